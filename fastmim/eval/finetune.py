"""End-to-end fine-tuning of a pre-trained encoder (method 6): ``finetune(cfg) -> summary``.

The model is timm's VisionTransformer with a global-average-pool -> fc_norm -> head classifier (head trunc-normal
std 2e-5), drop-path, started from the encoder (fastmim/eval/backbone.py). AdamW (0.9, 0.999) with layer-wise lr
decay: parameter layer ids are 0 for patch_embed / cls_token / pos_embed, i + 1 for blocks.i, depth + 1 for the rest
(fc_norm, head); a parameter with id i trains at lr * layer_decay ** (depth + 1 - i). No weight decay for 1-D tensors,
biases, pos_embed and cls_token. Learning rate per iteration: linear warm-up then half-cycle cosine. Augmentation
and regularisation come from timm: RandAugment, random erasing, mixup / cutmix with label smoothing (soft-target
cross-entropy), drop-path. Every epoch ends with a top-1 / top-5 evaluation on the val split; ``checkpoint-last.pt``
is rewritten every epoch and ``checkpoint-best.pt`` when top-1 improves, atomically and with a record that verifies
them on resume (fastmim.train.checkpoint_files).

Randomness is seeded per epoch from ``finetune.seed`` (data order, augmentation, mixup), so ``resume=auto``
continues at the next epoch boundary.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastmim.config import dump_toml
from fastmim.data.loader import mix_seed
from fastmim.errors import FastmimError
from fastmim.eval.backbone import Backbone, build_vit, describe, finetune_state, load_backbone
from fastmim.eval.common import check_fresh_run_dir, plot_curves, resolve_device, topk_correct, write_text
from fastmim.eval.config import EvalConfig
from fastmim.eval.data import LabelledImages, build_splits, eval_transform, train_transform
from fastmim.train.build import amp_dtype
from fastmim.train.checkpoint_files import FINETUNE_FORMAT, load_file, write_checkpoint
from fastmim.train.metrics import MetricsLog, read_metrics
from fastmim.train.optim import lr_at
from fastmim.train.rundir import hold_run_dir

NO_DECAY_NAMES = ("pos_embed", "cls_token")


def layer_id(name: str, depth: int) -> int:
    """Layer id (method 6) of a timm ViT parameter: 0 patch_embed / cls_token / pos_embed, i + 1 blocks.i, else
    depth + 1."""
    if name in NO_DECAY_NAMES or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per (layer id, decayed or not), each with ``lr_scale`` =
    layer_decay ** (depth + 1 - id) and ``names``. Frozen parameters are left out."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "layer_id": lid,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


@dataclass
class FinetuneRun:
    cfg: EvalConfig
    device: torch.device
    backbone: Backbone
    classes: list[str]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_set: LabelledImages
    val_loader: DataLoader
    mixup: Any
    criterion: nn.Module
    out_dir: Path
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    epoch: int = 0  # the next epoch to train
    step: int = 0
    best_acc1: float = -1.0


def _criterion_and_mixup(f: Any, num_classes: int) -> tuple[nn.Module, Any]:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if f.mixup > 0 or f.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=f.mixup,
            cutmix_alpha=f.cutmix,
            prob=f.mixup_prob,
            switch_prob=f.mixup_switch_prob,
            mode="batch",
            label_smoothing=f.smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if f.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=f.smoothing), None
    return nn.CrossEntropyLoss(), None


def build_finetune(cfg: EvalConfig) -> FinetuneRun:
    m, f = cfg.model, cfg.finetune
    out_dir = Path(f.out_dir)
    resume = out_dir / "checkpoint-last.pt"
    if f.resume != "auto":
        check_fresh_run_dir(out_dir, "finetune", resumable=True)
    device = resolve_device(f.device, "finetune.device")
    backbone = load_backbone(m.pretrained, m.name, m.img_size, f.seed)
    img_size = m.img_size or backbone.img_size
    splits = build_splits(cfg.data, img_size)
    torch.manual_seed(f.seed)  # head init
    model = build_vit(backbone, len(splits.classes), m.drop_path, img_size).to(device)
    train_set = LabelledImages(splits.train, train_transform(img_size, f.auto_augment, f.reprob))
    val_set = LabelledImages(splits.val, eval_transform(img_size, f.crop_pct))
    val_loader = DataLoader(val_set, batch_size=f.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    steps_per_epoch = len(train_set) // f.batch_size // f.accum_steps
    if steps_per_epoch == 0:
        raise FastmimError(
            f"the train split has {len(train_set)} images, fewer than one step of {f.batch_size} x {f.accum_steps}; "
            "lower finetune.batch_size."
        )
    total = f.steps if f.steps > 0 else f.epochs * steps_per_epoch
    peak = f.peak_lr()
    groups = layer_decay_groups(model, f.weight_decay, f.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(f.beta1, f.beta2))
    dtype = amp_dtype(f.precision, device)
    criterion, mixup = _criterion_and_mixup(f, len(splits.classes))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    run = FinetuneRun(
        cfg=cfg,
        device=device,
        backbone=backbone,
        classes=splits.classes,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        amp_dtype=dtype,
        train_set=train_set,
        val_loader=val_loader,
        mixup=mixup,
        criterion=criterion,
        out_dir=out_dir,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=round(f.warmup_epochs * steps_per_epoch),
        peak_lr=peak,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if f.resume == "auto" and resume.is_file():
        _restore(run, resume)
    if not (out_dir / "config.toml").exists():
        write_text(dump_toml(cfg), out_dir / "config.toml")
    return run


def _restore(run: FinetuneRun, path: Path) -> None:
    """Continue from ``path``, verified as a pre-training checkpoint is on resume (fastmim.train.checkpoint_files)."""
    ckpt = load_file(path, (FINETUNE_FORMAT,))
    if "optimizer" not in ckpt:
        raise FastmimError(f"{path} holds no optimizer state to continue from; give the run's checkpoint-last.pt.")
    if ckpt["model"].keys() != run.model.state_dict().keys() or ckpt["classes"] != run.classes:
        raise FastmimError(f"{path} is for another model or class list; resume with the run's own config.")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.step, run.best_acc1 = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_acc1"]


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed every random source the epoch uses (timm's transforms and mixup draw from the global generators)."""
    s = int(mix_seed(seed, epoch)) >> 33
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)
    return torch.Generator().manual_seed(s)


