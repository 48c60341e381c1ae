"""timm export: the file loads into timm's ViT with no missing or unexpected keys and gives fastmim's features."""

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastmim.cli import main
from fastmim.eval.backbone import backbone_from_model, build_vit, encode_all, finetune_state, load_backbone
from fastmim.eval.export import export_timm, load_timm
from fastmim.models import create_model
from fastmim.train.checkpoint_files import WEIGHTS_FORMAT
from tests.eval.conftest import TINY


def _fastmim_model(path):
    sd = torch.load(path, weights_only=True)["model"]
    model = create_model(TINY, img_size=32, decoder_dim=32)
    model.load_state_dict(sd)
    return model.eval()


def test_pretrained_export_loads_strictly_and_matches_features(tiny_weights, tmp_path):
    out = tmp_path / "enc.safetensors"
    meta = export_timm(str(tiny_weights), out)
    assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["fine_tuned"] == "false"
    # A user's plain timm call: the metadata says which constructor arguments the 32 px encoder needs.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", num_classes=0, img_size=32)
    missing, unexpected = model.load_state_dict(load_file(str(out)), strict=False)
    assert missing == [] and unexpected == []
    assert json.loads(meta["timm_kwargs"])["img_size"] == 32
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = encode_all(_fastmim_model(tiny_weights).encoder, imgs)
        got = model.eval().forward_features(imgs)
        pooled = load_timm(out).eval()(imgs)  # global average pool of the patch tokens -> fc_norm (identity init)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ref = torch.nn.functional.layer_norm(expected[:, 1:].mean(1), (192,), eps=1e-6)
    torch.testing.assert_close(pooled, ref, rtol=1e-5, atol=1e-5)


def test_pretrained_cfg_overlay_file_route(tiny_weights, tmp_path):
    """timm's own pretrained-file loading (no network) accepts the export too."""
    out = tmp_path / "enc.safetensors"
    export_timm(str(tiny_weights), out)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out)},
        global_pool="avg",
        num_classes=0,
        img_size=32,
    )
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, load_file(str(out))["blocks.1.mlp.fc1.weight"])


def test_finetuned_export_keeps_the_head_and_logits(tmp_path):
    torch.manual_seed(0)
    backbone = backbone_from_model(create_model(TINY, img_size=32, depth=4), TINY)
    vit = build_vit(backbone, num_classes=7).eval()
    torch.nn.init.normal_(vit.head.weight)  # a trained head, not the 2e-5 init
    ckpt = tmp_path / "checkpoint-best.pt"
    torch.save(finetune_state(backbone, vit, [f"c{i}" for i in range(7)], {"epoch": 3}), ckpt)
    out = tmp_path / "ft.safetensors"
    meta = export_timm(str(ckpt), out)
    assert meta["fine_tuned"] == "true" and json.loads(meta["classes"])[6] == "c6"
    model = timm.create_model("vit_tiny_patch16_224", global_pool="avg", num_classes=7, img_size=32, depth=4)
    assert model.load_state_dict(load_file(str(out)), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(imgs), vit(imgs), rtol=1e-5, atol=1e-5)
    # A fine-tuned checkpoint also starts a new run: the whole classifier is restored.
    again = load_backbone(str(ckpt))
    assert again.classes[0] == "c0" and torch.equal(again.state_dict["head.weight"], vit.head.weight)


def test_export_metadata(tiny_weights, tmp_path):
    out = tmp_path / "enc.safetensors"
    export_timm(str(tiny_weights), out)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["fastmim_model"] == TINY and meta["format"] == "pt"
    assert not any(k.startswith(("tap_norms", "decoders", "target", "encoder.", "norm.")) for k in keys)


def test_cli_export_never_overwrites_and_refuses_foreign_files(tiny_weights, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["export", str(tiny_weights), "--format", "timm", "--out", str(out)]) == 0
    assert "vit_tiny_patch16_224" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["export", str(tiny_weights), "--format", "timm", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    junk = tmp_path / "junk.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, junk)
    assert main(["export", str(junk), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmim: error:") and err.count("\n") == 1 and "import-checkpoint" in err
    with pytest.raises(SystemExit):
        main(["export", str(tiny_weights), "--format", "onnx", "--out", str(tmp_path / "y")])


def test_mae_weights_export_drops_the_final_norm(tmp_path):
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", img_size=32, decoder_dim=32, decoder_depth=1)
    path = tmp_path / "mae.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model_name": "mae_vit_tiny_patch16", "model": mae.state_dict()}, path)
    out = tmp_path / "mae.safetensors"
    export_timm(str(path), out)
    model = load_timm(out).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), encode_all(mae.encoder, imgs), rtol=1e-5, atol=1e-5)
