"""AdamW parameter groups and the per-iteration learning-rate schedule (method 5)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (>= 2-D weights; for ViT the cls and mask tokens too) and not decayed (1-D tensors,
    biases, and whatever the model lists in ``no_weight_decay()``: Swin's mask tokens and relative-position
    tables). Frozen parameters are left out (method 5)."""
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``fused`` (CUDA) runs the whole update as one kernel per dtype group
    instead of a for-each loop of small kernels."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up from 0 over ``warmup`` steps, then a
    half-cycle cosine from ``peak`` down to ``min_lr`` at ``total``."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
