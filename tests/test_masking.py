import pytest
import torch

from fastmim.masking import num_kept, random_masking, scale_weights
from tests.oracles import literal_mask_weights, literal_random_masking


@pytest.mark.parametrize("length,ratio,kept", [(196, 0.75, 49), (16, 0.75, 4), (196, 0.5, 98), (16, 0.9, 1)])
def test_kept_count_and_mask_invariants(length, ratio, kept):
    assert num_kept(length, ratio) == kept
    noise = torch.rand(5, length, generator=torch.Generator().manual_seed(0))
    m = random_masking(noise, ratio)
    assert m.ids_keep.shape == (5, kept)
    assert torch.equal(m.mask.sum(1), torch.full((5,), float(length - kept)))
    # kept patches are exactly those with the smallest noise, and are unmasked
    assert torch.equal(m.mask.gather(1, m.ids_keep), torch.zeros(5, kept))
    smallest = noise.argsort(1)[:, :kept]
    assert torch.equal(m.ids_keep, smallest)
    # ids_restore inverts the shuffle
    ids_shuffle = noise.argsort(1)
    assert torch.equal(ids_shuffle.gather(1, m.ids_restore), torch.arange(length).expand(5, -1))


def test_masking_matches_literal_oracle():
    noise = torch.rand(3, 196)
    ours = random_masking(noise, 0.75)
    ids_keep, ids_restore, mask = literal_random_masking(noise, 0.75)
    assert torch.equal(ours.ids_keep, ids_keep)
    assert torch.equal(ours.ids_restore, ids_restore)
    assert torch.equal(ours.mask, mask.to(ours.mask.dtype))


def test_scale_weights_hand_case():
    # 4 x 4 patch grid; one image with the top-left 2 x 2 group fully masked and one masked patch elsewhere
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    mask[0, 3, 3] = 1
    w_half = scale_weights(mask.flatten(1), 4, 0.5).view(2, 2)
    assert torch.equal(w_half, torch.tensor([[1.0, 0.0], [0.0, 0.25]]))
    w4 = scale_weights(mask.flatten(1), 4, 4).view(16, 16)
    assert w4[:8, :8].eq(1).all() and w4[12:, 12:].eq(1).all()
    assert w4.sum() == 5 * 16


@pytest.mark.parametrize("scale", [4, 2, 1, 0.5])
def test_scale_weights_match_oracle(scale):
    mask = random_masking(torch.rand(4, 64), 0.75).mask
    assert torch.equal(scale_weights(mask, 8, scale), literal_mask_weights(mask, 8, scale).to(mask.dtype))


def test_fractional_weights_at_half_scale():
    mask = random_masking(torch.rand(64, 16), 0.5).mask
    values = set(scale_weights(mask, 4, 0.5).unique().tolist())
    assert values <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert values - {0.0, 1.0}, "a 0.5 ratio must produce partially masked 2 x 2 groups"
