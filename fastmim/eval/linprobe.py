"""Linear probing of a frozen encoder (MAE's protocol, method 6): ``linprobe(cfg) -> summary``.

Features are extracted once (evaluation transform: resize + centre crop, no augmentation) from the last block of the
frozen encoder: the mean of its patch tokens (``pool = "avg"``) or its cls token (``"cls"``). The probe is
BatchNorm without affine parameters followed by a Linear layer (weight trunc-normal std 0.01, bias 0), trained on the
cached features with SGD (momentum) or LARS (timm's, trust ratio on the weight only, as MAE's LARS excludes 1-D
tensors), per-iteration warm-up + cosine. Top-1 / top-5 on the val split after every epoch. On CPU, a ViT-Ti on
scikit-learn's digits extracts features in seconds and probes 50 epochs in a few more.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastmim.config import dump_toml
from fastmim.eval.backbone import Backbone, build_vit, describe, load_backbone
from fastmim.eval.common import check_fresh_run_dir, plot_curves, resolve_device, topk_correct, write_json, write_text
from fastmim.eval.config import EvalConfig
from fastmim.eval.data import LabelledImages, build_splits, eval_transform
from fastmim.train.metrics import MetricsLog
from fastmim.train.optim import lr_at
from fastmim.train.rundir import hold_run_dir


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: LabelledImages, pool: str, batch_size: int, device: torch.device, workers: int = 0
) -> tuple[Tensor, Tensor]:
    """(features [N, D] fp32 on CPU, labels [N]) of a frozen timm ViT: last block, patch mean or cls token
    (bf16 autocast on CUDA, as MAE's probe)."""
    encoder.eval()
    feats, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder.forward_features(images.to(device)).float()
        feats.append((tokens[:, 1:].mean(dim=1) if pool == "avg" else tokens[:, 0]).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


class LinearProbe(nn.Sequential):
    """BatchNorm1d(affine=False) -> Linear (MAE's linear-probe head)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def build_probe_optimizer(
    probe: LinearProbe, kind: str, lr: float, momentum: float, wd: float
) -> torch.optim.Optimizer:
    """SGD, or timm's LARS with the trust ratio on the weight matrix only (bias: plain momentum SGD)."""
    weight, bias = probe[1].weight, probe[1].bias
    if kind == "sgd":
        groups = [{"params": [weight], "weight_decay": wd}, {"params": [bias], "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    from timm.optim import Lars

    groups = [
        {"params": [weight], "weight_decay": wd, "always_adapt": True},
        {"params": [bias], "weight_decay": 0.0, "always_adapt": False},
    ]
    return Lars(groups, lr=lr, momentum=momentum)


def _accuracy(probe: LinearProbe, feats: Tensor, labels: Tensor) -> dict[str, float]:
    probe.eval()
    with torch.no_grad():
        logits = probe(feats)
        loss = nn.functional.cross_entropy(logits, labels).item()
        top1, top5 = (100.0 * c.item() / len(labels) for c in topk_correct(logits, labels, (1, 5)))
    return {"val_loss": loss, "acc1": top1, "acc5": top5}


def train_probe(
    cfg: EvalConfig,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    log: MetricsLog,
    device: torch.device,
) -> tuple[LinearProbe, list[dict[str, Any]]]:
    """Train the probe on cached features (moved to ``device``); one logged row per epoch."""
    p = cfg.linprobe
    feats, labels = (t.to(device) for t in train)
    val = tuple(t.to(device) for t in val)
    torch.manual_seed(p.seed)
    probe = LinearProbe(feats.shape[1], num_classes).to(device)
    batch = min(p.batch_size, len(labels))
    steps_per_epoch = len(labels) // batch  # drop_last: BatchNorm statistics of a tiny last batch are noise
    total, warmup = p.epochs * steps_per_epoch, round(p.warmup_epochs * steps_per_epoch)
    peak = p.peak_lr(batch)
    optimizer = build_probe_optimizer(probe, p.optimizer, peak, p.momentum, p.weight_decay)
    generator = torch.Generator().manual_seed(p.seed)
    rows, step = [], 0
    for epoch in tqdm(range(p.epochs), desc="linprobe", unit="epoch", disable=not sys.stderr.isatty()):
        probe.train()
        order = torch.randperm(len(labels), generator=generator).to(device)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, peak, p.min_lr)
            loss = nn.functional.cross_entropy(probe(feats[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            step += 1
        row = {"step": step, "epoch": epoch, "train_loss": loss_sum / steps_per_epoch, **_accuracy(probe, *val)}
        rows.append(row)
        log.write(row)
    return probe, rows


def probe_backbone(cfg: EvalConfig, backbone: Backbone, log: MetricsLog) -> dict[str, Any]:
    """Extract features of both splits once, train the probe; returns timings, per-epoch rows and final accuracy."""
    p, device = cfg.linprobe, resolve_device(cfg.linprobe.device, "linprobe.device")
    img_size = cfg.model.img_size or backbone.img_size
    splits = build_splits(cfg.data, img_size)
    encoder = build_vit(backbone, 0, 0.0, img_size).to(device)
    transform = eval_transform(img_size, cfg.finetune.crop_pct)
    start = time.perf_counter()
    train = extract_features(
        encoder, LabelledImages(splits.train, transform), p.pool, p.extract_batch_size, device, cfg.data.num_workers
    )
    val = extract_features(
        encoder, LabelledImages(splits.val, transform), p.pool, p.extract_batch_size, device, cfg.data.num_workers
    )
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    _, rows = train_probe(cfg, train, val, len(splits.classes), log, device)
    return {
        "encoder": describe(backbone),
        "num_train": len(train[1]),
        "num_val": len(val[1]),
        "feature_dim": train[0].shape[1],
        "extract_s": extract_s,
        "probe_s": time.perf_counter() - start,
        "acc1": rows[-1]["acc1"],
        "acc5": rows[-1]["acc5"],
        "best_acc1": max(r["acc1"] for r in rows),
        "rows": rows,
    }


def linprobe(cfg: EvalConfig) -> dict[str, Any]:
    """Linear-probe per cfg, holding linprobe.out_dir's lock (one run per directory); writes config.toml,
    metrics.jsonl, result.json and curves.png into it."""
    with hold_run_dir(Path(cfg.linprobe.out_dir), "linprobe.out_dir"):
        return _linprobe(cfg)


def _linprobe(cfg: EvalConfig) -> dict[str, Any]:
    p, m = cfg.linprobe, cfg.model
    out_dir = Path(p.out_dir)
    check_fresh_run_dir(out_dir, "linprobe", resumable=False)
    backbone = load_backbone(m.pretrained, m.name, m.img_size, p.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(dump_toml(cfg), out_dir / "config.toml")
    log = MetricsLog(out_dir, None)
    try:
        result = probe_backbone(cfg, backbone, log)
    finally:
        log.close()
    plot = plot_curves(result["rows"], out_dir / "curves.png", f"linear probe: {backbone.model_name}")
    summary = {k: v for k, v in result.items() if k != "rows"}
    summary.update(metrics=str(log.path), plot=str(plot), result=str(out_dir / "result.json"))
    write_json(summary, out_dir / "result.json")
    return summary
