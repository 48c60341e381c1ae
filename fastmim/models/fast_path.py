"""LocalMIM ViT's encoder input and decoders for impl = "fast": fused gather/scatter and grouped decoders.

- ``encode``: the encoder input comes from ``fastmim.kernels.masked_gather.encoder_input`` (only the visible patches
  are patch-embedded; + position, cls prepended, in one op), then the encoder's own blocks run.
- ``decode``: each tap's LayerNorm -> Linear(D, C) runs on cls + visible tokens as in the reference; then one
  ``decoder_input`` kernel writes every decoder's [B, 1 + L, C] input (visible rows at their original positions,
  the decoder's mask token elsewhere, + position).
- Grouped decoders (``grouped=True``): the four decoders have identical shapes, so their blocks run as one
  computation over a leading group axis, each linear a ``torch.baddbmm`` over stacked weights and attention one
  SDPA call over G * B sequences: one launch per op instead of four. The per-decoder modules stay the parameter
  owners (names, shapes, released-checkpoint import and optimizer groups unchanged); their parameters are stacked
  at every forward with a single ``torch.cat`` (~3 M values at width 256, ~12 MB fp32: a few microseconds on a GPU,
  and its backward is views). Each block LayerNorm's affine is folded into the linear after it
  (W' = W diag(w), b' = W b_ln + b: exact up to rounding), so a grouped LayerNorm is one affine-free
  ``F.layer_norm`` instead of a norm plus an extra pass over [G, B, 1 + L, C] for the per-group affine.
  ``grouped=False`` runs the same fused decoder input per decoder followed by the decoder's own modules;
  ``benchmarks/bench_decoders.py`` measures both (eager and compiled) against each other.
Values equal the reference path up to float rounding (tests/models/test_fast_path.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmim.masking import Masking
from fastmim.models.decoder import MaskedDecoder
from fastmim.models.vit import Block, MaskedViTEncoder, attention


def _masked_gather():
    """fastmim.kernels.masked_gather, imported on first use rather than with fastmim: importing a kernel module
    fixes whether its kernels run in Triton's interpreter (TRITON_INTERPRET), which tests set after import."""
    from fastmim.kernels import masked_gather

    return masked_gather


def encode(encoder: MaskedViTEncoder, imgs: Tensor, masking: Masking, taps: Sequence[int]) -> list[Tensor]:
    """``MaskedViTEncoder.forward`` with the fused encoder input: the tapped blocks' outputs [B, 1 + K, D]."""
    proj = encoder.patch_embed.proj
    x = _masked_gather().encoder_input(imgs, masking.ids_keep, proj.weight, proj.bias, encoder.pos_embed,
                                       encoder.cls_token)  # fmt: skip
    return encoder.forward_blocks(x, taps)


def decode(decoders: Sequence[MaskedDecoder], norms: Sequence[nn.LayerNorm], feats: Sequence[Tensor],
           ids_restore: Tensor, grouped: bool = True, block_fn=None) -> list[Tensor]:  # fmt: skip
    """Every decoder's output [B, L, C] (cls dropped, as ``MaskedDecoder.forward``) from the tapped features
    feats[k] [B, 1 + K, D] normed by norms[k]; ``grouped``: the decoders' blocks as one grouped computation, by
    ``block_fn`` (default :func:`grouped_block`; fastmim.train.parallel passes its compiled version)."""
    block_fn = block_fn or grouped_block
    if not grouped:
        outs = []
        for dec, norm, feat in zip(decoders, norms, feats):
            x = decoder_input([dec], dec.embed(norm(feat)).unsqueeze(0), ids_restore)[0]
            for block in dec.blocks:
                x = block(x)
            outs.append(dec.norm(x)[:, 1:])
        return outs
    _check_groupable(decoders)
    x = decoder_input(decoders, torch.stack([d.embed(n(f)) for d, n, f in zip(decoders, norms, feats)]), ids_restore)
    for i in range(len(decoders[0].blocks)):
        x = block_fn([d.blocks[i] for d in decoders], x)
    # The final norms stay per decoder: each reads its contiguous x[g] once, no stacked affine pass.
    return [F.layer_norm(x[g], x.shape[-1:], d.norm.weight, d.norm.bias, d.norm.eps)[:, 1:]
            for g, d in enumerate(decoders)]  # fmt: skip