def train_one_epoch(run: FinetuneRun, bar: tqdm) -> float:
    """Optimizer steps of epoch ``run.epoch`` (stopping early at total_steps); returns the mean training loss."""
    f, model = run.cfg.finetune, run.model
    loader = DataLoader(
        run.train_set,
        batch_size=f.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=run.cfg.data.num_workers,
        generator=_seed_epoch(f.seed, run.epoch),
    )
    model.train()
    batches, loss_sum, count = iter(loader), torch.zeros((), device=run.device), 0
    for _ in range(run.steps_per_epoch):
        if run.step >= run.total_steps:
            break
        lr = lr_at(run.step, run.total_steps, run.warmup_steps, run.peak_lr, f.min_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for _ in range(f.accum_steps):
            images, labels = next(batches)
            images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
            if run.mixup is not None:
                images, labels = run.mixup(images, labels)
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                loss = run.criterion(model(images), labels)
            run.scaler.scale(loss / f.accum_steps).backward()
            loss_sum += loss.detach().float()
            count += 1
        if f.clip_grad > 0:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), f.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        bar.update(1)
        if run.step % f.log_every == 0:
            mean = loss_sum.item() / count  # host-device sync, at log steps only
            if not np.isfinite(mean):
                raise FastmimError(f"the loss became non-finite by step {run.step}; lower finetune.blr.")
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
    mean = loss_sum.item() / max(count, 1)
    if not np.isfinite(mean):  # before this epoch is evaluated or saved: a diverged model is never kept as "best"
        raise FastmimError(
            f"the training loss was non-finite in epoch {run.epoch} (by step {run.step}); nothing of this epoch is "
            "saved: lower finetune.blr or use finetune.precision=fp32, then continue with --finetune.resume=auto."
        )
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype | None) -> dict[str, float]:
    """Cross-entropy and top-1 / top-5 accuracy (percent) over a loader."""
    model.eval()
    loss_sum, hits, n = 0.0, torch.zeros(2, device=device), 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        hits += torch.stack(topk_correct(logits, labels, (1, 5)))
        n += labels.numel()
    acc1, acc5 = (100.0 * hits / max(n, 1)).tolist()
    return {"val_loss": loss_sum / max(n, 1), "acc1": acc1, "acc5": acc5}


