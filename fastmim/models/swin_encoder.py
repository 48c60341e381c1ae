"""The sparse Swin encoder of LocalMIM-Swin (method 4): a Swin Transformer that computes the visible tokens only.

Geometry (Swin-B at 224 px): patch 4 gives 56 x 56 tokens; the four stages run at 56, 28, 14 and 7 tokens per side.
The mask unit is 32 px, the footprint of one last-stage token, so an image has (H / 32)^2 units (7 x 7) and a unit
holds 8 x 8, 4 x 4, 2 x 2, 1 x 1 tokens in stages 1-4. The mask is shared by the batch (method 4): every image has the
same visible tokens, so the token layout is computed once per step, on the host, from the list of visible units.

Token layout: a stage holds its visible tokens as [B, V, r, r, C]: the V visible units in raster order, r x r tokens
per unit in raster order ("unit-major" order). Patch merging joins the 2 x 2 tokens inside a unit (it never crosses
units), concatenated in the standard Swin order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]: the
order timm and the fine-tuning code use, so pre-trained weights need no reordering for fine-tuning. (The released
pre-training code concatenates (0,0), (0,1), (1,0), (1,1) instead; fastmim.models.swin_weights swaps the two middle
channel blocks when it imports such weights.)

Window attention on a sparse set of tokens (GreenMIM's group attention): a block with window w and shift s puts the
token at (y, x) in window ((y + o) // w, (x + o) // w), o = (w - s) % w. Whenever w divides the stage's resolution
this is exactly the partition of Swin's cyclic shift plus region mask; otherwise the edge windows are simply smaller
(no padding tokens). Windows, each holding 1..w^2 visible tokens, are packed greedily (first fit, largest first) into
groups of at most G = min(w^2, largest window) tokens; attention runs per group with a mask that lets a token see only
the tokens of its own window, and the relative position bias is indexed by the coordinate offsets. A stage whose
resolution is at most w uses one window covering the map and no shift, as Swin does.

Token coordinates (they decide each token's window and relative-position index) follow one of two rules
(``COORD_RULES``). "true": every token at its own position. "released": the rule of the authors' released
pre-training code, which produced the published Swin results. It keeps tokens in unit-major order, but after a patch
merge it rebuilds the coordinates in raster order of the full map and filters them with the unit-ordered visibility
mask, so at a stage with r x r tokens per unit (side = units_per_side * r tokens) the token with unit-major index t =
u * r * r + a * r + b (unit u, row a, column b in the unit; masked units counted) sits at raster position divmod(t,
side). The first stage (its coordinates are made before any merge) and the r = 1 stage (where divmod(t, side) is the
unit's own position) are unaffected; in stages 2 and 3 (r = 4, 2) about 86 % of the visible tokens get another
token's position at 224 px with 37 of 49 units masked, so windows and relative positions differ. The network's
parameters are the same under both rules; only the function they compute differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmim.config import ModelConfig, choices
from fastmim.models.vit import LN_EPS, Mlp, init_weights


@dataclass(frozen=True)
class WindowLayout:
    """Where each visible token of a stage sits in the packed groups of one block type (plain or shifted).

    ``gather`` [nG * G]: the token (index in unit-major order) in each packed slot; padding slots repeat token 0.
    ``scatter`` [N]: the packed slot of each token (the inverse of gather on real slots).
    ``allowed`` [nG, G, G]: query i may attend to key j (same window; a padding slot sees itself only).
    ``bias_index`` [nG, G, G]: the row of the relative-position table for each pair (0 where not allowed).
    """

    gather: Tensor
    scatter: Tensor
    allowed: Tensor
    bias_index: Tensor
    num_groups: int
    group_size: int

    def to(self, device: torch.device) -> WindowLayout:
        return WindowLayout(
            self.gather.to(device),
            self.scatter.to(device),
            self.allowed.to(device),
            self.bias_index.to(device),
            self.num_groups,
            self.group_size,
        )


def pack_windows(counts: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy bin packing (first fit, largest window first): window indices per group, each group's total count at
    most ``capacity``, each group listed in increasing window order. Every window lands in exactly one group."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if counts[i] > capacity:
            raise ValueError(f"a window holds {counts[i]} tokens, more than the group capacity {capacity}")
        for g, free in enumerate(room):
            if counts[i] <= free:
                groups[g].append(i)
                room[g] -= counts[i]
                break
        else:
            groups.append([i])
            room.append(capacity - counts[i])
    return [sorted(g) for g in groups]


def window_layout(coords: Tensor, window: int, shift: int) -> WindowLayout:
    """The packed layout of tokens at integer ``coords`` [N, 2] (row, column; CPU) for windows of side ``window``
    shifted by ``shift``."""
    offset = (window - shift) % window
    cell = (coords + offset) // window
    wid = cell[:, 0] * (int(cell[:, 1].max()) + 1) + cell[:, 1]
    order = torch.argsort(wid, stable=True)
    counts = torch.unique_consecutive(wid[order], return_counts=True)[1].tolist()
    capacity = min(window * window, max(counts))
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    order_list = order.tolist()
    slots = []
    for group in pack_windows(counts, capacity):
        members = [t for w in group for t in order_list[starts[w] : starts[w] + counts[w]]]
        slots.append(members + [-1] * (capacity - len(members)))
    slot_tok = torch.tensor(slots, dtype=torch.long)  # [nG, G], -1 = padding
    real = slot_tok >= 0
    gather = slot_tok.clamp(min=0)
    # Padding slots get unique negative window ids, so they attend to themselves only (no empty softmax rows).
    slot_win = torch.where(real, wid[gather], -1 - torch.arange(slot_tok.numel()).view_as(slot_tok))
    allowed = slot_win[:, :, None] == slot_win[:, None, :]
    rel = coords[gather][:, :, None, :] - coords[gather][:, None, :, :] + (window - 1)  # [nG, G, G, 2]
    bias_index = torch.where(allowed, rel[..., 0] * (2 * window - 1) + rel[..., 1], 0)
    flat = gather.flatten()
    scatter = torch.empty(coords.shape[0], dtype=torch.long)
    scatter[flat[real.flatten()]] = torch.nonzero(real.flatten()).flatten()
    return WindowLayout(flat, scatter, allowed, bias_index, len(slots), capacity)


COORD_RULES = tuple(c for c in choices(ModelConfig, "swin_coords") if c != "default")  # model.swin_coords's rules


def check_coord_rule(rule: str) -> str:
    if rule not in COORD_RULES:
        raise ValueError(f"unknown coordinate rule '{rule}'; use one of {', '.join(COORD_RULES)}")
    return rule


def unit_token_coords(visible: Tensor, units_per_side: int, r: int, rule: str = "true") -> Tensor:
    """Coordinates [V * r * r, 2] (row, column) of the tokens of the visible units (unit-major order) on a map of
    units_per_side * r tokens per side: their own positions ("true"), or ("released") the raster position of each
    token's unit-major index among all units' tokens (module docstring; the caller applies it after a merge only)."""
    if check_coord_rule(rule) == "released":
        t = (visible[:, None] * r * r + torch.arange(r * r)).flatten()
        side = units_per_side * r
        return torch.stack([t // side, t % side], dim=-1)
    uy, ux = (visible // units_per_side) * r, (visible % units_per_side) * r
    a = torch.arange(r)
    rows = (uy[:, None, None] + a[None, :, None]).expand(-1, r, r)
    cols = (ux[:, None, None] + a[None, None, :]).expand(-1, r, r)
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2)


class WindowAttention(nn.Module):
    """Multi-head attention inside packed window groups with Swin's relative position bias.

    ``forward(x [B, nG, G, C], layout) -> [B, nG, G, C]``. Parameters (timm / Swin names): ``qkv``, ``proj``,
    ``relative_position_bias_table`` [(2w - 1)^2, heads], row (dy + w - 1) * (2w - 1) + (dx + w - 1).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))

    def forward(self, x: Tensor, layout: WindowLayout) -> Tensor:
        b, g, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, g, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5).reshape(3, b, g * h, n, c // h)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[layout.bias_index].permute(0, 3, 1, 2)  # [nG, heads, G, G]
        bias = bias.masked_fill(~layout.allowed[:, None], float("-inf")).reshape(1, g * h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.reshape(b, g, h, n, c // h).transpose(2, 3).reshape(b, g, n, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on the visible tokens: x + attn(norm1(x)) within windows, then + mlp(norm2(x)).
    ``forward(x [B, N, C], layout) -> [B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, layout: WindowLayout) -> Tensor:
        b, _, c = x.shape
        packed = self.norm1(x)[:, layout.gather].reshape(b, layout.num_groups, layout.group_size, c)
        x = x + self.attn(packed, layout).reshape(b, -1, c)[:, layout.scatter]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """``[B, V, r, r, C] -> [B, V, r / 2, r / 2, 2C]``: the 2 x 2 tokens inside each unit concatenated in the standard
    Swin order (row, column offsets (0,0), (1,0), (0,1), (1,1)), then ``norm`` (LayerNorm 4C) and ``reduction``
    (Linear 4C -> 2C, no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, v, r, _, c = x.shape
        # (b, v, row, dy, col, dx, c) -> (b, v, row, col, dx, dy, c): channel block index dx * 2 + dy.
        x = x.reshape(b, v, r // 2, 2, r // 2, 2, c).permute(0, 1, 2, 4, 5, 3, 6).reshape(b, v, r // 2, r // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``blocks`` (alternating plain and shifted windows), then ``downsample`` (PatchMerging) unless last.
    ``forward(x [B, V, r, r, C], coords [V * r * r, 2]) -> [B, V, r', r', C']``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        resolution: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        # Swin: a map no larger than the window is one window, never shifted.
        self.window = min(window, resolution)
        self.shift = 0 if resolution <= window else window // 2
        self.blocks = nn.ModuleList(SwinBlock(dim, num_heads, self.window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        plain = window_layout(coords, self.window, 0).to(x.device)
        shifted = window_layout(coords, self.window, self.shift).to(x.device) if self.shift else plain
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        for i, block in enumerate(self.blocks):
            flat = block(flat, shifted if i % 2 else plain)
        x = flat.reshape(x.shape)
        return x if self.downsample is None else self.downsample(x)


class SwinPatchEmbed(nn.Module):
    """``proj`` (Conv patch x patch, stride patch) then ``norm`` (LayerNorm): [n, 3, s, s] -> [n, s/p, s/p, C]."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SparseSwinEncoder(nn.Module):
    """Swin over the visible mask units only.

    ``forward(imgs [B, 3, H, W], visible [V] int64 unit indices, raster order, ascending) -> one tensor per stage,
    [B, V, r_i, r_i, C_i]``: each stage's output after its patch merging (stages 1-3) or blocks (stage 4), un-normed;
    r_i = 4, 2, 1, 1 and C_i = 2C, 4C, 8C, 8C for four stages. Module names follow Swin with the downsample at the
    end of a stage (``layers.{i}.blocks.{j}``, ``layers.{i}.downsample``); timm's layout is one index later.
    ``coords``: the token-coordinate rule of the stages after the first, "true" or "released" (module docstring);
    a plain attribute, not part of the state dict, so weights move freely between the rules.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        coords: str = "true",
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have the same length")
        self.coords = check_coord_rule(coords)
        self.unit_size = patch_size * 2 ** (len(depths) - 1)
        if img_size % self.unit_size:
            raise ValueError(f"the image size {img_size} must be a multiple of the {self.unit_size} px mask unit")
        self.patch_size, self.embed_dim, self.window_size = patch_size, embed_dim, window_size
        self.units_per_side = img_size // self.unit_size
        grid = img_size // patch_size
        self.patch_embed = SwinPatchEmbed(patch_size, embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2**i, d, h, window_size, grid // 2**i, i < len(depths) - 1, mlp_ratio)
            for i, (d, h) in enumerate(zip(depths, num_heads))
        )
        init_weights(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def num_units(self) -> int:
        return self.units_per_side**2

    def forward(self, imgs: Tensor, visible: Tensor) -> list[Tensor]:
        b, u, s = imgs.shape[0], self.units_per_side, self.unit_size
        visible = visible.cpu()
        units = imgs.reshape(b, 3, u, s, u, s).permute(0, 2, 4, 1, 3, 5).reshape(b, u * u, 3, s, s)
        units = units[:, visible.to(imgs.device)]
        x = self.patch_embed(units.reshape(-1, 3, s, s))
        x = x.reshape(b, len(visible), *x.shape[1:])
        outs = []
        for i, layer in enumerate(self.layers):
            # the first stage's coordinates predate any merge: the released rule leaves them true
            x = layer(x, unit_token_coords(visible, u, x.shape[2], self.coords if i else "true"))
            outs.append(x)
        return outs
