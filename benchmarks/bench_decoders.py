"""bench "decoders": LocalMIM's four decoders run one after another ("separate") or as one grouped computation
("grouped"), each eager and under torch.compile: which one LocalMIMViT.group_decoders should pick.

What is timed (impl = "fast"; "grouped" is fastmim.models.grouped.decode_grouped): from the four tapped encoder
outputs [B, 50, 768] to the four decoder outputs [B, 196, 256]: tap LayerNorm -> embed Linear -> fused decoder
input -> 1 block (8 heads, MLP 4) -> LayerNorm, for all four decoders. "grouped" includes stacking the decoders'
parameters (one torch.cat per block per step), so the comparison answers whether stacking costs more than it saves.
In full mode every decoder parameter and tap norm is an input, so the weight gradients are timed too. ViT-B shapes,
B = 256, bf16 autocast on GPU; --quick: a tiny fp32 case for checking the instrument on CPU (CPU timings decide
nothing).
The prediction heads are not part of it (they differ per scale; see fastmim.models.fast_heads).

    python benchmarks/bench_decoders.py [--providers separate,grouped,separate_compile,grouped_compile]
                                        [--modes full,fwd] [--quick] [--out DIR]

Default mode: full only (what a training step runs), so the two compiled providers' compile time fits the GPU
suite's per-benchmark limit.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastmim.bench.harness import Case, KernelBench, kernel_main
from fastmim.masking import random_masking
from fastmim.models.decoder import MaskedDecoder
from fastmim.models.grouped import GroupedBlock, decode_grouped
from fastmim.models.vit import LN_EPS


class TapDecoders(nn.Module):
    """The tap norms and decoders of a LocalMIM ViT (heads left out), with the same parameter names."""

    def __init__(self, in_dim: int, dim: int, heads: int, grid: int, taps: int = 4) -> None:
        super().__init__()
        self.tap_norms = nn.ModuleList(nn.LayerNorm(in_dim, eps=LN_EPS) for _ in range(taps))
        self.decoders = nn.ModuleList(MaskedDecoder(in_dim, dim, 1, heads, grid) for _ in range(taps))
        for decoder in self.decoders:
            decoder.impl = "fast"  # the fused decoder input, as in LocalMIMViT with impl "fast"
        self.grouped_block = GroupedBlock()

    def forward(self, feats: list[Tensor], ids_restore: Tensor, grouped: bool) -> list[Tensor]:
        if grouped:
            return decode_grouped(self.decoders, self.tap_norms, feats, ids_restore, self.grouped_block)
        return [dec(norm(f), ids_restore) for dec, norm, f in zip(self.decoders, self.tap_norms, feats)]


def _provider(module: TapDecoders, grouped: bool, amp: torch.dtype | None, compile_: bool):
    names = [n for n, _ in module.named_parameters()]

    def run(f0, f1, f2, f3, ids_restore, *params):
        ctx = torch.autocast(f0.device.type, dtype=amp) if amp else nullcontext()
        with ctx:
            return functional_call(module, dict(zip(names, params)), ([f0, f1, f2, f3], ids_restore, grouped))

    return torch.compile(run) if compile_ else run


def make_bench(device: torch.device, quick: bool) -> KernelBench:
    """Four LocalMIM ViT-B decoders (768 -> 256, 1 block, 8 heads, 197 tokens), B = 256."""
    amp = None if quick else torch.bfloat16  # the GPU case is bf16 autocast, also when gated on a CPU
    batch, grid, in_dim, dim, heads = (2, 4, 64, 32, 2) if quick else (256, 14, 768, 256, 8)
    torch.manual_seed(0)
    module = TapDecoders(in_dim, dim, heads, grid).to(device)
    providers = {
        f"{kind}{suffix}": _provider(module, kind == "grouped", amp, bool(suffix))
        for suffix in ("", "_compile")
        for kind in ("separate", "grouped")
    }
    length = grid * grid
    keep = int(length * 0.25)

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        feats = [torch.randn(batch, 1 + keep, in_dim, generator=g).to(device).requires_grad_() for _ in range(4)]
        ids_restore = random_masking(torch.rand(batch, length, generator=g), 0.75).ids_restore.to(device)
        params = [p.detach().clone().requires_grad_() for p in module.parameters()]
        return (*feats, ids_restore, *params)

    tokens = batch * (1 + length)
    # Per decoder: qkv 3 C^2, proj C^2 and MLP 8 C^2 MACs per token, attention 2 N C MACs per token, embed D C
    # MACs per kept token; 2 FLOPs per MAC.
    macs = tokens * (12 * dim * dim + 2 * (1 + length) * dim) + batch * (1 + keep) * in_dim * dim
    flops = 4 * 2 * macs
    case = Case(
        {"B": batch, "taps": 4, "keep": keep, "L": length, "D": in_dim, "C": dim},
        amp or torch.float32,
        make,
        flops=flops,
    )
    # fp32 (--quick) to 1e-4 (tests/models/test_grouped.py checks to 1e-5). bf16: the weight gradients are sums
    # over B * 197 tokens and the two providers round differently (folded LayerNorm affine), so the harness's rule
    # applies: within twice the separate decoders' own bf16 error against fp64.
    return KernelBench(
        "decoders", providers, [case], modes=("full",), reference="separate", atol=1e-4, rtol=1e-4, cuda_only=()
    )


if __name__ == "__main__":
    sys.exit(kernel_main(make_bench))