def _save(run: FinetuneRun, row: dict[str, Any]) -> None:
    extra = {
        "epoch": run.epoch,
        "step": run.step,
        "acc1": row["acc1"],
        "acc5": row["acc5"],
        "config": dump_toml(run.cfg),
    }
    if row["acc1"] > run.best_acc1:
        run.best_acc1 = row["acc1"]
        _write(finetune_state(run.backbone, run.model, run.classes, extra), run.out_dir / "checkpoint-best.pt")
    state = {
        **extra,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "best_acc1": run.best_acc1,
    }
    _write(finetune_state(run.backbone, run.model, run.classes, state), run.out_dir / "checkpoint-last.pt")


def _write(state: dict[str, Any], path: Path) -> None:
    """Rewrite ``path`` atomically with a record that verifies it on resume (fastmim.train.checkpoint_files)."""
    write_checkpoint(state, path, then="continue with --finetune.resume=auto")


def finetune(cfg: EvalConfig) -> dict[str, Any]:
    """Fine-tune per cfg, holding finetune.out_dir's lock (one run per directory); returns a summary (best / last
    top-1, paths)."""
    with hold_run_dir(Path(cfg.finetune.out_dir), "finetune.out_dir"):
        return _finetune(cfg)


def _finetune(cfg: EvalConfig) -> dict[str, Any]:
    run, f = build_finetune(cfg), cfg.finetune
    log = MetricsLog(run.out_dir, run.step if f.resume == "auto" else None)
    interactive = sys.stderr.isatty()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="finetune", unit="step", disable=not interactive)
    print(
        f"fine-tuning the {describe(run.backbone)} on {len(run.classes)} classes, {run.total_steps} steps", flush=True
    )
    row: dict[str, Any] | None = None
    with contextlib.closing(log), bar:
        while run.step < run.total_steps:  # epochs x steps per epoch, or finetune.steps
            start = time.perf_counter()
            train_loss = train_one_epoch(run, bar)
            metrics = evaluate(run.model, run.val_loader, run.device, run.amp_dtype)
            lr = max(g["lr"] for g in run.optimizer.param_groups)
            elapsed = time.perf_counter() - start
            row = {
                "step": run.step,
                "epoch": run.epoch,
                "train_loss": train_loss,
                **metrics,
                "lr": lr,
                "time_s": elapsed,
            }
            log.write(row)
            _save(run, row)
            line = (
                f"epoch {run.epoch}  step {run.step}/{run.total_steps}  train loss {train_loss:.4f}  "
                f"val loss {row['val_loss']:.4f}  top-1 {row['acc1']:.2f}  top-5 {row['acc5']:.2f}"
            )
            if interactive:
                bar.write(line)
            else:
                print(line, flush=True)
            run.epoch += 1
    rows = read_metrics(log.path) if log.path.exists() else []
    plot = plot_curves(rows, run.out_dir / "curves.png", f"fine-tuning {run.backbone.model_name}")
    return {
        "model": run.backbone.model_name,
        "steps": run.step,
        "epochs": run.epoch,
        "best_acc1": run.best_acc1,
        "last": rows[-1] if rows else None,
        "device": str(run.device),
        "best": str(run.out_dir / "checkpoint-best.pt"),
        "last_checkpoint": str(run.out_dir / "checkpoint-last.pt"),
        "metrics": str(log.path),
        "plot": str(plot) if plot else None,
    }
