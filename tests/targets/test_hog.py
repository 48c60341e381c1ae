import pytest
import torch

from fastmim.targets import HOGTarget, hog_histograms
from tests.oracles import literal_hog

CELLS_VIT = (4, 8, 16, 32)


def _images(b=2, h=64, w=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # smooth + noisy content so many orientations and magnitudes occur
    base = torch.rand(b, 3, h // 4, w // 4, generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (img + 0.1 * torch.randn(b, 3, h, w, generator=g)).to(dtype)


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("cells", [CELLS_VIT, (8, 16, 32, 32)])
def test_matches_literal_oracle_fp64(nbins, cells):
    img = _images(dtype=torch.float64)
    ours = HOGTarget(cells, nbins=nbins)(img)
    for k, cell in enumerate(cells):
        ref = literal_hog(img, cell, nbins)
        assert ours[k].shape == ref.shape == (2, (64 // cell) ** 2, 3 * nbins)
        torch.testing.assert_close(ours[k], ref, rtol=1e-9, atol=1e-10)


def test_matches_literal_oracle_fp32_with_bounded_ties():
    img = _images(b=3, h=96, w=64, seed=1)
    ours = HOGTarget(CELLS_VIT, nbins=9)(img)
    for k, cell in enumerate(CELLS_VIT):
        ref = literal_hog(img, cell, 9)
        # coarse scales are pooled from 4 px cells here, so values differ by float rounding only; a pixel whose
        # angle lies within rounding of a bin edge could land in the neighbouring bin: allow at most 1 % of cells
        bad = (ours[k] - ref).abs().amax(-1) > 1e-4
        assert bad.float().mean() <= 0.01
        torch.testing.assert_close(ours[k][~bad], ref[~bad], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nbins", [9, 18])
def test_with_bias_matches_per_scale_oracle(nbins):
    torch.manual_seed(3)
    target = HOGTarget(CELLS_VIT, nbins=nbins, bias=True)
    assert target.bias.shape == (4, 2) and target.bias.abs().max() <= 1 / 3
    assert len({tuple(b.tolist()) for b in target.bias}) == 4, "each scale draws its own bias"
    img = _images(dtype=torch.float64)
    ours = HOGTarget(CELLS_VIT, nbins=nbins, bias=True).double()
    ours.bias.copy_(target.bias)
    out = ours(img)
    for k, cell in enumerate(CELLS_VIT):
        torch.testing.assert_close(out[k], literal_hog(img, cell, nbins, bias=target.bias[k].double()))


def test_constant_image_gives_zero_histograms():
    img = torch.full((2, 3, 32, 32), 0.75)  # exactly representable: the Sobel sums cancel exactly
    for t in HOGTarget(CELLS_VIT, nbins=9)(img):
        assert torch.equal(t, torch.zeros_like(t))


def test_constant_image_with_bias_has_one_orientation():
    target = HOGTarget((4, 8), nbins=9, bias=True)
    target.bias.copy_(torch.tensor([[0.2, 0.0], [0.0, -0.3]]))
    out = target(torch.full((1, 3, 16, 16), 0.5))
    # bias (G0, G1) = (0.2, 0): phi = pi/2 -> floor(4.5) = bin 4;  (0, -0.3): phi = pi -> floor(9) mod 9 = bin 0
    assert torch.equal(out[0].view(-1, 3, 9).argmax(-1), torch.full((16, 3), 4))
    assert torch.equal(out[1].view(-1, 3, 9).argmax(-1), torch.full((4, 3), 0))
    torch.testing.assert_close(out[0].view(-1, 3, 9).amax(-1), torch.ones(16, 3))


@pytest.mark.parametrize("nbins,expected", [(9, 4), (18, 9)])
def test_horizontal_ramp_bin_and_argument_order(nbins, expected):
    # I = x: G0 = -8, G1 = 0 in the interior, phi = atan2(-8, 0) = -pi/2,
    # bin = floor(-nbins / 2) mod nbins: 9 bins -> -5 mod 9 = 4; 18 bins -> -9 mod 18 = 9 (a tie at a bin edge).
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous()
    (hist,) = HOGTarget((16,), nbins=nbins)(ramp)
    per_channel = hist.view(3, nbins)
    assert torch.equal(per_channel.argmax(-1), torch.full((3,), expected))
    torch.testing.assert_close(per_channel[:, expected], torch.ones(3))


def test_reflect_border():
    # I = x on 8 columns: reflect padding makes the border columns' G0 zero, so with cell 8 the histogram holds
    # 6 of 8 columns' magnitude; with zero padding the borders would add large spurious gradients.
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 8, 8).contiguous()
    hist = HOGTarget((8,), nbins=9)(ramp)[0].view(3, 9)
    assert torch.count_nonzero(hist) == 3  # one bin per channel: no spurious orientations at the borders
    raw = hog_histograms(ramp, 8, 9)
    torch.testing.assert_close(raw.sum(2).flatten(), torch.full((3,), 8.0 * 6 / 8))


def test_normalisation_invariance_without_bias():
    img = _images(dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    target = HOGTarget(CELLS_VIT)
    for a, b in zip(target(img), target((img - mean) / std)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_unit_norm_per_cell_and_channel():
    out = HOGTarget((8,), nbins=9)(_images())[0]
    norms = out.view(2, -1, 3, 9).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert out.min() >= 0
