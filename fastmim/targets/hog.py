"""Multi-scale HOG targets in plain PyTorch (SPEC 3.1 and 3.3): the reference path.

For each colour channel of the normalised image: reflect-padded 3 x 3 Sobel gradients (G0, G1), magnitude
sqrt(G0^2 + G1^2), angle atan2(G0, G1), hard unsigned bin floor(phi / pi * nbins) mod nbins, cell histogram =
mean of magnitude-weighted one-hot maps over the cell, L2 normalisation over bins, channels concatenated R, G, B.

Cell averages nest (an 8 px cell is the mean of its four 4 px cells), so without hog_bias the image is read once:
histograms are built at the finest cell size and pooled for the coarser ones. With hog_bias each scale has its own
frozen Sobel bias, its gradients differ, and each scale is computed from its own gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# G0 and its transpose G1 (SPEC 3.1 step 1), applied as cross-correlation (torch conv2d).
SOBEL = torch.tensor([[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]])
SOBEL_WEIGHT = torch.stack([SOBEL, SOBEL.transpose(1, 2)])  # [2, 1, 3, 3]


def hog_histograms(img: Tensor, cell_size: int, nbins: int, bias: Tensor | None = None) -> Tensor:
    """Un-normalised cell histograms [B, 3, nbins, H / cell, W / cell] of an image [B, 3, H, W], in fp32 (fp64
    for fp64 input)."""
    b, c, h, w = img.shape
    dtype = torch.promote_types(img.dtype, torch.float32)
    x = F.pad(img.to(dtype).reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    grad = F.conv2d(x, SOBEL_WEIGHT.to(x.device, dtype), None if bias is None else bias.to(dtype))
    g0, g1 = grad[:, 0], grad[:, 1]
    magnitude = torch.sqrt(g0 * g0 + g1 * g1)
    phi = torch.atan2(g0, g1)
    bins = torch.remainder(torch.floor(phi / torch.pi * nbins), nbins).long()  # [b*c, H, W]
    # Dense one-hot (not scatter_add) keeps the sum order fixed, so the reference is deterministic on CUDA too.
    onehot = bins.unsqueeze(1) == torch.arange(nbins, device=img.device).view(1, nbins, 1, 1)
    weighted = onehot * magnitude.unsqueeze(1)  # [b*c, nbins, H, W]
    hist = F.avg_pool2d(weighted, kernel_size=cell_size, stride=cell_size)
    return hist.reshape(b, c, nbins, h // cell_size, w // cell_size)


def _to_target(hist: Tensor) -> Tensor:
    """[B, 3, nbins, h, w] histograms -> L2-normalised over bins, laid out [B, h * w, 3 * nbins] (R, G, B)."""
    b, c, nbins, h, w = hist.shape
    hist = F.normalize(hist, p=2.0, dim=2, eps=1e-12)
    return hist.permute(0, 3, 4, 1, 2).reshape(b, h * w, c * nbins)


class HOGTarget(nn.Module):
    """HOG targets for several cell sizes: ``forward(img [B, 3, H, W]) -> [[B, N_k, 3 * nbins]] (fp32)``.

    ``bias`` (SPEC 3.3): one frozen 2-vector per scale drawn from U(-1/3, 1/3), stored as the buffer
    ``bias`` [K, 2] so it travels with the model's state dict.
    """

    def __init__(self, cell_sizes: Sequence[int], nbins: int = 9, bias: bool = False) -> None:
        super().__init__()
        self.cell_sizes = tuple(int(c) for c in cell_sizes)
        self.nbins = nbins
        bias_init = torch.empty(len(self.cell_sizes), 2).uniform_(-1 / 3, 1 / 3) if bias else None
        self.register_buffer("bias", bias_init)

    @property
    def out_dims(self) -> list[int]:
        return [3 * self.nbins] * len(self.cell_sizes)

    def extra_repr(self) -> str:
        return f"cell_sizes={self.cell_sizes}, nbins={self.nbins}, bias={self.bias is not None}"

    @torch.no_grad()
    def forward(self, img: Tensor) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(self.cell_sizes)
        if self.bias is None:
            groups = [(None, range(len(self.cell_sizes)))]
        else:
            groups = [(self.bias[k], [k]) for k in range(len(self.cell_sizes))]
        with torch.autocast(img.device.type, enabled=False):
            for bias, scales in groups:
                finest = min(self.cell_sizes[k] for k in scales)
                hist = hog_histograms(img, finest, self.nbins, bias)
                for k in scales:
                    factor = self.cell_sizes[k] // finest
                    pooled = hist if factor == 1 else F.avg_pool3d(hist, (1, factor, factor))
                    out[k] = _to_target(pooled)
        return out
