"""LocalMIM ViT prediction heads evaluated only where they reach the loss, plus the fused loss (impl = "fast").

Same parameters as ``ScaleHead`` (up1, norm, up2, proj: released checkpoints import unchanged), same mathematics as
method 2.3 step 6, far less work:
- a kernel-2 stride-2 transposed convolution has no overlap, so it is a per-token matrix: weight [in, out, 2, 2]
  maps one token to its 2 x 2 sub-cells, x @ W.permute(0, 2, 3, 1).reshape(in, 4 * out);
- the heads are therefore per-token MLPs and run on the masked patches' tokens only (visible cells have loss
  weight 0): 147 of 196 tokens at mask 0.75;
- linear maps with nothing between them are composed once per step on the weights (associativity): s = 2 is one
  [C, 4 * out] matrix (up1 then proj), and s = 4 is up1 -> LN -> GELU -> one [C/2, 4 * out] matrix (up2 then proj),
  so the [*, C/2] / [*, C/4] cell maps of the reference are never materialised (ViT-B, per token: s = 2 5.2x fewer
  FLOPs, s = 4 1.55x; with only 147 of 196 tokens, 7.0x and 2.1x fewer than the reference's full maps);
- s = 1/2 averages each 2 x 2 group of tokens, then projects; it runs on the groups holding a masked patch (every
  group at the usual ratios: at mask 0.75 a group has no masked patch with probability ~0.4%).
The predictions come out in the compact layout of ``fastmim.kernels.recon_loss`` and go straight into its fused
loss. Predictions differ from ScaleHead's by float rounding only (tests/models/test_fast_heads.py).

Not fused (yet): LN + GELU of the s = 4 head stay PyTorch ops between the two matmuls, with the reference's dtype
flow under autocast (bf16 matmul output -> fp32 LN -> fp32 GELU -> bf16 cast). At ViT-B, B = 256, mask 0.75 that
is 19.3 M elements moved as ~20 B each forward and ~26 B backward where one fused kernel would need ~4 and ~6:
~0.7 GB, ~0.23 ms per step at 3 TB/s, likely the largest avoidable cost left in this path. Whether a hand-written
kernel pays is measured, not assumed: benchmarks/bench_recon_loss.py times this path as "triton" and under
torch.compile (which fuses LN + GELU + casts) as "fast_compile"; a GPU run of it is owed, and models compiled by
their users already get that fusion (the loss is a custom op, so the graph does not break).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmim.models.base import recon_loss_ops, stage_range
from fastmim.models.decoder import ScaleHead
from fastmim.models.vit import LN_EPS


class CellSelection(NamedTuple):
    """Which predictions reach the loss: ``idx`` [B, n] patches (raster order) for s >= 1, ``gidx`` [B, n_grp]
    2 x 2 groups for s = 1/2."""

    idx: Tensor
    gidx: Tensor


def select_cells(mask: Tensor, grid: int, num_masked: int) -> CellSelection:
    """The masked patches and the groups holding one, from the patch mask [B, grid^2] (1 = masked).

    ``num_masked`` must be at least the number of masked patches of every row (random masking removes exactly
    L - int(L * (1 - ratio)) per row); it keeps shapes static, so no host-device sync. Rows with fewer masked
    patches get visible ones appended, which the loss weighs 0.
    """
    half = grid // 2
    idx = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :num_masked]
    n_grp = min(half * half, num_masked)
    if n_grp == half * half:
        gidx = torch.arange(n_grp, device=mask.device).expand(mask.shape[0], -1)
    else:
        counts = mask.reshape(-1, half, 2, half, 2).sum(dim=(2, 4)).reshape(-1, half * half)
        gidx = torch.argsort((counts > 0).to(torch.uint8), dim=1, descending=True, stable=True)[:, :n_grp]
    return CellSelection(idx, gidx.contiguous())


def _rows(tokens: Tensor, sel: Tensor) -> Tensor:
    """tokens [B, N, C], sel [B, n] -> the selected tokens [B * n, C] (one index_select)."""
    b, n, c = tokens.shape
    flat = (sel + torch.arange(b, device=sel.device).unsqueeze(1) * n).flatten()
    return tokens.reshape(b * n, c).index_select(0, flat)


def _convt_matrix(weight: Tensor) -> Tensor:
    """ConvTranspose k2 s2 weight [in, out, 2, 2] -> [in, 4 * out], column (2 di + dj) * out + o."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _then_proj(weight: Tensor, bias: Tensor, proj: torch.nn.Conv2d) -> tuple[Tensor, Tensor]:
    """A k2 s2 transposed convolution followed by the 1x1 conv ``proj``, composed: ([in, 4 * out_p], [4 * out_p])."""
    wp = proj.weight.flatten(1)  # [out_p, out]
    matrix = torch.einsum("iodk,po->idkp", weight, wp).reshape(weight.shape[0], -1)
    return matrix, (wp @ bias + proj.bias).repeat(4)


