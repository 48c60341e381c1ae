"""Layer-wise lr decay and weight-decay groups follow method 6 exactly."""

import pytest
import torch

from fastmim.eval.backbone import backbone_from_model, build_vit
from fastmim.eval.finetune import layer_decay_groups, layer_id
from fastmim.models import create_model


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_model("localmim_vit_tiny_patch16", img_size=32, depth=4)
    return build_vit(backbone_from_model(model, "localmim_vit_tiny_patch16"), num_classes=5)


def _spec_id(name: str, depth: int) -> int:
    """method 6 written out independently: patch embed / cls / pos -> 0, block i -> i + 1, rest -> depth + 1."""
    for i in range(depth):
        if name.startswith(f"blocks.{i}."):
            return i + 1
    return 0 if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed") else depth + 1


def test_every_parameter_once_with_the_spec_scale_and_decay(vit):
    depth, decay, wd = 4, 0.65, 0.05
    groups = layer_decay_groups(vit, weight_decay=wd, layer_decay=decay)
    seen = {}
    for group in groups:
        assert len(group["params"]) == len(group["names"])
        for name, p in zip(group["names"], group["params"]):
            assert name not in seen
            seen[name] = group
            assert group["layer_id"] == _spec_id(name, depth) == layer_id(name, depth)
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - _spec_id(name, depth)), rel=1e-12)
            exempt = p.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if exempt else wd), name
    assert set(seen) == {n for n, p in vit.named_parameters()}
    ids = {name: g["layer_id"] for name, g in seen.items()}
    assert ids["patch_embed.proj.weight"] == ids["cls_token"] == ids["pos_embed"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.3.mlp.fc2.bias"] == 4
    assert ids["head.weight"] == ids["fc_norm.weight"] == 5
    assert seen["head.weight"]["lr_scale"] == 1.0 and seen["pos_embed"]["weight_decay"] == 0.0
    assert seen["cls_token"]["weight_decay"] == 0.0 and seen["blocks.2.attn.qkv.weight"]["weight_decay"] == wd
    assert seen["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(decay**5)


def test_frozen_parameters_are_left_out(vit):
    vit.patch_embed.proj.weight.requires_grad_(False)
    try:
        names = {n for g in layer_decay_groups(vit, 0.05, 0.75) for n in g["names"]}
    finally:
        vit.patch_embed.proj.weight.requires_grad_(True)
    assert "patch_embed.proj.weight" not in names and "patch_embed.proj.bias" in names
