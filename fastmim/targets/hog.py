"""Multi-scale HOG targets (method 3.1 and 3.3): ``HOGTarget``, the module a model owns.

The math lives in fastmim.kernels.hog: ``hog_ref`` (plain PyTorch, the specification: reflect-padded Sobel
gradients, magnitude, atan2 bin, cell means, L2 normalisation, R, G, B) and ``hog`` (the Triton kernel: every scale
from one read of the image, or hog_ref where no kernel can run). It is imported when a target is first computed, not
with fastmim: importing it imports triton, which decides once, when it is imported, whether kernels are compiled or
interpreted (TRITON_INTERPRET), and test suites set that after fastmim is imported.

Without hog_bias every scale is pooled from the finest cells (cell means nest); with hog_bias each scale has its own
frozen Sobel bias, hence its own gradients and bins (both paths handle that).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# G0 and its transpose G1 (method 3.1 step 1) as a conv2d weight [2, 1, 3, 3]: the layout of the released checkpoints'
# frozen `hog_enc.{k}.conv.weight` (fastmim.kernels.hog applies the same operator as explicit fp32 sums).
SOBEL = torch.tensor([[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]])
SOBEL_WEIGHT = torch.stack([SOBEL, SOBEL.transpose(1, 2)])


def hog_histograms(img: Tensor, cell_size: int, nbins: int, bias: Tensor | None = None) -> Tensor:
    """Un-normalised cell histograms [B, 3, nbins, H / cell, W / cell] of an image [B, 3, H, W], in fp32 (fp64
    for fp64 input): fastmim.kernels.hog.hog_histograms."""
    from fastmim.kernels import hog as hog_math

    return hog_math.hog_histograms(img, cell_size, nbins, bias)


class HOGTarget(nn.Module):
    """HOG targets for several cell sizes: ``forward(img [B, 3, H, W] normalised) -> [[B, N_k, 3 * nbins]] (fp32)``.

    ``bias`` (method 3.3): one frozen 2-vector per scale drawn from U(-1/3, 1/3), stored as the buffer ``bias`` [K, 2]
    so it travels with the model's state dict. ``impl``: "reference" computes ``hog_ref``; "fast" uses the Triton
    kernel where one can run (CUDA, or CPU under TRITON_INTERPRET=1; fastmim.kernels.can_run_on) and ``hog_ref``
    elsewhere. A model sets it with its own (fastmim.models.base); the argument is for the module on its own.
    """

    def __init__(self, cell_sizes: Sequence[int], nbins: int = 9, bias: bool = False, impl: str = "reference") -> None:
        super().__init__()
        self.cell_sizes = tuple(int(c) for c in cell_sizes)
        self.nbins, self.impl = nbins, impl
        bias_init = torch.empty(len(self.cell_sizes), 2).uniform_(-1 / 3, 1 / 3) if bias else None
        self.register_buffer("bias", bias_init)

    @property
    def out_dims(self) -> list[int]:
        return [3 * self.nbins] * len(self.cell_sizes)

    def extra_repr(self) -> str:
        return f"cell_sizes={self.cell_sizes}, nbins={self.nbins}, bias={self.bias is not None}, impl={self.impl}"

    @torch.no_grad()
    def forward(self, img: Tensor) -> list[Tensor]:
        from fastmim.kernels import hog as hog_math

        compute = hog_math.hog if self.impl == "fast" else hog_math.hog_ref
        return compute(img, self.cell_sizes, self.nbins, self.bias)
