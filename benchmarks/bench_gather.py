"""bench "gather": the fused encoder input and decoder input (fastmim.kernels.masked_gather), forward and
forward + backward.

Cases (LocalMIM ViT-B, B = 256, mask 0.75, bf16 autocast on GPU; --quick: a tiny fp32 case for checking the
instrument on CPU):
- encoder: images [B, 3, 224, 224], 49 kept patches -> [B, 50, 768]; gradients for the patch-embed weight, bias and
  cls token;
- decoder: the four taps' embedded tokens [4, B, 50, 256] -> the decoders' input [4, B, 197, 256]; gradients for the
  tokens and the four mask tokens.
Providers: eager (the ``_ref``: conv on the whole image + pos + gather + cat; cat mask tokens + expanded-index
gather + cat + pos), compile (torch.compile of the ``_ref``), triton (the kernels; timed on a GPU only).
Bytes per call: what an ideal fused op must move (encoder: the kept pixels read + the output written; decoder:
the tokens read + the output written); FLOPs: the encoder's kept-patch matmul.

    python benchmarks/bench_gather.py [--providers eager,compile,triton] [--modes fwd,full] [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from fastmim.bench.harness import Case, KernelBench, kernel_main
from fastmim.kernels import masked_gather as mg
from fastmim.masking import random_masking
from fastmim.models.vit import sincos_pos_embed

OPS = {"eager": (mg.encoder_input_ref, mg.decoder_input_ref), "triton": (mg.encoder_input, mg.decoder_input)}


def _provider(encoder_fn, decoder_fn, amp: torch.dtype | None):
    """One callable for both cases: inputs start with the case's name."""

    def run(which: str, *args):
        ctx = torch.autocast(args[0].device.type, dtype=amp) if amp else nullcontext()
        with ctx:
            return (encoder_fn if which == "encoder" else decoder_fn)(*args)

    return run


def make_bench(device: torch.device, quick: bool) -> KernelBench:
    """Encoder input (B x 3 x 224^2 -> B x 50 x 768) and decoder input (4 x B x 50 x 256 -> 4 x B x 197 x 256)."""
    amp = None if quick else torch.bfloat16  # the GPU case is bf16 autocast, also when gated on a CPU
    batch, grid, patch, dim, dec_dim = (2, 4, 16, 64, 32) if quick else (256, 14, 16, 768, 256)
    length, ratio = grid * grid, 0.75
    compiled = (torch.compile(mg.encoder_input_ref), torch.compile(mg.decoder_input_ref))
    providers = {name: _provider(*fns, amp) for name, fns in {**OPS, "compile": compiled}.items()}
    providers = {k: providers[k] for k in ("eager", "compile", "triton")}
    keep = int(length * (1 - ratio))

    def ids():
        return random_masking(torch.rand(batch, length, device=device), ratio)

    def make_encoder():
        g = torch.Generator(device="cpu").manual_seed(0)
        imgs = torch.randn(batch, 3, grid * patch, grid * patch, generator=g).to(device)
        weight = (torch.randn(dim, 3, patch, patch, generator=g) / (3 * patch * patch) ** 0.5).to(device)
        bias, cls = (torch.randn(dim, generator=g) * 0.02).to(device), torch.randn(1, 1, dim, generator=g).to(device)
        pos = sincos_pos_embed(dim, grid).unsqueeze(0).to(device)
        weight, bias, cls = (t.requires_grad_() for t in (weight, bias, cls))
        return "encoder", imgs, ids().ids_keep, weight, bias, pos, cls

    def make_decoder():
        g = torch.Generator(device="cpu").manual_seed(1)
        y = torch.randn(4, batch, 1 + keep, dec_dim, generator=g).to(device, amp or torch.float32)
        mask_token = (torch.randn(4, dec_dim, generator=g) * 0.02).to(device)
        pos = sincos_pos_embed(dec_dim, grid).unsqueeze(0).expand(4, -1, -1).contiguous().to(device)
        return "decoder", y.requires_grad_(), ids().ids_restore, mask_token.requires_grad_(), pos

    y_bytes = 2 if amp else 4
    cases = [
        Case(
            {"op": "encoder", "B": batch, "img": grid * patch, "keep": keep, "D": dim},
            amp or torch.float32,
            make_encoder,
            bytes=batch * keep * 3 * patch * patch * 4 + batch * (1 + keep) * dim * 4,
            flops=2 * batch * keep * 3 * patch * patch * dim,
        ),
        Case(
            {"op": "decoder", "G": 4, "B": batch, "keep": keep, "L": length, "C": dec_dim},
            amp or torch.float32,
            make_decoder,
            bytes=4 * batch * ((1 + keep) * dec_dim * y_bytes + (1 + length) * dec_dim * 4),
        ),
    ]
    # fp32 (--quick) to 1e-4; bf16: within twice the eager provider's own error against fp64 (the harness's rule)
    return KernelBench("gather", providers, cases, modes=("fwd", "full"), reference="eager", atol=1e-4, rtol=1e-4)


if __name__ == "__main__":
    sys.exit(kernel_main(make_bench))
