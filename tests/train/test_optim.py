import itertools
import math

import pytest
import torch

from fastmim import create_model
from fastmim.train.optim import lr_at, param_groups


def test_decay_groups_follow_spec():
    model = create_model(
        "localmim_vit_small_patch16",
        img_size=64,
        embed_dim=32,
        depth=4,
        num_heads=2,
        decoder_dim=32,
        decoder_heads=2,
        hog_bias=True,
    )
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "encoder.cls_token" in decayed and "decoders.0.mask_token" in decayed  # method 5: tokens are decayed
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "decoders.0.head.up1.weight" in decayed
    assert "encoder.blocks.0.attn.qkv.bias" in not_decayed and "tap_norms.0.weight" in not_decayed
    assert "decoders.0.head.norm.weight" in not_decayed
    assert decayed | not_decayed == set(names.values())  # frozen tensors are buffers, never in a group


def test_schedule_warmup_then_cosine():
    peak, floor = 1.6e-3, 1e-6
    assert lr_at(0, 100, 10, peak, floor) == 0.0
    assert lr_at(5, 100, 10, peak, floor) == pytest.approx(peak / 2)
    assert lr_at(10, 100, 10, peak, floor) == pytest.approx(peak)
    assert lr_at(55, 100, 10, peak, floor) == pytest.approx(floor + (peak - floor) * 0.5)
    assert lr_at(100, 100, 10, peak, floor) == pytest.approx(floor)
    values = [lr_at(s, 100, 10, peak, floor) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(30, 100, 0, peak, floor) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(0.3 * math.pi)))


def test_optimizer_excludes_frozen():
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == 1


def test_swin_exemptions_follow_spec():
    model = create_model("localmim_swin_nano_patch4_window4", img_size=64)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    tables = {n for n in names.values() if n.endswith("relative_position_bias_table")}
    tokens = {n for n in names.values() if n.endswith("mask_token")}
    assert tables and tokens and (tables | tokens) <= not_decayed
    assert any(n.endswith("qkv.weight") for n in decayed)
