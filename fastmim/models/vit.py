"""The ViT building blocks and the masked encoder shared by LocalMIM and MAE (SPEC 2.1).

Pre-norm blocks (qkv bias, MLP ratio 4, LayerNorm eps 1e-6, exact GELU), a fixed 2-D sin-cos position embedding,
and an encoder that embeds patches, adds positions, drops the masked patches, prepends cls and returns the
outputs of the requested blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmim.masking import Masking

LN_EPS = 1e-6


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding [(1 +) grid * grid, dim] (the MAE construction, SPEC 2.1).

    Token t sits at row t // grid, column t % grid. The first dim / 2 channels encode the column and the second
    half the row (the MAE code's meshgrid order), each as [sin | cos] with frequencies 1 / 10000^(2i / (dim / 2)).
    The cls row, when present, is zero.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class Attention(nn.Module):
    """Multi-head self-attention through torch's scaled_dot_product_attention. [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: [B, 3, H, W] -> [B, L, D] (a stride-p convolution, `proj`)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module: nn.Module) -> None:
    """SPEC 2.1 init for Linear and LayerNorm (xavier-uniform weights, zero bias; LN weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskedViTEncoder(nn.Module):
    """ViT encoder over the visible patches only.

    ``forward(imgs [B, 3, H, W], masking, taps) -> [ [B, 1 + len_keep, D] for each tapped block ]``: the un-normed
    outputs of the blocks listed in ``taps`` (0-based). Order: patch embed -> + position -> keep visible ->
    prepend cls (+ its zero position) -> blocks.
    """

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Frozen (SPEC 2.1): a persistent buffer, so it is never trained but travels with checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.patch_embed.grid).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        init_weights(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def grid(self) -> int:
        return self.patch_embed.grid

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward(self, imgs: Tensor, masking: Masking, taps: Sequence[int]) -> list[Tensor]:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            outs += [x] * taps.count(i)
            if i >= max(taps):
                break
        return outs
