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
device. The coefficients are built with torch in float64 (O(B * S * taps), tiny); the two passes are Triton kernels
(one program per block of outputs of one sample, all taps in registers).

Bytes per image, 224 px output from a 256 x 192 crop: read 147 KB uint8 (each tap re-reads neighbouring bytes from
L1/L2), write + read a 224 x 192 x 3 uint8 intermediate (2 x 129 KB), write 602 KB fp32: ~1 MB, ~0.3 us at 3 TB/s,
against ~25 torch launches per batch and fp32 intermediates for the reference (which moves ~10x the bytes).

Caveats: exact integer arithmetic needs sum |k| * 255 * 2^22 < 2^31, true for the bicubic filter (sum |k| <= 1.3);
images must be uint8 RGB. Tensors a kernel cannot run on (CPU without TRITON_INTERPRET=1) use ``crop_resize_ref``.
"""

from __future__ import annotations

import functools
import math
import types

import torch
from torch import Tensor

from . import can_run_on, interpreter_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch builds ship without triton: crop_resize() then uses crop_resize_ref.
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = None

# The @triton.jit decorator picks the interpreter when this module is imported, not when a kernel runs.
_INTERPRETED = interpreter_enabled()

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 bits - 8 (pixel) - 2 (overshoot of the filter)
_HALF = 1 << (PRECISION_BITS - 1)
_SUPPORT = 2.0  # bicubic support at scale 1
_BLOCK = 16384 if _INTERPRETED else 1024  # outputs per program (the interpreter runs programs one by one)


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
    if boxes.shape != (b, 4) or flips.shape != (b,):
        raise ValueError(f"boxes must be [{b}, 4] and flips [{b}], got {list(boxes.shape)} and {list(flips.shape)}")
    if size < 1:
        raise ValueError(f"output size must be positive, got {size}")
    top, left, bh, bw = boxes.unbind(1)
    if b and bool(((top < 0) | (left < 0) | (bh < 1) | (bw < 1) | (top + bh > h) | (left + bw > w)).any()):
        raise ValueError(f"every box (top, left, height, width) must lie inside the {h} x {w} images")


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


def crop_resize_ref(images: Tensor, boxes: Tensor, flips: Tensor, size: int, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> Tensor:  # fmt: skip
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


@triton.jit
def _resize_rows_kernel(img_ptr, top_ptr, h_ptr, x0_ptr, kx_ptr, t_ptr, W, S, ROWS, TAPS, s_ib, s_ih,
                        BLOCK: tl.constexpr):  # fmt: skip
    # Horizontal pass. One program computes BLOCK consecutive elements (y, x, c) of t[b] [ROWS, S, 3] for sample
    # b = program_id(0), y < the box height; grid (B, cdiv(ROWS * S * 3, BLOCK)). The accumulator (int32, exact:
    # see the caveat in the module docstring) and the BLOCK tap starts stay in registers across the tap loop.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = offs % 3
    x = (offs // 3) % S
    y = offs // (3 * S)
    height = tl.load(h_ptr + b)
    mask = y < height
    row = tl.load(top_ptr + b) + y
    start = tl.load(x0_ptr + b * S + x, mask=mask, other=0)
    acc = tl.full((BLOCK,), 1 << 21, tl.int32)
    for k in range(0, TAPS):
        coeff = tl.load(kx_ptr + (b * S + x) * TAPS + k, mask=mask, other=0)
        col = tl.minimum(start + k, W - 1)
        pix = tl.load(img_ptr + b * s_ib + row * s_ih + col * 3 + c, mask=mask, other=0)
        acc += coeff * pix.to(tl.int32)
    out = tl.minimum(tl.maximum(acc >> 22, 0), 255)
    tl.store(t_ptr + b * ROWS * S * 3 + offs, out.to(tl.uint8), mask=mask)


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


def crop_resize_fwd(images: Tensor, boxes: Tensor, flips: Tensor, size: int, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> Tensor:  # fmt: skip
    """Launch the two passes (arguments as :func:`crop_resize`)."""
    _check(images, boxes, flips, size)
    b, _, w_img, _ = images.shape
    out = torch.empty(b, 3, size, size, dtype=torch.float32, device=images.device)
    if b == 0:
        return out
    if images.stride(3) != 1 or images.stride(2) != 3:
        images = images.contiguous()  # rows may be strided (a padded batch), pixels within a row may not
    rows, top, _, h, x0, kx, y0, ky, lut = _prepare(images, boxes, size, mean, std)
    t = torch.empty(b, rows, size, 3, dtype=torch.uint8, device=images.device)
    flip8 = to_device_async(flips.to(torch.uint8), images.device)
    grid = (b, triton.cdiv(rows * size * 3, _BLOCK))
    _resize_rows_kernel[grid](images, top.contiguous(), h.contiguous(), x0.contiguous(), kx.contiguous(), t, w_img,
                              size, rows, kx.shape[-1], images.stride(0), images.stride(1), BLOCK=_BLOCK)  # fmt: skip
    grid = (b, triton.cdiv(3 * size * size, _BLOCK))
    _resize_cols_kernel[grid](t, y0.contiguous(), ky.contiguous(), flip8, lut, out, size, rows, ky.shape[-1],
                              BLOCK=_BLOCK)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- public API


def _use_kernel(x: Tensor) -> bool:
    """A kernel can run: CUDA with triton, or CPU with this module's kernels built for the interpreter."""
    return can_run_on(x) and (x.is_cuda or _INTERPRETED)


@torch.no_grad()
def crop_resize(images: Tensor, boxes: Tensor, flips: Tensor, size: int, mean: tuple[float, ...],
                std: tuple[float, ...]) -> Tensor:  # fmt: skip
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
