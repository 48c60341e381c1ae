"""LocalMIM for Swin (method 4): a sparse Swin encoder, four stage taps, light decoders, multi-scale targets.

Masking is per batch: the image is cut into 32 px mask units (7 x 7 at 224 px) and one set of units is removed from
every image of the batch, so the encoder packs the same visible tokens for all images (see swin_encoder.py).

The ``noise`` contract (what the trainer passes as ``model(images, noise)``): a tensor of shape [num_units] or
[B, num_units] (``model.num_patches == model.num_units``); only its first row is used. ids = argsort(noise)
ascending; the first ``num_units - n_masked`` units are kept, the rest masked. n_masked = round(ratio * units) (halves
round up) with ``mask_rule = "exact"`` (the default), or int(ratio * units) + 1 with ``mask_rule = "released"`` (the
authors' ``randperm(L) <= int(ratio * L)`` test, which masks one unit more: 37 of 49 at 0.75, 30 of 49 at 0.6); at
least one unit always stays visible. The same noise row reproduces the mask exactly. The mask is computed on the
host: noise on a GPU costs one small device-to-host copy per step (pass CPU noise to avoid it).

Token coordinates (``swin_coords``, see swin_encoder.py): "true" (every token at its own position) or "released"
(the authors' pre-training code, which gives the merged tokens of stages 2 and 3 the raster position of their
unit-major index, and so other windows and relative positions). Unset, it follows ``mask_rule``: "released" selects
the whole released computation (mask count and coordinates), "exact" the true coordinates. The published Swin
recipes use the released rule, the one that produced the published numbers.

Taps: the outputs of the four stages, after patch merging for stages 1-3 (28 x 28, 14 x 14, 7 x 7, 7 x 7 tokens at
224 px), each through its own LayerNorm, feed one decoder each: Linear in -> w (w = decoder_dim / 2, then
decoder_dim: 64, 128, 128, 128), the decoder's mask token at masked positions, raster order, fixed 2-D sin-cos
position embedding (no cls), one block (4 heads), LayerNorm, Linear head to 3 * nbins (HOG) or 3 * p * p (pixels).
Targets at 8 / 16 / 32 / 32 px cells; loss weights are the unit mask upsampled (nearest, binary) x4, x2, x1, x1.
Total loss = the unweighted sum of the four masked MSEs.

``impl = "fast"`` (same parameters, same values up to float rounding; tests/models/test_swin.py): the HOG targets
come from the Triton kernel (fastmim.kernels.hog: all four scales, each with its own bias, in one launch); each
decoder's final LayerNorm and Linear head run only on the cells of masked units (the rest have loss weight 0: 37 of
49 units at 224 px and mask 0.75), and the four masked MSEs with d(loss)/d(pred) are one fused kernel
(fastmim.kernels.recon_loss with ``SWIN_SUBS``), so no full prediction map, upsampled mask or squared-residual
temporary exists. ``out.preds[k]`` is then built on first access, zero at visible units (as for ViT). The encoder
and the decoders' blocks are the reference modules (decoder widths and lengths differ per tap, so they do not group
as ViT's do); pixel targets stay PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastmim.config import ModelConfig, choices
from fastmim.masking import scale_weights
from fastmim.models.base import MaskedImageModel, MIMOutput, masked_mse, recon_loss_ops
from fastmim.models.decoder import MaskedDecoder
from fastmim.models.fast_heads import CellSelection, ScatteredPredictions
from fastmim.models.swin_encoder import SparseSwinEncoder
from fastmim.models.vit import LN_EPS, init_weights, sincos_pos_embed
from fastmim.targets import make_target

MASK_RULES = choices(ModelConfig, "mask_rule")  # the values model.mask_rule declares


class UnitMasking(NamedTuple):
    visible: Tensor  # [V] int64 (CPU): kept unit indices, raster order, ascending
    mask: Tensor  # [num_units] float (CPU): 1 = masked, 0 = kept


def num_masked_units(num_units: int, mask_ratio: float, rule: str = "exact") -> int:
    """Units masked per batch: round(ratio * units) ("exact") or int(ratio * units) + 1 ("released"), at most
    units - 1."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule '{rule}'; use one of {', '.join(MASK_RULES)}")
    n = math.floor(mask_ratio * num_units + 0.5) if rule == "exact" else int(mask_ratio * num_units) + 1
    return min(n, num_units - 1)


