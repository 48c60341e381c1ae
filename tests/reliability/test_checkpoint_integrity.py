"""Checkpoints on disk, damaged for real: truncated, bit-flipped, without a record, a disk that fills up mid-save;
rotation keeps the newest N and the best."""

import errno
import json
import signal

import pytest
import torch

from fastmim.errors import FastmimError
from fastmim.train import checkpoint_files, train
from fastmim.train.checkpoint_files import (
    best_checkpoint,
    checkpoint_path,
    checkpoints,
    load_checkpoint,
    prune,
    read_record,
    record_path,
    verify_checkpoint,
    write_checkpoint,
)
from tests.reliability._harness import STEPS, assert_same_run, config, pretrain_args, run

SAVING = ["--train.save_every=2", "--train.keep_last=0"]


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # one flipped bit in the middle of the tensor data: torch.load would read it without complaint
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_constant_lr, how, capsys):
    out = tmp_path / "run"
    train(config(out, "--train.steps=6", *SAVING))  # checkpoints 2, 4, 6
    damaged = _damage(checkpoint_path(out, 6), how)
    with pytest.raises(FastmimError, match="checkpoint-0000006.pt is (truncated|corrupt)"):
        load_checkpoint(checkpoint_path(out, 6))
    capsys.readouterr()
    summary = train(config(out, f"--train.steps={STEPS}", *SAVING, "--train.resume=auto"))
    err = capsys.readouterr().err
    assert "checkpoint-0000006.pt" in err and "falling back to the previous checkpoint" in err
    assert summary["steps_this_run"] == STEPS - 4  # resumed from step 4
    assert (out / "checkpoint-0000006.pt.corrupt").read_bytes() == damaged  # moved aside, never deleted
    assert_same_run(out, reference_constant_lr)


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(tmp_path):
    out = tmp_path / "run"
    train(config(out, "--train.steps=4", *SAVING))
    for _, path in checkpoints(out):
        _damage(path, "truncate")
    with pytest.raises(FastmimError, match="no checkpoint in .* is intact"):
        train(config(out, f"--train.steps={STEPS}", "--train.resume=auto"))


def test_explicit_damaged_checkpoint_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "run"
    train(config(out, "--train.steps=2"))
    _damage(checkpoint_path(out, 2), "flip")
    with pytest.raises(FastmimError, match="is corrupt .* train.resume=auto to take the newest intact one"):
        train(config(tmp_path / "other", f"--train.resume={checkpoint_path(out, 2)}"))


def test_checkpoint_without_record_still_resumes_with_a_warning(tmp_path, reference_constant_lr, capsys):
    out = tmp_path / "run"
    train(config(out, "--train.steps=4", *SAVING))
    record_path(checkpoint_path(out, 4)).unlink()  # e.g. copied without its .json, or from an older fastmim
    capsys.readouterr()
    train(config(out, f"--train.steps={STEPS}", *SAVING, "--train.resume=auto"))
    assert "its integrity cannot be verified" in capsys.readouterr().err
    assert_same_run(out, reference_constant_lr)


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: None, 6: 6.0}  # step 2 has the lowest loss; 5 recorded none
    for step, loss in losses.items():
        write_checkpoint({"step": step, "x": torch.full((3,), float(step))}, checkpoint_path(tmp_path, step), loss)
    assert best_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)
    deleted = prune(tmp_path, keep_last=2, current_step=6)
    assert [p.name for p in deleted] == ["checkpoint-0000001.pt", "checkpoint-0000003.pt", "checkpoint-0000004.pt"]
    assert [step for step, _ in checkpoints(tmp_path)] == [2, 5, 6]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"checkpoint-000000{s}.pt.json" for s in (2, 5, 6)]
    assert prune(tmp_path, keep_last=0, current_step=6) == []  # 0 keeps everything


def test_training_rotates_checkpoints_and_records_losses(tmp_path):
    out = tmp_path / "run"
    summary = train(config(out, "--train.steps=5", "--train.save_every=1", "--train.keep_last=2"))
    kept = [step for step, _ in checkpoints(out)]
    best = best_checkpoint(out)
    assert kept[-2:] == [4, 5] and len(kept) <= 3 and summary["best_checkpoint"] == str(best)
    for _, path in checkpoints(out):
        record = verify_checkpoint(path)
        assert record["loss"] > 0 and record["step"] == load_checkpoint(path)["step"]
    assert min(read_record(p)["loss"] for _, p in checkpoints(out)) == read_record(best)["loss"]


class _FillingDisk:
    """A checkpoint file on a disk that fills up: writes past ``room`` bytes fail with ENOSPC, as write() does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_disk_full_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path, reference_constant_lr, monkeypatch):
    """The second checkpoint's file runs out of space 64 KiB in."""
    out = tmp_path / "run"
    init, saves = checkpoint_files._HashingWriter.__init__, []

    def on_filling_disk(self, f):
        saves.append(f)
        init(self, _FillingDisk(f, 64 << 10) if len(saves) == 2 else f)

    monkeypatch.setattr(checkpoint_files._HashingWriter, "__init__", on_filling_disk)
    with pytest.raises(FastmimError, match=r"No space left on device.*previous checkpoints are intact: free disk"):
        train(config(out, f"--train.steps={STEPS}", *SAVING))
    monkeypatch.undo()
    assert [step for step, _ in checkpoints(out)] == [2]
    assert verify_checkpoint(checkpoint_path(out, 2))["step"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the partial file is gone
    train(config(out, f"--train.steps={STEPS}", *SAVING, "--train.resume=auto"))
    assert_same_run(out, reference_constant_lr)


def test_file_size_limit_hit_by_a_real_process(tmp_path, reference):
    """A real process whose writes the kernel cuts off (RLIMIT_FSIZE: EFBIG past 256 KiB) at its first checkpoint
    after resuming: it exits 2 with the fix; the checkpoint it resumed from is intact; an unrestricted resume is
    exact."""
    out = tmp_path / "run"
    args = pretrain_args(out, f"--train.steps={STEPS}", *SAVING)
    code, output = run(args, tmp_path / "log1", crash=("after-rename", 1))  # dies right after checkpoint 2 lands
    assert code == -signal.SIGKILL, output
    code, output = run([*args, "--train.resume=auto"], tmp_path / "log2", fsize_limit=256 << 10)
    assert code == 2, output
    assert "could not write checkpoint" in output and "File too large" in output and "Traceback" not in output
    assert [step for step, _ in checkpoints(out)] == [2] and verify_checkpoint(checkpoint_path(out, 2))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    code, output = run([*args, "--train.resume=auto"], tmp_path / "log3")
    assert code == 0, output
    assert_same_run(out, reference)
    assert json.loads(record_path(checkpoint_path(out, STEPS)).read_text())["step"] == STEPS
