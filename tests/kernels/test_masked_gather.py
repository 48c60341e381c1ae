"""fastmim.kernels.masked_gather: the fused encoder input and decoder input against their references, values and
every gradient (random upstream gradients), odd shapes, one visible token, no masked token, batch of one, compile.

Runs the Triton kernels through the interpreter on CPU (tests/kernels/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastmim.kernels import masked_gather as mg
from fastmim.masking import num_kept, random_masking


def setup_module():
    assert mg._use_kernel(torch.zeros(1)), "these tests must run the kernels (TRITON_INTERPRET=1 before import)"


def assert_rel_close(actual, expected, tol):
    """max |actual - expected| <= tol * max |expected|, and expected is not all zero (the check can fail)."""
    scale = expected.detach().abs().max().item()
    assert scale > 0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def masking(batch, num_patches, ratio, seed=0):
    noise = torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(seed))
    return random_masking(noise, ratio)


def encoder_inputs(batch, grid, patch, dim, ratio, cin=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, cin, grid * patch, grid * patch, generator=g)
    weight = (torch.randn(dim, cin, patch, patch, generator=g) * 0.1).to(dtype).requires_grad_()
    bias = torch.randn(dim, generator=g).to(dtype).requires_grad_()
    pos = torch.randn(1, 1 + grid * grid, dim, generator=g)
    cls = torch.randn(1, 1, dim, generator=g).to(dtype).requires_grad_()
    return imgs, masking(batch, grid * grid, ratio, seed).ids_keep, weight, bias, pos, cls


def upstream(out, seed=1):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)


@pytest.mark.parametrize(
    "batch,grid,patch,dim,ratio",
    [(2, 4, 4, 24, 0.75), (1, 4, 4, 24, 0.9), (3, 3, 8, 40, 0.5), (2, 4, 2, 20, 0.0)],
)
def test_encoder_input_matches_reference(batch, grid, patch, dim, ratio):
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(batch, grid, patch, dim, ratio)
    assert ids_keep.shape[1] == num_kept(grid * grid, ratio)
    assert ratio == 0 or batch == 1 or not ids_keep.is_contiguous()  # the kernels read strided indices
    out = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
    ref = mg.encoder_input_ref(imgs, ids_keep, weight, bias, pos, cls)
    assert out.shape == ref.shape == (batch, 1 + ids_keep.shape[1], dim) and out.dtype == ref.dtype
    assert_rel_close(out, ref, 1e-5)
    up = upstream(out)
    for got, want in zip(
        torch.autograd.grad(out, [weight, bias, cls], up), torch.autograd.grad(ref, [weight, bias, cls], up)
    ):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_rel_close(got, want, 1e-5)


def test_encoder_input_fp16_weights_and_launchers():
    """fp16 matmul: output promotes with the fp32 position embedding; the launchers' A is the kept pixels."""
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(2, 4, 4, 24, 0.75, dtype=torch.float16)
    out = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
    ref = mg.encoder_input_ref(imgs.half().float(), ids_keep, weight.float(), bias.float(), pos, cls.float())
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, 2e-3)
    _, patches = mg.encoder_input_fwd(
        imgs, ids_keep, weight.detach().reshape(24, -1), bias.detach(), pos[0], cls.detach().reshape(-1), 4
    )
    b, j = 1, 2
    row, col = divmod(int(ids_keep[b, j]), 4)
    expected = imgs[b, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4].reshape(-1).half()
    assert patches.dtype == torch.float16 and torch.equal(patches[b * ids_keep.shape[1] + j], expected)