def decoder_input(decoders: Sequence[MaskedDecoder], y: Tensor, ids_restore: Tensor) -> Tensor:
    """The fused decoder input [G, B, 1 + L, C] of G decoders from their embedded tokens y [G, B, 1 + K, C]."""
    mask_tokens = torch.cat([d.mask_token.reshape(1, -1) for d in decoders])
    pos = torch.cat([d.pos_embed for d in decoders]) if len(decoders) > 1 else decoders[0].pos_embed
    return _masked_gather().decoder_input(y, ids_restore, mask_tokens, pos)


def _check_groupable(decoders: Sequence[MaskedDecoder]) -> None:
    first = [(n, p.shape) for n, p in decoders[0].named_parameters() if not n.startswith("head.")]
    for d in decoders[1:]:
        if [(n, p.shape) for n, p in d.named_parameters() if not n.startswith("head.")] != first:
            raise ValueError("grouped decoders need identical decoder shapes; use grouped=False")


def stack_parameters(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    """name -> the G modules' parameters stacked [G, *shape], from one ``torch.cat`` (one launch, not one per
    parameter); gradients flow back to each module's own parameters."""
    names = [n for n, _ in modules[0].named_parameters()]
    params = [dict(m.named_parameters()) for m in modules]
    flat = torch.cat([p[n].reshape(-1) for n in names for p in params])
    shapes = [params[0][n].shape for n in names]
    sizes = [len(modules) * s.numel() for s in shapes]
    return {n: t.view(len(modules), *s) for n, s, t in zip(names, shapes, flat.split(sizes))}


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [G, ..., in] @ weight[g]^T + bias[g] with weight [G, out, in], bias [G, out]: one batched matmul."""
    g, cin = x.shape[0], x.shape[-1]
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(g, -1, cin), weight.transpose(1, 2))
    return out.view(*x.shape[:-1], weight.shape[1])


def _fold_norm(norm_w: Tensor, norm_b: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Linear(LayerNorm affine(z)) = Linear'(z): weight' = weight * norm_w (per input column), bias' =
    weight @ norm_b + bias. Elementwise ops and a sum (no matmul), so autocast keeps them in the weights' dtype."""
    return weight * norm_w.unsqueeze(1), bias + (weight * norm_b.unsqueeze(1)).sum(-1)


def grouped_block(blocks: Sequence[Block], x: Tensor) -> Tensor:
    """G pre-norm transformer blocks applied to their own group: x [G, B, N, C] -> [G, B, N, C], x[g] through
    blocks[g] (same result as ``blocks[g](x[g])`` up to rounding)."""
    p = stack_parameters(blocks)
    g, b, n, c = x.shape
    heads, first = blocks[0].attn.num_heads, blocks[0]
    h = F.layer_norm(x, (c,), eps=first.norm1.eps)
    qkv = _grouped_linear(h, *_fold_norm(p["norm1.weight"], p["norm1.bias"], p["attn.qkv.weight"], p["attn.qkv.bias"]))
    q, k, v = qkv.reshape(g * b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = attention(q, k, v, first.attn.backend).transpose(1, 2).reshape(g, b, n, c)
    x = x + _grouped_linear(a, p["attn.proj.weight"], p["attn.proj.bias"])
    h = F.layer_norm(x, (c,), eps=first.norm2.eps)
    h = first.mlp.act(_grouped_linear(h, *_fold_norm(p["norm2.weight"], p["norm2.bias"], p["mlp.fc1.weight"],
                                                     p["mlp.fc1.bias"])))  # fmt: skip
    return x + _grouped_linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
