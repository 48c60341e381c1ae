"""Sanity tests of the LocalMIM-Swin oracle itself (tests/oracles_swin.py): hand-worked coordinates under both rules,
window ids against Swin's cyclic shift, the relative-position index, the released mask count, the checkpoint names,
and (true rule) the same taps as a dense Swin with cyclic shift. Fast, CPU, float64."""

import pytest
import torch

from tests.models.test_swin import _ln, _rel, dense_swin, visible_part
from tests.oracles_swin import (
    ReleasedLocalMIMSwin,
    released_swin_unit_mask,
    swin_relative_position_index,
    swin_token_coords,
    swin_window_ids,
)

ARCH = {
    "img_size": 64,
    "embed_dim": 16,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 2, 4),
    "decoder_dim": 32,
    "decoder_heads": 2,
}


@pytest.fixture(autouse=True)
def _fp64_seeded(fp64):
    """Every test in float64 (tests/conftest.py) from seed 0."""
    torch.manual_seed(0)


def _pairs(coords):
    return [tuple(c) for c in coords.tolist()]


def test_token_coords_hand_worked():
    """2 x 2 units of 2 x 2 tokens (a 4 x 4 map), units 1 and 2 visible (unit-major: unit 1's tokens, then unit 2's)."""
    masked = torch.tensor([True, False, False, True])
    true = [(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)]
    # released, after a merge: unit-major indices 4..7 and 8..11 (unit 0's four counted) -> divmod(t, 4)
    released = [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert _pairs(swin_token_coords(masked, 2, 2, "true", merged=True)) == true
    assert _pairs(swin_token_coords(masked, 2, 2, "released", merged=True)) == released
    assert _pairs(swin_token_coords(masked, 2, 2, "released", merged=False)) == true  # coordinates made before a merge
    assert _pairs(swin_token_coords(masked, 2, 1, "released", merged=True)) == [(0, 1), (1, 0)]  # r = 1: the units


def test_window_ids_partition_like_swins_cyclic_shift():
    """On an 8 x 8 map with window 4: plain windows are the 4 x 4 blocks; shifted ones (shift 2) group tokens as
    Swin's roll by -2, 4 x 4 partition and region mask do."""
    side, w, s = 8, 4, 2
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=-1)
    same = lambda ids: (ids[:, None] == ids[None, :]).all(-1)  # noqa: E731
    assert torch.equal(same(swin_window_ids(coords, w, 0)), same(coords // w))
    rolled = (coords - s) % side  # where the cyclic shift moves each token
    region = torch.zeros(side, side, dtype=torch.long)
    cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
    for n, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
        region[a, b] = n
    swin = torch.cat([rolled // w, region[rolled[:, 0], rolled[:, 1]][:, None]], dim=1)
    assert torch.equal(same(swin_window_ids(coords, w, s)), same(swin))
    few = torch.tensor([[0, 1], [1, 2], [5, 6], [6, 7]])
    assert _pairs(swin_window_ids(few, w, s)) == [(0, 0), (0, 1), (1, 2), (2, 2)]  # floor((c + 2) / 4)


def test_relative_position_index_of_a_full_window():
    """Window 2 in raster order: Swin's well-known table rows (dy + 1) * 3 + (dx + 1)."""
    coords = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    expected = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    assert swin_relative_position_index(coords, 2).tolist() == expected


@pytest.mark.parametrize("ratio,count", [(0.6, 30), (0.75, 37), (0.8, 40)])
def test_released_mask_count(ratio, count):
    assert released_swin_unit_mask(torch.randperm(49), ratio).sum() == count


@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_state_dict_names_and_shapes(target):
    model = ReleasedLocalMIMSwin(**ARCH, window_size=4, target=target)
    sd = model.state_dict()
    assert sd["encoder.patch_embed.proj.weight"].shape == (16, 3, 4, 4)
    assert sd["encoder.layers.0.blocks.1.attn.relative_position_bias_table"].shape == (49, 1)  # window 4
    assert sd["encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (9, 4)  # 2 x 2 map: window 2
    assert sd["encoder.layers.3.blocks.0.attn.relative_position_index"].shape == (4, 4)
    assert sd["encoder.layers.2.downsample.reduction.weight"].shape == (128, 256)
    assert "encoder.layers.3.downsample.norm.weight" not in sd
    assert sd["encoder.norm.3.weight"].shape == (128,)
    assert sd["decoder.0.pos_embed"].shape == (1, 64, 16) and sd["decoder.3.pos_embed"].shape == (1, 4, 32)
    out = 54 if target == "hog" else 3 * 32 * 32
    assert sd["decoder.3.pred.weight"].shape == (out, 32)
    assert ("hog_enc.0.conv.bias" in sd) == (target == "hog")
    ReleasedLocalMIMSwin(**ARCH, window_size=4, target=target).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("window", [2, 4])
def test_true_rule_equals_a_dense_swin_with_cyclic_shift(window):
    """The oracle's tap-normed taps on the visible tokens equal those of a dense Swin (the whole map, cyclic shift and
    region mask, attention keys restricted to visible tokens) with the same weights."""
    model = ReleasedLocalMIMSwin(**ARCH, window_size=window, coords="true")
    imgs, masked = torch.randn(2, 3, 64, 64), torch.tensor([True, False, True, False])
    taps = model.encode(imgs, masked)
    sd = model.state_dict()
    dense = dense_swin(sd, imgs, ARCH["num_heads"], window, ~masked.reshape(2, 2), released=True)
    visible = (~masked).nonzero().flatten()
    for k, (tap, d) in enumerate(zip(taps, dense)):
        d = visible_part(d, visible, 2)
        assert _rel(tap, _ln(d.reshape(2, -1, d.shape[-1]), sd, f"encoder.norm.{k}")) < 1e-12, k


def test_rules_differ_only_after_the_first_merge():
    """Same weights: the first tap (stage 1, coordinates made before any merge) is the same under both rules; the
    later taps are not (stages 2 and 3 see other windows and relative positions)."""
    true = ReleasedLocalMIMSwin(**ARCH, window_size=4, coords="true")
    released = ReleasedLocalMIMSwin(**ARCH, window_size=4, coords="released")
    released.load_state_dict(true.state_dict())
    imgs, masked = torch.randn(2, 3, 64, 64), torch.tensor([True, False, False, True])
    a, b = true.encode(imgs, masked), released.encode(imgs, masked)
    assert torch.equal(a[0], b[0])
    assert all((x - y).abs().max() > 1e-6 for x, y in zip(a[1:], b[1:]))
