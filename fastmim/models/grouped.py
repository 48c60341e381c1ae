"""LocalMIM ViT's four decoders as one grouped computation (impl = "fast").

The four decoders have identical shapes, so their blocks run as one computation over a leading group axis: each
linear a ``torch.baddbmm`` over stacked weights, attention one SDPA call over G * B sequences, one launch per op
instead of four. The per-decoder modules stay the parameter owners (names, shapes, released-checkpoint import and
optimizer groups unchanged); their parameters are stacked at every forward with a single ``torch.cat`` (~3 M values
at width 256, ~12 MB fp32: a few microseconds on a GPU, and its backward is views). Each block LayerNorm's affine is
folded into the linear after it (W' = W diag(w), b' = W b_ln + b: exact up to rounding), so a grouped LayerNorm is
one affine-free ``F.layer_norm`` instead of a norm plus an extra pass over [G, B, 1 + L, C] for the per-group affine.
Everything else is the decoders' own modules: their embeddings, their input (``decoder_input`` over the G decoders
at once), their final norms.

The reference is each decoder on its own (``LocalMIMViT.group_decoders = False``, which under impl "fast" still
uses the fused decoder input); ``benchmarks/bench_decoders.py`` measures both, eager and compiled. Values equal the
reference up to float rounding (tests/models/test_grouped.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmim.models.base import stage_range
from fastmim.models.decoder import MaskedDecoder, decoder_input
from fastmim.models.vit import Block, multi_head_attention


class GroupedBlock(nn.Module):
    """G pre-norm transformer blocks, each on its own group: ``forward(blocks, x [G, B, N, C]) -> [G, B, N, C]``,
    x[g] through blocks[g] (``torch.stack([blocks[g](x[g]) for g ...])`` up to rounding). It holds no parameters
    (the blocks do); it is a module so that fastmim.train.parallel compiles it as one region, as it does each Block.
    """

    def forward(self, blocks: Sequence[Block], x: Tensor) -> Tensor:
        p = stack_parameters(blocks)
        first, c = blocks[0], x.shape[-1]
        qkv = _grouped_linear(F.layer_norm(x, (c,), eps=first.norm1.eps), *_fold_norm(p, "norm1", "attn.qkv"))
        a = multi_head_attention(qkv, first.attn.num_heads, first.attn.backend)
        x = x + _grouped_linear(a, *_linear(p, "attn.proj"))
        h = _grouped_linear(F.layer_norm(x, (c,), eps=first.norm2.eps), *_fold_norm(p, "norm2", "mlp.fc1"))
        return x + _grouped_linear(first.mlp.act(h), *_linear(p, "mlp.fc2"))


def decode_grouped(
    decoders: Sequence[MaskedDecoder],
    norms: Sequence[nn.LayerNorm],
    feats: Sequence[Tensor],
    ids_restore: Tensor,
    block: GroupedBlock,
) -> list[Tensor]:
    """``[decoders[k](norms[k](feats[k]), ids_restore) for k ...]`` (each [B, L, C]) as one grouped computation;
    feats[k] [B, 1 + K, D]. ``block``: the model's GroupedBlock (compiled or not)."""
    _check_groupable(decoders)
    with stage_range("decoders"):
        y = torch.stack([d.embed(n(f)) for d, n, f in zip(decoders, norms, feats)])
        x = decoder_input(decoders, y, ids_restore)
        for i in range(len(decoders[0].blocks)):
            x = block([d.blocks[i] for d in decoders], x)
        # The final norms stay per decoder: each reads its contiguous x[g] once, no stacked affine pass.
        return [d.norm(x[g])[:, 1:] for g, d in enumerate(decoders)]


def _check_groupable(decoders: Sequence[MaskedDecoder]) -> None:
    first = [(n, p.shape) for n, p in decoders[0].named_parameters() if not n.startswith("head.")]
    for d in decoders[1:]:
        if [(n, p.shape) for n, p in d.named_parameters() if not n.startswith("head.")] != first:
            raise ValueError("grouped decoders need identical decoder shapes; set group_decoders = False")


def stack_parameters(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    """name -> the G modules' parameters stacked [G, *shape], from one ``torch.cat`` (one launch, not one per
    parameter); gradients flow back to each module's own parameters."""
    names = [n for n, _ in modules[0].named_parameters()]
    params = [dict(m.named_parameters()) for m in modules]
    flat = torch.cat([p[n].reshape(-1) for n in names for p in params])
    shapes = [params[0][n].shape for n in names]
    sizes = [len(modules) * s.numel() for s in shapes]
    return {n: t.view(len(modules), *s) for n, s, t in zip(names, shapes, flat.split(sizes))}


def _linear(p: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    return p[f"{name}.weight"], p[f"{name}.bias"]


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [G, ..., in] @ weight[g]^T + bias[g] with weight [G, out, in], bias [G, out]: one batched matmul."""
    g, cin = x.shape[0], x.shape[-1]
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(g, -1, cin), weight.transpose(1, 2))
    return out.view(*x.shape[:-1], weight.shape[1])


def _fold_norm(p: dict[str, Tensor], norm: str, linear: str) -> tuple[Tensor, Tensor]:
    """Linear(LayerNorm affine(z)) = Linear'(z): weight' = weight * norm_w (per input column), bias' =
    weight @ norm_b + bias. Elementwise ops and a sum (no matmul), so autocast keeps them in the weights' dtype."""
    (norm_w, norm_b), (weight, bias) = _linear(p, norm), _linear(p, linear)
    return weight * norm_w.unsqueeze(1), bias + (weight * norm_b.unsqueeze(1)).sum(-1)
