"""LocalMIM-Swin weights: released-checkpoint import (names, merge-order fix, the released computation's loss and
gradients under both token-coordinate rules) and export of the encoder as a timm Swin (names, shapes, same features).

The released computation is tests/oracles_swin.py's ReleasedLocalMIMSwin, a literal transcription written
independently of fastmim's Swin modules; a model imported from its state dict must compute its loss, per-scale
losses and every gradient, with the coordinate rule that ``mask_rule`` (or ``swin_coords``) selects.
"""

import pytest
import torch

from fastmim import convert_released_state_dict, create_model, export_released_state_dict, import_released
from fastmim.cli import main
from fastmim.errors import FastmimError
from fastmim.models.swin import unit_masking
from fastmim.models.swin_weights import export_timm_swin, timm_swin_kwargs
from tests.models.test_swin import NAME, NANO, TINY, _ln, _rel, dense_swin, visible_part
from tests.oracles_swin import ReleasedLocalMIMSwin

LARGE = "localmim_swin_large_patch4_window14"
# noise -> with mask ratio 0.5 on the 2 x 2 units of 64 px: "exact" keeps units 1 and 3, "released" (3 of 4 masked)
# unit 1. A masked unit precedes each visible one, so the released rule's counting of masked units matters.
NOISE = torch.tensor([0.9, 0.1, 0.8, 0.3])
# (mask_rule, swin_coords argument, the coordinate rule they select)
RULES = [("exact", None, "true"), ("released", None, "released"), ("exact", "released", "released")]


def _oracle(window, target, coords):
    arch = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "decoder_dim": 32, "decoder_heads": 2}
    return ReleasedLocalMIMSwin(img_size=64, window_size=window, target=target, coords=coords, **arch)


def _backward(losses, module):
    """Per-scale losses and, in fastmim names, the gradients of a random combination of them (each scale's path is
    checked, not only their sum)."""
    module.zero_grad(set_to_none=True)
    upstream = torch.rand(4, generator=torch.Generator().manual_seed(5)).to(losses[0].dtype) + 0.5
    (torch.stack(losses) * upstream).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    if isinstance(module, ReleasedLocalMIMSwin):
        grads = convert_released_state_dict(grads, NANO)
    return torch.stack(losses).detach(), grads


def _compare_with_oracle(window, target, mask_rule, swin_coords, rule, impl):
    """fastmim (``impl``) against the oracle with ``rule``, same weights, image and mask: the worst relative
    difference over the losses (total and per scale) and over the gradients; and the smallest difference between
    that oracle's gradients and the other rule's for the relative-position tables of stages 2 and 3, which shows
    that the comparison tells the two rules apart."""
    torch.manual_seed(window)
    oracle = _oracle(window, target, rule)
    kw = {"swin_coords": swin_coords} if swin_coords else {}
    model = import_released(
        oracle.state_dict(), NANO, impl=impl, decoder_heads=2, mask_rule=mask_rule, mask_ratio=0.5, **kw
    )
    assert model.swin_coords == rule and (type(model.target).__name__ == "HOGTarget") == (target == "hog")
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(window))
    out = model(imgs, NOISE)
    mask = out.mask[0]
    assert mask.sum() == {"exact": 2, "released": 3}[mask_rule]
    got, got_grads = _backward(out.losses, model)
    want, want_grads = _backward(oracle(imgs, mask)[1], oracle)
    assert set(want_grads) == set(got_grads), "every trainable released tensor maps to a trainable fastmim one"
    loss_err = max(_rel(got, want), _rel(out.loss.detach(), want.sum()))
    grad_err = max(_rel(got_grads[n], g) for n, g in want_grads.items())
    other = _oracle(window, target, "true" if rule == "released" else "released")
    other.load_state_dict(oracle.state_dict())
    other_grads = _backward(other(imgs, mask)[1], other)[1]
    tables = [n for n in want_grads if n.startswith(("encoder.layers.1.", "encoder.layers.2.")) and "position" in n]
    gap = min(_rel(other_grads[n], want_grads[n]) for n in tables)
    return loss_err, grad_err, gap


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("target", ["hog", "pixel"])
@pytest.mark.parametrize("mask_rule,swin_coords,rule", RULES)
def test_imported_model_computes_the_released_oracle_fp64(fp64, window, target, mask_rule, swin_coords, rule):
    """Reference impl, fp64: loss, per-scale losses and every gradient within 1e-12 (relative) of the oracle."""
    loss_err, grad_err, gap = _compare_with_oracle(window, target, mask_rule, swin_coords, rule, "reference")
    assert loss_err <= 1e-12 and grad_err <= 1e-12 and gap > 1e-3, (loss_err, grad_err, gap)


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("target", ["hog", "pixel"])
@pytest.mark.parametrize("mask_rule,swin_coords,rule", RULES[:2])
def test_fast_impl_computes_the_released_oracle_fp32(window, target, mask_rule, swin_coords, rule):
    """impl = "fast" (Triton kernels under the interpreter), fp32: the ViT fast path's tolerances, 1e-5 on the
    losses and 1e-4 on the gradients (relative)."""
    loss_err, grad_err, gap = _compare_with_oracle(window, target, mask_rule, swin_coords, rule, "fast")
    assert loss_err <= 1e-5 and grad_err <= 1e-4 and gap > 1e-3, (loss_err, grad_err, gap)


