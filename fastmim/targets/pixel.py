"""Multi-scale (normalised) pixel targets (method 3.2).

Each p x p cell of the normalised image becomes a vector of p * p * 3 values ordered (row in cell, column in cell,
channel); with norm_pix each vector is standardised by its own mean and unbiased variance: (x - mean) /
sqrt(var + 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def pixel_target(img: Tensor, cell_size: int, norm_pix: bool = True) -> Tensor:
    """[B, C, H, W] -> [B, (H / p) * (W / p), p * p * C], in fp32 (fp64 for fp64 input)."""
    b, c, h, w = img.shape
    p = cell_size
    x = img.to(torch.promote_types(img.dtype, torch.float32)).reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
    if norm_pix:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-6)
    return x


class PixelTarget(nn.Module):
    """Pixel targets for several cell sizes: ``forward(img) -> [[B, N_k, p_k * p_k * 3]]``."""

    def __init__(self, cell_sizes: Sequence[int], norm_pix: bool = True) -> None:
        super().__init__()
        self.cell_sizes = tuple(int(c) for c in cell_sizes)
        self.norm_pix = norm_pix

    @property
    def out_dims(self) -> list[int]:
        return [3 * c * c for c in self.cell_sizes]

    def extra_repr(self) -> str:
        return f"cell_sizes={self.cell_sizes}, norm_pix={self.norm_pix}"

    @torch.no_grad()
    def forward(self, img: Tensor) -> list[Tensor]:
        cache: dict[int, Tensor] = {}
        with torch.autocast(img.device.type, enabled=False):
            for c in self.cell_sizes:
                if c not in cache:
                    cache[c] = pixel_target(img, c, self.norm_pix)
        return [cache[c] for c in self.cell_sizes]
