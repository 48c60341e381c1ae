"""Independent, deliberately naive oracle of the authors' released LocalMIM-Swin pre-training computation.

A literal transcription of the released model's description (a GreenMIM-style Swin that computes the visible tokens
only, one mask of 32 px units per batch, four stage taps with light decoders) and of its token-coordinate rule,
independent of fastmim's Swin modules (nothing is imported from fastmim): dense attention of every visible token to
the visible tokens of its window (no packing), coordinates listed the way the released code lists them. The pieces
shared with the ViT oracle (blocks, HOG and pixel targets, masked MSE, sin-cos embedding) come from tests/oracles.py,
which this module extends.

Public names:
    released_swin_unit_mask(perm, mask_ratio) -> bool [L]
    swin_token_coords(unit_masked, units_per_side, r, rule, merged) -> [N_vis, 2]
    swin_window_ids(coords, window, shift) -> [N, 2]
    swin_relative_position_index(coords, window) -> [N, N]
    ReleasedLocalMIMSwin(...)  forward(imgs, unit_mask) -> (loss, [L_0, L_1, L_2, L_3])
"""

import torch
from torch import nn

from tests.oracles import (
    Block,
    HOGLayer,
    Mlp,
    _frozen,
    _init_linear_and_layernorm,
    literal_masked_mse,
    literal_targets,
    sincos_pos_embed_2d,
)

# ----------------------------------------------------------------------------------------------------------------
# LocalMIM-Swin: the authors' released pre-training computation, module names of their checkpoints
# ----------------------------------------------------------------------------------------------------------------
# Geometry: the image is cut into mask units of 8 x 8 patches (32 px at patch 4), u x u of them. A stage holds r x r
# tokens per unit (r = 8, 4, 2, 1) and u * r tokens per side. The encoder keeps the visible tokens in "unit-major"
# order: unit by unit (units in raster order), then row and column inside the unit.


def released_swin_unit_mask(perm, mask_ratio):
    """The released mask rule: unit i is masked iff perm[i] <= int(mask_ratio * L), perm = torch.randperm(L).
    Returns bool [L], True = masked: int(mask_ratio * L) + 1 units."""
    L = perm.numel()
    return perm <= int(mask_ratio * L)


def swin_token_coords(unit_masked, units_per_side, r, rule, merged):
    """(row, column) [N_vis, 2] of the visible tokens of a stage with r x r tokens per unit, in unit-major order.

    unit_masked: bool [u * u] (raster order of units, True = masked). rule "true", or a stage whose coordinates were
    made before any patch merge (merged=False): every token's own position. rule "released" after a merge: the
    released code lists the coordinates of the whole map in raster order and filters that list with the unit-major
    visibility mask, so the token with unit-major index t (masked units counted) gets raster position divmod(t, side).
    """
    side = units_per_side * r
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([rows, cols], dim=-1)  # side x side x 2: entry [y, x] holds (y, x)
    visible = (~unit_masked.bool()).repeat_interleave(r * r)  # one flag per token, unit-major order
    if rule == "released" and merged:
        listed = grid.reshape(side * side, 2)  # raster order
    elif rule in ("true", "released"):
        u = units_per_side
        listed = grid.reshape(u, r, u, r, 2).permute(0, 2, 1, 3, 4).reshape(side * side, 2)  # unit-major order
    else:
        raise ValueError(rule)
    return listed[visible]


def swin_window_ids(coords, window, shift):
    """Window (row, column) [N, 2] of tokens at coords [N, 2]: floor((coord + (window - shift) mod window) / window).
    shift = window // 2 moves the window grid by half a window, the partition of Swin's cyclic shift + region mask."""
    return torch.div(coords + (window - shift) % window, window, rounding_mode="floor")


def swin_relative_position_index(coords, window):
    """[N, N] row of the relative-position table for each pair (i, j): (dy + w - 1) * (2w - 1) + (dx + w - 1) with
    (dy, dx) = coords[i] - coords[j]; meaningful for pairs in one window (|dy|, |dx| < w)."""
    d = coords[:, None, :] - coords[None, :, :] + (window - 1)
    return d[..., 0] * (2 * window - 1) + d[..., 1]