def test_released_names_and_shapes_full_size():
    """Swin-B: the released key set (module structure of the authors' MaskedAutoencoderSwin) and a lossless round
    trip; built on the meta device."""
    with torch.device("meta"):
        ours = create_model(NAME).state_dict()
    released = export_released_state_dict(ours, NAME)
    # patch embed 4 + 24 blocks x (12 tensors, table, index) + 3 merges x 3 + 4 tap norms x 2 + 4 decoders x 20 + HOG
    assert len(released) == 4 + 24 * 14 + 9 + 8 + 80 + 8
    expected = {
        "encoder.patch_embed.proj.weight": (128, 3, 4, 4),
        "encoder.patch_embed.norm.bias": (128,),
        "encoder.layers.0.blocks.1.attn.relative_position_bias_table": (169, 4),
        "encoder.layers.2.blocks.17.attn.relative_position_index": (49, 49),
        "encoder.layers.2.blocks.17.mlp.fc2.weight": (512, 2048),
        "encoder.layers.0.downsample.norm.weight": (512,),
        "encoder.layers.2.downsample.reduction.weight": (1024, 2048),
        "encoder.norm.0.weight": (256,),
        "encoder.norm.3.bias": (1024,),
        "decoder.0.embed.weight": (64, 256),
        "decoder.0.pos_embed": (1, 784, 64),
        "decoder.0.blocks.0.attn.qkv.weight": (192, 64),
        "decoder.3.mask_token": (1, 1, 128),
        "decoder.3.pred.weight": (54, 128),
        "hog_enc.2.conv.weight": (2, 1, 3, 3),
        "hog_enc.3.conv.bias": (2,),
    }
    assert {k: tuple(released[k].shape) for k in expected} == expected
    assert "encoder.layers.3.downsample.norm.weight" not in released
    back = convert_released_state_dict(released, NAME)
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)


def test_import_applies_the_merge_order_fix(fp64):
    """A released state dict computes, in the released (0,0), (0,1), (1,0), (1,1) merge order, what the imported
    fastmim model computes in Swin's order; without the channel swap the taps would differ."""
    torch.manual_seed(0)
    ours = create_model(NAME, **TINY)
    released = export_released_state_dict(ours.state_dict(), NAME)
    merge = "encoder.layers.0.downsample.reduction.weight"
    assert not torch.equal(released[merge], ours.state_dict()[merge])  # the blocks really moved
    imported = import_released(released, NAME, decoder_heads=2)
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in ours.state_dict().items())
    imgs, masking = torch.randn(2, 3, 128, 128), unit_masking(torch.rand(16), 16, 0.5)
    vis = (masking.mask == 0).reshape(4, 4)
    sparse = imported.encoder(imgs, masking.visible)
    oracle = dense_swin(released, imgs, TINY["num_heads"], 4, vis, released=True)
    for s, d in zip(sparse, oracle):
        assert _rel(s, visible_part(d, masking.visible, 4)) < 1e-10
    unswapped = {**released, merge: ours.state_dict()[merge]}
    wrong = dense_swin(unswapped, imgs, TINY["num_heads"], 4, vis, released=True)[0]
    assert _rel(sparse[0], visible_part(wrong, masking.visible, 4)) > 1e-3


