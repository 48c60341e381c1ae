"""bench "attention": every attention backend on LocalMIM ViT-B's shapes, forward and forward + backward.

Shapes (docs/performance.md section 2): the encoder sees 1 + 49 tokens (12 heads of 64), each decoder 1 + 196 tokens
(8 heads of 32). Providers: eager (explicit softmax(q k^T / sqrt(d)) v, as the released code computes it), sdpa
(torch picks), flash / cudnn / efficient / math (SDPA forced), xformers (when installed). At these short sequence
lengths the win is avoiding materialised scores and copies, not FLOPs: measure all, keep the fastest as model.attn.

    python benchmarks/bench_attention.py [--providers ...] [--modes fwd,full] [--quick] [--out DIR] [--plot]
"""

from __future__ import annotations

import sys

import torch

from fastmim.bench.harness import Case, KernelBench, kernel_main
from fastmim.models.vit import _xformers_ops, attention


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def make_bench(device: torch.device, quick: bool) -> KernelBench:
    """Attention over encoder (B x 12 x 50 x 64) and decoder (B x 8 x 197 x 32) shapes."""
    dtype = torch.float32 if quick else torch.bfloat16  # the GPU case is bf16, also when gated on a CPU
    backends = ["sdpa", "flash", "cudnn", "efficient", "math"] + (["xformers"] if _xformers_ops() else [])
    providers = {"eager": eager_attention}
    providers.update({b: (lambda q, k, v, b=b: attention(q, k, v, b)) for b in backends})
    batch = 2 if quick else 256
    cases = []
    for name, heads, tokens, dim in (("encoder", 12, 50, 64), ("decoder", 8, 197, 32)):

        def make(h=heads, n=tokens, d=dim):
            return tuple(torch.randn(batch, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

        elem = batch * heads * tokens * dim
        shape = {"where": name, "B": batch, "H": heads, "N": tokens, "d": dim}
        flops = 4 * batch * heads * tokens * tokens * dim
        cases.append(Case(shape, dtype, make, bytes=4 * elem * dtype.itemsize, flops=flops))
    # fp32 (--quick) to 1e-4; bf16: within twice eager's own error against fp64 (the harness's rule)
    return KernelBench(
        "attention",
        providers,
        cases,
        modes=("fwd", "full"),
        reference="eager",
        atol=1e-4,
        rtol=1e-4,
        cuda_only=("flash", "cudnn", "efficient", "xformers"),
    )


if __name__ == "__main__":
    sys.exit(kernel_main(make_bench))
