"""Tests for fastmim.data.transforms: crop sampling, flip rate, determinism and normalisation."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from fastmim.data import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform
from fastmim.data.transforms import sample_crop

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def _structured_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("width,height", [(64, 64), (37, 53), (300, 240), (500, 480)])
def test_sample_crop_inside_image_with_area_and_ratio_in_bounds(width: int, height: int) -> None:
    # Aspect ratios of these images lie inside RATIO, so even the fallback (whole image) is within the bounds.
    g = torch.Generator().manual_seed(width * height)
    area = width * height
    fractions, ratios = [], []
    for _ in range(400):
        top, left, h, w = sample_crop(width, height, SCALE, RATIO, g)
        assert h >= 1 and w >= 1
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding w and h to integers moves the area by at most about (w + h) / 2 pixels.
        assert SCALE[0] * area - (w + h) <= w * h <= SCALE[1] * area
        slack = 2 / min(w, h)
        assert RATIO[0] * (1 - slack) <= w / h <= RATIO[1] * (1 + slack)
        fractions.append(w * h / area)
        ratios.append(w / h)
    # The draws actually span the allowed ranges rather than collapsing to one crop.
    assert min(fractions) < 0.3 and max(fractions) > 0.8
    assert min(ratios) < 0.85 and max(ratios) > 1.15


def test_sample_crop_positions_are_spread_over_the_image() -> None:
    g = torch.Generator().manual_seed(1)
    crops = [sample_crop(400, 400, (0.05, 0.05), (1.0, 1.0), g) for _ in range(300)]
    tops = np.array([c[0] for c in crops])
    lefts = np.array([c[1] for c in crops])
    # Crops are 89 px; positions are uniform in [0, 311], so both halves of the range must be used.
    assert tops.min() < 60 and tops.max() > 250 and lefts.min() < 60 and lefts.max() > 250


@pytest.mark.parametrize(
    "width,height,expected",
    [
        (1000, 20, (0, (1000 - 27) // 2, 20, 27)),  # too wide: ratio clamped to 4/3, height kept
        (20, 1000, ((1000 - 27) // 2, 0, 27, 20)),  # too tall: ratio clamped to 3/4, width kept
    ],
)
def test_sample_crop_falls_back_to_centre_crop_with_clamped_ratio(
    width: int, height: int, expected: tuple[int, int, int, int]
) -> None:
    # No proposal of area >= 0.2 * W * H and ratio in [3/4, 4/3] fits a 50:1 image, so every call falls back.
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample_crop(width, height, SCALE, RATIO, g) == expected


def test_sample_crop_is_a_function_of_the_generator_state() -> None:
    a = [sample_crop(300, 200, SCALE, RATIO, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    others = {sample_crop(300, 200, SCALE, RATIO, torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(others) > 15


def test_flip_probability_is_one_half() -> None:
    # With scale = ratio = 1 on a square image the crop is the whole image, so the output is either the
    # horizontal ramp or its mirror image; the sign of the left-right difference tells which.
    ramp = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    transform = PretrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    g = torch.Generator().manual_seed(3)
    flips = sum(
        bool(out[0, :, 0].mean() > out[0, :, -1].mean())
        for out in (transform(Image.fromarray(ramp, "RGB"), g) for _ in range(600))
    )
    # Binomial(600, 0.5): std 12.2, so +-50 is about 4 standard deviations.
    assert abs(flips - 300) < 50


def test_output_shape_dtype_and_determinism() -> None:
    img = _structured_image()
    transform = PretrainTransform(24)
    a = transform(img, torch.Generator().manual_seed(11))
    b = transform(img, torch.Generator().manual_seed(11))
    c = transform(img, torch.Generator().manual_seed(12))
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_matches_resized_crop_with_sampled_params_then_flip_coin() -> None:
    # Pins the draw order (crop params, then flip) and bicubic resampling, so a seed keeps its meaning.
    img = _structured_image(61, 45, seed=4)
    transform = PretrainTransform(20)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = sample_crop(61, 45, SCALE, RATIO, g)
        flip = float(torch.rand(1, generator=g)) < 0.5
        ref = TF.resized_crop(img, top, left, h, w, [20, 20], InterpolationMode.BICUBIC, antialias=True)
        ref = TF.hflip(ref) if flip else ref
        ref = TF.normalize(TF.to_tensor(ref), list(IMAGENET_MEAN), list(IMAGENET_STD))
        assert torch.equal(transform(img, torch.Generator().manual_seed(seed)), ref)


def test_normalisation_uses_imagenet_mean_and_std() -> None:
    # A constant image stays constant through crop and bicubic resize, so each channel is (v / 255 - mean) / std.
    value = (200, 90, 30)
    out = PretrainTransform(16)(Image.new("RGB", (40, 30), value), torch.Generator().manual_seed(0))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(value, IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert out.std(dim=(1, 2)).max() < 1e-5


def test_crop_distribution_matches_torchvision_random_resized_crop() -> None:
    # Both placements use these draws. Two-sample Kolmogorov-Smirnov tests of area fraction, aspect ratio and
    # position against torchvision's own RandomResizedCrop.get_params (global RNG, seeded): at alpha = 0.001 with
    # n = m = 3000 the critical distance is 1.95 * sqrt(2 / 3000) = 0.050.
    from torchvision.transforms import RandomResizedCrop

    width, height, n = 500, 375, 3000
    g = torch.Generator().manual_seed(0)
    ours = np.array([sample_crop(width, height, SCALE, RATIO, g) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(1)  # another seed: independent samples (with the same seed the two streams coincide)
    image = torch.zeros(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)], np.float64)

    def features(crops: np.ndarray) -> dict[str, np.ndarray]:
        top, left, h, w = crops.T
        return {
            "area": h * w / (width * height),
            "log_ratio": np.log(w / h),
            "cy": (top + h / 2) / height,
            "cx": (left + w / 2) / width,
        }

    def ks(a: np.ndarray, b: np.ndarray) -> float:
        grid = np.sort(np.concatenate([a, b]))
        cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
        return float(np.abs(cdf(a) - cdf(b)).max())

    for name, ours_values in features(ours).items():
        assert ks(ours_values, features(theirs)[name]) < 0.050, name
    # And the draws do cover the allowed range (the test above could pass on two equally broken samplers).
    area = features(ours)["area"]
    assert area.min() < 0.21 and area.max() > 0.95 and 0.4 < np.median(area) < 0.6  # large areas often do not fit


def test_sample_params_are_the_transforms_draws() -> None:
    transform = PretrainTransform(16)
    box, flip = transform.sample_params(61, 45, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    assert box == sample_crop(61, 45, SCALE, RATIO, g) and flip == (float(torch.rand(1, generator=g)) < 0.5)


def test_uint8_output_normalised_later_is_bit_identical_to_the_float_path() -> None:
    """The loader ships uint8 pixels and normalises the batch on the device: the same float32 values, bit for bit,
    as normalising each sample in the worker (ToTensor -> Normalize)."""
    from fastmim.data.transforms import normalize_uint8

    transform = PretrainTransform(32)
    images = [_structured_image(48 + i, 40, seed=i) for i in range(4)]
    floats = torch.stack([transform(im, torch.Generator().manual_seed(i)) for i, im in enumerate(images)])
    pixels = torch.stack(
        [transform(im, torch.Generator().manual_seed(i), normalize=False) for i, im in enumerate(images)]
    )
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 32, 32)
    out = normalize_uint8(pixels, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32
    assert torch.equal(out, floats)