def test_foreign_or_damaged_checkpoints_are_refused():
    released = export_released_state_dict(create_model(NAME, **TINY).state_dict(), NAME)
    with pytest.raises(FastmimError, match="unexpected key 'head.weight'"):
        convert_released_state_dict({**released, "head.weight": torch.zeros(1)}, NAME)
    with pytest.raises(FastmimError, match="Sobel"):
        convert_released_state_dict({**released, "hog_enc.1.conv.weight": torch.ones(2, 1, 3, 3)}, NAME)
    index = "encoder.layers.1.blocks.0.attn.relative_position_index"
    with pytest.raises(FastmimError, match="relative position index"):
        convert_released_state_dict({**released, index: released[index].flip(0)}, NAME)
    with pytest.raises(FastmimError, match="do not fit"):
        import_released(released, NAME, decoder_heads=2, embed_dim=32)
    with pytest.raises(FastmimError, match="not a fastmim LocalMIM-Swin state dict"):
        export_timm_swin(
            create_model("localmim_vit_small_patch16", img_size=64, embed_dim=32, depth=4, num_heads=2).state_dict()
        )


def test_cli_import_checkpoint(tmp_path):
    released = export_released_state_dict(create_model(NAME, **{**TINY, "decoder_heads": 4}).state_dict(), NAME)
    torch.save({"model": released, "epoch": 399}, tmp_path / "released.pth")
    assert (
        main(["import-checkpoint", str(tmp_path / "released.pth"), "--model", NAME, "--out", str(tmp_path / "ours.pt")])
        == 0
    )
    assert main(["export-released", str(tmp_path / "ours.pt"), "--out", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == set(released) and all(torch.equal(back[k], released[k]) for k in released)


def test_timm_export_names_and_shapes_full_size():
    """The key set of timm's swin_base_patch4_window7_224 (timm >= 0.9 layout, read from timm 1.0.31 here: 329
    tensors, head.fc.weight / head.fc.bias not exported), checked without timm."""
    with torch.device("meta"):
        model = create_model(NAME)
    sd = export_timm_swin(model.state_dict())
    assert len(sd) == 327 and sum(v.numel() for v in sd.values()) == 86_743_224
    expected = {
        "patch_embed.proj.weight": (128, 3, 4, 4),
        "patch_embed.norm.weight": (128,),
        "layers.0.blocks.0.attn.relative_position_bias_table": (169, 4),
        "layers.0.blocks.1.attn.qkv.weight": (384, 128),
        "layers.1.downsample.norm.weight": (512,),
        "layers.1.downsample.reduction.weight": (256, 512),
        "layers.3.downsample.reduction.weight": (1024, 2048),
        "layers.2.blocks.17.attn.relative_position_bias_table": (169, 16),
        "layers.3.blocks.1.mlp.fc1.weight": (4096, 1024),
        "norm.weight": (1024,),
        "norm.bias": (1024,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert not any(k.startswith(("layers.0.downsample", "head", "decoders", "tap_norms", "target")) for k in sd)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in sd)  # non-persistent in timm


@pytest.mark.parametrize("img_size,window", [(128, 4), (224, 7)])
def test_fine_tuning_mapping_preserves_dense_features(fp64, img_size, window):
    """Pre-training -> fine-tuning: on an unmasked image the sparse encoder (all units visible) and a dense Swin
    built from the exported timm state dict give the same final features, norm included."""
    torch.manual_seed(img_size)
    model = create_model(NAME, **{**TINY, "img_size": img_size, "window_size": window, "mask_ratio": 0.0})
    u = model.encoder.units_per_side
    imgs = torch.randn(2, 3, img_size, img_size)
    ours = model.tap_norms[3](model.encoder(imgs, torch.arange(u * u))[3]).reshape(2, u, u, -1)
    sd = export_timm_swin(model.state_dict())
    dense = _ln(dense_swin(sd, imgs, TINY["num_heads"], window, torch.ones(u, u, dtype=torch.bool))[3], sd, "norm")
    assert _rel(ours, dense) < 1e-10


def test_timm_loads_the_export_strictly_and_gives_the_same_features():
    """Runs when timm is installed (the dev environment may lack it; the two tests above check the same mapping
    against a timm-free description)."""
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(3)
    model = create_model(NAME, **{**TINY, "img_size": 224, "window_size": 7}).eval()
    reference = SwinTransformer(**timm_swin_kwargs(model.encoder), num_classes=0).eval()
    reference.load_state_dict(export_timm_swin(model.state_dict()), strict=True)
    with torch.device("meta"):  # names and shapes of the full-size model (a shape mismatch raises)
        full = timm.create_model("swin_base_patch4_window7_224", pretrained=False)
        sd = export_timm_swin(create_model(NAME).state_dict())
    missing, unexpected = full.load_state_dict(sd, strict=False, assign=True)
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight"] and unexpected == []
    imgs = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model.tap_norms[3](model.encoder(imgs, torch.arange(49))[3]).reshape(2, 7, 7, -1)
        theirs = reference.forward_features(imgs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
