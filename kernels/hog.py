"""Multi-scale HOG targets (method 3.1, 3.3): every scale and colour from one read of the image.

Math. For each colour channel I of the normalised image [B, 3, H, W] (reflect padding by one pixel):
    G0 = I * [[1, 0, -1], [2, 0, -2], [1, 0, -1]] + b0,   G1 = I * [[1, 2, 1], [0, 0, 0], [-1, -2, -1]] + b1
(cross-correlation; (b0, b1) the optional frozen per-scale bias), |g| = sqrt(G0^2 + G1^2),
bin = floor(atan2(G0, G1) / pi * nbins) mod nbins (hard, unsigned), cell histogram = the mean of |g| * onehot(bin)
over each c x c cell, L2-normalised over the bins (x / max(||x||, 1e-12)), channels concatenated R, G, B.
Output: one target per cell size, [B, (H / c) * (W / c), 3 * nbins], cells row-major, fp32 (or bf16 on request).
Without a bias the cell sums nest (an 8 px cell is the sum of four 4 px cells), so every scale is pooled from the
finest; with a bias each scale has its own gradients and is binned separately (the kernel re-bins the same
gradients with each scale's bias, one program per tile and scale, whose re-reads of the tile should hit L2).

Inputs. Either the normalised float image (fp32 / fp16 / bf16; fp64 uses ``hog_ref``) or uint8 pixels with the
normalisation's ``mean`` and ``std`` (x = (u8 / 255 - mean) / std, torchvision's ToTensor + Normalize). The mean
cancels in the gradients (each Sobel kernel sums to zero, reflect padding only repeats pixels), so the kernel reads
the uint8 pixels, forms integer Sobel sums (exact in fp32) and multiplies them by 1 / (255 std_c): no normalised
copy of the batch exists, and without a bias the bins of uint8 input are exact.

Bins without atan2 (Triton has none). Fold (G0, G1) into the half-plane that the unsigned bin sees:
(y, x) = (G0, G1) if G0 > 0 or (G0 == 0 and G1 >= 0), else (-G0, -G1), so theta = atan2(y, x) lies in [0, pi) and
bin = floor(theta / pi * nbins) is the method's floor(atan2(G0, G1) / pi * nbins) mod nbins. x / (|G0| + |G1|)
decreases strictly with theta, hence theta >= edge k (k pi / nbins)  <=>  x <= u_k (|G0| + |G1|), with
u_k = cos(k pi / n) / (|cos| + sin) of that edge. This is exact on every edge a float direction can hit exactly:
theta = 0 (G0 = +-0 with any G1, matching atan2's +-0 / +-pi conventions: bin 0), 90 degrees (u = 0) and 45 / 135
degrees (u = +-1/2), the only rational directions; on the other edges (irrational tangents) this test and
atan2 + division + floor both carry ~1e-7 relative rounding, so pixels within ~1e-6 of such an edge are ambiguous
and may differ from hog_ref (tests bound how many; they also check exact edges against exact arithmetic).

Histograms without a per-pixel bin. Per edge k the kernel sums the magnitude of the pixels at or beyond it,
S_k = sum |g| [theta >= edge k] (S_0 = sum |g|), and bin k's histogram is S_k - S_{k+1}: one compare, select and
add per pixel and edge, and no integer bin. Where bin k is empty, S_k and S_{k+1} add the same terms in the same
order, so the difference is exactly 0 (a flat cell stays all-zero), and it is never negative (fp addition is
monotone); elsewhere it differs from a direct sum by rounding (~1e-7 relative).

Program layout (the design for speed). One program = one T x T tile (T = the largest cell) of one image, all three
channels, every scale. A channel's pixels are a [pixels-per-cell, cells] register tile (finest cells), walked
column by column inside a cell so that the compiler keeps its default layout: lanes along cells, every pixel of a
cell in one thread, so the per-cell sums are in-thread adds (no shuffles). Per channel the kernel reads the tile's
pixels with their one-pixel halo (8 shifted loads; the halo and the re-reads are L1/L2 hits, DRAM sees each image
byte once), forms G0, G1, |g| and the edge sums in registers (no atomics, no tl.histogram, no zero-filled
[B, nbins, H, W] map), keeps that channel's finest-cell sums [nbins, cells], pools them scale by scale (each from
the next finer one, reshape-sums) and stores each scale's nbins values of that channel straight into its place in
[B, N_k, 3 * nbins] before reading the next channel (holding all three channels' sums took up to 255 registers and
spilled with 18 bins). The channel loop is a runtime loop: unrolled, the compiler would hoist all three channels'
loads (250+ registers). Grid = B * (H / T) * (W / T) tiles, the tiles of an image adjacent; with a bias, one
program per tile and scale, a tile's programs adjacent, so that their re-reads of the tile should hit L2 (not yet
measured on a GPU).

Bytes moved (ViT-B, B = 256, 224 px, 9 bins, cells 4/8/16/32): image 154 MB fp32 (38.5 MB uint8) read once,
targets 4165 cells x 27 x 4 B = 450 kB per image = 115 MB fp32 (58 MB bf16) written once: 269 MB, ~0.09 ms at
3 TB/s. The released code makes 12 passes (4 scales x 3 colours) each zero-filling and scattering into a
[B, 9, 224, 224] fp32 map (~28 GB, ~12.6 ms, docs/performance.md section 1): the expected speedup is >= 50x over
it, and several x over torch.compile of ``hog_ref`` (which still materialises per-pixel one-hot maps). Compiled
offline for sm_90 (ptxas, no GPU run yet; before the per-channel stores): 136 registers at 2 warps, ~72 SASS
instructions per pixel and channel (the 8 edge tests are half of them), i.e. an instruction-issue floor of ~0.13 ms
at B = 256 next to the 0.09 ms memory floor: the kernel is as much issue- as memory-bound, and its H100 time is
still to be measured (benchmarks/bench_hog.py).

Caveats: no backward (targets are no-grad). Cell sizes must be powers of two, at most 4 scales, the largest cell at
most 64 px and at most 16 times the smallest (registers), dividing H and W; other configurations (and fp64, and
tensors no kernel can run on) use ``hog_ref``. H and W are compile-time constants (one compilation per image size);
a non-contiguous image (e.g. channels-last) is copied to contiguous first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# triton fixes the interpreter choice when it is imported (its own tl.sum etc. are decorated then), so fastmim
# imports this module lazily (fastmim.targets.hog), after a test suite has set TRITON_INTERPRET.
from ._common import autotune_configs, kernel_op, tl, traced, triton, wrap_triton
from ._common import use_kernel as _use_kernel  # a module global, so that tests can turn the kernel path off

KERNEL_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16)
MAX_SCALES = 4
MAX_TILE = 64
MAX_CELL_RATIO = 16  # largest / smallest cell: (16)^2 finest cells per program at most


# ----------------------------------------------------------------------------------------------- reference


def _sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """(G0, G1) of images [N, H, W] with reflect padding (method 3.1 step 1: G0 = [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
    G1 its transpose, cross-correlated), as explicit sums in the dtype of x.

    Written out rather than as conv2d: on Ampere and later GPUs cuDNN convolves in TF32 by default (10-bit
    mantissa: ~1e-3 relative error in G, enough to move the bin of pixels near an edge); these sums are plain fp32
    on every device and associate exactly as the kernel's do, so kernel and reference see bitwise equal gradients
    for float input."""
    p = F.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="reflect").squeeze(1)
    up, mid, down = p[:, :-2], p[:, 1:-1], p[:, 2:]
    left = up[..., :-2] + 2 * mid[..., :-2] + down[..., :-2]
    right = up[..., 2:] + 2 * mid[..., 2:] + down[..., 2:]
    top = up[..., :-2] + 2 * up[..., 1:-1] + up[..., 2:]
    bottom = down[..., :-2] + 2 * down[..., 1:-1] + down[..., 2:]
    return left - right, top - bottom


def hog_histograms(img: Tensor, cell_size: int, nbins: int, bias: Tensor | None = None) -> Tensor:
    """Un-normalised cell histograms [B, 3, nbins, H / cell, W / cell] of a normalised image [B, 3, H, W]
    (method 3.1 steps 1-5, with atan2 and floor exactly as written), in fp32 (fp64 for fp64 input)."""
    b, c, h, w = img.shape
    dtype = torch.promote_types(img.dtype, torch.float32)
    g0, g1 = _sobel(img.to(dtype).reshape(b * c, h, w))
    if bias is not None:
        bias = bias.to(img.device, dtype)
        g0, g1 = g0 + bias[0], g1 + bias[1]
    magnitude = torch.sqrt(g0 * g0 + g1 * g1)
    phi = torch.atan2(g0, g1)
    bins = torch.remainder(torch.floor(phi / torch.pi * nbins), nbins).long()  # [b*c, H, W]
    # Dense one-hot (not scatter_add) keeps the sum order fixed, so the reference is deterministic on CUDA too.
    onehot = bins.unsqueeze(1) == torch.arange(nbins, device=img.device).view(1, nbins, 1, 1)
    hist = F.avg_pool2d(onehot * magnitude.unsqueeze(1), kernel_size=cell_size, stride=cell_size)
    return hist.reshape(b, c, nbins, h // cell_size, w // cell_size)


def _to_target(hist: Tensor) -> Tensor:
    """[B, 3, nbins, h, w] histograms -> L2-normalised over bins, laid out [B, h * w, 3 * nbins] (R, G, B)."""
    b, c, nbins, h, w = hist.shape
    hist = F.normalize(hist, p=2.0, dim=2, eps=1e-12)
    return hist.permute(0, 3, 4, 1, 2).reshape(b, h * w, c * nbins)


def _check(img: Tensor, cell_sizes: Sequence[int], nbins: int, bias: Tensor | None, mean, std) -> None:
    """Input checks shared by hog_ref, hog_fwd and hog: one sentence each, naming the fix."""
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"hog expects images [B, 3, H, W], got shape {list(img.shape)}")
    h, w = img.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"reflect padding needs images of at least 2 x 2 pixels, got {h} x {w}")
    if not cell_sizes or any(int(c) < 1 or h % int(c) or w % int(c) for c in cell_sizes):
        raise ValueError(f"every cell size must be a positive divisor of the image size {h} x {w}, got {cell_sizes}")
    if nbins < 1:
        raise ValueError(f"nbins must be at least 1, got {nbins}")
    if bias is not None and tuple(bias.shape) != (len(cell_sizes), 2):
        raise ValueError(f"bias must be [{len(cell_sizes)}, 2] (one (b0, b1) per scale), got {list(bias.shape)}")
    if (img.dtype == torch.uint8) != (std is not None) or (mean is None) != (std is None):
        raise ValueError("pass mean and std (3 values each) with uint8 pixels, and neither with a normalised image")
    if std is not None and (len(std) != 3 or len(mean) != 3 or min(float(v) for v in std) <= 0):
        raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean}, std={std}")


@torch.no_grad()
def hog_ref(
    img: Tensor,
    cell_sizes: Sequence[int],
    nbins: int = 9,
    bias: Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """HOG targets for every cell size (the specification): ``[[B, N_k, 3 * nbins]]``.

    img: the normalised image [B, 3, H, W], or uint8 pixels with ``mean``/``std`` (normalised here, as
    ToTensor + Normalize do). bias: [K, 2] per-scale Sobel bias (method 3.3) or None. Computed in fp32 (fp64 for
    fp64 input) with autocast off; ``out_dtype`` (default: that compute dtype) casts the results."""
    _check(img, cell_sizes, nbins, bias, mean, std)
    cells = [int(c) for c in cell_sizes]
    with torch.autocast(img.device.type, enabled=False):
        if img.dtype == torch.uint8:
            m, s = (torch.tensor(v, dtype=torch.float32, device=img.device).view(1, 3, 1, 1) for v in (mean, std))
            img = (img.float() / 255 - m) / s
        groups = [(None, range(len(cells)))] if bias is None else [(bias[k], [k]) for k in range(len(cells))]
        out: list[Tensor] = [img] * len(cells)
        for group_bias, scales in groups:
            finest = min(cells[k] for k in scales)
            hist = hog_histograms(img, finest, nbins, group_bias)
            for k in scales:
                factor = cells[k] // finest
                pooled = hist if factor == 1 else F.avg_pool3d(hist, (1, factor, factor))
                out[k] = _to_target(pooled)
    return out if out_dtype is None else [t.to(out_dtype) for t in out]


# ----------------------------------------------------------------------------------------------- kernel


@triton.jit
def _channel_histogram(ptr, y, x, scale, b0, b1, edge_ptr, H: tl.constexpr, W: tl.constexpr, CELLS: tl.constexpr,
                       PIX: tl.constexpr, NBINS: tl.constexpr, NB_PAD: tl.constexpr,
                       HAS_BIAS: tl.constexpr):  # fmt: skip
    # One channel of one tile, pixels as [PIX, CELLS] (a lane owns a cell: the per-cell sums stay in-thread): the 8
    # reflect-padded neighbours (L1/L2 hits after the first touch), G0, G1, |g|, and per bin edge k the cumulative
    # cell sum S_k = sum |g| over pixels with bin >= k; the histogram [NB_PAD, CELLS] is S_k - S_{k+1}. S_k and
    # S_{k+1} add the same terms in the same order where bin k is empty, so empty bins are exactly 0, never < 0.
    # Reflect padding: row -1 reads row 1, row H reads row H - 2 (likewise columns).
    row_m = tl.where(y == 0, 1, y - 1) * W
    row_0 = y * W
    row_p = tl.where(y == H - 1, H - 2, y + 1) * W
    col_m = tl.where(x == 0, 1, x - 1)
    col_p = tl.where(x == W - 1, W - 2, x + 1)
    i_mm = tl.load(ptr + row_m + col_m).to(tl.float32)
    i_m0 = tl.load(ptr + row_m + x).to(tl.float32)
    i_mp = tl.load(ptr + row_m + col_p).to(tl.float32)
    i_0m = tl.load(ptr + row_0 + col_m).to(tl.float32)
    i_0p = tl.load(ptr + row_0 + col_p).to(tl.float32)
    i_pm = tl.load(ptr + row_p + col_m).to(tl.float32)
    i_p0 = tl.load(ptr + row_p + x).to(tl.float32)
    i_pp = tl.load(ptr + row_p + col_p).to(tl.float32)
    # the sums of hog_ref's _sobel in the same order; scale = 1 (float input) or 1 / (255 std_c)
    g0 = ((i_mm + 2.0 * i_0m + i_pm) - (i_mp + 2.0 * i_0p + i_pp)) * scale
    g1 = ((i_mm + 2.0 * i_m0 + i_mp) - (i_pm + 2.0 * i_p0 + i_pp)) * scale
    if HAS_BIAS:
        g0 += b0
        g1 += b1
    mag = tl.sqrt(g0 * g0 + g1 * g1)
    # the bin without atan2 (module docstring): fold into theta in [0, pi); theta >= edge k <=> xs <= u_k * dist
    xs = tl.where((g0 < 0) | ((g0 == 0) & (g1 < 0)), -g1, g1)
    dist = tl.abs(g0) + tl.abs(g1)
    brow = tl.arange(0, NB_PAD)[:, None]
    hist = tl.zeros([NB_PAD, CELLS], dtype=tl.float32)
    above = tl.sum(mag, axis=0)  # S_0
    for k in tl.static_range(1, NBINS):
        s_k = tl.sum(tl.where(xs <= tl.load(edge_ptr + (k - 1)) * dist, mag, 0.0), axis=0)
        hist = tl.where(brow == k - 1, (above - s_k)[None, :], hist)
        above = s_k
    return tl.where(brow == NBINS - 1, above[None, :], hist)


@triton.jit
def _pool(hist, G: tl.constexpr, P: tl.constexpr, NB_PAD: tl.constexpr):
    # [NB_PAD, G * G] cell sums on a G x G grid -> [NB_PAD, (G / P)^2]: cells nest, so a P x P block's sum is the sum
    # of its cells (row-major cells: index (P * i + di) * G + P * j + dj).
    if P > 1:
        h5 = tl.reshape(hist, [NB_PAD, G // P, P, G // P, P])
        out = tl.reshape(tl.sum(tl.sum(h5, axis=4), axis=2), [NB_PAD, (G // P) * (G // P)])
    else:
        out = hist
    return out


@triton.jit
def _store_scale(sums, out_ptr, b, c, ty, tx, H, W, CELL: tl.constexpr, TILE: tl.constexpr, NBINS: tl.constexpr,
                 NB_PAD: tl.constexpr):  # fmt: skip
    # One scale and channel c of one tile: cell sums [NB_PAD, GK * GK] -> means (1 / CELL^2 is a power of two:
    # exact) -> L2-normalised over bins per cell -> NBINS contiguous values at column c * NBINS of each cell's row.
    GK: tl.constexpr = TILE // CELL
    avg = sums * (1.0 / (CELL * CELL))
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(avg * avg, axis=0)), 1e-12)
    val = avg * inv[None, :]
    bcol = tl.arange(0, NB_PAD)[:, None]
    qk = tl.arange(0, GK * GK)[None, :]
    row = (ty * GK + qk // GK) * (W // CELL) + tx * GK + qk % GK
    offs = (b * (H // CELL) * (W // CELL) + row) * (3 * NBINS) + c * NBINS + bcol
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=bcol < NBINS)


# 4 and 8 warps: compiled for sm_80 / sm_90 (fastmim bench kernels --static) every recipe's shape takes <= 109
# registers with triton 3.8 and <= 175 with triton 3.6, never spilling. 1 warp took 208-255 registers (spilling with
# 18 bins + bias); 2 warps spilled under triton 3.6 (ViT-B: 8 bytes, Swin: 128-136).
@triton.autotune(
    configs=autotune_configs([({}, 4), ({}, 8)], num_stages=1), key=["H", "W", "NBINS", "CELLS_K", "HAS_BIAS"]
)
@triton.jit
def _hog_fwd_kernel(
    x_ptr, scale_ptr, bias_ptr, edge_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr,
    H: tl.constexpr, W: tl.constexpr, NBINS: tl.constexpr, NB_PAD: tl.constexpr, TILE: tl.constexpr,
    MIN_CELL: tl.constexpr, CELLS_K: tl.constexpr, NUM_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # One program: a TILE x TILE block of one image (TILE = the largest cell), 3 channels, every scale (with a bias:
    # one scale, see below). Registers hold one channel at a time: its pixels as [PIX, CELLS] (pixels per finest
    # cell x finest cells), its cell sums [NB_PAD, CELLS], and the pooled sums of one scale; each scale's values of
    # that channel are stored before the next channel is read (holding all three channels' sums took 255 registers
    # and spilled with 18 bins). CELLS_K: the cell sizes in ascending order, each scale pooled from the previous
    # one. With a bias each scale is a group of its own, binned from the same pixels with its own (b0, b1), and each
    # group is a program of its own (a loop over the groups in one program took 255 registers and spilled under
    # triton 3.6). Grid: B * (H / TILE) * (W / TILE) * GROUPS, the groups of a tile and the tiles of an image
    # consecutive (so that their pixels and halos are L2 hits after the first read).
    GRID: tl.constexpr = TILE // MIN_CELL
    CELLS: tl.constexpr = GRID * GRID
    PIX: tl.constexpr = MIN_CELL * MIN_CELL
    GROUPS: tl.constexpr = NUM_SCALES if HAS_BIAS else 1
    TILES_W: tl.constexpr = W // TILE
    TILES_H: tl.constexpr = H // TILE
    pid = tl.program_id(0).to(tl.int64)
    grp = pid % GROUPS
    tile = pid // GROUPS
    b = tile // (TILES_H * TILES_W)
    ty = (tile % (TILES_H * TILES_W)) // TILES_W
    tx = tile % TILES_W
    q = tl.arange(0, CELLS)[None, :]
    r = tl.arange(0, PIX)[:, None]
    # a cell's pixels column by column: with no contiguous run along PIX the compiler keeps the default layout,
    # lanes along cells and each cell's pixels in one thread (row by row it vectorises PIX and splits cells)
    y = (ty * TILE + (q // GRID) * MIN_CELL + r % MIN_CELL).to(tl.int32)
    x = (tx * TILE + (q % GRID) * MIN_CELL + r // MIN_CELL).to(tl.int32)
    b0 = tl.load(bias_ptr + 2 * grp) if HAS_BIAS else 0.0
    b1 = tl.load(bias_ptr + 2 * grp + 1) if HAS_BIAS else 0.0
    for c in range(3):  # a runtime loop: unrolled, the compiler hoists every channel's loads (200+ registers)
        sums = _channel_histogram(
            x_ptr + (b * 3 + c) * (H * W),
            y,
            x,
            tl.load(scale_ptr + c),
            b0,
            b1,
            edge_ptr,
            H,
            W,
            CELLS,
            PIX,
            NBINS,
            NB_PAD,
            HAS_BIAS,
        )
        for s in tl.static_range(NUM_SCALES):
            out_ptr = out0_ptr if s == 0 else (out1_ptr if s == 1 else (out2_ptr if s == 2 else out3_ptr))
            if HAS_BIAS:
                if s == grp:
                    pooled = _pool(sums, GRID, CELLS_K[s] // MIN_CELL, NB_PAD)
                    _store_scale(pooled, out_ptr, b, c, ty, tx, H, W, CELLS_K[s], TILE, NBINS, NB_PAD)
            else:
                # the previous scale's cells (the finest cells before the first scale) pooled up to this one's
                sums = _pool(
                    sums,
                    TILE // (CELLS_K[s - 1] if s > 0 else MIN_CELL),
                    CELLS_K[s] // (CELLS_K[s - 1] if s > 0 else MIN_CELL),
                    NB_PAD,
                )
                _store_scale(sums, out_ptr, b, c, ty, tx, H, W, CELLS_K[s], TILE, NBINS, NB_PAD)


@functools.cache
def _edges(nbins: int) -> tuple[float, ...]:
    """u_k = cos(a) / (|cos(a)| + sin(a)) of the bin edges a = k pi / nbins, k = 1..nbins-1 (one 0 for one bin).
    Edges at multiples of 45 degrees are set exactly (1/2, 0, -1/2): they are the ones float gradients can hit."""
    u = []
    for k in range(1, nbins):
        if (4 * k) % nbins == 0:
            u.append((2 - 4 * k // nbins) / 2)
        else:
            a = k * math.pi / nbins
            u.append(math.cos(a) / (abs(math.cos(a)) + math.sin(a)))
    return tuple(u or [0.0])


def _grad_scale(std: Sequence[float] | None) -> tuple[float, ...]:
    """Per-channel factor on the Sobel sums: 1 for a normalised image, 1 / (255 std_c) for uint8 pixels."""
    return (1.0, 1.0, 1.0) if std is None else tuple(1.0 / (255.0 * float(s)) for s in std)


def _constant(values: tuple[float, ...], like: Tensor) -> Tensor:
    """fp32 ``values`` on the device of ``like``, made once per device (a fresh host-to-device copy per batch would
    synchronise); while torch traces (``like`` is fake) made afresh, a constant of the graph, so that the cache
    never holds a traced tensor."""
    if traced(like):
        return torch.tensor(values, dtype=torch.float32, device=like.device)
    return _cached_constant(values, like.device)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def kernel_supports(
    img: Tensor, cell_sizes: Sequence[int], bias: Tensor | None = None, out_dtype: torch.dtype | None = None
) -> bool:
    """Whether hog_fwd handles this configuration (else hog() uses hog_ref): power-of-two cells, at most 4 scales,
    the largest cell <= 64 px and <= 16 x the smallest, kernel dtypes in and out, the bias on the image's device."""
    cells = [int(c) for c in cell_sizes]
    return (
        img.dtype in KERNEL_DTYPES
        and (out_dtype is None or out_dtype in OUT_DTYPES)
        and 0 < len(cells) <= MAX_SCALES
        and all(c > 0 and c & (c - 1) == 0 for c in cells)
        and max(cells) <= MAX_TILE
        and max(cells) <= MAX_CELL_RATIO * min(cells)
        and (bias is None or bias.device == img.device)
    )


def hog_fwd(
    img: Tensor,
    cell_sizes: Sequence[int],
    nbins: int = 9,
    bias: Tensor | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Launch the kernel: targets ``[[B, N_k, 3 * nbins]]`` in ``out_dtype`` (default fp32). ``std`` only with
    uint8 pixels (the mean cancels; see the module docstring)."""
    _check(img, cell_sizes, nbins, bias, None if std is None else (0.0,) * 3, std)  # the mean is not needed
    if not kernel_supports(img, cell_sizes, bias, out_dtype):
        raise ValueError(
            f"the HOG kernel needs {', '.join(map(str, KERNEL_DTYPES))} input, fp32/bf16 output, 1-{MAX_SCALES} "
            f"power-of-two cell sizes of at most {MAX_TILE} px (largest <= {MAX_CELL_RATIO} x smallest) and the bias "
            "on the image's device; got "
            f"{img.dtype}, out {out_dtype}, cells {list(cell_sizes)}: use hog() or hog_ref for this configuration"
        )
    if not _use_kernel(img):
        raise ValueError(
            f"no Triton kernel can run on a {img.device.type} tensor here: use CUDA, or set TRITON_INTERPRET=1 before "
            "triton is imported"
        )
    cells = [int(c) for c in cell_sizes]
    order = sorted(range(len(cells)), key=cells.__getitem__)  # the kernel pools each scale from the next finer
    bsz, _, h, w = img.shape
    outs = [
        torch.empty(bsz, (h // c) * (w // c), 3 * nbins, device=img.device, dtype=out_dtype or torch.float32)
        for c in cells
    ]
    scale = _constant(_grad_scale(std), img)
    bias_arg = scale if bias is None else bias.detach()[order].to(torch.float32).contiguous()
    ordered = [outs[k] for k in order]
    ordered += ordered[-1:] * (MAX_SCALES - len(cells))  # unused output slots: never written
    grid = (bsz * (h // max(cells)) * (w // max(cells)) * (len(cells) if bias is not None else 1),)
    wrap_triton(_hog_fwd_kernel)[grid](
        x_ptr=img.contiguous(),
        scale_ptr=scale,
        bias_ptr=bias_arg,
        edge_ptr=_constant(_edges(nbins), img),
        **{f"out{k}_ptr": out for k, out in enumerate(ordered)},
        H=h,
        W=w,
        NBINS=nbins,
        NB_PAD=triton.next_power_of_2(nbins),
        TILE=max(cells),
        MIN_CELL=min(cells),
        CELLS_K=tuple(cells[k] for k in order),
        NUM_SCALES=len(cells),
        HAS_BIAS=bias is not None,
    )
    return outs


# ----------------------------------------------------------------------------------------------- custom op


def _hog_launch(
    img: Tensor, bias: Tensor | None, cell_sizes: list[int], nbins: int, std: list[float] | None, out_dtype: torch.dtype
) -> list[Tensor]:
    # hog_fwd with the op's argument types (lists, no defaults), called by name (tests count its calls)
    return hog_fwd(img, cell_sizes, nbins, bias, std, out_dtype)


_hog_op = kernel_op("fastmim::hog", _hog_launch)


def hog(
    img: Tensor,
    cell_sizes: Sequence[int],
    nbins: int = 9,
    bias: Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """HOG targets ``[[B, N_k, 3 * nbins]]`` (arguments as ``hog_ref``): the Triton kernel where one can run (CUDA,
    or CPU under TRITON_INTERPRET=1) and the configuration is supported (``kernel_supports``), else ``hog_ref``.
    Never differentiable: targets are constants."""
    if not (_use_kernel(img) and kernel_supports(img, cell_sizes, bias, out_dtype)):
        return hog_ref(img, cell_sizes, nbins, bias, mean, std, out_dtype)
    _check(img, cell_sizes, nbins, bias, mean, std)
    std_arg = None if std is None else [float(s) for s in std]
    return _hog_op(img.detach(), bias, [int(c) for c in cell_sizes], nbins, std_arg, out_dtype or torch.float32)


__all__ = ["hog", "hog_fwd", "hog_histograms", "hog_ref", "kernel_supports"]
