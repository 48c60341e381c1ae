"""A disk that fills up outside the checkpoint write: a metrics row, the resumed run's config, a ZeRO shard.

Each ends the run in one line naming the file and the fix, with status 2, after the final save it could still
attempt; metrics rows stay whole and the checkpoints written before stay intact, so the run continues once there
is room. The disks are real: a small tmpfs mounted for the test (the tests need root, as the development machine
gives), filled to the last page by a file the test writes.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmim.errors import FastmimError
from fastmim.train import metrics, train
from fastmim.train.checkpoint_files import checkpoint_path, checkpoints, verify_checkpoint
from fastmim.train.metrics import read_metrics
from tests.reliability._harness import STEPS, Proc, RunResult, _equal, config, pretrain_args, run

REPO = Path(__file__).parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 16 MiB at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Write a file into ``disk`` until it is full (ENOSPC); returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        with pytest.raises(OSError) as info:
            for _ in range(1 << 20):
                f.write(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC
    return filler


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _whole_rows(path: Path) -> list[int]:
    """The steps of a metrics file whose every line is a whole row (a torn one fails here)."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_metrics_then_config_on_a_full_disk_are_one_line_and_nothing_is_lost(tmp_path, small_disk):
    """The run stops itself (SIGSTOP) right after its checkpoint at step 32 lands; the test fills the disk and lets
    it go on. Rows 33... fit into the metrics file's last page until one crosses into a page there is no room for:
    before, a traceback (status 1) and that row torn in half; now one line, status 2, the row cut back, the final
    save attempted (it does not fit either). Resuming on the still-full disk cannot write its config: one line,
    status 2. With room again the resume finishes, every step logged once."""
    out = small_disk / "run"
    args = pretrain_args(out, "--train.steps=96", "--train.save_every=32", "--train.keep_last=0")
    proc = Proc(args, tmp_path / "log1", crash=("after-rename", 1, (signal.SIGSTOP,)))
    try:
        deadline = time.monotonic() + 120
        while not _stopped(proc.pid):
            assert proc.process.is_alive() and time.monotonic() < deadline, proc.output()
            time.sleep(0.05)
        filler = fill(small_disk)
        proc.signal(signal.SIGCONT)
        code, output = proc.wait(), proc.output()
    finally:
        proc.process.kill()  # a stopped run left behind would keep the test session from ending
    assert code == 2, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith(f"fastmim: error: could not write {out / 'metrics.jsonl'} (No space left on device)")
    assert (
        ", nor the checkpoint of step" in errors[0]
        and "the previous checkpoints are intact: free disk space" in (errors[0])
    )
    steps = _whole_rows(out / "metrics.jsonl")
    assert steps == list(range(1, len(steps) + 1)) and 32 <= len(steps) < 96
    assert [step for step, _ in checkpoints(out)] == [32] and verify_checkpoint(checkpoint_path(out, 32))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    code, output = run([*args, "--train.resume=auto"], tmp_path / "log2")
    assert code == 2, output
    config = out / "config.resumed-0000032.toml"
    assert f"fastmim: error: could not write the run's config {config} (No space left on device)" in output
    assert "Traceback" not in output and not config.exists() and _whole_rows(out / "metrics.jsonl") == steps

    filler.unlink()
    code, output = run([*args, "--train.resume=auto"], tmp_path / "log3")
    assert code == 0, output
    assert _whole_rows(out / "metrics.jsonl") == list(range(1, 97))
    assert [step for step, _ in checkpoints(out)] == [32, 64, 96]


def test_a_metrics_row_that_fails_where_a_checkpoint_fits_saves_it(tmp_path, reference_constant_lr, monkeypatch):
    """A row that cannot be written (an I/O error on that file alone): the step is saved all the same, the error
    names the row's file and the checkpoint saved, and the run resumed from it is exact (that one row is missing:
    its step is not trained again)."""
    out = tmp_path / "run"
    append, calls = metrics._append_whole, []

    def failing(path, line):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        append(path, line)

    monkeypatch.setattr(metrics, "_append_whole", failing)
    with pytest.raises(FastmimError) as info:
        train(config(out, f"--train.steps={STEPS}", "--train.save_every=0"))
    monkeypatch.undo()
    saved = checkpoint_path(out, 3)
    assert str(info.value) == (
        f"could not write {out / 'metrics.jsonl'} (Input/output error); saved step 3 in {saved}: fix the file system "
        "and continue with --train.resume=auto."
    )
    assert verify_checkpoint(saved)["step"] == 3 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    train(config(out, f"--train.steps={STEPS}", "--train.resume=auto"))
    got, ref = RunResult(out), reference_constant_lr  # the same run, less the one row that could not be written
    assert got.rows == [row for row in ref.rows if row[0] != 3] and got.step == ref.step
    assert _equal(got.model, ref.model) and _equal(got.optimizer, ref.optimizer)


def test_a_zero_shard_write_on_a_full_disk_is_one_line_on_two_ranks(tmp_path):
    """`--train.dist=deepspeed --train.zero_stage=2` on 2 processes (DeepSpeed on CPU) on a tmpfs that holds the
    first save (111 MB: the tiny recipe's weights and its two ranks' AdamW shards) and half of the second: before,
    a traceback per rank ("unexpected pos", "iostream error") and status 1; now one line from rank 0, status 2 on
    both ranks, no staging directory left, the first checkpoint and its shards intact."""
    pytest.importorskip("deepspeed")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=170m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        argv = ["pretrain", "--model.img_size=32", "--model.decoder_dim=32", "--data.num_images=32"]
        argv += ["--train.precision=fp32", "--train.device=cpu", "--train.log_every=1", "--train.dist_timeout=60"]
        argv += ["--train.batch_size=4", "--train.dist=deepspeed", "--train.zero_stage=2", "--train.steps=4"]
        argv += ["--train.save_every=2", "--train.keep_last=0", f"--train.out_dir={out}"]
        (tmp_path / "jobs.json").write_text(json.dumps([{"argv": argv, "world": 2}]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        launch = [sys.executable, str(REPO / "tests" / "train" / "_launch.py"), str(tmp_path / "jobs.json")]
        result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=400)
        output = result.stdout + result.stderr
        assert "RESULTS [[2, 2]]" in result.stdout, output[-4000:]
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        shards = out / "checkpoint-0000004.zero"
        assert len(errors) == 1 and "Traceback" not in output, output[-4000:]
        assert errors[0] == (
            f"fastmim: error: rank 0: could not write the ZeRO shards of checkpoint {shards} (No space left on "
            "device); the previous checkpoints are intact: free disk space and continue with --train.resume=auto."
        )
        assert [step for step, _ in checkpoints(out)] == [2] and verify_checkpoint(checkpoint_path(out, 2))
        assert sorted(p.name for p in out.iterdir() if "zero" in p.name) == ["checkpoint-0000002.zero"]
        assert sorted(p.name for p in (out / "checkpoint-0000002.zero").iterdir()) == [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    finally:
        shutil.rmtree(disk / "run", ignore_errors=True)
        subprocess.run(["umount", "-l", str(disk)], check=True)