class SwinWindowAttention(nn.Module):
    """Attention of every visible token to every visible token of its own window (dense N x N, no packing), with
    the relative position bias. relative_position_index: the full-window index the checkpoints carry (unused)."""

    def __init__(self, dim, num_heads, window):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        full = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        self.register_buffer("relative_position_index", swin_relative_position_index(full, window))

    def forward(self, x, coords, shift):
        B, N, D = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each B x heads x N x head_dim
        attn = (q * (D // h) ** -0.5) @ k.transpose(-2, -1)  # B x heads x N x N
        ids = swin_window_ids(coords, self.window, shift)
        same_window = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)  # N x N
        index = torch.where(same_window, swin_relative_position_index(coords, self.window), 0)
        attn = attn + self.relative_position_bias_table[index].permute(2, 0, 1)  # heads x N x N
        # The released code adds -100 instead of -inf: a weight below e^-100 relative, far under any tolerance here.
        attn = attn.masked_fill(~same_window, float("-inf")).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, D)
        return self.proj(out)


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SwinWindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, coords, shift):
        x = x + self.attn(self.norm1(x), coords, shift)
        return x + self.mlp(self.norm2(x))


class ReleasedPatchMerging(nn.Module):
    """[B, V, r, r, C] -> [B, V, r/2, r/2, 2C]: the 2 x 2 tokens inside each unit concatenated in the released
    pre-training order of (row, column) offsets (0,0), (0,1), (1,0), (1,1), then norm and reduction (no bias)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=1e-6)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        parts = [x[:, :, dy::2, dx::2, :] for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class SwinStage(nn.Module):
    """encoder.layers.{i}: blocks (even: plain windows, odd: shifted), then downsample unless last. A stage no wider
    than the window is one window and never shifts."""

    def __init__(self, dim, depth, num_heads, window, resolution, downsample, mlp_ratio=4.0):
        super().__init__()
        self.window = min(window, resolution)
        self.shift = 0 if resolution <= window else window // 2
        self.blocks = nn.ModuleList([SwinBlock(dim, num_heads, self.window, mlp_ratio) for _ in range(depth)])
        self.downsample = ReleasedPatchMerging(dim) if downsample else None


class SwinPatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)


class ReleasedSwinEncoder(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio):
        super().__init__()
        self.patch_embed = SwinPatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.layers = nn.ModuleList(
            [
                SwinStage(embed_dim * 2**i, depths[i], num_heads[i], window_size, grid // 2**i, i < 3, mlp_ratio)
                for i in range(4)
            ]
        )
        self.norm = nn.ModuleList([nn.LayerNorm(embed_dim * m, eps=1e-6) for m in (2, 4, 8, 8)])


class ReleasedSwinDecoder(nn.Module):
    """decoder.{k}: embed, mask_token, pos_embed (fixed sin-cos, no cls), blocks.0, norm, pred (Linear)."""

    def __init__(self, in_dim, dim, num_heads, grid_size, out, mlp_ratio=4.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # the released code stores this fixed embedding in float32 (its checkpoints hold float32 values)
        embed = sincos_pos_embed_2d(dim, grid_size)[1:].unsqueeze(0)
        self.pos_embed = _frozen(embed.float().to(torch.get_default_dtype()))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out, bias=True)

    def forward(self, x, unit_masked, units_per_side, r):
        """x: [B, N_vis, D] visible tokens, unit-major. Returns [B, L, out], tokens in raster order of the map."""
        x = self.embed(x)
        B, n, C = x.shape
        token_masked = unit_masked.to(x.dtype).repeat_interleave(r * r)  # unit-major, 1 = masked
        L = token_masked.numel()
        # visible tokens first, masked ones after, each in unit-major order; ids_restore sends each back to its index
        ids_shuffle = torch.argsort(token_masked + torch.arange(L, dtype=x.dtype) / (5.0 * L))
        ids_restore = torch.argsort(ids_shuffle)
        x = torch.cat([x, self.mask_token.expand(B, L - n, C)], dim=1)
        x = torch.gather(x, 1, ids_restore.reshape(1, L, 1).expand(B, L, C))  # unit-major order
        u = units_per_side
        x = x.reshape(B, u, u, r, r, C).transpose(2, 3).reshape(B, L, C)  # (unit row, row, unit col, col): raster
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class ReleasedLocalMIMSwin(nn.Module):
    """The authors' LocalMIM-Swin pre-training model, state-dict names of their checkpoints.

    forward(imgs [B, 3, H, W], unit_mask [u * u] (raster order of units, 1 = masked, one mask for the batch))
    -> (loss, [L_0, L_1, L_2, L_3]); self.last_preds / self.last_targets hold the per-tap [B, N_k, F].
    coords: "released" (the released code) or "true" (the corrected rule) for the token coordinates after a merge.
    Taps: the four stage outputs (after merging for stages 1-3), each with its own LayerNorm; targets at cells of
    2, 4, 8, 8 patches (8 / 16 / 32 / 32 px at patch 4); loss weights = the unit mask upsampled nearest x4, x2, x1, x1.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=4,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=7,
        decoder_dim=128,
        decoder_heads=4,
        mlp_ratio=4.0,
        nbins=18,
        hog_bias=True,
        target="hog",
        coords="released",
    ):
        super().__init__()
        self.units_per_side = img_size // (patch_size * 8)
        assert self.units_per_side * patch_size * 8 == img_size
        self.window_size = window_size
        self.coords = coords
        self.nbins = nbins
        self.target = target
        self.tokens_per_unit = [4, 2, 1, 1]  # r at each tap (after merging for the first three)
        self.cell_sizes = [patch_size * 2, patch_size * 4, patch_size * 8, patch_size * 8]
        self.encoder = ReleasedSwinEncoder(img_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio)
        decoders = []
        for k in range(4):
            out = 3 * nbins if target == "hog" else 3 * self.cell_sizes[k] ** 2
            in_dim = embed_dim * (2, 4, 8, 8)[k]
            dim = decoder_dim // 2 if k == 0 else decoder_dim
            grid = self.units_per_side * self.tokens_per_unit[k]
            decoders.append(ReleasedSwinDecoder(in_dim, dim, decoder_heads, grid, out, mlp_ratio))
        self.decoder = nn.ModuleList(decoders)
        if target == "hog":
            self.hog_enc = nn.ModuleList([HOGLayer(hog_bias) for _ in range(4)])
        elif target != "pixel":
            raise ValueError(target)
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        _init_linear_and_layernorm(self)
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)
            if name.endswith("mask_token"):
                nn.init.normal_(p, std=0.02)

    def encode(self, imgs, unit_masked):
        """The four taps, each [B, N_vis(k), C_k] in unit-major order, tap-normed."""
        enc, u = self.encoder, self.units_per_side
        x = enc.patch_embed.norm(enc.patch_embed.proj(imgs).permute(0, 2, 3, 1))  # B x side x side x C
        B, side, _, C = x.shape
        r = side // u
        x = x.reshape(B, u, r, u, r, C).permute(0, 1, 3, 2, 4, 5).reshape(B, u * u, r, r, C)  # unit-major
        x = x[:, ~unit_masked]  # the visible units: B x V x r x r x C
        taps = []
        for i, stage in enumerate(enc.layers):
            coords = swin_token_coords(unit_masked, u, x.shape[2], self.coords, merged=i > 0)
            flat = x.reshape(B, -1, x.shape[-1])
            for j, blk in enumerate(stage.blocks):
                flat = blk(flat, coords, stage.shift if j % 2 else 0)
            x = flat.reshape(x.shape)
            if stage.downsample is not None:
                x = stage.downsample(x)
            taps.append(enc.norm[i](x.reshape(B, -1, x.shape[-1])))
        return taps

    def compute_targets(self, imgs):
        return literal_targets(imgs, self.target, self.cell_sizes, self.nbins, getattr(self, "hog_enc", None))

    def forward(self, imgs, unit_mask):
        unit_masked = unit_mask.bool().cpu()
        u, B = self.units_per_side, imgs.shape[0]
        taps = self.encode(imgs, unit_masked)
        targets = self.compute_targets(imgs)
        preds, losses = [], []
        for k in range(4):
            r = self.tokens_per_unit[k]
            pred = self.decoder[k](taps[k], unit_masked, u, r)
            weight = unit_masked.to(pred.dtype).reshape(u, u).repeat_interleave(r, 0).repeat_interleave(r, 1)
            losses.append(literal_masked_mse(pred, targets[k], weight.reshape(1, -1).expand(B, -1)))
            preds.append(pred)
        self.last_preds, self.last_targets = preds, targets
        return losses[0] + losses[1] + losses[2] + losses[3], losses
