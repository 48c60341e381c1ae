"""The checkpointer alone: its save schedule, and a load that restores every part of a run (the reliability tests
exercise it through whole runs: signals, kill -9, damaged files)."""

import itertools

import pytest
import torch

from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.train.build import build_run
from fastmim.train.checkpoint import checkpoints, load_checkpoint
from fastmim.train.checkpointer import Checkpointer, FullState
from fastmim.train.trainer import train_step

FAST = [
    "--model.img_size=32",
    "--model.decoder_dim=32",
    "--data.num_images=16",
    "--train.batch_size=8",
    "--train.precision=fp32",
    "--train.device=cpu",
    "--train.steps=4",
]


def _run(out_dir, *extra):
    run = build_run(load_config(None, [*FAST, f"--train.out_dir={out_dir}", *extra]))
    out_dir.mkdir(exist_ok=True)
    return run, Checkpointer(run, FullState(run.dist))


def _train(run, steps):
    batches = itertools.repeat(next(run.loader.iterate(0))[0])
    for _ in range(steps):
        run.stats.update(*train_step(run, batches))


def test_save_follows_the_schedule_and_saves_the_last_step_once(tmp_path):
    run, checkpointer = _run(tmp_path / "run", "--train.save_every=2", "--train.keep_last=0")
    saved = []
    for step in (1, 2, 3):
        _train(run, 1)
        saved.append(checkpointer.save(step))
    assert [p.name if p else None for p in saved] == [None, "checkpoint-0000002.pt", None]
    assert checkpointer.save(3, last=True).name == "checkpoint-0000003.pt"
    assert checkpointer.save(3, last=True) is None  # saved already
    assert [step for step, _ in checkpoints(tmp_path / "run")] == [2, 3]
    assert checkpointer.last == (3, tmp_path / "run" / "checkpoint-0000003.pt")


def test_load_restores_model_optimizer_position_and_counts(tmp_path):
    run, checkpointer = _run(tmp_path / "run")
    _train(run, 2)
    run.stats.skipped_before = 5  # as if an earlier part of the run had skipped five steps
    path = checkpointer.save(2, last=True)
    assert load_checkpoint(path)["skipped_steps"] == 5
    again, loader = _run(tmp_path / "run", "--train.resume=auto")
    assert loader.load() == path and loader.last == (2, path)
    assert again.pos.step == 2 and again.stats.skipped_before == 5
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), again.model.state_dict().values()))
    assert again.optimizer.state_dict()["state"].keys() == run.optimizer.state_dict()["state"].keys()
    assert loader.save(2, last=True) is None  # the step it resumed from is saved already
    _, refused = _run(tmp_path / "run")
    with pytest.raises(FastmimError, match="already holds a run"):
        refused.load()
