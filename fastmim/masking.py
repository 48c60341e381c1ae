"""Random patch masking (method 2.1) and the per-scale loss weights derived from a patch mask (method 2.4).

Per sample: noise ~ U[0, 1) of shape [B, L]; ids_shuffle = argsort(noise); the first int(L * (1 - ratio)) indices
are kept; ids_restore = argsort(ids_shuffle); mask = 1 for removed patches, 0 for kept, in original patch order.
Passing the same noise reproduces a mask exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Masking(NamedTuple):
    ids_keep: Tensor  # [B, len_keep] int64, indices of kept patches in original order positions
    ids_restore: Tensor  # [B, L] int64, position of each original patch in the shuffled order
    mask: Tensor  # [B, L] float, 1 = removed (masked), 0 = kept


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: int(L * (1 - ratio)) as method 2.1 (49 of 196 at 0.75); at least one."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(noise: Tensor, mask_ratio: float) -> Masking:
    """Masking from noise [B, L] (method 2.1)."""
    batch, length = noise.shape
    len_keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep, ids_restore, mask)


def scale_weights(mask: Tensor, grid: int, scale: float) -> Tensor:
    """Loss weights M_k [B, N_k] of one scale from the patch mask [B, grid * grid] (method 2.4).

    scale >= 1: nearest upsampling (each patch's value copied to its s x s cells); scale = 1/2: the fraction of
    masked patches in each 2 x 2 group of patches.
    """
    m = mask.reshape(-1, 1, grid, grid)
    if scale >= 1:
        s = int(scale)
        m = m.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
    else:
        k = round(1 / scale)
        m = F.avg_pool2d(m, kernel_size=k, stride=k)
    return m.flatten(1)
