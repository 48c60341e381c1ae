"""fastmim.models.grouped and LocalMIMViT(impl="fast"): fused encoder input, fused decoder input and grouped
decoders against the reference modules, values and the gradient of every parameter, on odd shapes and MIM edge cases.

The Triton kernels run through the interpreter on CPU: TRITON_INTERPRET is set here before fastmim.kernels'
modules are first imported (the models import them on first use), as tests/kernels/conftest.py does.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy

import pytest
import torch

from fastmim import create_model
from fastmim.masking import random_masking
from fastmim.models.base import masked_gather_ops
from fastmim.models.grouped import GroupedBlock, decode_grouped, stack_parameters

TINY = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 24,
    "depth": 4,
    "num_heads": 2,
    "decoder_dim": 16,
    "decoder_heads": 2,
}


def setup_module():
    assert masked_gather_ops()._use_kernel(torch.zeros(1)), "the fast path must run its kernels here"


def assert_rel_close(actual, expected, tol):
    scale = expected.detach().abs().max().item()
    assert scale > 0
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def perturbed(model, seed=0):
    """Random non-trivial LayerNorm affines and biases (init sets them to 1 / 0, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def decoder_setup(batch, ratio, seed=0):
    model = perturbed(create_model("localmim_vit_small_patch16", **TINY))
    num_patches = model.num_patches
    g = torch.Generator().manual_seed(seed)
    m = random_masking(torch.rand(batch, num_patches, generator=g), ratio)
    keep = m.ids_keep.shape[1]
    feats = [torch.randn(batch, 1 + keep, TINY["embed_dim"], generator=g).requires_grad_() for _ in model.taps]
    return model, feats, m


def reference_decode(model, feats, m):
    return [dec(norm(f), m.ids_restore) for dec, norm, f in zip(model.decoders, model.tap_norms, feats)]


def decoder_params(model):
    return [p for n, p in model.named_parameters() if n.startswith(("decoders.", "tap_norms.")) and ".head." not in n]


@pytest.mark.parametrize("grouped,batch,ratio", [(True, 2, 0.75), (True, 1, 0.9), (False, 3, 0.0)])
def test_decode_matches_reference_decoders(grouped, batch, ratio):
    model, feats, m = decoder_setup(batch, ratio)
    ref = reference_decode(model, feats, m)
    model.impl = "fast"  # the same parameters, now with the fused decoder input
    if grouped:
        out = decode_grouped(model.decoders, model.tap_norms, feats, m.ids_restore, model.grouped_block)
    else:
        out = reference_decode(model, feats, m)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(r.shape, generator=g) for r in ref]
    inputs = feats + decoder_params(model)
    got = torch.autograd.grad(out, inputs, ups, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, ups, allow_unused=True)
    for o, r in zip(out, ref):
        assert o.shape == r.shape == (batch, model.num_patches, TINY["decoder_dim"])
        assert_rel_close(o, r, 1e-5)
    names = [f"feats.{k}" for k in range(4)] + [n for n, p in model.named_parameters() if any(p is q for q in inputs)]
    for name, a, b in zip(names, got, want):
        if ratio == 0 and name.endswith("mask_token"):
            assert a is None or torch.equal(a, torch.zeros_like(a)), name  # no masked patch
            continue
        assert a is not None and b is not None, name
        assert_rel_close(a, b, 1e-5)


def test_grouped_block_equals_each_block():
    model = perturbed(create_model("localmim_vit_small_patch16", **TINY))
    blocks = [d.blocks[0] for d in model.decoders]
    x = torch.randn(4, 2, 17, TINY["decoder_dim"], requires_grad=True)
    out = GroupedBlock()(blocks, x)
    ref = torch.stack([blk(x[g]) for g, blk in enumerate(blocks)])
    assert_rel_close(out, ref, 1e-5)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = [p for blk in blocks for p in blk.parameters()]
    for a, b in zip(torch.autograd.grad(out, [x, *params], up), torch.autograd.grad(ref, [x, *params], up)):
        assert_rel_close(a, b, 1e-5)


def test_stack_parameters_views_every_module():
    model = create_model("localmim_vit_small_patch16", **TINY)
    blocks = [d.blocks[0] for d in model.decoders]
    stacked = stack_parameters(blocks)
    assert list(stacked) == [n for n, _ in blocks[0].named_parameters()]
    for name, t in stacked.items():
        for g, blk in enumerate(blocks):
            assert torch.equal(t[g], blk.get_parameter(name))


def test_grouping_needs_identical_shapes():
    model = create_model("localmim_vit_small_patch16", **TINY)
    other = create_model("localmim_vit_small_patch16", **{**TINY, "decoder_dim": 8})
    decoders = [*list(model.decoders)[:3], other.decoders[0]]
    with pytest.raises(ValueError, match="group_decoders = False"):
        decode_grouped(decoders, model.tap_norms, [torch.randn(1, 5, 24)] * 4, torch.arange(16)[None], GroupedBlock())


@pytest.mark.parametrize("group_decoders,batch,ratio", [(True, 2, 0.75), (False, 1, 0.9)])
def test_fast_model_matches_reference_model(group_decoders, batch, ratio):
    """Whole model, impl fast vs reference with the same weights and noise: loss and every parameter's gradient."""
    ref = perturbed(create_model("localmim_vit_small_patch16", **TINY, mask_ratio=ratio))
    fast = copy.deepcopy(ref)
    fast.impl, fast.group_decoders = "fast", group_decoders
    g = torch.Generator().manual_seed(3)
    imgs, noise = torch.randn(batch, 3, 32, 32, generator=g), torch.rand(batch, 16, generator=g)
    out_ref, out_fast = ref(imgs, noise), fast(imgs, noise)
    assert torch.equal(out_ref.mask, out_fast.mask)
    for a, b in zip(out_fast.losses, out_ref.losses):
        assert_rel_close(a, b, 1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert q.grad is not None, name
        assert_rel_close(q.grad, p.grad, 1e-4)


def test_fast_model_under_autocast_agrees_with_reference():
    ref = create_model("localmim_vit_small_patch16", **TINY)
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    truth = ref(imgs, noise).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(imgs, noise).loss, ref(imgs, noise).loss
    assert abs(a.item() - truth.item()) <= 2 * abs(b.item() - truth.item()) + 1e-2 * truth.item()
