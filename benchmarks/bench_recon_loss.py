"""bench "heads_loss": the four LocalMIM ViT prediction heads + the multi-scale masked MSE (method 2.3 step 6, 2.4).

Inputs: the four decoders' output tokens [B, L, C] (fp32, as the decoders' final LayerNorm returns them under
autocast), the full targets [B, N_k, 27] (fp32), the patch mask, and every head parameter (so that "full" times the
weight gradients too, as a training step does).
Providers:
- eager: the method-literal path: ScaleHead on full 14 x 14 maps (transposed convs, LN2d, GELU, 1x1 convs), masks
  upsampled by scale_weights, masked_mse per scale;
- compile: torch.compile of eager;
- triton: impl = "fast": per-token heads on masked cells only (fastmim.models.fast_heads) + the fused loss kernel
  (fastmim.kernels.recon_loss);
- fast_compile: torch.compile of the triton provider (the kernel stays one opaque op; inductor fuses the s = 4
  head's LN + GELU and the gathers around the matmuls): what hand-fusing LN + GELU could gain at most.
  (On CPU the loss inside is the kernel's PyTorch reference.)
GPU case: ViT-B, B = 256, mask 0.75, bf16 autocast. Bytes per call: tokens + targets + mask read once (fp32), the
floor any implementation pays. The bf16 correctness gate is the tests' rule (tests/kernels/test_recon_loss.py):
every loss and gradient within twice the eager provider's own bf16 error against an fp64 evaluation of eager (a
fixed tolerance failed a head-bias gradient that differed by one bf16 ulp at B = 256); fp32 (--quick) to 1e-7 / 1e-4.

    python benchmarks/bench_recon_loss.py [--providers eager,triton] [--modes fwd,full] [--quick] [--out DIR]
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastmim.bench.harness import Case, KernelBench, kernel_main
from fastmim.masking import num_kept, random_masking, scale_weights
from fastmim.models.base import masked_mse
from fastmim.models.decoder import ScaleHead
from fastmim.models.fast_heads import heads_and_loss

SCALES = (4, 2, 1, 0.5)
OUT = 27  # 3 x 9 HOG bins
RATIO = 0.75


class HeadsLoss(nn.Module):
    """The four heads and the summed loss of one implementation: forward(tokens, targets, mask) -> losses [4]."""

    def __init__(self, heads: nn.ModuleList, grid: int, fast: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads, self.grid, self.fast, self.dtype = heads, grid, fast, dtype

    def forward(self, tokens: list[Tensor], targets: list[Tensor], mask: Tensor) -> Tensor:
        autocast = torch.autocast(mask.device.type, dtype=self.dtype) if self.dtype != torch.float32 else None
        with autocast or contextlib.nullcontext():
            if self.fast:
                num_masked = self.grid**2 - num_kept(self.grid**2, RATIO)
                return torch.stack(heads_and_loss(list(self.heads), tokens, targets, mask, self.grid, num_masked)[1])
            losses = [
                masked_mse(head(x), t, scale_weights(mask, self.grid, s))
                for head, x, t, s in zip(self.heads, tokens, targets, SCALES)
            ]
            return torch.stack(losses)


def provider(module: HeadsLoss, names: list[str]):
    """inputs = (4 token tensors, 4 targets, mask, *head parameters) -> losses [4], parameters swapped in."""

    def run(*inputs: Tensor) -> Tensor:
        params = dict(zip(names, inputs[9:]))
        return functional_call(module, params, (list(inputs[:4]), list(inputs[4:8]), inputs[8]))

    return run


def make_bench(device: torch.device, quick: bool) -> KernelBench:
    """LocalMIM ViT heads + loss (quick: B = 4, 4 x 4 patches, width 32, fp32)."""
    batch, grid, dim, dtype = (4, 4, 32, torch.float32) if quick else (256, 14, 256, torch.bfloat16)
    heads = nn.ModuleList(ScaleHead(dim, OUT, s, grid) for s in SCALES).to(device)
    names = [f"heads.{n}" for n, _ in heads.named_parameters()]
    eager = provider(HeadsLoss(heads, grid, fast=False, dtype=dtype), names)
    fast = provider(HeadsLoss(heads, grid, fast=True, dtype=dtype), names)
    providers = {"eager": eager, "compile": torch.compile(eager), "triton": fast, "fast_compile": torch.compile(fast)}

    def make() -> tuple:
        g = torch.Generator().manual_seed(0)
        tokens = [torch.randn(batch, grid * grid, dim, generator=g).to(device).requires_grad_() for _ in SCALES]
        targets = [torch.rand(batch, int(grid * s) ** 2, OUT, generator=g).to(device) for s in SCALES]
        mask = random_masking(torch.rand(batch, grid * grid, generator=g), RATIO).mask.to(device)
        params = [p.detach().clone().requires_grad_() for p in heads.parameters()]
        return (*tokens, *targets, mask, *params)

    cells = sum(int(grid * s) ** 2 for s in SCALES)
    case = Case(
        shape={"B": batch, "L": grid * grid, "C": dim, "out": OUT},
        dtype=dtype,
        make=make,
        bytes=batch * (4 * grid * grid * dim + cells * OUT + grid * grid) * 4,
    )
    return KernelBench("heads_loss", providers, [case], modes=("fwd", "full"), reference="eager", atol=1e-7, rtol=1e-4)


if __name__ == "__main__":
    sys.exit(kernel_main(make_bench))
