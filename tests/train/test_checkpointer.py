"""The checkpointer alone: its save schedule, and a load that restores every part of a run (the reliability tests
exercise it through whole runs: signals, kill -9, damaged files)."""

import itertools
import shutil

import pytest
import torch

from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.train.build import build_run
from fastmim.train.checkpoint_files import checkpoints, load_checkpoint, write_checkpoint
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


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory with the checkpoint of step 2 (copied by each test that resumes it)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    run, checkpointer = _run(out)
    _train(run, 2)
    checkpointer.save(2, last=True)
    return out


def _resume_warnings(saved_run, tmp_path, capsys, *changes) -> tuple[list[str], object]:
    """The warnings about the saved checkpoint that a run resumed with ``changes`` prints, and that run."""
    shutil.copytree(saved_run, tmp_path / "run")
    capsys.readouterr()
    again, loader = _run(tmp_path / "run", "--train.resume=auto", *changes)
    loader.load()
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("fastmim: warning: checkpoint")], again


@pytest.mark.parametrize(
    "change, named",
    [
        ("--train.accum_steps=2", ["train.accum_steps 1 -> 2 micro-batches per step", "global batch 8 -> 16 images"]),
        ("--train.batch_size=4", ["8 -> 4 images per micro-step", "global batch 8 -> 4", "the lr schedule"]),
        ("--train.seed=1", ["train.seed 0 -> 1 (another data order, augmentation and masks"]),
        ("--data.source=synthetic", ["data.source 'demo' -> 'synthetic' (other images)"]),
        ("--data.min_scale=0.5", ["data.min_scale 0.2 -> 0.5"]),
        ("--train.steps=8", ["the lr schedule (train.steps 4 -> 8): 4 steps", "-> 8 steps", "step 3 runs at lr"]),
        ("--train.lr=1e-3", ["the lr schedule (train.lr 0.0 -> 0.001)", "peak 0.001"]),
        ("--train.weight_decay=0.1", ["train.weight_decay 0.05 -> 0.1 (AdamW updates differ)"]),
        ("--train.precision=bf16", ["train.precision 'fp32' -> 'bf16'"]),
    ],
)
def test_a_resume_with_other_settings_names_each_in_one_warning(saved_run, tmp_path, capsys, change, named):
    """accum_steps, seed and data.source used to resume silently (only batch_size x processes was compared)."""
    warnings, _ = _resume_warnings(saved_run, tmp_path, capsys, change)
    assert len(warnings) == 1 and all(text in warnings[0] for text in named), warnings
    assert warnings[0].endswith("(resume with the checkpoint's values to continue exactly).")


def test_a_resume_that_computes_the_same_says_nothing(saved_run, tmp_path, capsys):
    """Where it runs, what it logs and saves, and keys that resolve to the same schedule change nothing."""
    neutral = ["--train.log_every=3", "--train.keep_last=1", "--data.stall_warn_s=5", "--train.epochs=7"]
    warnings, _ = _resume_warnings(saved_run, tmp_path, capsys, *neutral)
    assert warnings == []


def test_a_resume_trains_with_the_configs_adamw_settings(saved_run, tmp_path, capsys):
    """torch's optimizer load_state_dict brings the saved weight decay and betas back; the config's apply."""
    warnings, again = _resume_warnings(saved_run, tmp_path, capsys, "--train.weight_decay=0.1", "--train.beta2=0.9")
    decayed, exempt = again.optimizer.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    assert decayed["betas"] == exempt["betas"] == (0.9, 0.9)
    assert "train.beta2 0.95 -> 0.9" in warnings[0]


def test_a_version_1_checkpoint_still_resumes(saved_run, tmp_path, capsys):
    """A checkpoint in the layout fastmim wrote before it stored the model's arguments (version 1, no model_args;
    rewritten here from a current one) resumes as before, and a new save stores the arguments."""
    shutil.copytree(saved_run, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint-0000002.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["version"] == 2 and ckpt["model_args"]["kwargs"] == {
        "img_size": 32,
        "mask_ratio": 0.75,
        "decoder_dim": 32,
    }
    old = {key: value for key, value in ckpt.items() if key != "model_args"}
    write_checkpoint({**old, "version": 1}, path)
    again, loader = _run(tmp_path / "run", "--train.resume=auto")
    assert loader.load() == path and again.pos.step == 2
    assert all(torch.equal(a, b) for a, b in zip(ckpt["model"].values(), again.model.state_dict().values()))
    _train(again, 1)
    assert load_checkpoint(loader.save(3, last=True))["model_args"] == ckpt["model_args"]
