"""bench "hog": multi-scale HOG targets (method 3.1), every scale of a ViT batch.

Providers:
- released: the released code's way, transcribed from docs/method.md: one pass per scale and colour (4 x 3 = 12), each
  reflect-padding, convolving, zero-filling a [B, nbins, H, W] fp32 tensor, scattering magnitudes into it, pooling
  and normalising;
- eager: fastmim's reference (fastmim.targets.HOGTarget: one pass at the finest cell, pooled for coarser cells);
- compile: torch.compile of the reference;
- triton: the fused kernel, fastmim.kernels.hog.hog_fwd (timed on a GPU only; the interpreter runs its gate).
Bytes per call: the image read once (fp32) + every target written once (fp32): the floor a fused kernel can reach.

The images are random integers 0..15 (as floats): every provider then computes exact gradients (|G| <= 60, exact in
fp32 and in TF32 convolutions), and no pixel lies within 3e-4 of a bin edge except exactly on one (G0 = 0: bin 0 for
every provider), so the elementwise correctness gate compares identical bins. With real-valued images ~1e-6 of the
pixels fall within rounding of an edge, where providers legitimately bin differently (tests/kernels/test_hog_kernel.py
bounds that); the timing does not depend on the values.

    python benchmarks/bench_hog.py [--providers released,eager] [--quick] [--out DIR] [--plot]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fastmim.bench.harness import Case, KernelBench, kernel_main
from fastmim.kernels.hog import hog_fwd
from fastmim.targets import HOGTarget
from fastmim.targets.hog import SOBEL_WEIGHT

CELLS = (4, 8, 16, 32)
NBINS = 9


def released_hog(img: torch.Tensor, cells=CELLS, nbins: int = NBINS) -> list[torch.Tensor]:
    """12 passes (scale x colour), zero-fill + scatter per pass, as the released code computes HOG targets."""
    weight = SOBEL_WEIGHT.to(img.device)
    out = []
    for cell in cells:
        channels = []
        for c in range(3):
            x = F.pad(img[:, c : c + 1].float(), (1, 1, 1, 1), mode="reflect")
            g = F.conv2d(x, weight)
            mag = torch.sqrt(g[:, 0:1] ** 2 + g[:, 1:2] ** 2)
            phase = torch.atan2(g[:, 0:1], g[:, 1:2])
            bins = torch.remainder(torch.floor(phase / torch.pi * nbins), nbins).long()
            hist = torch.zeros(img.shape[0], nbins, img.shape[2], img.shape[3], device=img.device)
            hist.scatter_(1, bins, mag)
            hist = F.normalize(F.avg_pool2d(hist, cell, cell), p=2, dim=1)
            channels.append(hist.flatten(2).transpose(1, 2))
        out.append(torch.cat(channels, dim=-1))
    return out


def make_bench(device: torch.device, quick: bool) -> KernelBench:
    """HOG targets for cells 4/8/16/32 px, 9 bins, 224 px images (quick: 32 px, B = 2)."""
    reference = HOGTarget(CELLS, NBINS).to(device)
    providers = {
        "released": released_hog,
        "eager": reference,
        "compile": torch.compile(reference.forward),
        "triton": lambda img: hog_fwd(img, CELLS, NBINS),
    }
    shapes = [(2, 32)] if quick else [(64, 224), (256, 224)]
    cases = []
    for batch, size in shapes:
        n_out = sum((size // c) ** 2 for c in CELLS) * 3 * NBINS
        cases.append(
            Case(
                shape={"B": batch, "H": size, "W": size},
                dtype=torch.float32,
                make=lambda b=batch, s=size: (torch.randint(0, 16, (b, 3, s, s), device=device).float(),),
                bytes=(batch * 3 * size * size + batch * n_out) * 4,
            )
        )
    return KernelBench("hog", providers, cases, modes=("fwd",), reference="eager", atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    sys.exit(kernel_main(make_bench))
