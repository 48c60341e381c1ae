"""DeepSpeed ZeRO-3 across saves and resumes, and DeepSpeed in a group of one, through the real command line
(processes forked by tests/train/_launch.py, gloo on CPU).

- A ZeRO-3 run interrupted at step 2 and resumed with train.resume=auto to step 4, saving every step, crosses two
  saves after its resume (steps 3 and 4): it used to fail in the first backward after the first of them (DeepSpeed
  "tracing error ... parameter fetch queue"). ZeRO promises an exact continuation on the same number of processes
  and stage (the fp32 partitions, AdamW moments and step count are restored; fastmim restores the data position
  and the masks), so the resumed run must equal the uninterrupted one exactly: the same loss at every step, the
  same weights at every save and the same optimizer shards at the end, except the padding that rounds each
  parameter's partition up to a multiple of the number of processes (never trained, its content is whatever the
  partition's memory held).
- `fastmim pretrain --train.dist=deepspeed` without a launcher used to stop with DeepSpeed's LOCAL_RANK assertion;
  a group of one (ZeRO-3, parameters and optimizer offloaded to the CPU) trains like two processes with half the
  batch each.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import torch

from fastmim.train.checkpoint_files import load_checkpoint
from fastmim.train.metrics import read_metrics
from tests.train.test_distributed import ENV, FAST, HERE, RTOL, _optimizer_shards

STAGE3 = [*FAST, "--train.dist=deepspeed", "--train.zero_stage=3", "--train.save_every=1", "--train.keep_last=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[list[int]], str]:
    """Jobs, in order: ZeRO-3 on 2 processes for 4 steps; the same stopped at step 2, then resumed to step 4; ZeRO-3
    with offload=all in one process without a launcher, batch 8 (the 2 processes' global batch), 4 steps."""
    root = tmp_path_factory.mktemp("zero3")
    two = [*STAGE3, "--train.batch_size=4"]
    jobs = [
        {"argv": ["pretrain", *two, "--train.steps=4", f"--train.out_dir={root / 'whole'}"], "world": 2},
        {"argv": ["pretrain", *two, "--train.steps=2", f"--train.out_dir={root / 'cut'}"], "world": 2},
        {
            "argv": ["pretrain", *two, "--train.steps=4", "--train.resume=auto", f"--train.out_dir={root / 'cut'}"],
            "world": 2,
        },
        {
            "argv": [
                "pretrain",
                *STAGE3,
                "--train.batch_size=8",
                "--train.offload=all",
                "--train.steps=4",
                f"--train.out_dir={root / 'one'}",
            ],
            "world": 1,
            "launcher": False,
        },
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    launch = [sys.executable, str(HERE / "_launch.py"), str(root / "jobs.json")]
    # A session of its own, so that a timeout ends the ranks the launcher forked too.
    proc = subprocess.Popen(launch, env=ENV, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # the launcher and the ranks it forked
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, stderr[-4000:]
    return root, json.loads(lines[0].removeprefix("RESULTS ")), stderr


def test_resumed_zero3_run_crosses_its_saves_and_equals_the_uninterrupted_one(runs):
    root, codes, stderr = runs
    assert codes[:3] == [[0, 0]] * 3, stderr[-4000:]
    assert "tracing error" not in stderr
    whole, cut = root / "whole", root / "cut"
    losses = {out: {row["step"]: row["loss"] for row in read_metrics(out / "metrics.jsonl")} for out in (whole, cut)}
    assert sorted(losses[cut]) == [1, 2, 3, 4]
    assert losses[cut] == losses[whole]  # exact: same data, masks, partitions and moments
    for step in (3, 4):  # the saves after the resume: the full weights, as the uninterrupted run's
        ours, theirs = (load_checkpoint(out / f"checkpoint-000000{step}.pt") for out in (cut, whole))
        assert ours["step"] == step and ours.keys() == theirs.keys()
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    ours, theirs = (_optimizer_shards(out / "checkpoint-0000004.pt") for out in (cut, whole))
    assert ours.keys() == theirs.keys() and len(ours) >= 6
    padding = 0
    for key in theirs:
        if "/fp32_flat_groups/" not in key:
            assert torch.equal(ours[key], theirs[key]), key
            continue
        # The trained positions of a partition: AdamW's second moment is non-zero there after 4 steps.
        rank_file, group = key.split("/")[0], key.rsplit("/", 1)[1]
        trained = theirs[f"{rank_file}/optimizer_state_dict/optimizer_state_dict/state/{group}/exp_avg_sq"] != 0
        assert torch.equal(ours[key][trained], theirs[key][trained]), key
        padding += int((~trained).sum())
    assert padding < 100  # at most one element per parameter (2 processes)


def test_deepspeed_without_a_launcher_is_a_group_of_one(runs):
    root, codes, stderr = runs
    assert codes[3] == [0], stderr[-4000:]
    one = root / "one"
    pointer = load_checkpoint(one / "checkpoint-0000004.pt")["optimizer"]["zero"]
    assert (pointer["world_size"], pointer["zero_stage"]) == (1, 3)
    # One process with batch 8 reads the images and masks of 2 processes with batch 4 (float order differs).
    ours, theirs = (
        {row["step"]: row["loss"] for row in read_metrics(out / "metrics.jsonl")} for out in (one, root / "whole")
    )
    assert sorted(ours) == [1, 2, 3, 4]
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=RTOL), (step, ours, theirs)
