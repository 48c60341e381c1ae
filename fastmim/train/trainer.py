"""The pre-training loop: ``train(cfg) -> summary``.

Building happens in ``build_*`` helpers; ``train()`` itself is the loop. Everything random is derived from
``train.seed``: the data order and augmentation (per sample, see fastmim.data) and the masks (per optimizer step and
micro-batch, below), so a resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastmim.config import Config, config_from_toml, dump_toml
from fastmim.data import MIMLoader, build_loader
from fastmim.data.loader import mix_seed
from fastmim.errors import FastmimError
from fastmim.models import model_from_config
from fastmim.train.checkpoint import (
    FORMAT,
    VERSION,
    atomic_save,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from fastmim.train.metrics import MetricsLog, peak_memory_gib, plot_losses
from fastmim.train.optim import build_optimizer, lr_at

SCALE_NAMES = ["s=4", "s=2", "s=1", "s=1/2"]


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next batch to read (epoch, batch index)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Run:
    cfg: Config
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: MIMLoader
    out_dir: Path
    total_steps: int
    warmup_steps: int
    peak_lr: float
    amp_dtype: torch.dtype | None
    pos: Position = field(default_factory=Position)
    resumed_from: Path | None = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FastmimError("train.device = 'cuda' but no CUDA device is visible; use --train.device=cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 / fp16, None for fp32; "auto" = bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def mask_noise(seed: int, step: int, micro: int, batch: int, num_patches: int) -> torch.Tensor:
    """The masking noise [B, L] of one micro-batch: a function of (seed, step, micro) only, so resumes repeat it."""
    g = torch.Generator().manual_seed(int(mix_seed(seed, step, micro)) >> 1)  # hashed: no aliasing between steps
    return torch.rand(batch, num_patches, generator=g)


def build_run(cfg: Config) -> Run:
    t = cfg.train
    out_dir = Path(t.out_dir)
    resume = _resume_path(cfg, out_dir)
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    model = model_from_config(cfg.model).to(device)
    loader = build_loader(cfg.data, cfg.model.img_size or 224, t.batch_size, t.seed)
    micro_per_epoch = loader.steps_per_epoch
    steps_per_epoch = max(1, micro_per_epoch // t.accum_steps)
    total = t.steps if t.steps > 0 else t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps >= 0 else round(t.warmup_epochs * steps_per_epoch)
    peak = t.lr if t.lr > 0 else t.blr * t.batch_size * t.accum_steps / 256
    optimizer = build_optimizer(model, peak, t.weight_decay, (t.beta1, t.beta2))
    dtype = amp_dtype(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    run = Run(cfg, device, model, optimizer, scaler, loader, out_dir, total, warmup, peak, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        _restore(run, resume)
    _save_config(run)
    return run


def _resume_path(cfg: Config, out_dir: Path) -> Path | None:
    """Which checkpoint to continue from; refuses to start a fresh run on top of an existing one."""
    resume = cfg.train.resume
    if resume == "auto":
        return latest_checkpoint(out_dir)
    if resume:
        return Path(resume)
    if (out_dir / "metrics.jsonl").exists() or latest_checkpoint(out_dir) is not None:
        raise FastmimError(
            f"{out_dir} already holds a run; continue it with --train.resume=auto or pick a new --train.out_dir."
        )
    return None


def _restore(run: Run, path: Path) -> None:
    ckpt = load_checkpoint(path)
    saved = config_from_toml(ckpt["config"], f"checkpoint {path}")
    if ckpt["model_name"] != run.cfg.model.name:
        raise FastmimError(
            f"checkpoint {path} is for {ckpt['model_name']}, not {run.cfg.model.name}; set --model.name accordingly."
        )
    for key, value in vars(saved.model).items():
        if key != "impl" and getattr(run.cfg.model, key) != value:
            raise FastmimError(f"checkpoint {path} was trained with model.{key} = {value!r}; resume with that value.")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.pos = Position(ckpt["step"], ckpt["data"]["epoch"], ckpt["data"]["batch"])
    run.resumed_from = path


def _save_config(run: Run) -> None:
    """config.toml holds the run's config; a resume with different settings is recorded beside it, not over it."""
    text = dump_toml(run.cfg)
    path = run.out_dir / "config.toml"
    if path.exists() and path.read_text() != text:
        path = run.out_dir / f"config.resumed-{run.pos.step:07d}.toml"
    if not path.exists():
        atomic_save_text(text, path)


