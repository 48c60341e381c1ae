"""What every masked-image model returns, and the masked mean-squared error they share (SPEC 2.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastmim.masking import Masking, random_masking


@dataclass
class MIMOutput:
    """``loss``: total (scalar); ``losses``: per scale, SPEC order; ``mask``: [B, L], 1 = masked;
    ``preds``: per scale [B, N_k, out_k]; ``targets``: per scale, same shapes (no grad)."""

    loss: Tensor
    losses: list[Tensor]
    mask: Tensor
    preds: list[Tensor]
    targets: list[Tensor]


def masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """sum_{b,j} w[b,j] * mean_c (pred - target)^2 / sum_{b,j} w[b,j], in fp32 (fp64 for fp64 input).
    pred/target [B, N, C], w [B, N]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    per_cell = (pred.to(dtype) - target.to(dtype)).pow(2).mean(dim=-1)
    return (per_cell * weight).sum() / weight.sum()


def make_masking(imgs: Tensor, num_patches: int, mask_ratio: float, noise: Tensor | None) -> Masking:
    """Masking from the caller's noise [B, L] if given (reproducible), else from fresh U[0, 1) noise."""
    if noise is None:
        noise = torch.rand(imgs.shape[0], num_patches, device=imgs.device)
    elif noise.shape != (imgs.shape[0], num_patches):
        raise ValueError(f"noise must have shape [B, L] = {[imgs.shape[0], num_patches]}, got {list(noise.shape)}")
    return random_masking(noise.to(imgs.device), mask_ratio)
