"""Several processes on CPU over gloo, through the real command line: torchrun DDP, DeepSpeed ZeRO 1 / 2 / 3, their
checkpoints across world sizes, and a rank that fails.

The reference for every multi-process run is one process with the global batch: 2 ranks x batch 4 read the same
images and masks per step as 1 process x batch 8 (fastmim.train.distributed), so with a constant lr their losses
and weights agree up to float summation order.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.train.checkpoint_files import load_checkpoint, read_record, write_checkpoint
from fastmim.train.distributed import deepspeed_config, resolve_mode
from fastmim.train.metrics import read_metrics
from fastmim.train.trainer import train
from fastmim.train.zero import consolidate

HERE = Path(__file__).parent
FAST = [
    "--model.img_size=32",
    "--model.decoder_dim=32",
    "--data.num_images=32",
    "--train.precision=fp32",
    "--train.device=cpu",
    "--train.log_every=1",
    "--train.lr=1e-3",
    "--train.min_lr=1e-3",
    "--train.warmup_steps=0",
    "--train.dist_timeout=60",
]
TWO_RANKS = [*FAST, "--train.batch_size=4"]  # per process: global batch 8
ONE_RANK = [*FAST, "--train.batch_size=8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
# Float summation order differs (two partial batches, a gradient all-reduce): a few ulps per step, grown by Adam.
RTOL = 1e-4
# Weights: Adam moves a parameter whose gradient is ~0 (the attention key bias: softmax ignores it) by up to lr per
# step on float noise alone, so single entries may differ by ~1e-4; over all weights, the runs must differ by under
# 1 % of how far two steps move them (measured: 0.03 % for DDP, 0.02 % for ZeRO-3, 0 for ZeRO 1 and 2).
WEIGHT_RTOL = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    return subprocess.run([*cmd, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _losses(out_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(out_dir / "metrics.jsonl")}


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=RTOL), (step, a, b)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point()) ** 0.5


def _weights_agree(a: Path, b: Path, one_process: Path) -> None:
    """Checkpoints a and b hold the same weights, up to WEIGHT_RTOL of the reference's movement over steps 3-4."""
    step2, step4 = (load_checkpoint(one_process / f"checkpoint-000000{n}.pt")["model"] for n in (2, 4))
    distance = _distance(load_checkpoint(a)["model"], load_checkpoint(b)["model"])
    assert distance < WEIGHT_RTOL * _distance(step2, step4), distance


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, batch 8, 4 steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(load_config(None, [*ONE_RANK, "--train.steps=4", "--train.save_every=2", f"--train.out_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`torchrun --nproc_per_node 2 -m fastmim pretrain`: DDP (train.dist = auto), batch 4 per rank, 4 steps."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _torchrun(
        "-m", "fastmim", "pretrain", *TWO_RANKS, "--train.steps=4", "--train.save_every=2", f"--train.out_dir={out}"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """ZeRO 1, 2, 3 on 2 processes (3 steps, saving at 2 and 3), then ZeRO-2 resumed from step 2 to step 4; ZeRO 2
    and 3 with rank 1's loss NaN at step 3 (4 steps, saving each); then one byte of a shard of the ZeRO-2 run's
    step-4 checkpoint flipped and that run continued to step 5 with train.resume=auto; then a DeepSpeed resume (its
    own world size and stage) of an attacker's copy of the ZeRO-2 run's step-3 checkpoint, whose model-states shard
    holds a payload that would create ``pwned`` (stderr in stderr.txt)."""
    root = tmp_path_factory.mktemp("zero")
    base = ["pretrain", *TWO_RANKS, "--train.dist=deepspeed"]
    jobs = [
        {
            "argv": [
                *base,
                f"--train.zero_stage={z}",
                "--train.steps=3",
                "--train.save_every=2",
                f"--train.out_dir={root / f'z{z}'}",
            ],
            "world": 2,
        }
        for z in (1, 2, 3)
    ]
    resume = f"--train.resume={root / 'z2' / 'checkpoint-0000002.pt'}"
    jobs.append(
        {
            "argv": [*base, "--train.zero_stage=2", "--train.steps=4", resume, f"--train.out_dir={root / 'z2r'}"],
            "world": 2,
        }
    )
    each = [*base, "--train.save_every=1", "--train.keep_last=0"]
    jobs += [
        {
            "argv": [*each, f"--train.zero_stage={z}", "--train.steps=4", f"--train.out_dir={root / f'nan{z}'}"],
            "world": 2,
            "poison": {"rank": 1, "step": 3},
        }
        for z in (2, 3)
    ]
    jobs.append(
        {
            "argv": [
                *each,
                "--train.zero_stage=2",
                "--train.steps=5",
                "--train.resume=auto",
                f"--train.out_dir={root / 'nan2'}",
            ],
            "world": 2,
            "flip": str(root / "nan2" / "checkpoint-0000004.zero" / "*optim_states.pt"),
        }
    )
    plant = {
        "src": str(root / "z2" / "checkpoint-0000003.pt"),
        "dst": str(root / "hostile"),
        "marker": str(root / "pwned"),
    }
    hostile = [f"--train.resume={root / 'hostile' / 'checkpoint-0000003.pt'}", f"--train.out_dir={root / 'h_run'}"]
    jobs.append({"argv": [*base, "--train.zero_stage=2", "--train.steps=4", *hostile], "world": 2, "plant": plant})
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run(
        [sys.executable, str(HERE / "_launch.py"), str(root / "jobs.json")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=400,
    )
    (root / "stderr.txt").write_text(result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stderr[-4000:]
    return root, json.loads(lines[0].removeprefix("RESULTS "))


def test_ddp_trains_and_only_rank_0_reports(ddp):
    out, result = ddp
    assert result.stdout.count("resolved config:") == 1 and result.stdout.count("done: ") == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # The record's loss (which picks the best checkpoint) is the global batch's, as logged: both ranks' batches.
    assert read_record(out / "checkpoint-0000002.pt")["loss"] == pytest.approx((rows[0]["loss"] + rows[1]["loss"]) / 2)
    progress = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert progress == ["1/4", "2/4", "3/4", "4/4"]  # one progress line per step: rank 0's
    ckpt = load_checkpoint(out / "checkpoint-0000004.pt")
    assert ckpt["world_size"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
    assert (out / "checkpoint-0000002.pt").exists() and (out / "loss.png").exists()


def test_ddp_two_ranks_follow_one_process_with_twice_the_batch(ddp, one_process):
    out, _ = ddp
    _close(_losses(out), _losses(one_process), [1, 2, 3, 4])
    _weights_agree(out / "checkpoint-0000004.pt", one_process / "checkpoint-0000004.pt", one_process)


def test_ddp_checkpoint_of_two_ranks_resumes_on_one(ddp, one_process, tmp_path):
    out, _ = ddp
    resumed = train(
        load_config(
            None,
            [
                *ONE_RANK,
                "--train.steps=4",
                f"--train.resume={out / 'checkpoint-0000002.pt'}",
                f"--train.out_dir={tmp_path / 'r'}",
            ],
        )
    )
    assert resumed["steps_this_run"] == 2
    _close(_losses(tmp_path / "r"), _losses(one_process), [3, 4])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_like_ddp(zero, ddp, one_process, stage):
    root, codes = zero
    assert codes[stage - 1] == [0, 0]
    out = root / f"z{stage}"
    _close(_losses(out), _losses(ddp[0]), [1, 2, 3])
    ckpt = load_checkpoint(out / "checkpoint-0000003.pt")
    pointer = dict(ckpt["optimizer"]["zero"])
    files = pointer.pop("files")
    assert pointer == {"dir": "checkpoint-0000003.zero", "world_size": 2, "zero_stage": stage}
    assert (out / "checkpoint-0000003.zero").is_dir() and not list(out.glob(".*.tmp"))
    # The record's manifest names every shard file, with its size (and SHA-256, checked on resume).
    written = {p.name: p.stat().st_size for p in (out / "checkpoint-0000003.zero").iterdir()}
    assert {f["name"]: f["size"] for f in files} == written and all(len(f["sha256"]) == 64 for f in files)
    assert len(written) >= 3  # model states and one optimizer partition per rank
    # The record holds the full weights, gathered under ZeRO-3 too.
    _weights_agree(out / "checkpoint-0000002.pt", ddp[0] / "checkpoint-0000002.pt", one_process)


def test_zero_resumes_on_the_same_world_size(zero, ddp):
    root, codes = zero
    assert codes[3] == [0, 0]
    _close(_losses(root / "z2r"), _losses(ddp[0]), [3, 4])


def _tensors(x, prefix=""):
    """(name, tensor) of every tensor in a nested DeepSpeed shard file."""
    if isinstance(x, torch.Tensor):
        yield prefix, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}/{i}")


def _optimizer_shards(ckpt: Path) -> dict[str, torch.Tensor]:
    shards = sorted(ckpt.with_suffix(".zero").glob("*optim_states.pt"))
    assert len(shards) == 2
    loaded = {f.name: torch.load(f, map_location="cpu", weights_only=False) for f in shards}  # DeepSpeed's pickles
    return {f"{name}{k}": v for name, state in loaded.items() for k, v in _tensors(state)}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_skips_a_nonfinite_step_and_goes_on(zero, stage):
    """Rank 1's loss is NaN at step 3 (rank 0's is finite): DeepSpeed's ZeRO optimizer sees the non-finite global
    gradient norm and skips the step on both ranks; fastmim counts it; step 4 trains again."""
    root, codes = zero
    assert codes[4 + stage - 2] == [0, 0]
    out = root / f"nan{stage}"
    rows = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert [rows[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert rows[3]["nonfinite"] == {"gradient": 1}  # rank 0's view: its own loss was finite
    warning = "step 3: skipped 1 step(s) since the last log (non-finite: gradient x1)"
    assert (root / "stderr.txt").read_text().count(warning) == 2  # once per poisoned run: rank 0 speaks
    assert all(math.isfinite(rows[s]["loss"]) for s in (1, 2, 4)) and not math.isfinite(rows[3]["loss"])
    ckpts = {n: out / f"checkpoint-000000{n}.pt" for n in (2, 3)}
    weights = {n: load_checkpoint(p)["model"] for n, p in ckpts.items()}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # the skipped step moved nothing
    moments = {n: _optimizer_shards(p) for n, p in ckpts.items()}  # fp32 partitions, AdamW moments, step count
    assert moments[2].keys() == moments[3].keys() and len(moments[2]) >= 6
    assert all(torch.equal(moments[2][k], moments[3][k]) for k in moments[2])
    if stage == 3:  # (the ZeRO-2 run's step 4 is re-trained by the resume test below)
        after = _optimizer_shards(out / "checkpoint-0000004.pt")
        assert all(not torch.equal(after[k], moments[3][k]) for k in after if after[k].is_floating_point())
        weights4 = load_checkpoint(out / "checkpoint-0000004.pt")
        assert weights4["skipped_steps"] == 1 and _distance(weights4["model"], weights[3]) > 0


def test_zero_resume_auto_falls_back_past_damaged_shards(zero, one_process):
    """One byte of a shard of checkpoint 4 flipped: resume=auto moves checkpoint 4 (file, record, shards) aside and
    continues from checkpoint 3, re-training step 4 to the same weights."""
    root, codes = zero
    assert codes[6] == [0, 0]
    out = root / "nan2"
    assert (
        "checkpoint-0000004.zero/zero_pp_rank_0_mp_rank_00_optim_states.pt of checkpoint"
        in (root / "stderr.txt").read_text()
    )
    assert (out / "checkpoint-0000004.pt.corrupt").is_file() and (out / "checkpoint-0000004.zero.corrupt").is_dir()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    first = torch.load(out / "checkpoint-0000004.pt.corrupt", map_location="cpu", weights_only=True)
    again = load_checkpoint(out / "checkpoint-0000004.pt")
    step2, step4 = (load_checkpoint(one_process / f"checkpoint-000000{n}.pt")["model"] for n in (2, 4))
    assert _distance(first["model"], again["model"]) < WEIGHT_RTOL * _distance(step2, step4)
    assert load_checkpoint(out / "checkpoint-0000005.pt")["skipped_steps"] == 1


def test_damaged_or_missing_shards_are_refused(zero, tmp_path):
    """An explicit resume or a consolidation of a checkpoint whose shards are damaged or missing is refused."""
    root, _ = zero
    for name in ("checkpoint-0000003.pt", "checkpoint-0000003.pt.json"):
        shutil.copy(root / "z3" / name, tmp_path / name)
    shutil.copytree(root / "z3" / "checkpoint-0000003.zero", tmp_path / "checkpoint-0000003.zero")
    src, shards = tmp_path / "checkpoint-0000003.pt", sorted((tmp_path / "checkpoint-0000003.zero").iterdir())
    data = bytearray(shards[-1].read_bytes())
    data[len(data) // 2] ^= 1
    shards[-1].write_bytes(data)
    resume = [*ONE_RANK, "--train.steps=4", f"--train.resume={src}", f"--train.out_dir={tmp_path / 'r'}"]
    with pytest.raises(FastmimError, match=rf"ZeRO shard .*{shards[-1].name} .* altered .*; give another checkpoint"):
        train(load_config(None, resume))
    with pytest.raises(FastmimError, match=r"altered .*; consolidate an intact checkpoint"):
        consolidate(src, tmp_path / "plain.pt")
    shards[0].unlink()
    with pytest.raises(FastmimError, match=rf"ZeRO shard .*{shards[0].name} of checkpoint .* is missing; give"):
        train(load_config(None, resume))
    assert not (tmp_path / "plain.pt").exists() and src.exists()  # nothing written, nothing moved


def test_code_in_a_zero_shard_is_refused_and_never_run(zero, tmp_path):
    """A payload pickled into a shard, the manifest and record recomputed to match (so no checksum stops it): a
    DeepSpeed resume (2 processes, ZeRO-2, as the checkpoint was written), resume=auto and consolidate refuse it in
    one line; the payload never runs and the checkpoint is not moved aside as if it were merely damaged."""
    root, codes = zero
    assert codes[7] == [2, 2]
    message = "mp_rank_00_model_states.pt of checkpoint .* holds pickled Python objects.*never executes code"
    stderr = (root / "stderr.txt").read_text()
    assert len(re.findall(f"fastmim: error: rank 0: the ZeRO shard .*{message}", stderr)) == 1
    with pytest.raises(FastmimError, match=message):
        consolidate(root / "hostile" / "checkpoint-0000003.pt", tmp_path / "plain.pt")
    shutil.copytree(root / "hostile", tmp_path / "run")
    auto = [*ONE_RANK, "--train.steps=4", "--train.resume=auto", f"--train.out_dir={tmp_path / 'run'}"]
    with pytest.raises(FastmimError, match=message):
        train(load_config(None, auto))
    assert not (root / "pwned").exists()
    assert (tmp_path / "run" / "checkpoint-0000003.pt").is_file() and not (tmp_path / "plain.pt").exists()


def test_a_malformed_zero_pointer_is_refused_in_one_line(one_process, tmp_path):
    ckpt = load_checkpoint(one_process / "checkpoint-0000002.pt")
    for name, pointer in [
        ("nodir", {"world_size": 2, "zero_stage": 2}),
        ("escape", {"dir": "../..", "world_size": 2, "zero_stage": 2, "files": []}),
        ("files", {"dir": "x.zero", "world_size": 2, "zero_stage": 2, "files": [{"name": "/etc"}]}),
        ("type", [1, 2]),
    ]:
        src = tmp_path / f"{name}.pt"
        write_checkpoint({**ckpt, "optimizer": {"zero": pointer}}, src)
        resume = [*ONE_RANK, "--train.steps=4", f"--train.resume={src}", f"--train.out_dir={tmp_path / name}"]
        with pytest.raises(FastmimError, match="has a malformed ZeRO shard pointer"):
            train(load_config(None, resume))
        with pytest.raises(FastmimError, match="has a malformed ZeRO shard pointer"):
            consolidate(src, tmp_path / f"{name}-out.pt")


def test_zero_checkpoint_is_refused_elsewhere_and_consolidates(zero, tmp_path):
    root, _ = zero
    src = root / "z3" / "checkpoint-0000003.pt"
    with pytest.raises(FastmimError, match=r"ZeRO-3 shards of 2 process.*fastmim consolidate"):
        train(load_config(None, [*ONE_RANK, "--train.steps=4", f"--train.resume={src}", f"--train.out_dir={tmp_path}"]))
    summary = consolidate(src, tmp_path / "plain.pt")
    assert (summary["step"], summary["zero_stage"], summary["world_size"]) == (3, 3, 2)
    plain, record = load_checkpoint(tmp_path / "plain.pt"), load_checkpoint(src)
    assert all(torch.equal(plain["model"][k], record["model"][k]) for k in record["model"])
    assert plain["optimizer"]["state"] == {} and plain["step"] == 3
    resumed = train(
        load_config(
            None,
            [
                *ONE_RANK,
                "--train.steps=4",
                f"--train.resume={tmp_path / 'plain.pt'}",
                f"--train.out_dir={tmp_path / 'r'}",
            ],
        )
    )
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 1


def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises at its second step while rank 0 waits for it in an all-reduce: torchrun must end the job
    with a non-zero status, rank 0 with one line that points at the other rank's error."""
    start = time.monotonic()
    result = _torchrun(
        str(HERE / "_failing_rank.py"),
        "pretrain",
        *TWO_RANKS,
        "--train.steps=3",
        f"--train.out_dir={tmp_path / 'run'}",
        timeout=180,
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    assert "injected failure on rank 1" in result.stderr
    assert "fastmim: error: rank 0: lost contact with another process" in result.stderr


def test_dist_modes_and_deepspeed_config():
    assert resolve_mode("auto", 1) == "none" and resolve_mode("auto", 4) == "ddp"
    with pytest.raises(FastmimError, match="launcher started 2 processes"):
        resolve_mode("none", 2)
    cfg = load_config(
        None,
        [
            "--train.dist=deepspeed",
            "--train.zero_stage=3",
            "--train.offload=all",
            "--train.batch_size=16",
            "--train.accum_steps=4",
            "--train.clip_grad=1.0",
        ],
    )
    ds = deepspeed_config(cfg.train, world=8)
    assert ds["train_batch_size"] == 16 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    for bad, message in [
        (["--train.dist=deepspeed"], "needs train.zero_stage 1, 2 or 3"),
        (["--train.zero_stage=2"], "needs train.dist = 'deepspeed'"),
        (["--train.offload=optimizer"], "train.offload needs"),
        (["--train.dist=deepspeed", "--train.zero_stage=2", "--train.offload=all"], "needs train.zero_stage=3"),
        (
            ["--train.dist=deepspeed", "--train.zero_stage=1", "--train.precision=fp16"],
            "needs train.precision=bf16 or fp32",
        ),
    ]:
        with pytest.raises(FastmimError, match=message):
            load_config(None, bad)
