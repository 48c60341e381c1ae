"""Masked-token decoders and the LocalMIM per-scale prediction heads (method 2.3).

A decoder projects the encoder tokens (cls + visible) to its width, inserts its learned mask token at every removed
position (un-shuffling with ids_restore), adds its fixed sin-cos position embedding, runs its blocks and a final
LayerNorm, and returns the patch tokens [B, L, C] in raster order (cls dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmim.models.base import masked_gather_ops
from fastmim.models.vit import LN_EPS, Block, init_weights, sincos_pos_embed


class MaskedDecoder(nn.Module):
    """``forward(x [B, 1 + len_keep, D_in], ids_restore [B, L]) -> [B, L, dim]``.

    Parameters: ``embed`` (Linear D_in -> dim), ``mask_token`` [1, 1, dim], ``pos_embed`` (frozen buffer
    [1, 1 + L, dim]), ``blocks``, ``norm``. ``impl`` (set by the owning model) chooses how :func:`decoder_input`
    computes the blocks' input.
    """

    impl = "reference"

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        x = decoder_input([self], self.embed(x).unsqueeze(0), ids_restore)[0]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


def decoder_input(decoders: Sequence[MaskedDecoder], y: Tensor, ids_restore: Tensor) -> Tensor:
    """The blocks' input [G, B, 1 + L, C] of G decoders of one width from their embedded tokens y [G, B, 1 + K, C]
    (cls + visible): each decoder's mask token at the removed positions, all tokens un-shuffled to raster order with
    ids_restore [B, L], cls in front, + each decoder's position embedding. impl "reference": concatenate, gather,
    concatenate, add, the released steps (``decoder_input_ref``); "fast": one pass that reads each visible row once
    and writes each output row once (``decoder_input``)."""
    ops = masked_gather_ops()
    op = ops.decoder_input if decoders[0].impl == "fast" else ops.decoder_input_ref
    if len(decoders) == 1:
        return op(y, ids_restore, decoders[0].mask_token.reshape(1, -1), decoders[0].pos_embed)
    mask_tokens = torch.cat([d.mask_token.reshape(1, -1) for d in decoders])
    return op(y, ids_restore, mask_tokens, torch.cat([d.pos_embed for d in decoders]))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a [B, C, H, W] map, at each position (method 2.3 "LN2d", eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, LN_EPS)
        return x.permute(0, 3, 1, 2)


class ScaleHead(nn.Module):
    """Prediction head of one scale s: tokens [B, L, C] -> predictions [B, N_k, out_dim] (method 2.3 step 6).

    s = 4: up1 (ConvTranspose C -> C/2, k2 s2) -> norm (LN2d) -> GELU -> up2 (ConvTranspose C/2 -> C/4) -> proj (1x1)
    s = 2: up1 (ConvTranspose C -> C/2) -> proj;  s = 1: proj;  s = 1/2: AvgPool(2) -> proj.
    Conv layers keep PyTorch's default init (method 2.3).
    """

    def __init__(self, dim: int, out_dim: int, scale: float, grid: int) -> None:
        super().__init__()
        self.scale, self.grid = scale, grid
        if scale == 4:
            self.up1 = nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)
            self.norm = LayerNorm2d(dim // 2)
            self.up2 = nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2)
            proj_in = dim // 4
        elif scale == 2:
            self.up1 = nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)
            proj_in = dim // 2
        elif scale in (1, 0.5):
            proj_in = dim
        else:
            raise ValueError(f"unsupported scale {scale}; LocalMIM ViT heads exist for 4, 2, 1 and 1/2")
        self.proj = nn.Conv2d(proj_in, out_dim, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:
        b, _, c = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        if self.scale == 4:
            x = self.up2(F.gelu(self.norm(self.up1(x))))
        elif self.scale == 2:
            x = self.up1(x)
        elif self.scale == 0.5:
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.proj(x).flatten(2).transpose(1, 2)
