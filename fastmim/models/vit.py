"""The ViT building blocks and the masked encoder shared by LocalMIM and MAE (method 2.1).

Pre-norm blocks (qkv bias, MLP ratio 4, LayerNorm eps 1e-6, exact GELU), a fixed 2-D sin-cos position embedding,
and an encoder that embeds patches, adds positions, drops the masked patches, prepends cls and returns the
outputs of the requested blocks.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastmim.config import ModelConfig, choices
from fastmim.masking import Masking
from fastmim.models.base import masked_gather_ops, stage_range

LN_EPS = 1e-6


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding [(1 +) grid * grid, dim] (the MAE construction, method 2.1).

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


# model.attn: "sdpa" lets torch choose per call; the others force one SDPA backend or use xformers; "auto" is
# resolved by measurement before training (fastmim.train.attn_choice) and acts as "sdpa" until then.
ATTN_BACKENDS = choices(ModelConfig, "attn")  # the values model.attn declares
_FORCED = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_CUDA_ONLY = ("flash", "cudnn", "efficient", "xformers")
_fallback_warned: set[str] = set()


@functools.cache
def _xformers_ops():
    """xformers.ops, or None when xformers is not installed or does not import (it has no CPU kernels anyway)."""
    try:
        return importlib.import_module("xformers.ops")
    except Exception:  # an installed xformers built for another torch can fail with any error at import
        return None


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, H, N, d] through the chosen backend.

    Forced CUDA backends (flash, cudnn, efficient, xformers) fall back to automatic SDPA on CPU tensors, and
    xformers also when it is not installed, with a one-time warning naming the fallback.
    """
    if backend == "auto":
        backend = "sdpa"
    if backend in _CUDA_ONLY and (not q.is_cuda or (backend == "xformers" and _xformers_ops() is None)):
        if backend not in _fallback_warned:
            _fallback_warned.add(backend)
            why = "runs on CUDA only" if not q.is_cuda else "is not installed (pip install fastmim[xformers])"
            warnings.warn(f"model.attn={backend!r} {why}; using torch SDPA instead", stacklevel=2)
        backend = "sdpa"
    if backend == "xformers":
        out = _xformers_ops().memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(_FORCED[backend]):
        return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention. [B, N, C] -> [B, N, C]. ``backend``: one of ATTN_BACKENDS (see attention())."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(multi_head_attention(self.qkv(x), self.num_heads, self.backend))


def multi_head_attention(qkv: Tensor, num_heads: int, backend: str = "sdpa") -> Tensor:
    """Self-attention of the heads packed in ``qkv`` [*, N, 3C] (q, k, v of all heads, as ``Attention.qkv`` makes
    them) -> [*, N, C], heads concatenated: Attention's core, shared with the grouped decoder blocks."""
    *lead, n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(-1, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    return attention(q, k, v, backend).transpose(1, 2).reshape(*lead, n, c)


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Use ``backend`` in every Attention module of ``model`` (encoder and decoders); returns the model."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {', '.join(ATTN_BACKENDS)}")
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return model


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
    """The parameters of the non-overlapping patch embedding: ``proj``, a stride-p convolution 3 -> D (the released
    name). :func:`visible_tokens` applies it."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)


def init_weights(module: nn.Module) -> None:
    """method 2.1 init for Linear and LayerNorm (xavier-uniform weights, zero bias; LN weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskedViTEncoder(nn.Module):
    """ViT encoder over the visible patches only; ``impl`` (set by the owning model) chooses how
    :func:`visible_tokens` computes its input.

    ``forward(imgs [B, 3, H, W], masking, taps) -> [ [B, 1 + len_keep, D] for each tapped block ]``: the un-normed
    outputs of the blocks listed in ``taps`` (0-based). Order: patch embed -> + position -> keep visible ->
    prepend cls (+ its zero position) -> blocks.
    """

    impl = "reference"

    def __init__(
        self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Frozen (method 2.1): a persistent buffer, so it is never trained but travels with checkpoints.
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
        x = visible_tokens(self, imgs, masking.ids_keep)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            outs += [x] * taps.count(i)
            if i >= max(taps):
                break
        return outs


def visible_tokens(encoder: MaskedViTEncoder, imgs: Tensor, ids_keep: Tensor) -> Tensor:
    """The encoder's input [B, 1 + K, D]: the patches ``ids_keep`` [B, K] embedded, + their positions, cls (+ its
    zero position) prepended. impl "reference": every patch is embedded, then the kept ones are gathered, the
    released order (``encoder_input_ref``); "fast": only the kept patches are embedded, in one fused op
    (``encoder_input``, a quarter of the patch-embed FLOPs at mask 0.75)."""
    ops = masked_gather_ops()
    op = ops.encoder_input if encoder.impl == "fast" else ops.encoder_input_ref
    proj = encoder.patch_embed.proj
    with stage_range("patch embed"):  # patch embed + gather, fused under impl "fast"
        return op(imgs, ids_keep, proj.weight, proj.bias, encoder.pos_embed, encoder.cls_token)
