import contextlib
import itertools
import json
import time

import pytest
import torch

from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.train import build, trainer
from fastmim.train.checkpoint_files import latest_checkpoint, load_checkpoint
from fastmim.train.rundir import LOCK_NAME
from fastmim.train.trainer import build_run, train, train_step

# A seconds-long configuration: ViT-Ti at 32 px (2 x 2 patches), 32-wide decoders, synthetic-free demo images.
FAST = [
    "--model.img_size=32",
    "--model.decoder_dim=32",
    "--data.num_images=32",
    "--train.batch_size=8",
    "--train.precision=fp32",
    "--train.log_every=1",
    "--train.device=cpu",
]


def _cfg(tmp_path, *extra, name="run"):
    return load_config(None, [*FAST, f"--train.out_dir={tmp_path / name}", *extra])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    cfg = _cfg(tmp_path, "--train.steps=5", "--train.warmup_steps=0", "--train.lr=2e-3", "--train.min_lr=2e-3")
    run = build_run(cfg)
    images = next(run.loader.iterate(0))[0]
    losses = [train_step(run, itertools.repeat(images))[0].item() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.9, losses


def test_train_step_names_its_stages_to_the_hook(tmp_path):
    """`bench step` times and `fastmim profile` names the stages of the production step through this hook."""
    run = build_run(_cfg(tmp_path, "--train.steps=2", "--train.accum_steps=2"))
    images = next(run.loader.iterate(0))[0]
    seen = []

    def stage(name):
        seen.append(name)
        return contextlib.nullcontext()

    train_step(run, itertools.repeat(images), stage=stage)
    assert seen == ["data", "forward", "backward"] * 2 + ["optimizer"] and run.pos.step == 1
    assert set(seen) == set(trainer.STAGES)


def test_smoke_run_writes_metrics_checkpoint_and_plot(tmp_path):
    summary = train(_cfg(tmp_path, "--train.steps=4", "--train.warmup_steps=2"))
    out = tmp_path / "run"
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "losses", "lr", "img_per_s", "mem_gib"):
        assert all(key in r for r in rows)
    assert len(rows[0]["losses"]) == 4 and all(map(torch.isfinite, torch.tensor([r["loss"] for r in rows])))
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] > 0  # linear warm-up from 0 (lr logged is the step's lr)
    assert (out / "config.toml").exists() and (out / "loss.png").stat().st_size > 1000
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["step"] == 4 and "[model]" in ckpt["config"]
    assert load_config(None, []).model.name in ckpt["config"]


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path):
    """3 steps, stop, resume to 6 == 6 steps straight: same logged losses (bitwise, fp32 CPU), same weights."""
    const = ["--train.warmup_steps=0", "--train.lr=1e-3", "--train.min_lr=1e-3", "--data.num_images=16"]
    full = train(_cfg(tmp_path, *const, "--train.steps=6", name="full"))
    train(_cfg(tmp_path, *const, "--train.steps=3", name="split"))
    resumed = train(_cfg(tmp_path, *const, "--train.steps=6", "--train.resume=auto", name="split"))
    assert resumed["steps_this_run"] == 3
    a, b = _rows(tmp_path / "full" / "metrics.jsonl"), _rows(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # 16 images / batch 8: the resume crosses epochs
    assert [(r["loss"], r["losses"]) for r in a] == [(r["loss"], r["losses"]) for r in b]
    wa, wb = load_checkpoint(full["checkpoint"])["model"], load_checkpoint(resumed["checkpoint"])["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_a_mid_run_checkpoint_of_a_cosine_run(tmp_path):
    full = train(_cfg(tmp_path, "--train.steps=4", "--train.save_every=2", name="a"))
    again = train(
        _cfg(tmp_path, "--train.steps=4", f"--train.resume={tmp_path / 'a' / 'checkpoint-0000002.pt'}", name="b")
    )
    a, b = _rows(tmp_path / "a" / "metrics.jsonl"), _rows(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
    wa, wb = load_checkpoint(full["checkpoint"])["model"], load_checkpoint(again["checkpoint"])["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_accumulation_and_fp16_scaler_run(tmp_path):
    summary = train(
        _cfg(tmp_path, "--train.steps=2", "--train.accum_steps=2", "--train.precision=fp16", "--train.clip_grad=1")
    )
    assert summary["steps"] == 2
    assert "scale" in load_checkpoint(summary["checkpoint"])["scaler"]


def test_existing_run_is_never_overwritten(tmp_path):
    train(_cfg(tmp_path, "--train.steps=1"))

    def files():  # run.lock names whichever process last held the directory: not the run's data
        return {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file() and p.name != LOCK_NAME}

    before = files()
    with pytest.raises(FastmimError, match="already holds a run"):
        train(_cfg(tmp_path, "--train.steps=2"))
    assert files() == before


def test_bad_resume_targets(tmp_path):
    train(_cfg(tmp_path, "--train.steps=1"))
    ckpt = latest_checkpoint(tmp_path / "run")
    with pytest.raises(FastmimError, match="trained with model.mask_ratio"):
        train(_cfg(tmp_path, "--train.steps=2", f"--train.resume={ckpt}", "--model.mask_ratio=0.5", name="x"))
    with pytest.raises(FastmimError, match="is for localmim_vit_tiny_patch16"):
        train(
            _cfg(tmp_path, "--train.steps=2", f"--train.resume={ckpt}", "--model.name=mae_vit_tiny_patch16", name="y")
        )
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FastmimError, match="not a readable checkpoint"):
        train(_cfg(tmp_path, f"--train.resume={junk}", name="z"))
    with pytest.raises(FastmimError, match="does not exist"):
        train(_cfg(tmp_path, f"--train.resume={tmp_path / 'missing.pt'}", name="w"))


def test_compiled_run_reports_compile_time_and_trains_like_eager(tmp_path, capsys):
    """train.compile=on (inductor, also on the CPU): the first step's compile time is reported, and the losses
    follow the eager run's (inductor fuses ops, so equal up to float rounding)."""
    const = ["--train.steps=2", "--train.warmup_steps=0", "--train.lr=1e-3", "--data.num_images=16"]
    eager = train(_cfg(tmp_path, *const, "--train.compile=off", name="eager"))
    compiled = train(_cfg(tmp_path, *const, "--train.compile=on", name="compiled"))
    assert eager["compile_s"] is None and compiled["compile_s"] > 0
    assert "compiling 16 transformer blocks" in capsys.readouterr().out
    a, b = _rows(tmp_path / "eager" / "metrics.jsonl"), _rows(tmp_path / "compiled" / "metrics.jsonl")
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
        assert rb["losses"] == pytest.approx(ra["losses"], rel=1e-4)


def test_summary_rate_is_the_steady_one_and_start_up_is_apart(tmp_path, monkeypatch):
    """A slow start-up (here 1.5 s added to building the run) is reported as start-up, not averaged into the
    headline img/s, which matches the progress rows after the first step (before: 31.9 img/s in the summary where
    the last row said 94.6)."""
    build_loader = build.build_loader

    def slow_build(*args):
        time.sleep(1.5)
        return build_loader(*args)

    monkeypatch.setattr(build, "build_loader", slow_build)
    summary = train(_cfg(tmp_path, "--train.steps=6"))
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    images = 8  # batch_size, one process
    steady = images * 5 / sum(images / row["img_per_s"] for row in rows[1:])  # the windows of steps 2-6
    assert summary["img_per_s"] == pytest.approx(steady, rel=0.1)
    assert summary["startup_s"] >= 1.5
