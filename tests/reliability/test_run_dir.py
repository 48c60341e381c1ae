"""A run directory is one run's: a second run on it is refused while the first holds it (a lock a kill -9 does not
leave stuck), a checkpoint from another directory never edits this one's history, and a failed fresh run leaves
nothing that confuses the next one."""

import os
import signal
import time

import pytest

from fastmim.config import dump_toml
from fastmim.errors import FastmimError
from fastmim.train import train
from fastmim.train.checkpoint_files import checkpoint_path, checkpoints
from fastmim.train.metrics import read_metrics
from fastmim.train.rundir import hold_run_dir
from tests.reliability._harness import Proc, config, pretrain_args, run


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with hold_run_dir(out):
        with pytest.raises(FastmimError, match=rf"{out} is in use by another run \(pid {os.getpid()} on .*, started "):
            train(config(out, "--train.steps=1"))
        assert not (out / "config.toml").exists()  # refused before reading or writing anything
    train(config(out, "--train.steps=1"))  # released: the directory is free again


def test_two_runs_started_together_then_the_holder_killed(tmp_path):
    """Two real processes on one directory at once: one trains, the other is refused in one line naming it. A
    kill -9 of the holder does not leave the directory locked: resume=auto continues the run."""
    out = tmp_path / "run"
    argv = pretrain_args(out, "--train.steps=100000", "--train.save_every=1")
    procs = [Proc(argv, tmp_path / f"log{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.process.is_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = next((p for p in procs if not p.process.is_alive()), None)
        assert refused is not None, "neither run was refused"
        holder = next(p for p in procs if p is not refused)
        assert refused.wait() == 2, refused.output()
        errors = [line for line in refused.output().splitlines() if line.startswith("fastmim: error:")]
        assert len(errors) == 1 and f"is in use by another run (pid {holder.pid} on " in errors[0], refused.output()
        while not checkpoints(out) and holder.process.is_alive():
            time.sleep(0.05)
        holder.signal(signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
    finally:
        for p in procs:
            p.process.kill()
    rows = [row["step"] for row in read_metrics(out / "metrics.jsonl")]
    assert rows == list(range(1, len(rows) + 1))  # one run's rows only
    code, output = run(pretrain_args(out, f"--train.steps={rows[-1] + 2}", "--train.resume=auto"), tmp_path / "log")
    assert code == 0 and "in use" not in output, output


def test_a_checkpoint_from_another_directory_never_edits_this_ones_history(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(config(a, "--train.steps=4"))
    train(config(b, "--train.steps=4", "--train.save_every=2", "--train.seed=1"))
    history = (a / "metrics.jsonl").read_bytes()
    foreign = f"--train.resume={checkpoint_path(b, 2)}"
    with pytest.raises(FastmimError, match=f"{a} already holds a run, and checkpoint .* is from another directory"):
        train(config(a, "--train.steps=4", foreign))
    assert (a / "metrics.jsonl").read_bytes() == history and [s for s, _ in checkpoints(a)] == [4]
    capsys.readouterr()
    summary = train(config(c, "--train.steps=4", foreign))  # a directory without a run: continued there
    assert f"continuing {checkpoint_path(b, 2)} (step 2) in {c}, a new run directory" in capsys.readouterr().out
    assert [row["step"] for row in read_metrics(c / "metrics.jsonl")] == [3, 4] and summary["steps_this_run"] == 2


def test_a_failed_fresh_run_leaves_no_stale_config(tmp_path):
    """A fresh run that failed after writing config.toml (every image unreadable) left it behind, and the next
    fresh run in that directory then recorded its config as config.resumed-0000000.toml and named that file in
    its resume command."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    with pytest.raises(FastmimError, match="unreadable"):
        train(config(out, "--train.steps=2", "--data.source=folder", f"--data.path={images}"))
    cfg = config(out, "--train.steps=2")
    summary = train(cfg)
    assert summary["config"] == str(out / "config.toml") and (out / "config.toml").read_text() == dump_toml(cfg)
    assert not list(out.glob("config.resumed-*"))
