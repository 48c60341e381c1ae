"""Masked-token gather (encoder input) and decoder scatter (decoder input), forward and backward (method 2.1, 2.3).

Encoder input. For images x [B, Cin, H, W] (patch p, g x g patches, L = g^2), kept patches ids_keep [B, K] (int64,
any strides), patch-embed weight W [D, Cin*p*p] and bias b [D], frozen position embedding pos [1 + L, D] and cls [D]:

    out[b, 0]     = cls + pos[0]
    out[b, 1 + j] = W @ patch(x[b], ids_keep[b, j]) + b + pos[1 + ids_keep[b, j]]          out [B, 1 + K, D]

which is what the reference encoder computes (patch-embed every patch, add positions, gather the kept ones, prepend
cls), with a quarter of the patch-embed FLOPs at mask ratio 0.75. Three launches: ``_patch_gather_kernel`` copies the
kept patches' pixels into A [B*K, Cin*p*p] (cast to the matmul dtype on the way: the autocast dtype when autocast is
on), ``torch.mm`` (cuBLAS: a hand-written gather-GEMM would save only the 2 x 19 MB A round trip at ViT-B, B = 256,
~13 us, and would risk more than that against cuBLAS on the 15 GFLOP product, ~20 us at peak), and
``_encoder_epilogue_kernel`` adds b + pos in fp32 and writes every row of ``out``, cls row included.
Backward (image and pos get no gradient): ``_encoder_input_bwd_kernel`` reads dout once, writes its patch rows
dY [B*K, D] in the matmul dtype and per-sample partial bias sums; then dW = dY^T A (torch.mm), db = sum of partials,
dcls = sum_b dout[b, 0].
Output dtype = promote(matmul dtype, pos, cls): fp32 under bf16 autocast, as the reference (bf16 conv + fp32 pos).

Decoder input, for G decoders at once (G = 4 taps grouped, or 1). y [G, B, 1 + K, C] (the embedded cls + visible
tokens), ids_restore [B, L], mask token m [G, C], frozen pos [G, 1 + L, C]:

    out[g, b, 0]     = y[g, b, 0] + pos[g, 0]
    out[g, b, 1 + t] = (y[g, b, 1 + r] if r < K else m[g]) + pos[g, 1 + t],    r = ids_restore[b, t]

i.e. the reference's concat-mask-tokens + un-shuffle gather + cls + pos, as one pass that reads each visible row once
and writes each output row once (no int64 [B, L, C] expanded index, no concatenated temporary). Backward
(``_decoder_input_bwd_kernel``): dy[g, b, src] = dout[g, b, u] for the rows that came from y (a permutation:
no atomics, no zero-fill), dm[g] = sum of dout over the mask-token rows (per-(g, b) partials, summed after).

Bytes (ViT-B, B = 256, bf16 autocast). Encoder forward: the kept pixels read (fp32, 38 MB), A written and read
(2 x 19 MB), Y written and read (2 x 19 MB), out written (fp32, 39 MB): ~155 MB and a 15 GFLOP matmul, against the
reference's image cast + full-image convolution (~390 MB and 59 GFLOP), fp32 position add over [B, 196, 768]
(~230 MB), gather and cat (~150 MB): ~770 MB. Decoder forward, all four taps: y read (26 MB) + out written (fp32,
206 MB), against ~1.5 GB in the reference (per decoder: cat with the mask tokens, expanded-index gather, cat with
cls, + pos, each a full fp32 [B, 197, 256] pass). Expected: ~3-5x for the encoder input and ~5x for the decoder
input, forward and backward alike (GPU figures: benchmarks/bench_gather.py).

Caveats: pos embeddings are frozen (a pos that requires grad, or an image that does, takes the ``_ref`` path);
the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (set before this module is imported); elsewhere the
``_ref`` functions run. Every reduction is a fixed-order sum of per-program partials: results are reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._common import autotune_configs, kernel_op, tl, triton, wrap_triton
from ._common import use_kernel as _use_kernel  # a module global, so that tests can turn the kernel path off

# ----------------------------------------------------------------------------------------------- references


def encoder_input_ref(
    imgs: Tensor, ids_keep: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, cls_token: Tensor
) -> Tensor:
    """The reference encoder input: patch-embed every patch (a stride-p convolution with ``weight`` [D, Cin, p, p]
    and ``bias`` [D]), add ``pos_embed`` [1, 1 + L, D], keep ``ids_keep`` [B, K], prepend ``cls_token`` [1, 1, D]
    + pos[0]. Returns [B, 1 + K, D]."""
    p = weight.shape[-1]
    x = F.conv2d(imgs, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def decoder_input_ref(y: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor) -> Tensor:
    """The reference decoder input of G decoders: y [G, B, 1 + K, C], ids_restore [B, L], mask_token [G, C],
    pos_embed [G, 1 + L, C] -> [G, B, 1 + L, C] (mask tokens appended, un-shuffled, cls prepended, + pos)."""
    g, b, n, c = y.shape
    length = ids_restore.shape[1]
    tokens = torch.cat([y[:, :, 1:], mask_token[:, None, None, :].expand(g, b, length + 1 - n, c)], dim=2)
    tokens = torch.gather(tokens, 2, ids_restore[None, :, :, None].expand(g, b, length, c))
    return torch.cat([y[:, :, :1], tokens], dim=2) + pos_embed[:, None]


# ----------------------------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=autotune_configs(
        [
            ({"BLOCK_M": 32, "BLOCK_K": 256}, 4),
            ({"BLOCK_M": 64, "BLOCK_K": 128}, 4),
            ({"BLOCK_M": 64, "BLOCK_K": 256}, 8),
            ({"BLOCK_M": 128, "BLOCK_K": 64}, 4),
        ],
        interpreted={"BLOCK_M": 64, "BLOCK_K": 256},
    ),
    key=["M", "KP"],
)
@triton.jit
def _patch_gather_kernel(img_ptr, ids_ptr, out_ptr, M, KP, KEEP, GW, P: tl.constexpr, s_b, s_c, s_h, s_w, s_ib,
                         s_ik, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # One program copies a BLOCK_M x BLOCK_K tile of A [M = B*KEEP, KP = Cin*P*P]: row m = b * KEEP + j is kept patch
    # ids_keep[b, j], column k = (c, i, jj) its pixel (channel c, row i, column jj; the conv weight's flat order).
    # Grid (cdiv(M, BLOCK_M), cdiv(KP, BLOCK_K)); only the tile and the BLOCK_M patch ids live in registers.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < KP
    b = rows // KEEP
    patch = tl.load(ids_ptr + b * s_ib + (rows % KEEP) * s_ik, mask=rmask, other=0)
    c = cols // (P * P)
    i = (cols // P) % P
    jj = cols % P
    y = (patch // GW) * P
    x = (patch % GW) * P
    src = (b * s_b)[:, None] + (c * s_c)[None, :] + (y[:, None] + i[None, :]) * s_h + (x[:, None] + jj[None, :]) * s_w
    m2 = rmask[:, None] & cmask[None, :]
    pix = tl.load(img_ptr + src, mask=m2, other=0.0)
    tl.store(out_ptr + rows[:, None] * KP + cols[None, :], pix.to(out_ptr.dtype.element_ty), mask=m2)


# The encoder's row kernels (epilogue, backward) share one list: both stream BLOCK_R x BLOCK_D tiles of rows.
_ROW_CONFIGS = autotune_configs(
    [
        ({"BLOCK_R": 16, "BLOCK_D": 128}, 4),
        ({"BLOCK_R": 32, "BLOCK_D": 128}, 4),
        ({"BLOCK_R": 16, "BLOCK_D": 256}, 4),
        ({"BLOCK_R": 32, "BLOCK_D": 256}, 8),
    ],
    interpreted={"BLOCK_R": 64, "BLOCK_D": 256},
)
# The decoder kernels' rows are a whole C-channel row each (BLOCK_C = C rounded up to a power of two).
_DECODER_CONFIGS = autotune_configs(
    [({"BLOCK_R": 8}, 4), ({"BLOCK_R": 16}, 4), ({"BLOCK_R": 32}, 8)], interpreted={"BLOCK_R": 64}
)


@triton.autotune(configs=_ROW_CONFIGS, key=["KEEP", "D"])
@triton.jit
def _encoder_epilogue_kernel(y_ptr, ids_ptr, bias_ptr, pos_ptr, cls_ptr, out_ptr, KEEP, D, s_ib, s_ik,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    # One program writes BLOCK_D channels of the 1 + KEEP rows of sample b = program 0 (BLOCK_R rows at a time):
    # row 0 = cls + pos[0], row u > 0 = Y[b * KEEP + u - 1] + bias + pos[1 + ids_keep[b, u - 1]], in fp32.
    # Grid (B, cdiv(D, BLOCK_D)); bias and cls (BLOCK_D each) stay in registers.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    cls = tl.load(cls_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    cls += tl.load(pos_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for start in range(0, KEEP + 1, BLOCK_R):
        u = start + tl.arange(0, BLOCK_R).to(tl.int64)
        umask = u <= KEEP
        vis = umask & (u > 0)
        patch = tl.load(ids_ptr + b * s_ib + (u - 1) * s_ik, mask=vis, other=0)
        m2 = vis[:, None] & cmask[None, :]
        y = tl.load(y_ptr + (b * KEEP + u - 1)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + (patch + 1)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        val = tl.where(vis[:, None], y + bias[None, :] + pos, cls[None, :])
        dst = out_ptr + (b * (KEEP + 1) + u)[:, None] * D + cols[None, :]
        tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=umask[:, None] & cmask[None, :])


@triton.autotune(configs=_ROW_CONFIGS, key=["KEEP", "D"])
@triton.jit
def _encoder_input_bwd_kernel(g_ptr, dy_ptr, part_ptr, KEEP, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: sample b = program 0, BLOCK_D channels. Copies dout[b, 1:] (the patch rows) to dY[b * KEEP:]
    # in dY's dtype and stores the fp32 column sums of those rows (the bias gradient's share of sample b) to
    # part[b]. Grid (B, cdiv(D, BLOCK_D)); the fp32 accumulator [BLOCK_D] stays in registers.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(1, KEEP + 1, BLOCK_R):
        u = start + tl.arange(0, BLOCK_R).to(tl.int64)
        m2 = (u <= KEEP)[:, None] & cmask[None, :]
        g = tl.load(g_ptr + (b * (KEEP + 1) + u)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(dy_ptr + (b * KEEP + u - 1)[:, None] * D + cols[None, :], g.to(dy_ptr.dtype.element_ty), mask=m2)
        acc += tl.sum(g, axis=0)
    tl.store(part_ptr + b * D + cols, acc, mask=cmask)


@triton.autotune(configs=_DECODER_CONFIGS, key=["KEEP", "L", "C"])
@triton.jit
def _decoder_input_fwd_kernel(y_ptr, ids_ptr, mask_ptr, pos_ptr, out_ptr, B, KEEP, L, C, s_ib, s_il, s_pg, s_pu,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    # One program writes the 1 + L rows of decoder g = program 1, sample b = program 0, BLOCK_R rows at a time:
    # row u comes from y row src = 0 (u = 0) or 1 + ids_restore[b, u - 1], or is the mask token when src > KEEP;
    # + pos[g, u]. Grid (B, G); the mask token [BLOCK_C] stays in registers.
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mtok = tl.load(mask_ptr + g * C + cols, mask=cmask, other=0.0).to(tl.float32)
    y_base = y_ptr + (g * B + b) * (KEEP + 1) * C
    out_base = out_ptr + (g * B + b) * (L + 1) * C
    for start in range(0, L + 1, BLOCK_R):
        u = start + tl.arange(0, BLOCK_R).to(tl.int64)
        umask = u <= L
        r = tl.load(ids_ptr + b * s_ib + (u - 1) * s_il, mask=umask & (u > 0), other=0)
        src = tl.where(u == 0, 0, r + 1)
        vis = umask & (src <= KEEP)
        y = tl.load(y_base + src[:, None] * C + cols[None, :], mask=vis[:, None] & cmask[None, :], other=0.0)
        m2 = umask[:, None] & cmask[None, :]
        pos = tl.load(pos_ptr + g * s_pg + u[:, None] * s_pu + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        val = tl.where(vis[:, None], y.to(tl.float32), mtok[None, :]) + pos
        tl.store(out_base + u[:, None] * C + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=m2)


@triton.autotune(configs=_DECODER_CONFIGS, key=["KEEP", "L", "C"])
@triton.jit
def _decoder_input_bwd_kernel(g_ptr, ids_ptr, dy_ptr, part_ptr, B, KEEP, L, C, s_ib, s_il, BLOCK_R: tl.constexpr,
                              BLOCK_C: tl.constexpr):  # fmt: skip
    # One program reads the 1 + L gradient rows of decoder g = program 1, sample b = program 0: a row that came
    # from y is stored to dy[g, b, src] (each dy row exactly once), a mask-token row is summed into the fp32
    # accumulator [BLOCK_C], stored to part[g, b] at the end. Grid (B, G).
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    g_base = g_ptr + (g * B + b) * (L + 1) * C
    dy_base = dy_ptr + (g * B + b) * (KEEP + 1) * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, L + 1, BLOCK_R):
        u = start + tl.arange(0, BLOCK_R).to(tl.int64)
        umask = u <= L
        r = tl.load(ids_ptr + b * s_ib + (u - 1) * s_il, mask=umask & (u > 0), other=0)
        src = tl.where(u == 0, 0, r + 1)
        vis = umask & (src <= KEEP)
        grad = tl.load(g_base + u[:, None] * C + cols[None, :], mask=umask[:, None] & cmask[None, :], other=0.0)
        grad = grad.to(tl.float32)
        dst = dy_base + src[:, None] * C + cols[None, :]
        tl.store(dst, grad.to(dy_ptr.dtype.element_ty), mask=vis[:, None] & cmask[None, :])
        acc += tl.sum(tl.where((umask & (src > KEEP))[:, None], grad, 0.0), axis=0)
    tl.store(part_ptr + (g * B + b) * C + cols, acc, mask=cmask)


# ----------------------------------------------------------------------------------------------- launchers


def _check_encoder(
    imgs: Tensor, ids_keep: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, cls: Tensor, patch_size: int
) -> None:
    b, cin, h, w = imgs.shape
    if h % patch_size or w % patch_size or h != w:
        raise ValueError(f"images must be square multiples of the patch size {patch_size}, got {h} x {w}")
    num_patches, d = (h // patch_size) ** 2, weight.shape[0]
    if weight.shape != (d, cin * patch_size**2) or bias.shape != (d,) or cls.shape != (d,):
        raise ValueError(
            f"weight must be [D, Cin*p*p] = {[d, cin * patch_size**2]}, bias and cls [D]; got "
            f"{list(weight.shape)}, {list(bias.shape)}, {list(cls.shape)}"
        )
    if pos_embed.shape != (1 + num_patches, d):
        raise ValueError(f"pos_embed must be [1 + L, D] = {[1 + num_patches, d]}, got {list(pos_embed.shape)}")
    if ids_keep.dim() != 2 or ids_keep.shape[0] != b or ids_keep.dtype != torch.int64:
        raise ValueError(f"ids_keep must be int64 [B, K] with B = {b}, got {ids_keep.dtype} {list(ids_keep.shape)}")
    if len({t.device for t in (imgs, ids_keep, weight, bias, pos_embed, cls)}) != 1:
        raise ValueError("all encoder-input tensors must be on one device")


def encoder_input_fwd(
    imgs: Tensor, ids_keep: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, cls: Tensor, patch_size: int
) -> tuple[Tensor, Tensor]:
    """Launch the forward: (out [B, 1 + K, D], A [B*K, Cin*p*p] the kept pixels in weight's dtype, saved for the
    weight gradient). weight [D, Cin*p*p] in the matmul dtype; bias, cls [D]; pos_embed [1 + L, D]."""
    _check_encoder(imgs, ids_keep, weight, bias, pos_embed, cls, patch_size)
    b, keep, d = imgs.shape[0], ids_keep.shape[1], weight.shape[0]
    kp = weight.shape[1]
    patches = torch.empty(b * keep, kp, device=imgs.device, dtype=weight.dtype)
    grid = lambda meta: (triton.cdiv(b * keep, meta["BLOCK_M"]), triton.cdiv(kp, meta["BLOCK_K"]))  # noqa: E731
    if patches.numel():
        s_b, s_c, s_h, s_w = imgs.stride()
        wrap_triton(_patch_gather_kernel)[grid](
            img_ptr=imgs,
            ids_ptr=ids_keep,
            out_ptr=patches,
            M=b * keep,
            KP=kp,
            KEEP=keep,
            GW=imgs.shape[-1] // patch_size,
            P=patch_size,
            s_b=s_b,
            s_c=s_c,
            s_h=s_h,
            s_w=s_w,
            s_ib=ids_keep.stride(0),
            s_ik=ids_keep.stride(1),
        )
    y = torch.mm(patches, weight.t())
    out_dtype = torch.promote_types(torch.promote_types(weight.dtype, pos_embed.dtype), cls.dtype)
    out = torch.empty(b, keep + 1, d, device=imgs.device, dtype=out_dtype)
    grid = lambda meta: (b, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    if out.numel():
        wrap_triton(_encoder_epilogue_kernel)[grid](
            y_ptr=y,
            ids_ptr=ids_keep,
            bias_ptr=bias.contiguous(),
            pos_ptr=pos_embed.contiguous(),
            cls_ptr=cls.contiguous(),
            out_ptr=out,
            KEEP=keep,
            D=d,
            s_ib=ids_keep.stride(0),
            s_ik=ids_keep.stride(1),
        )
    return out, patches


def encoder_input_bwd(grad_out: Tensor, patches: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: (dW [D, Cin*p*p] in the matmul dtype, dbias [D] fp32, dcls [D] fp32) from
    grad_out [B, 1 + K, D] and the forward's A [B*K, Cin*p*p]."""
    grad_out = grad_out.contiguous()
    b, n, d = grad_out.shape
    keep = n - 1
    dy = torch.empty(b * keep, d, device=grad_out.device, dtype=patches.dtype)
    part = torch.empty(b, d, device=grad_out.device, dtype=torch.float32)
    grid = lambda meta: (b, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    if part.numel():
        wrap_triton(_encoder_input_bwd_kernel)[grid](g_ptr=grad_out, dy_ptr=dy, part_ptr=part, KEEP=keep, D=d)
    d_weight = torch.mm(dy.t(), patches)
    return d_weight, part.sum(0), grad_out[:, 0].sum(0, dtype=torch.float32)


def _check_decoder(y: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor) -> None:
    if y.dim() != 4:
        raise ValueError(f"y must be [G, B, 1 + K, C], got {list(y.shape)}")
    g, b, n, c = y.shape
    if ids_restore.dim() != 2 or ids_restore.shape[0] != b or ids_restore.dtype != torch.int64:
        raise ValueError(
            f"ids_restore must be int64 [B, L] with B = {b}, got {ids_restore.dtype} {list(ids_restore.shape)}"
        )
    length = ids_restore.shape[1]
    if not 1 <= n <= length + 1:
        raise ValueError(f"y holds {n} tokens: cls plus 0 to L = {length} visible ones expected")
    if mask_token.shape != (g, c) or pos_embed.shape != (g, length + 1, c):
        raise ValueError(
            f"mask_token must be [G, C] = {[g, c]} and pos_embed [G, 1 + L, C] = {[g, length + 1, c]}; "
            f"got {list(mask_token.shape)} and {list(pos_embed.shape)}"
        )
    if len({t.device for t in (y, ids_restore, mask_token, pos_embed)}) != 1:
        raise ValueError("all decoder-input tensors must be on one device")


def decoder_input_fwd(y: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor) -> Tensor:
    """Launch the forward: [G, B, 1 + L, C] in promote(y, mask_token, pos_embed) dtype."""
    _check_decoder(y, ids_restore, mask_token, pos_embed)
    g, b, n, c = y.shape
    length = ids_restore.shape[1]
    dtype = torch.promote_types(torch.promote_types(y.dtype, mask_token.dtype), pos_embed.dtype)
    out = torch.empty(g, b, length + 1, c, device=y.device, dtype=dtype)
    if out.numel():
        pos = pos_embed if pos_embed.stride(-1) == 1 else pos_embed.contiguous()
        wrap_triton(_decoder_input_fwd_kernel)[(b, g)](
            y_ptr=y.contiguous(),
            ids_ptr=ids_restore,
            mask_ptr=mask_token.contiguous(),
            pos_ptr=pos,
            out_ptr=out,
            B=b,
            KEEP=n - 1,
            L=length,
            C=c,
            s_ib=ids_restore.stride(0),
            s_il=ids_restore.stride(1),
            s_pg=pos.stride(0),
            s_pu=pos.stride(1),
            BLOCK_C=triton.next_power_of_2(c),
        )
    return out


def decoder_input_bwd(grad_out: Tensor, ids_restore: Tensor, keep: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Launch the backward: (dy [G, B, 1 + keep, C] in ``dtype``, dmask [G, C] fp32) from grad_out [G, B, 1 + L, C]."""
    grad_out = grad_out.contiguous()
    g, b, n, c = grad_out.shape
    dy = torch.empty(g, b, keep + 1, c, device=grad_out.device, dtype=dtype)
    part = torch.empty(g, b, c, device=grad_out.device, dtype=torch.float32)
    if part.numel():
        wrap_triton(_decoder_input_bwd_kernel)[(b, g)](
            g_ptr=grad_out,
            ids_ptr=ids_restore,
            dy_ptr=dy,
            part_ptr=part,
            B=b,
            KEEP=keep,
            L=n - 1,
            C=c,
            s_ib=ids_restore.stride(0),
            s_il=ids_restore.stride(1),
            BLOCK_C=triton.next_power_of_2(c),
        )
    return dy, part.sum(1)


# ----------------------------------------------------------------------------------------------- custom ops + autograd
# Each launcher is a torch.library op (forward and backward alike: kernels._common.kernel_op), so torch.compile keeps
# its graph around the kernels; the autograd functions give the forward ops their backward (the STYLE "<Op>Fn" role).


def _encoder_save(ctx, inputs: dict[str, Any], output: tuple[Tensor, Tensor]) -> None:
    ctx.dtypes = {name: inputs[name].dtype for name in ("weight", "bias", "cls")}
    ctx.save_for_backward(output[1])


def _encoder_backward(ctx, grad_out: Tensor, _grad_patches: Tensor) -> dict[str, Tensor]:
    (patches,) = ctx.saved_tensors
    d_weight, d_bias, d_cls = _encoder_input_bwd_op(grad_out, patches)
    grads = {"weight": d_weight, "bias": d_bias, "cls": d_cls}
    return {name: grad.to(ctx.dtypes[name]) for name, grad in grads.items()}


def _decoder_save(ctx, inputs: dict[str, Any], output: Tensor) -> None:
    ctx.keep, ctx.y_dtype = inputs["y"].shape[2] - 1, inputs["y"].dtype
    ctx.mask_dtype = inputs["mask_token"].dtype
    ctx.save_for_backward(inputs["ids_restore"])


def _decoder_backward(ctx, grad_out: Tensor) -> dict[str, Tensor]:
    (ids_restore,) = ctx.saved_tensors
    dy, d_mask = _decoder_input_bwd_op(grad_out, ids_restore, ctx.keep, ctx.y_dtype)
    return {"y": dy, "mask_token": d_mask.to(ctx.mask_dtype)}


_encoder_input_bwd_op = kernel_op("fastmim::encoder_input_bwd", encoder_input_bwd)
_encoder_input_op = kernel_op(
    "fastmim::encoder_input", encoder_input_fwd, setup_context=_encoder_save, backward=_encoder_backward
)
_decoder_input_bwd_op = kernel_op("fastmim::decoder_input_bwd", decoder_input_bwd)
_decoder_input_op = kernel_op(
    "fastmim::decoder_input", decoder_input_fwd, setup_context=_decoder_save, backward=_decoder_backward
)


# torch.utils.flop_counter sees a custom op as one leaf (not the torch.mm inside it): count its matmul, so FLOPs and
# MFU (fastmim bench step) include it. The decoder-input ops do no arithmetic worth counting.
@register_flop_formula(torch.ops.fastmim.encoder_input)
def _encoder_input_flops(imgs_shape, ids_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * ids_shape[0] * ids_shape[1] * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.fastmim.encoder_input_bwd)
def _encoder_input_bwd_flops(grad_shape, patches_shape, *args, **kwargs) -> int:
    return 2 * patches_shape[0] * patches_shape[1] * grad_shape[-1]


# ----------------------------------------------------------------------------------------------- public API


def encoder_input(
    imgs: Tensor, ids_keep: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, cls_token: Tensor
) -> Tensor:
    """The encoder's input tokens [B, 1 + K, D] (module docstring; same arguments as ``encoder_input_ref``):
    only the kept patches are embedded. Under autocast the patch-embed matmul runs in the autocast dtype, as the
    reference's convolution does. Gradients reach weight, bias and cls_token; pos_embed is frozen."""
    if not _use_kernel(imgs) or imgs.requires_grad or pos_embed.requires_grad:
        return encoder_input_ref(imgs, ids_keep, weight, bias, pos_embed, cls_token)
    dev = imgs.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    d, p = weight.shape[0], weight.shape[-1]
    w2d = weight.reshape(d, -1).to(dtype)
    out, _ = _encoder_input_op(imgs, ids_keep, w2d, bias, pos_embed.reshape(-1, d), cls_token.reshape(d), p)
    return out


def decoder_input(y: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Tensor) -> Tensor:
    """The decoders' input tokens [G, B, 1 + L, C] (module docstring; same arguments as ``decoder_input_ref``).
    Gradients reach y and mask_token; pos_embed is frozen."""
    if not _use_kernel(y) or pos_embed.requires_grad:
        return decoder_input_ref(y, ids_restore, mask_token, pos_embed)
    return _decoder_input_op(y, ids_restore, mask_token, pos_embed)