def unit_masking(noise: Tensor | None, num_units: int, mask_ratio: float, rule: str = "exact") -> UnitMasking:
    """The batch's unit mask from ``noise`` ([num_units] or [B, num_units]; first row used) or fresh U[0, 1) noise
    (module docstring)."""
    if noise is None:
        noise = torch.rand(num_units)
    elif noise.ndim not in (1, 2) or noise.shape[-1] != num_units or noise.numel() == 0:
        raise ValueError(f"noise must have shape [{num_units}] or [B, {num_units}], got {list(noise.shape)}")
    row = noise.reshape(-1, num_units)[0].detach().cpu()
    keep = num_units - num_masked_units(num_units, mask_ratio, rule)
    visible = torch.argsort(row, stable=True)[:keep].sort().values
    mask = torch.ones(num_units)
    mask[visible] = 0.0
    return UnitMasking(visible, mask)


def restore_index(visible: Tensor, units_per_side: int, r: int) -> Tensor:
    """For a map of units_per_side * r tokens per side: index [L] into [visible tokens (unit-major order), then the
    masked positions in raster order] that puts every token at its raster position."""
    side = units_per_side * r
    uy, ux = (visible // units_per_side) * r, (visible % units_per_side) * r
    a = torch.arange(r)
    pos = ((uy[:, None, None] + a[None, :, None]) * side + ux[:, None, None] + a[None, None, :]).flatten()
    restore = torch.empty(side * side, dtype=torch.long)
    restore[pos] = torch.arange(pos.numel())
    masked = torch.ones(side * side, dtype=torch.bool)
    masked[pos] = False
    restore[masked] = pos.numel() + torch.arange(side * side - pos.numel())
    return restore


class SwinDecoder(MaskedDecoder):
    """A MaskedDecoder without cls (method 4) and with a Linear ``head``:
    ``forward(x [B, N_vis, D_in] unit-major, restore [L]) -> [B, L, out_dim]`` in raster order; with ``rows`` [n]
    (raster positions) only those tokens go through the final LayerNorm and the head: [B, n, out_dim]. Its input
    (no cls, one restore for the whole batch) has no fused op: ``impl`` does not change it."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, grid: int, out_dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(in_dim, dim, 1, num_heads, grid, mlp_ratio)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid, cls_token=False).unsqueeze(0))
        self.head = nn.Linear(dim, out_dim)
        init_weights(self.head)

    def forward(self, x: Tensor, restore: Tensor, rows: Tensor | None = None) -> Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        x = torch.cat([x, self.mask_token.expand(b, restore.numel() - n, c)], dim=1)[:, restore] + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if rows is not None:  # LayerNorm and head are per token: the other tokens' outputs are never used
            x = x.index_select(1, rows)
        return self.head(self.norm(x))


class LocalMIMSwin(MaskedImageModel):
    """LocalMIM Swin. ``forward(imgs [B, 3, H, W] normalised, noise [U] | [B, U] | None) -> MIMOutput`` with
    ``mask`` [B, U] (the batch's unit mask, the same row for every image), U = (H / 32)^2 = ``num_patches``."""

    masks_on_host = True  # the trainer passes CPU noise: the window packing is planned on the host (module docs)

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 128,
        decoder_heads: int = 4,
        target: str = "hog",
        nbins: int = 18,
        hog_bias: bool = True,
        mask_ratio: float = 0.75,
        mask_rule: str = "exact",
        swin_coords: str | None = None,
        impl: str = "reference",
    ) -> None:
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"LocalMIM-Swin taps four stages: depths must have 4 entries, got {list(depths)}")
        num_masked_units(1, mask_ratio, mask_rule)  # validates the rule
        self.mask_ratio, self.mask_rule = mask_ratio, mask_rule
        coords = swin_coords or ("released" if mask_rule == "released" else "true")
        self.encoder = SparseSwinEncoder(
            img_size, patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio, coords
        )
        # Tap k: 2^(k+1) times coarser than the patch grid, except the last stage, which has no merging.
        levels = [min(k + 1, 3) for k in range(4)]
        self.tokens_per_unit = [8 // 2**lv for lv in levels]  # r: 4, 2, 1, 1 tokens per unit side
        self.cell_sizes = [patch_size * 2**lv for lv in levels]  # 8, 16, 32, 32 px
        dims = [embed_dim * 2**lv for lv in levels]
        self.target = make_target(target, self.cell_sizes, nbins, hog_bias)
        u = self.encoder.units_per_side
        self.tap_norms = nn.ModuleList(nn.LayerNorm(d, eps=LN_EPS) for d in dims)
        self.decoders = nn.ModuleList(
            SwinDecoder(d, decoder_dim // 2 if k == 0 else decoder_dim, decoder_heads, u * r, out, mlp_ratio)
            for k, (d, r, out) in enumerate(zip(dims, self.tokens_per_unit, self.target.out_dims))
        )
        self.impl = impl  # last: it reaches the submodules built above

    @property
    def num_units(self) -> int:
        return self.encoder.num_units

    @property
    def num_patches(self) -> int:
        """The length of a noise row (the trainer draws noise [B, num_patches]): one value per mask unit."""
        return self.encoder.num_units

    @property
    def swin_coords(self) -> str:
        """The token-coordinate rule, "true" or "released" (module docstring)."""
        return self.encoder.coords

    def no_weight_decay(self) -> set[str]:
        """Parameters that method 5 exempts from weight decay for Swin beyond 1-D tensors and biases: the decoders'
        mask tokens and the relative-position bias tables."""
        return {n for n, _ in self.named_parameters() if n.endswith(("mask_token", "relative_position_bias_table"))}

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> MIMOutput:
        masking = unit_masking(noise, self.num_units, self.mask_ratio, self.mask_rule)
        b, u, device = imgs.shape[0], self.encoder.units_per_side, imgs.device
        mask = masking.mask.to(device).expand(b, -1)
        targets = self.target(imgs)
        feats = self.encoder(imgs, masking.visible)
        fast = self.impl == "fast"
        # impl "fast": the decoders' norms and heads only on the cells of masked units, in the compact layout of
        # fastmim.kernels.recon_loss (unit-major; a unit's 4 x 4 cells in that module's sub-cell order)
        units = torch.nonzero(masking.mask).flatten().unsqueeze(0) if fast else None  # [1, n] masked, ascending
        preds = []
        for k, feat in enumerate(feats):
            r = self.tokens_per_unit[k]
            restore = restore_index(masking.visible, u, r).to(device)
            rows = recon_loss_ops().cell_index(units, u, r).flatten().to(device) if fast else None
            preds.append(self.decoders[k](self.tap_norms[k](feat.reshape(b, -1, feat.shape[-1])), restore, rows))
        if fast:
            return self._fused_loss(preds, targets, units.to(device).expand(b, -1), mask)
        losses = [masked_mse(p, t, scale_weights(mask, u, r)) for p, t, r in zip(preds, targets, self.tokens_per_unit)]
        return MIMOutput(sum(losses), losses, mask, preds, targets)

    def _fused_loss(self, preds: list[Tensor], targets: list[Tensor], units: Tensor, mask: Tensor) -> MIMOutput:
        """impl "fast": the four masked MSEs of the predictions at the masked units ``units`` [B, n] in one fused
        kernel; ``preds[k]`` of the output scatters to the full map on first access."""
        ops, u = recon_loss_ops(), self.encoder.units_per_side
        b, n = units.shape
        compact = [p.view(ops.compact_shape(r, b, n, 0) + p.shape[-1:]) for p, r in zip(preds, self.tokens_per_unit)]
        sel = CellSelection(units, torch.zeros(b, 0, dtype=torch.long, device=units.device))
        losses = list(ops.recon_loss(compact, targets, mask, sel.idx, sel.gidx, u, self.tokens_per_unit).unbind())
        preds = ScatteredPredictions(compact, sel, u, self.tokens_per_unit)
        return MIMOutput(sum(losses), losses, mask, preds, targets)