def atomic_save_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_checkpoint(run: Run) -> Path:
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": run.cfg.model.name,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.pos.step,
        "data": {"epoch": run.pos.epoch, "batch": run.pos.batch},
        "rng": rng_state(),
        "config": dump_toml(run.cfg),
    }
    path = checkpoint_path(run.out_dir, run.pos.step)
    atomic_save(state, path)
    return path


def _batches(run: Run):
    """Endless (images on device) stream from the saved position; advances run.pos.epoch / batch as it reads."""
    while True:
        for images, _ in run.loader.iterate(run.pos.epoch, run.pos.batch):
            run.pos.batch += 1
            yield images.to(run.device, non_blocking=True)
        run.pos.epoch, run.pos.batch = run.pos.epoch + 1, 0


def train_step(run: Run, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step (accum_steps micro-batches). Returns device tensors (loss, per-scale losses, finite
    flag) without synchronising."""
    t, model = run.cfg.train, run.model
    lr = lr_at(run.pos.step, run.total_steps, run.warmup_steps, run.peak_lr, t.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = losses_sum = None
    for micro in range(t.accum_steps):
        images = next(batches)
        noise = mask_noise(t.seed, run.pos.step, micro, images.shape[0], model.num_patches).to(run.device)
        autocast = torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)
        with autocast:
            out = model(images, noise)
        run.scaler.scale(out.loss / t.accum_steps).backward()
        detached = torch.stack([x.detach().float() for x in out.losses])
        loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
        losses_sum = detached if losses_sum is None else losses_sum + detached
    if t.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.pos.step += 1
    loss = loss_sum / t.accum_steps
    return loss, losses_sum / t.accum_steps, torch.isfinite(loss)


def train(cfg: Config) -> dict[str, Any]:
    """Pre-train per cfg; returns a summary (steps, img/s, final loss, paths)."""
    run, t = build_run(cfg), cfg.train
    # On resume (also "auto" that found no checkpoint yet) logged rows past the restart step are recomputed.
    log = MetricsLog(run.out_dir, run.pos.step if t.resume else None)
    batches = _batches(run)
    images_per_step = t.batch_size * t.accum_steps
    # A live bar on a terminal; in logs (CI, SLURM) one plain line per log step instead of carriage-return noise.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=run.total_steps, initial=run.pos.step, desc="pretrain", unit="step", disable=not interactive)
    start, window_start, window_step = time.perf_counter(), time.perf_counter(), run.pos.step
    first_step, row, ckpt = run.pos.step, None, None
    all_finite = torch.ones((), dtype=torch.bool, device=run.device)
    with contextlib.closing(log), bar:
        while run.pos.step < run.total_steps:
            loss, losses, finite = train_step(run, batches)
            all_finite &= finite
            bar.update(1)
            if run.pos.step % t.log_every == 0 or run.pos.step == run.total_steps:
                # Host-device sync, at log steps only.
                if not bool(all_finite):
                    raise FastmimError(
                        f"the loss became non-finite by step {run.pos.step}; "
                        "lower train.blr or use train.precision=fp32."
                    )
                now = time.perf_counter()
                row = {
                    "step": run.pos.step,
                    "epoch": run.pos.epoch,
                    "loss": loss.item(),
                    "losses": losses.tolist(),
                    "lr": run.optimizer.param_groups[0]["lr"],
                    "img_per_s": images_per_step * (run.pos.step - window_step) / (now - window_start),
                    "mem_gib": peak_memory_gib(run.device),
                }
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                if not interactive:
                    print(
                        f"step {row['step']}/{run.total_steps}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                        f"{row['img_per_s']:.1f} img/s  mem {row['mem_gib']:.2f} GiB",
                        flush=True,
                    )
                window_start, window_step = now, run.pos.step
            if t.save_every and run.pos.step % t.save_every == 0:
                ckpt = save_checkpoint(run)
        if run.pos.step == first_step:
            ckpt = run.resumed_from  # nothing left to train: the checkpoint we resumed from is the result
        elif ckpt is None or run.pos.step % max(t.save_every, 1):
            ckpt = save_checkpoint(run)
    elapsed = time.perf_counter() - start
    steps_done = run.pos.step - first_step
    plot = plot_losses(log.path, run.out_dir / "loss.png", SCALE_NAMES)
    return {
        "model": cfg.model.name,
        "steps": run.pos.step,
        "steps_this_run": steps_done,
        "img_per_s": images_per_step * steps_done / elapsed if steps_done else 0.0,
        "final_loss": row["loss"] if row else None,
        "device": str(run.device),
        "checkpoint": str(ckpt),
        "metrics": str(log.path),
        "plot": str(plot) if plot else None,
        "out_dir": str(run.out_dir),
    }