def test_encoder_input_under_autocast_matches_reference_error():
    """bf16 autocast: the kernel's error against fp32 is at most twice the reference's own bf16 error (+ atol)."""
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(2, 4, 4, 32, 0.75)
    truth = mg.encoder_input_ref(imgs, ids_keep, weight, bias, pos, cls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
        ref = mg.encoder_input_ref(imgs, ids_keep, weight, bias, pos, cls)
    assert out.dtype == ref.dtype == torch.float32
    ref_err = (ref - truth).abs().max().item()
    assert 0 < (out - truth).abs().max().item() <= 2 * ref_err + 1e-3


def test_flop_counter_sees_the_kept_patch_matmuls():
    """torch.utils.flop_counter (bench step's MFU) counts the custom op's forward and weight-gradient matmuls."""
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(2, 4, 4, 24, 0.75)
    counter = FlopCounterMode(display=False)
    with counter:
        out = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
        out.backward(upstream(out))
    assert counter.get_total_flops() == 2 * (2 * 2 * ids_keep.shape[1] * 3 * 4 * 4 * 24)


def test_encoder_input_frozen_pos_only():
    """A position embedding that requires grad takes the reference path (the kernel gives pos no gradient)."""
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(1, 4, 4, 24, 0.75)
    pos.requires_grad_()
    out = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
    (grad,) = torch.autograd.grad(out, [pos], upstream(out))
    assert grad[0, 0].abs().sum() > 0 and grad[0, 1 + ids_keep[0, 0]].abs().sum() > 0


def decoder_inputs(groups, batch, num_patches, channels, ratio, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = masking(batch, num_patches, ratio, seed)
    keep = m.ids_keep.shape[1]
    y = torch.randn(groups, batch, 1 + keep, channels, generator=g).to(dtype).requires_grad_()
    mask_token = torch.randn(groups, channels, generator=g).requires_grad_()
    pos = torch.randn(groups, 1 + num_patches, channels, generator=g)
    return y, m.ids_restore, mask_token, pos


@pytest.mark.parametrize(
    "groups,batch,num_patches,channels,ratio",
    [(4, 2, 16, 32, 0.75), (1, 1, 16, 20, 0.9), (3, 3, 9, 24, 0.5), (2, 2, 16, 16, 0.0), (4, 1, 36, 8, 0.75)],
)
def test_decoder_input_matches_reference(groups, batch, num_patches, channels, ratio):
    y, ids_restore, mask_token, pos = decoder_inputs(groups, batch, num_patches, channels, ratio)
    out = mg.decoder_input(y, ids_restore, mask_token, pos)
    ref = mg.decoder_input_ref(y, ids_restore, mask_token, pos)
    assert out.shape == (groups, batch, 1 + num_patches, channels)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # a copy plus one fp32 add: bitwise equal
    up = upstream(out)
    dy, dmask = torch.autograd.grad(out, [y, mask_token], up)
    ry, rmask = torch.autograd.grad(ref, [y, mask_token], up)
    torch.testing.assert_close(dy, ry, rtol=0, atol=0)
    if ratio == 0:
        assert torch.equal(dmask, torch.zeros_like(dmask))  # no mask-token row, no gradient
    else:
        assert_rel_close(dmask, rmask, 1e-5)


def test_decoder_input_mixed_dtypes_and_strided_pos():
    """fp16 tokens with an fp32 mask token and a position embedding shared by every group (stride 0)."""
    y, ids_restore, mask_token, pos = decoder_inputs(4, 2, 16, 24, 0.75, dtype=torch.float16)
    shared = pos[:1].expand(4, -1, -1)
    out = mg.decoder_input(y, ids_restore, mask_token, shared)
    ref = mg.decoder_input_ref(y, ids_restore, mask_token, shared)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dy, dmask = torch.autograd.grad(out, [y, mask_token], upstream(out))
    ry, rmask = torch.autograd.grad(ref, [y, mask_token], upstream(out))
    assert dy.dtype == torch.float16 and dmask.dtype == torch.float32
    torch.testing.assert_close(dy, ry, rtol=0, atol=0)
    assert_rel_close(dmask, rmask, 1e-5)


def test_shape_errors_name_the_fix():
    y, ids_restore, mask_token, pos = decoder_inputs(2, 2, 16, 8, 0.75)
    with pytest.raises(ValueError, match=r"mask_token must be \[G, C\]"):
        mg.decoder_input_fwd(y, ids_restore, mask_token[:1], pos)
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(1, 4, 4, 8, 0.75)
    with pytest.raises(ValueError, match="ids_keep must be int64"):
        mg.encoder_input_fwd(imgs, ids_keep.int(), weight.reshape(8, -1), bias, pos[0], cls.reshape(-1), 4)


def test_compiled_graph_keeps_the_ops():
    """torch.compile(fullgraph=True) traces through both custom ops (no graph break), forward and backward."""
    imgs, ids_keep, weight, bias, pos, cls = encoder_inputs(2, 4, 4, 16, 0.75)
    ids_restore = masking(2, 16, 0.75).ids_restore
    mask_token, dec_pos = torch.randn(1, 16, requires_grad=True), torch.randn(1, 17, 16)

    def fn(imgs, weight, bias, cls, mask_token):
        x = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
        return mg.decoder_input(torch.tanh(x).unsqueeze(0), ids_restore, mask_token, dec_pos)

    args = (imgs, weight, bias, cls, mask_token)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref)
    up = upstream(out)
    for got, want in zip(torch.autograd.grad(out, args[1:], up), torch.autograd.grad(ref, args[1:], up)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_gpu_bf16_vit_base_shapes():
    """ViT-B shapes in bf16 autocast on CUDA: encoder error within twice the reference's; decoder bitwise."""
    dev = torch.device("cuda")
    imgs, ids_keep, weight, bias, pos, cls = (t.to(dev) for t in encoder_inputs(64, 14, 16, 768, 0.75))
    weight, bias, cls = (t.detach().requires_grad_() for t in (weight, bias, cls))
    truth = mg.encoder_input_ref(imgs, ids_keep, weight, bias, pos, cls)
    up = upstream(truth).to(dev)
    truth_grads = torch.autograd.grad(truth, [weight, bias, cls], up)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mg.encoder_input(imgs, ids_keep, weight, bias, pos, cls)
        ref = mg.encoder_input_ref(imgs, ids_keep, weight, bias, pos, cls)
    assert (out - truth).abs().max() <= 2 * (ref - truth).abs().max() + 1e-3
    for got, want, exact in zip(
        torch.autograd.grad(out, [weight, bias, cls], up),
        torch.autograd.grad(ref, [weight, bias, cls], up),
        truth_grads,
    ):
        assert (got - exact).abs().max() <= 2 * (want - exact).abs().max() + 1e-3 * exact.abs().max()
    y, ids_restore, mask_token, dpos = (t.to(dev) for t in decoder_inputs(4, 64, 196, 256, 0.75, torch.bfloat16))
    y, mask_token = y.detach().requires_grad_(), mask_token.detach().requires_grad_()
    out = mg.decoder_input(y, ids_restore, mask_token, dpos)
    ref = mg.decoder_input_ref(y, ids_restore, mask_token, dpos)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    up = upstream(out).to(dev)
    dy, dmask = torch.autograd.grad(out, [y, mask_token], up)
    ry, rmask = torch.autograd.grad(ref, [y, mask_token], up)
    torch.testing.assert_close(dy, ry, rtol=0, atol=0)
    torch.testing.assert_close(dmask, rmask, rtol=1e-4, atol=1e-3)
