"""fastmim.kernels.crop_resize: the device half of the augmentation against its reference (bit for bit), and the
reference against Pillow / torchvision, the CPU placement's arithmetic, for fixed crop boxes.

The Triton kernels run through the interpreter on CPU (tests/kernels/conftest.py sets TRITON_INTERPRET=1), on small
shapes: the interpreter runs programs one by one.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from fastmim.kernels import crop_resize as cr

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LEVEL = 1 / 255 / min(STD)  # one step of 8-bit input, in normalised units (the largest over the channels)


def setup_module():
    assert cr._use_kernel(torch.zeros(1)), "these tests must run the kernels (TRITON_INTERPRET=1 before import)"


def random_batch(rng, batch, height, width, smooth=False):
    """uint8 [B, H, W, 3] (noise, or smooth gradients + edges) and random boxes (any size, inside) and flips."""
    if smooth:
        y, x = np.mgrid[0:height, 0:width]
        base = [
            (np.sin(x / rng.uniform(2, 9) + rng.uniform(0, 6)) * 90 + 128 + (x + y > height) * 40) for _ in range(3)
        ]
        images = np.stack([np.stack(base, -1) + rng.normal(0, 4, (height, width, 3)) for _ in range(batch)])
        images = np.clip(images, 0, 255).astype(np.uint8)
    else:
        images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    boxes = []
    for _ in range(batch):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        boxes.append([int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w])
    flips = torch.from_numpy(rng.integers(0, 2, batch).astype(bool))
    return torch.from_numpy(images), torch.tensor(boxes), flips


def pil_two_pass(image: np.ndarray, box, flip: bool, size: int) -> torch.Tensor:
    """torchvision's CPU augmentation for a fixed box, with Pillow's two passes made explicit (width, then
    height): the same arithmetic as one resize in every Pillow version, whichever pass order it picks."""
    top, left, h, w = box
    crop = Image.fromarray(image).crop((left, top, left + w, top + h))
    out = crop.resize((size, h), Image.BICUBIC).resize((size, size), Image.BICUBIC)
    out = TF.hflip(out) if flip else out
    return TF.normalize(TF.to_tensor(out), list(MEAN), list(STD))


@pytest.mark.parametrize(
    "batch,height,width,size,smooth",
    [(3, 20, 31, 12, False), (2, 9, 40, 16, True), (1, 33, 17, 7, False), (4, 24, 24, 24, True)],
)
def test_kernel_equals_reference_bit_for_bit(batch, height, width, size, smooth):
    images, boxes, flips = random_batch(np.random.default_rng(height * width), batch, height, width, smooth)
    out = cr.crop_resize(images, boxes, flips, size, MEAN, STD)
    ref = cr.crop_resize_ref(images, boxes, flips, size, MEAN, STD)
    assert out.shape == (batch, 3, size, size) and out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_kernel_reads_a_padded_batch_through_its_strides():
    # The loader hands over a zero-padded batch; a strided view (a crop of a larger tensor) must read the same.
    images, boxes, flips = random_batch(np.random.default_rng(3), 3, 30, 26)
    big = torch.zeros(3, 40, 26, 3, dtype=torch.uint8)
    big[:, 5:35] = images
    view = big[:, 5:35]
    assert not view.is_contiguous()
    assert torch.equal(
        cr.crop_resize(view, boxes, flips, 9, MEAN, STD), cr.crop_resize_ref(images, boxes, flips, 9, MEAN, STD)
    )


def test_reference_equals_pillow_for_fixed_boxes_bit_for_bit():
    # The check that the device placement computes the CPU placement's function: down- and up-scaling, both axes,
    # one-pixel boxes, whole images, flips; exact equality of the normalised float32 tensors.
    rng = np.random.default_rng(0)
    for trial in range(40):
        h_img, w_img = (int(v) for v in rng.integers(2, 70, 2))
        images, boxes, flips = random_batch(rng, 1, h_img, w_img, smooth=trial % 2 == 1)
        size = int(rng.integers(3, 40))
        got = cr.crop_resize_ref(images, boxes, flips, size, MEAN, STD)[0]
        want = pil_two_pass(images[0].numpy(), boxes[0].tolist(), bool(flips[0]), size)
        assert torch.equal(got, want), f"trial {trial}: box {boxes[0].tolist()} -> {size}"


def test_reference_matches_the_one_call_cpu_transform_on_photos():
    # The CPU placement calls resized_crop once. Pillow <= 12 always runs the width pass first, so there the two
    # placements agree bit for bit; Pillow >= 13 runs the height pass first when the height shrinks much more than
    # the width (e.g. a 270 x 237 crop to 224), which rounds the 8-bit intermediate differently: about a fifth of
    # such a crop's pixels move by one level, a few by more where the filter overshoots and clips at edges.
    from matplotlib import cbook

    from fastmim.data.transforms import sample_crop

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    photo = np.array(Image.open(path).convert("RGB").resize((250, 190), Image.BICUBIC))
    generator = torch.Generator().manual_seed(0)
    diffs = []
    for _ in range(16):
        box = list(sample_crop(250, 190, (0.2, 1.0), (3 / 4, 4 / 3), generator))
        image = torch.from_numpy(photo)[None]
        got = cr.crop_resize_ref(image, torch.tensor([box]), torch.tensor([False]), 112, MEAN, STD)[0]
        pil = TF.resized_crop(Image.fromarray(photo), *box, [112, 112], InterpolationMode.BICUBIC, antialias=True)
        diffs.append((got - TF.normalize(TF.to_tensor(pil), list(MEAN), list(STD))).abs())
    diff = torch.stack(diffs)
    exact = sum(bool((d == 0).all()) for d in diffs)
    assert exact >= len(diffs) // 2, f"only {exact} of {len(diffs)} crops are bit-identical"
    assert diff.mean() <= 0.1 * LEVEL and diff.max() <= 16 * LEVEL


def test_coefficients_are_normalised_fixed_point_taps_inside_the_span():
    lengths = torch.tensor([1, 7, 100, 300])
    first, coeffs = cr.resample_coeffs(lengths, 24)
    assert coeffs.dtype == torch.int32 and first.shape == (4, 24)
    sums = coeffs.sum(-1).to(torch.int64)
    assert ((sums - (1 << cr.PRECISION_BITS)).abs() <= coeffs.shape[-1]).all()  # rounding: <= 1 unit per tap
    taps = first[..., None] + torch.arange(coeffs.shape[-1])
    assert ((coeffs == 0) | ((taps >= 0) & (taps < lengths[:, None, None]))).all()
    # Downscaling 300 -> 24 widens the filter 12.5x: 2 * ceil(2 * 12.5) + 1 = 51 taps.
    assert coeffs.shape[-1] == 51
    # Identity: a 24 px span to 24 px copies each pixel.
    first, coeffs = cr.resample_coeffs(torch.tensor([24]), 24)
    assert (coeffs[0, torch.arange(24), torch.arange(24) - first[0]] == 1 << cr.PRECISION_BITS).all()


def test_invalid_inputs_are_rejected():
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    flips = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="uint8"):
        cr.crop_resize(images.float(), torch.tensor([[0, 0, 8, 8]] * 2), flips, 4, MEAN, STD)
    with pytest.raises(ValueError, match="inside"):
        cr.crop_resize(images, torch.tensor([[0, 0, 8, 8], [1, 0, 8, 8]]), flips, 4, MEAN, STD)
    with pytest.raises(ValueError, match="boxes must be"):
        cr.crop_resize(images, torch.tensor([[0, 0, 8, 8]]), flips, 4, MEAN, STD)
    empty = cr.crop_resize(images[:0], torch.zeros(0, 4, dtype=torch.int64), flips[:0], 4, MEAN, STD)
    assert empty.shape == (0, 3, 4, 4)


@pytest.mark.gpu
def test_cuda_kernel_equals_reference_at_training_size():
    images, boxes, flips = random_batch(np.random.default_rng(7), 64, 256, 256, smooth=True)
    out = cr.crop_resize(images.cuda(), boxes, flips, 224, MEAN, STD)
    assert out.is_cuda
    assert torch.equal(out.cpu(), cr.crop_resize_ref(images, boxes, flips, 224, MEAN, STD))


def packed(images: torch.Tensor, shapes: list[tuple[int, int]], channels_last: bool):
    """The top-left H_b x W_b of each padded image, packed back to back (HWC or CHW): (pixels, offsets, shapes)."""
    parts = [im[:h, :w] if channels_last else im[:h, :w].permute(2, 0, 1) for im, (h, w) in zip(images, shapes)]
    flat = [p.contiguous().reshape(-1) for p in parts]
    offsets = torch.tensor([0, *np.cumsum([f.numel() for f in flat])[:-1].tolist()])
    return torch.cat(flat), offsets, torch.tensor(shapes)


@pytest.mark.parametrize("channels_last", [True, False])
def test_packed_images_of_different_sizes_equal_the_padded_batch(channels_last):
    rng = np.random.default_rng(11)
    images, _, flips = random_batch(rng, 4, 26, 30, smooth=True)
    shapes = [(26, 30), (9, 17), (20, 5), (1, 1)]
    boxes = torch.tensor([[3, 4, 20, 25], [0, 2, 9, 15], [5, 0, 10, 5], [0, 0, 1, 1]])
    pixels, offsets, shape_t = packed(images, shapes, channels_last)
    out = cr.crop_resize_packed(pixels, offsets, shape_t, boxes, flips, 11, MEAN, STD, channels_last)
    ref = cr.crop_resize_ref(images, boxes, flips, 11, MEAN, STD)  # the same pixels, padded
    assert torch.equal(out, ref)
    assert torch.equal(cr.unpack(pixels, offsets, shape_t, channels_last)[1, :9, :17], images[1, :9, :17])


def test_packed_reference_path_equals_the_kernel(monkeypatch):
    rng = np.random.default_rng(12)
    images, _, flips = random_batch(rng, 3, 18, 21)
    shapes = [(18, 21), (7, 13), (15, 4)]
    boxes = torch.tensor([[0, 0, 18, 21], [1, 2, 6, 11], [0, 0, 15, 4]])
    pixels, offsets, shape_t = packed(images, shapes, True)
    kernel = cr.crop_resize_packed(pixels, offsets, shape_t, boxes, flips, 8, MEAN, STD)
    monkeypatch.setattr(cr, "_use_kernel", lambda x: False)
    assert torch.equal(cr.crop_resize_packed(pixels, offsets, shape_t, boxes, flips, 8, MEAN, STD), kernel)


def test_invalid_packed_inputs_are_rejected():
    pixels = torch.zeros(100, dtype=torch.uint8)
    flips = torch.zeros(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="lie inside the 100 bytes"):
        cr.crop_resize_packed(
            pixels, torch.tensor([50]), torch.tensor([[4, 5]]), torch.tensor([[0, 0, 4, 5]]), flips, 4, MEAN, STD
        )
    with pytest.raises(ValueError, match="inside its image"):
        cr.crop_resize_packed(
            pixels, torch.tensor([0]), torch.tensor([[4, 5]]), torch.tensor([[1, 0, 4, 5]]), flips, 4, MEAN, STD
        )


@pytest.mark.gpu
def test_cuda_packed_kernel_equals_reference_at_training_size():
    rng = np.random.default_rng(8)
    images, _, flips = random_batch(rng, 16, 375, 500, smooth=True)
    shapes = [(int(rng.integers(150, 376)), int(rng.integers(150, 501))) for _ in range(16)]
    pixels, offsets, shape_t = packed(images, shapes, True)
    boxes = torch.cat([torch.zeros(16, 2, dtype=torch.int64), shape_t], 1)
    out = cr.crop_resize_packed(pixels.cuda(), offsets, shape_t, boxes, flips, 224, MEAN, STD)
    assert out.is_cuda and torch.equal(out.cpu(), cr.crop_resize_ref(images, boxes, flips, 224, MEAN, STD))