def predict_cells(head: ScaleHead, tokens: Tensor, sel: CellSelection) -> Tensor:
    """Head predictions in the compact layout: s = 4 [B, n, 16, out], s = 2 [B, n, 4, out], s = 1 [B, n, out],
    s = 1/2 [B, n_grp, out]; tokens [B, L, C] as the decoder returns them."""
    b, n = sel.idx.shape
    proj_w, proj_b = head.proj.weight.flatten(1), head.proj.bias
    if head.scale == 0.5:
        half, c = head.grid // 2, tokens.shape[-1]
        groups = tokens.reshape(b, half, 2, half, 2, c).mean(dim=(2, 4)).reshape(b, half * half, c)
        return F.linear(_rows(groups, sel.gidx), proj_w, proj_b).view(b, sel.gidx.shape[1], -1)
    x = _rows(tokens, sel.idx)
    if head.scale == 1:
        return F.linear(x, proj_w, proj_b).view(b, n, -1)
    if head.scale == 2:
        matrix, bias = _then_proj(head.up1.weight, head.up1.bias, head.proj)
        return torch.addmm(bias, x, matrix).view(b, n, 4, -1)
    h = torch.addmm(head.up1.bias.repeat(4), x, _convt_matrix(head.up1.weight)).view(b * n * 4, -1)
    h = F.gelu(F.layer_norm(h, h.shape[-1:], head.norm.weight, head.norm.bias, LN_EPS))
    matrix, bias = _then_proj(head.up2.weight, head.up2.bias, head.proj)
    return torch.addmm(bias, h, matrix).view(b, n, 16, -1)


def scatter_cells(pred: Tensor, sel: CellSelection, grid: int, k: int, subs: Sequence[int] | None = None) -> Tensor:
    """Compact predictions of scale k -> [B, N_k, out], zero at the cells that were not predicted. ``subs``: the
    scales' cells per patch side (default the ViT scales, ``recon_loss.SUBS``)."""
    b, out = pred.shape[0], pred.shape[-1]
    ops = recon_loss_ops()
    sub = (subs or ops.SUBS)[k]
    cells = ops.cell_index(sel.idx, grid, sub).flatten(1) if sub else sel.gidx
    side = grid * sub if sub else grid // 2
    rows = (cells + torch.arange(b, device=cells.device).unsqueeze(1) * side * side).flatten()
    full = pred.new_zeros(b * side * side, out)
    return full.index_copy(0, rows, pred.reshape(-1, out)).view(b, side * side, out)


class ScatteredPredictions(Sequence[Tensor]):
    """``MIMOutput.preds`` of impl = "fast": ``preds[k]`` is [B, N_k, out] like the reference's, built from the
    compact predictions on first access (then cached) and zero at cells that were not predicted (those of visible
    patches, and s = 1/2 groups without a masked patch), i.e. wherever the loss weight is 0. Training never reads
    it, so it costs nothing there; ``compact`` holds what the loss saw."""

    def __init__(self, compact: list[Tensor], sel: CellSelection, grid: int, subs: Sequence[int] | None = None) -> None:
        self.compact, self.sel, self.grid, self.subs = compact, sel, grid, subs
        self._full: list[Tensor | None] = [None] * len(compact)

    def __len__(self) -> int:
        return len(self.compact)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        if self._full[k] is None:
            self._full[k] = scatter_cells(self.compact[k], self.sel, self.grid, k % len(self), self.subs)
        return self._full[k]


def heads_and_loss(
    heads: Sequence[ScaleHead],
    tokens: Sequence[Tensor],
    targets: Sequence[Tensor],
    mask: Tensor,
    grid: int,
    num_masked: int,
) -> tuple[ScatteredPredictions, list[Tensor]]:
    """The four heads at the cells that reach the loss and the fused masked MSE (``fastmim.kernels.recon_loss``,
    its reference where no kernel can run): (predictions, per-scale losses), equal to ScaleHead + masked_mse with
    scale_weights up to float rounding. tokens[k] [B, L, C]; targets[k] [B, N_k, out_k]; mask [B, L]."""
    with stage_range("heads"):  # the heads and the fused loss
        sel = select_cells(mask, grid, num_masked)
        compact = [predict_cells(head, x, sel) for head, x in zip(heads, tokens)]
        losses = recon_loss_ops().recon_loss(compact, list(targets), mask, sel.idx, sel.gidx, grid)
        return ScatteredPredictions(compact, sel, grid), list(losses.unbind())
