"""Non-finite loss or gradient: the step is skipped (parameters, AdamW moments and step count untouched), counted,
its scale logged; train.max_nonfinite consecutive ones save and stop with a clear message."""

import contextlib
import copy
import itertools
import json

import pytest
import torch

from fastmim.errors import FastmimError
from fastmim.models import model_from_config
from fastmim.train import build, trainer
from fastmim.train.checkpoint_files import checkpoint_path, load_checkpoint
from fastmim.train.metrics import StepStats
from fastmim.train.optim import param_groups
from fastmim.train.trainer import build_run, train, train_step
from tests.reliability._harness import config


def _state(run):
    return copy.deepcopy({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()})


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class _NoSync:
    """Fails the test if anything reads a tensor's value on the host (the CPU stand-in for a device sync)."""

    def __enter__(self):
        self.saved = torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist

        def refuse(*args, **kwargs):
            raise AssertionError("host read of a device value in a non-logging step")

        torch.Tensor.item = torch.Tensor.__bool__ = torch.Tensor.tolist = refuse

    def __exit__(self, *exc):
        torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist = self.saved


@pytest.mark.parametrize("variant", ["for-loop AdamW", "fused AdamW", "fp16 + GradScaler"])
def test_a_nonfinite_step_changes_nothing(tmp_path, variant):
    cfg = config(tmp_path / "run", "--train.steps=4", *(["--train.precision=fp16"] if "fp16" in variant else []))
    run = build_run(cfg)
    if variant == "fused AdamW":  # decides on the device: no host sync at all
        run.optimizer = torch.optim.AdamW(param_groups(run.model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    images = next(run.loader.iterate(0))[0]
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    assert bool(train_step(run, iter([images]))[2])
    before, scale = _state(run), run.scaler.get_scale()
    with _NoSync() if variant == "fused AdamW" else contextlib.nullcontext():
        loss, _, applied = train_step(run, iter([poisoned]))
    assert not bool(applied) and not torch.isfinite(loss) and run.pos.step == 2
    assert _equal(_state(run), before)  # weights, moments and AdamW's step count all as they were
    if "fp16" in variant:
        assert run.scaler.get_scale() < scale  # the loss scale backed off, as torch's GradScaler does
    assert all(p.grad is None for p in run.model.parameters())
    assert bool(train_step(run, iter([images]))[2])
    assert not _equal(_state(run)["model"], before["model"])


def test_nonfinite_gradient_with_finite_loss_is_skipped_and_named(tmp_path):
    run = build_run(config(tmp_path / "run", "--train.steps=2"))
    stats = StepStats(["s=4", "s=2", "s=1", "s=1/2"], run.device)
    images = next(run.loader.iterate(0))[0]
    hook = run.model.encoder.blocks[0].attn.qkv.weight.register_hook(lambda g: g * float("inf"))
    before = _state(run)
    loss, losses, applied = train_step(run, itertools.repeat(images))
    hook.remove()
    stats.update(loss, losses, applied)
    assert torch.isfinite(loss) and not bool(applied) and _equal(_state(run), before)
    assert stats.read() == {"skipped": 1, "nonfinite": {"gradient": 1}, "streak": 1}


def _poison_scale(monkeypatch, scale: int, steps) -> None:
    """Every model the trainer builds predicts NaN at one scale on the given forward passes (1-based)."""
    calls = itertools.count(1)

    def poisoned(mcfg):
        model = model_from_config(mcfg)
        head = model.decoders[scale].head
        head.register_forward_hook(lambda m, i, out: out * float("nan") if next(calls) in steps else None)
        return model

    monkeypatch.setattr(build, "model_from_config", poisoned)


def test_a_transient_nan_is_skipped_logged_by_scale_and_training_goes_on(tmp_path, monkeypatch, capsys):
    _poison_scale(monkeypatch, 3, steps={3})
    summary = train(config(tmp_path / "run", "--train.steps=5"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    assert rows[2]["nonfinite"] == {"s=1/2": 1} and "nonfinite" not in rows[1]
    assert "step 3: skipped 1 step(s) since the last log (non-finite: s=1/2 x1)" in capsys.readouterr().err
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5
    weights = load_checkpoint(summary["checkpoint"])["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_consecutive_nonfinite_steps_save_and_stop(tmp_path, monkeypatch):
    _poison_scale(monkeypatch, 3, steps=set(range(1, 100)))
    out = tmp_path / "run"
    cfg = config(out, "--train.steps=10", "--train.max_nonfinite=3")
    with pytest.raises(
        FastmimError,
        match=r"stopped at step 3: 3 consecutive steps had a non-finite loss or "
        r"gradient \(s=1/2 x3; .*saved .*checkpoint-0000003.pt: lower",
    ):
        train(cfg)
    saved = load_checkpoint(checkpoint_path(out, 3))
    assert saved["step"] == 3 and saved["skipped_steps"] == 3
    torch.manual_seed(cfg.train.seed)
    untrained = model_from_config(cfg.model).state_dict()
    assert _equal(saved["model"], untrained)  # nothing was ever applied


@pytest.mark.gpu
def test_fused_skip_on_cuda_needs_no_host_sync(tmp_path):
    """CUDA counterpart of the fused case above: the skip decision, the update and the tallies make no host-device
    synchronisation (torch's sync debug mode turns any into an error)."""
    run = build_run(config(tmp_path / "run", "--train.steps=2", "--train.device=cuda", "--train.precision=bf16"))
    run.optimizer = torch.optim.AdamW(param_groups(run.model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    stats = StepStats(trainer.scale_names(run.model), run.device)
    images = next(run.loader.iterate(0))[0].cuda()
    assert bool(train_step(run, iter([images]))[2])
    before = _state(run)
    noise = trainer.mask_noise(0, 1, 0, images.shape[0], run.model.num_patches).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run.model(images * float("nan"), noise)
    out.loss.backward()
    losses = torch.stack([x.detach().float() for x in out.losses])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        applied = trainer.apply_update(run, torch.isfinite(out.loss.detach()))
        stats.update(out.loss.detach(), losses, applied)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(applied) and _equal(_state(run), before)
    assert stats.read()["skipped"] == 1
