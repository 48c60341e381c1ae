"""LocalMIM-Swin weights: released-checkpoint import (names, merge-order fix, same loss and gradients as a literal
transcription of the released model) and export of the encoder as a timm Swin (names, shapes, same features).

The released model is transcribed below from its description (SPEC 4 and the authors' module structure): the dense
Swin oracle of test_swin.py with the released merge order, tap norms ``encoder.norm.{k}``, and decoders that insert
mask tokens in unit-major order, reorder to raster, add the position embedding, run one block, a LayerNorm and the
Linear ``pred``; loss = sum over taps of the masked MSE with the unit mask upsampled x4, x2, x1, x1.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmim import convert_released_state_dict, create_model, export_released_state_dict, import_released
from fastmim.cli import main
from fastmim.errors import FastmimError
from fastmim.models.swin import unit_masking
from fastmim.models.swin_weights import export_timm_swin, timm_swin_kwargs
from tests.models.test_swin import NAME, TINY, _ln, _rel, dense_swin, visible_part

LARGE = "localmim_swin_large_patch4_window14"


def _released_decoder(sd, k, x, visible, u, r, heads):
    """decoder.{k} of the released model on visible tokens x [B, N_vis, D] (unit-major order)."""
    x = F.linear(x, sd[f"decoder.{k}.embed.weight"], sd[f"decoder.{k}.embed.bias"])
    b, n, c = x.shape
    tokens_masked = torch.ones(u * u, r * r)
    tokens_masked[visible] = 0
    tokens_masked = tokens_masked.flatten()  # unit-major order
    ids_restore = torch.argsort(
        torch.argsort(tokens_masked + torch.arange(len(tokens_masked)) / (5 * len(tokens_masked)))
    )
    x = torch.cat([x, sd[f"decoder.{k}.mask_token"].expand(b, len(tokens_masked) - n, c)], dim=1)[:, ids_restore]
    x = x.reshape(b, u, u, r, r, c).transpose(2, 3).reshape(b, -1, c) + sd[f"decoder.{k}.pos_embed"]
    pre = f"decoder.{k}.blocks.0."
    y = F.linear(_ln(x, sd, pre + "norm1"), sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
    q, kk, v = y.reshape(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q * (c // heads) ** -0.5) @ kk.transpose(-2, -1)).softmax(-1)
    x = x + F.linear(
        (attn @ v).transpose(1, 2).reshape(b, -1, c), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"]
    )
    hidden = F.gelu(F.linear(_ln(x, sd, pre + "norm2"), sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]))
    x = x + F.linear(hidden, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
    return F.linear(_ln(x, sd, f"decoder.{k}.norm"), sd[f"decoder.{k}.pred.weight"], sd[f"decoder.{k}.pred.bias"])


def released_loss(sd, imgs, mask_units, targets, enc_heads, window, dec_heads):
    """The released LocalMIM-Swin loss for a batch unit mask (bool [U], True = masked) and given targets."""
    u = round(len(mask_units) ** 0.5)
    visible = (~mask_units).nonzero().flatten()
    taps = dense_swin(sd, imgs, enc_heads, window, ~mask_units.reshape(u, u), released=True)
    total = 0.0
    for k, (tap, scale) in enumerate(zip(taps, [4, 2, 1, 1])):
        x = visible_part(tap, visible, u)
        x = _ln(x.reshape(x.shape[0], -1, x.shape[-1]), sd, f"encoder.norm.{k}")
        pred = _released_decoder(sd, k, x, visible, u, scale, dec_heads)
        m = mask_units.double().reshape(u, u).repeat_interleave(scale, 0).repeat_interleave(scale, 1).flatten()
        m = m.expand(imgs.shape[0], -1)
        total = total + (((pred - targets[k]) ** 2).mean(-1) * m).sum() / m.sum()
    return total


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


@pytest.mark.parametrize("target", ["hog", "pixel"])
def test_imported_model_matches_released_loss_and_gradients(fp64, target):
    torch.manual_seed(1)
    released = export_released_state_dict(create_model(NAME, **TINY, target=target).state_dict(), NAME)
    frozen = ("pos_embed", "relative_position_index", "hog_enc.")
    leaves = {k: v.clone().requires_grad_(not any(f in k for f in frozen)) for k, v in released.items()}
    model = import_released(released, NAME, decoder_heads=2)
    assert (model.target.__class__.__name__ == "HOGTarget") == (target == "hog")
    imgs, noise = torch.randn(2, 3, 128, 128), torch.rand(2, 16)
    out = model(imgs, noise)
    ref = released_loss(leaves, imgs, out.mask[0].bool(), out.targets, TINY["num_heads"], 4, 2)
    assert _rel(out.loss, ref) < 1e-10
    out.loss.backward()
    ref.backward()
    grads = convert_released_state_dict({k: v.grad for k, v in leaves.items() if v.requires_grad}, NAME)
    params = dict(model.named_parameters())
    assert set(grads) == set(params)
    for name, grad in grads.items():
        assert _rel(params[name].grad, grad) < 1e-10, name


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
    assert main(["import-checkpoint", str(tmp_path / "released.pth"), "--model", NAME,
                 "--out", str(tmp_path / "ours.pt")]) == 0  # fmt: skip
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
