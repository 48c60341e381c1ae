"""Crop, resize, flip and normalise a batch of uint8 images: the device half of the pre-training augmentation.

Math. For images uint8 [B, H, W, 3] (channels last, as decoded; sample b may use only part of the padded tensor),
boxes int64 [B, 4] = (top, left, height, width) inside each image, flips bool [B] and output side S:

    t[b, y, x, c]   = clip8((2^21 + sum_k kx[b, x, k] * img[b, top + y, x0[b, x] + k, c]) >> 22)   (y < height)
    v[b, i, x, c]   = clip8((2^21 + sum_k ky[b, i, k] * t[b, y0[b, i] + k, x, c]) >> 22)
    out[b, c, i, j] = lut[c, v[b, i, j', c]]     j' = S - 1 - j if flips[b] else j
    lut[c, u]       = (u / 255 - mean_c) / std_c

kx, ky (:func:`resample_coeffs`) are Pillow's antialiased bicubic coefficients (Keys cubic, a = -0.5, support
2 * max(scale, 1), taps clipped to the box, normalised to sum 1) in Pillow's 22-bit fixed point, and the horizontal
pass runs first with an 8-bit intermediate, exactly as Pillow resamples an 8-bit image. ``lut`` holds
``ToTensor`` + ``Normalize`` for the 256 possible values in float32. So for a fixed box and flip the output is
torchvision's ``resized_crop(PIL image, box, S, BICUBIC) -> hflip -> to_tensor -> normalize``, bit for bit, as long
as Pillow runs its horizontal pass first. Pillow >= 13 runs the vertical pass first when the height shrinks much
more than the width; on natural images that moves a few pixels by one level of 255 (the tests bound it).

Shapes, dtypes: images uint8 (any device), boxes int64, flips bool; returns float32 [B, 3, S, S] on the images'
device. :func:`crop_resize_packed` takes the images packed back to back in one uint8 buffer instead (each its own
size, channels last or first, no padding: what the loader ships), with per-sample offsets and shapes; the kernels
read either layout through per-sample (base, row stride, channel stride, last column) and give the same output.
The coefficients are built with torch in float64 (O(B * S * taps), tiny); the two passes are Triton kernels (one
program per block of outputs of one sample, all taps in registers).

Bytes per image, 224 px output from a 256 x 192 crop: read 147 KB uint8 (each tap re-reads neighbouring bytes from
L1/L2), write + read a 224 x 192 x 3 uint8 intermediate (2 x 129 KB), write 602 KB fp32: ~1 MB, ~0.3 us at 3 TB/s,
against ~25 torch launches per batch and fp32 intermediates for the reference (which moves ~10x the bytes).

Caveats: exact integer arithmetic needs sum |k| * 255 * 2^22 < 2^31, true for the bicubic filter (sum |k| <= 1.3);
images must be uint8 RGB. Tensors a kernel cannot run on (CPU without TRITON_INTERPRET=1) use ``crop_resize_ref``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._common import autotune_configs, tl, triton, wrap_triton
from ._common import use_kernel as _use_kernel  # a module global, so that tests can turn the kernel path off

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 bits - 8 (pixel) - 2 (overshoot of the filter)
_HALF = 1 << (PRECISION_BITS - 1)
_SUPPORT = 2.0  # bicubic support at scale 1
# BLOCK outputs per program, nothing to tune; the interpreter runs programs one by one, so it takes larger blocks.
_CONFIGS = autotune_configs([({"BLOCK": 1024}, 4)], interpreted={"BLOCK": 16384})


def _bicubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's and PyTorch's bicubic), float64."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_coeffs(length: Tensor, out_size: int, longest: int | None = None) -> tuple[Tensor, Tensor]:
    """Fixed-point resampling coefficients for resizing spans of ``length`` [B] pixels to ``out_size``.

    Output pixel ``i`` of sample b reads input pixels ``first[b, i] + k`` (relative to the span's start) for
    ``k < K`` with weights ``coeffs[b, i, k] / 2^22``; taps beyond the span have weight 0. ``longest``: the largest
    length as a host int (the kernel size K depends on it), so that a device ``length`` is never read back (a host
    sync per batch); default: read from ``length``.

    Returns:
        ``first`` int64 [B, out_size] and ``coeffs`` int32 [B, out_size, K], K = Pillow's kernel size for the
        largest downscale in the batch.
    """
    if longest is None:
        longest = int(length.max()) if len(length) else out_size
    length = length.to(torch.float64)
    scale = length / out_size
    filterscale = scale.clamp(min=1.0)
    support = _SUPPORT * filterscale
    taps = math.ceil(_SUPPORT * max(longest / out_size, 1.0)) * 2 + 1
    center = (torch.arange(out_size, dtype=torch.float64, device=length.device) + 0.5) * scale[:, None]
    lo = (center - support[:, None] + 0.5).trunc().clamp(min=0.0)
    hi = torch.minimum((center + support[:, None] + 0.5).trunc(), length[:, None])
    pos = lo[..., None] + torch.arange(taps, dtype=torch.float64, device=length.device)
    weight = _bicubic((pos - center[..., None] + 0.5) * (1.0 / filterscale)[:, None, None])
    weight = torch.where(pos < hi[..., None], weight, torch.zeros_like(weight))
    total = weight.sum(-1, keepdim=True)
    weight = torch.where(total != 0, weight / total, weight)
    fixed = weight * (1 << PRECISION_BITS)
    coeffs = torch.where(fixed < 0, fixed - 0.5, fixed + 0.5).trunc().to(torch.int32)
    return lo.to(torch.int64), coeffs


def normalize_lut(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    """float32 [3, 256]: ``(u / 255 - mean_c) / std_c`` computed as to_tensor + normalize do, for every byte u.
    Made once per (mean, std, device): a fresh host-to-device copy per batch would synchronise."""
    return _cached_lut(tuple(mean), tuple(std), torch.device(device))


@functools.cache
def _cached_lut(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    u = torch.arange(256, dtype=torch.float32).div(255)
    m = torch.tensor(mean, dtype=torch.float32)[:, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None]
    return ((u[None, :] - m) / s).to(device)


def _check(images: Tensor, boxes: Tensor, flips: Tensor, size: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    b, h, w, _ = images.shape
    _check_boxes(boxes, flips, size, torch.tensor([[h, w]]).expand(b, 2), f"the {h} x {w} images")


def _check_boxes(boxes: Tensor, flips: Tensor, size: int, shapes: Tensor, what: str) -> None:
    b = shapes.shape[0]
    if boxes.shape != (b, 4) or flips.shape != (b,):
        raise ValueError(f"boxes must be [{b}, 4] and flips [{b}], got {list(boxes.shape)} and {list(flips.shape)}")
    if size < 1:
        raise ValueError(f"output size must be positive, got {size}")
    top, left, bh, bw = boxes.cpu().unbind(1)
    h, w = shapes.cpu().unbind(1)
    if b and bool(((top < 0) | (left < 0) | (bh < 1) | (bw < 1) | (top + bh > h) | (left + bw > w)).any()):
        raise ValueError(f"every box (top, left, height, width) must lie inside {what}")


def _check_packed(pixels: Tensor, offsets: Tensor, shapes: Tensor) -> None:
    if pixels.dtype != torch.uint8 or pixels.dim() != 1:
        raise ValueError(f"pixels must be uint8 [N], got {pixels.dtype} {list(pixels.shape)}")
    b = shapes.shape[0]
    if shapes.shape != (b, 2) or offsets.shape != (b,):
        raise ValueError(f"shapes must be [B, 2] and offsets [B], got {list(shapes.shape)} and {list(offsets.shape)}")
    start, end = offsets.cpu(), offsets.cpu() + shapes.cpu().prod(1) * 3
    if b and bool(((shapes.cpu() < 1).any(1) | (start < 0) | (end > pixels.numel())).any()):
        raise ValueError(f"every packed image must have a positive size and lie inside the {pixels.numel()} bytes")


def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a host tensor goes to a GPU through pinned memory, without making the host wait."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _prepare(images: Tensor, boxes: Tensor, size: int, mean, std):
    """What both implementations use: the tallest and widest box (read on the host when the boxes are there, as the
    loader's are: no device read), then device tensors: box columns, coefficients (absolute tap starts) and the
    LUT."""
    rows, cols = (int(v) for v in boxes[:, 2:].max(0).values) if boxes.shape[0] else (0, 0)
    boxes = to_device_async(boxes.to(torch.int64), images.device)
    top, left, h, w = boxes.unbind(1)
    y0, ky = resample_coeffs(h, size, rows)
    x0, kx = resample_coeffs(w, size, cols)
    return rows, top, left, h, x0 + left[:, None], kx, y0, ky, normalize_lut(mean, std, images.device)


# ----------------------------------------------------------------------------------------------- reference


def crop_resize_ref(
    images: Tensor, boxes: Tensor, flips: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """The module docstring's math in plain torch (int64 gathers, one per tap): float32 [B, 3, size, size]."""
    _check(images, boxes, flips, size)
    b, h_img, w_img, c = images.shape
    rows, top, _, _, x0, kx, y0, ky, lut = _prepare(images, boxes, size, mean, std)
    # Horizontal pass over the box rows only: t [B, rows, S, C] (rows past a box's height are never read).
    src_rows = (top[:, None] + torch.arange(rows, device=images.device)).clamp(max=h_img - 1)
    img = torch.gather(images, 1, src_rows[:, :, None, None].expand(b, rows, w_img, c)).to(torch.int64)
    acc = torch.full((b, rows, size, c), _HALF, dtype=torch.int64, device=images.device)
    for k in range(kx.shape[-1]):
        cols = (x0 + k).clamp(max=w_img - 1)[:, None, :, None].expand(b, rows, size, c)
        acc += kx[:, None, :, k, None].to(torch.int64) * torch.gather(img, 2, cols)
    t = (acc >> PRECISION_BITS).clamp(0, 255)
    # Vertical pass: v [B, S, S, C].
    acc = torch.full((b, size, size, c), _HALF, dtype=torch.int64, device=images.device)
    for k in range(ky.shape[-1]):
        src = (y0 + k).clamp(max=max(rows - 1, 0))[:, :, None, None].expand(b, size, size, c)
        acc += ky[:, :, k, None, None].to(torch.int64) * torch.gather(t, 1, src)
    v = (acc >> PRECISION_BITS).clamp(0, 255)
    v = torch.where(flips.to(images.device)[:, None, None, None], v.flip(2), v)
    out = lut[torch.arange(c, device=images.device)[None, :, None, None], v.permute(0, 3, 1, 2)]
    return out.contiguous()


# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(configs=_CONFIGS, key=[])
@triton.jit
def _resize_rows_kernel(img_ptr, layout_ptr, top_ptr, h_ptr, x0_ptr, kx_ptr, t_ptr, S, ROWS, TAPS, COL_STRIDE,
                        BLOCK: tl.constexpr):  # fmt: skip
    # Horizontal pass. One program computes BLOCK consecutive elements (y, x, c) of t[b] [ROWS, S, 3] for sample
    # b = program_id(0), y < the box height; grid (B, cdiv(ROWS * S * 3, BLOCK)). The accumulator (int32, exact:
    # see the caveat in the module docstring) and the BLOCK tap starts stay in registers across the tap loop.
    # Sample b's pixel (row, col, c) is at img_ptr + base + row * row_stride + col * COL_STRIDE + c * chan_stride,
    # with (base, row_stride, chan_stride, last column) = layout[b]: a padded batch and images of different sizes
    # packed back to back (channels last or first) read alike.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = offs % 3
    x = (offs // 3) % S
    y = offs // (3 * S)
    height = tl.load(h_ptr + b)
    mask = y < height
    base = tl.load(layout_ptr + b * 4)
    row_stride = tl.load(layout_ptr + b * 4 + 1)
    chan_stride = tl.load(layout_ptr + b * 4 + 2)
    last_col = tl.load(layout_ptr + b * 4 + 3)
    row = tl.load(top_ptr + b) + y
    start = tl.load(x0_ptr + b * S + x, mask=mask, other=0)
    pixel = img_ptr + base + row * row_stride + c * chan_stride
    acc = tl.full((BLOCK,), 1 << 21, tl.int32)
    for k in range(0, TAPS):
        coeff = tl.load(kx_ptr + (b * S + x) * TAPS + k, mask=mask, other=0)
        col = tl.minimum(start + k, last_col)
        pix = tl.load(pixel + col * COL_STRIDE, mask=mask, other=0)
        acc += coeff * pix.to(tl.int32)
    out = tl.minimum(tl.maximum(acc >> 22, 0), 255)
    tl.store(t_ptr + b * ROWS * S * 3 + offs, out.to(tl.uint8), mask=mask)


@triton.autotune(configs=_CONFIGS, key=[])
@triton.jit
def _resize_cols_kernel(t_ptr, y0_ptr, ky_ptr, flip_ptr, lut_ptr, out_ptr, S, ROWS, TAPS, BLOCK: tl.constexpr):
    # Vertical pass, flip and normalisation. One program writes BLOCK consecutive elements (c, i, j) of out[b]
    # [3, S, S] (NCHW, so stores are contiguous) for b = program_id(0); grid (B, cdiv(3 * S * S, BLOCK)). The
    # flip is an index reversal of the column read; the normalisation is a gather from the [3, 256] float32 LUT.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < 3 * S * S
    j = offs % S
    i = (offs // S) % S
    c = offs // (S * S)
    flip = tl.load(flip_ptr + b)
    x = tl.where(flip != 0, S - 1 - j, j)
    start = tl.load(y0_ptr + b * S + i, mask=mask, other=0)
    acc = tl.full((BLOCK,), 1 << 21, tl.int32)
    for k in range(0, TAPS):
        coeff = tl.load(ky_ptr + (b * S + i) * TAPS + k, mask=mask, other=0)
        row = tl.minimum(start + k, ROWS - 1)
        pix = tl.load(t_ptr + ((b * ROWS + row) * S + x) * 3 + c, mask=mask, other=0)
        acc += coeff * pix.to(tl.int32)
    v = tl.minimum(tl.maximum(acc >> 22, 0), 255)
    val = tl.load(lut_ptr + c * 256 + v, mask=mask, other=0.0)
    tl.store(out_ptr + b * 3 * S * S + offs, val, mask=mask)


def crop_resize_fwd(
    images: Tensor, boxes: Tensor, flips: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """Launch the two passes on a padded batch (arguments as :func:`crop_resize`)."""
    _check(images, boxes, flips, size)
    b, _, w_img, _ = images.shape
    if images.stride(3) != 1 or images.stride(2) != 3:
        images = images.contiguous()  # rows may be strided (a padded batch), pixels within a row may not
    # (base, row stride, channel stride, last column) per sample, as in the kernel's comment.
    layout = torch.tensor([[0, images.stride(1), 1, w_img - 1]], dtype=torch.int64).repeat(b, 1)
    layout[:, 0] = torch.arange(b) * images.stride(0)
    return _launch(images, layout, 3, boxes, flips, size, mean, std)


def _launch(
    data: Tensor,
    layout: Tensor,
    col_stride: int,
    boxes: Tensor,
    flips: Tensor,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Tensor:
    """The two passes over the images ``layout`` (host int64 [B, 4], see the rows kernel) places in ``data``."""
    b = layout.shape[0]
    out = torch.empty(b, 3, size, size, dtype=torch.float32, device=data.device)
    if b == 0:
        return out
    rows, top, _, h, x0, kx, y0, ky, lut = _prepare(data, boxes, size, mean, std)
    layout = to_device_async(layout, data.device)
    t = torch.empty(b, rows, size, 3, dtype=torch.uint8, device=data.device)
    flip8 = to_device_async(flips.to(torch.uint8), data.device)
    wrap_triton(_resize_rows_kernel)[lambda meta: (b, triton.cdiv(rows * size * 3, meta["BLOCK"]))](
        img_ptr=data,
        layout_ptr=layout,
        top_ptr=top.contiguous(),
        h_ptr=h.contiguous(),
        x0_ptr=x0.contiguous(),
        kx_ptr=kx.contiguous(),
        t_ptr=t,
        S=size,
        ROWS=rows,
        TAPS=kx.shape[-1],
        COL_STRIDE=col_stride,
    )
    wrap_triton(_resize_cols_kernel)[lambda meta: (b, triton.cdiv(3 * size * size, meta["BLOCK"]))](
        t_ptr=t,
        y0_ptr=y0.contiguous(),
        ky_ptr=ky.contiguous(),
        flip_ptr=flip8,
        lut_ptr=lut,
        out_ptr=out,
        S=size,
        ROWS=rows,
        TAPS=ky.shape[-1],
    )
    return out


# ----------------------------------------------------------------------------------------------- public API


@torch.no_grad()
def crop_resize(
    images: Tensor, boxes: Tensor, flips: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """Crop each image to its box, resize it to ``size`` x ``size`` (antialiased bicubic, Pillow's arithmetic),
    flip it horizontally where ``flips`` is set and normalise it (module docstring).

    Args:
        images: uint8 [B, H, W, 3], channels last; the output is computed on this tensor's device.
        boxes: int [B, 4], (top, left, height, width) of each crop, inside its image.
        flips: bool [B].
        size: output side S.
        mean, std: per-channel normalisation of the [0, 1]-scaled values.

    Returns:
        float32 [B, 3, size, size].
    """
    if _use_kernel(images):
        return crop_resize_fwd(images, boxes, flips, size, mean, std)
    return crop_resize_ref(images, boxes, flips, size, mean, std)


def _packed_layout(offsets: Tensor, shapes: Tensor, channels_last: bool) -> tuple[Tensor, int]:
    """Host int64 [B, 4] kernel layout of packed images and their column stride."""
    offsets, shapes = offsets.cpu().to(torch.int64), shapes.cpu().to(torch.int64)
    h, w = shapes.unbind(1)
    if channels_last:  # [H, W, 3]
        return torch.stack([offsets, w * 3, torch.ones_like(w), w - 1], 1), 3
    return torch.stack([offsets, w, h * w, w - 1], 1), 1  # [3, H, W]


def unpack(pixels: Tensor, offsets: Tensor, shapes: Tensor, channels_last: bool = True) -> Tensor:
    """Packed images (see :func:`crop_resize_packed`) as one zero-padded uint8 [B, H_max, W_max, 3] batch."""
    _check_packed(pixels, offsets, shapes)
    h_max, w_max = (int(v) for v in shapes.max(0).values) if len(shapes) else (1, 1)
    batch = torch.zeros(len(shapes), h_max, w_max, 3, dtype=torch.uint8, device=pixels.device)
    for i, (start, (h, w)) in enumerate(zip(offsets.tolist(), shapes.tolist())):
        image = pixels[start : start + h * w * 3]
        batch[i, :h, :w] = image.view(h, w, 3) if channels_last else image.view(3, h, w).permute(1, 2, 0)
    return batch


@torch.no_grad()
def crop_resize_packed(
    pixels: Tensor,
    offsets: Tensor,
    shapes: Tensor,
    boxes: Tensor,
    flips: Tensor,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    channels_last: bool = True,
) -> Tensor:
    """:func:`crop_resize` for images of different sizes packed back to back in one buffer, with no padding: the
    loader's batches (only the bytes of each crop cross from the data workers, or only each JPEG's bytes for
    device decoding). The result equals :func:`crop_resize` of the same images padded into one batch.

    Args:
        pixels: uint8 [N]; image b is ``pixels[offsets[b] : offsets[b] + H_b * W_b * 3]``, laid out
            [H_b, W_b, 3] (``channels_last``) or [3, H_b, W_b].
        offsets: int [B], where each image starts.
        shapes: int [B, 2], (H_b, W_b).
        boxes, flips, size, mean, std: as :func:`crop_resize`, each box inside its own image.
    """
    _check_packed(pixels, offsets, shapes)
    _check_boxes(boxes, flips, size, shapes, "its image")
    if _use_kernel(pixels):
        layout, col_stride = _packed_layout(offsets, shapes, channels_last)
        return _launch(pixels, layout, col_stride, boxes, flips, size, mean, std)
    return crop_resize_ref(unpack(pixels, offsets, shapes, channels_last), boxes, flips, size, mean, std)
