"""Released-checkpoint import/export against the independent method-literal oracle (tests/oracles.py), which uses the
authors' module names: a model imported from the oracle's state dict must give the same loss and gradients."""

import pytest
import torch

from fastmim import convert_released_state_dict, create_model, export_released_state_dict, import_released
from fastmim.errors import FastmimError
from tests.oracles import ReleasedLocalMIMViT, ReleasedMAEViT

ARCH = {"embed_dim": 32, "depth": 6, "num_heads": 2}
SMALL = "localmim_vit_small_patch16"


def _oracle(**kw):
    return ReleasedLocalMIMViT(img_size=64, patch_size=16, decoder_dim=32, decoder_heads=2, **ARCH, **kw)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("nbins,hog_bias", [(9, False), (18, True)])
def test_imported_model_matches_oracle_loss_and_gradients_fp64(fp64, nbins, hog_bias):
    torch.manual_seed(0)
    oracle = _oracle(nbins=nbins, hog_bias=hog_bias)
    model = import_released(oracle.state_dict(), SMALL, decoder_heads=2, **ARCH)
    assert model.target.nbins == nbins and (model.target.bias is not None) == hog_bias
    imgs, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 16)
    ref_loss, ref_losses = oracle(imgs, noise)
    out = model(imgs, noise)
    assert _rel(out.loss, ref_loss) <= 1e-5
    for ours, ref in zip(out.losses, ref_losses):
        assert _rel(ours, ref) <= 1e-5
    ref_loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    ours = dict(model.named_parameters())
    mapped = convert_released_state_dict(ref_grads, SMALL)
    assert set(mapped) == set(ours), "every trainable released tensor maps to a trainable fastmim one"
    for name, grad in mapped.items():
        assert _rel(ours[name].grad, grad) <= 1e-5, name


def test_mae_matches_oracle_fp64(fp64):
    torch.manual_seed(0)
    oracle = ReleasedMAEViT(img_size=64, patch_size=16, decoder_dim=32, decoder_depth=2, decoder_heads=2, **ARCH)
    model = import_released(oracle.state_dict(), "mae_vit_base_patch16", decoder_heads=2, **ARCH)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    ref = oracle(imgs, noise)
    out = model(imgs, noise)
    assert _rel(out.loss, ref) <= 1e-5
    ref.backward()
    out.loss.backward()
    mapped = convert_released_state_dict(
        {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}, "mae_vit_base_patch16"
    )
    for name, p in model.named_parameters():
        assert _rel(p.grad, mapped[name]) <= 1e-5, name


@pytest.mark.parametrize(
    "name,bias",
    [("localmim_vit_base_patch16", False), ("localmim_vit_large_patch16", True), ("mae_vit_base_patch16", False)],
)
def test_round_trip_with_released_names_and_shapes(name, bias):
    """Full-size key names and shapes (built on the meta device): released -> fastmim -> released is lossless."""
    family = ReleasedMAEViT if name.startswith("mae") else ReleasedLocalMIMViT
    size = {"embed_dim": 1024, "depth": 24, "num_heads": 16} if "large" in name else {}
    extra = {} if name.startswith("mae") else {"nbins": 18 if bias else 9, "hog_bias": bias}
    with torch.device("meta"):
        released = family(**size, **extra).state_dict()
        ours = create_model(name).state_dict()
    converted = convert_released_state_dict(released, name)
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)
    back = export_released_state_dict(converted, name)
    assert set(back) == set(released)
    assert all(back[k].shape == released[k].shape for k in released)


def test_round_trip_values_and_checkpoint_wrapper():
    torch.manual_seed(1)
    released = _oracle(nbins=18, hog_bias=True).state_dict()
    converted = convert_released_state_dict({"model": released, "epoch": 3}, SMALL)
    back = export_released_state_dict(converted, SMALL)
    for key, value in released.items():
        assert torch.equal(back[key], value), key


def test_foreign_checkpoints_are_refused():
    released = _oracle(nbins=9).state_dict()
    with pytest.raises(FastmimError, match="unexpected key 'head.weight'"):
        convert_released_state_dict({**released, "head.weight": torch.zeros(1)}, SMALL)
    bad_sobel = {**released, "hog_enc.0.conv.weight": torch.ones(2, 1, 3, 3)}
    with pytest.raises(FastmimError, match="Sobel"):
        convert_released_state_dict(bad_sobel, SMALL)
    with pytest.raises(FastmimError, match="do not fit"):
        import_released(released, SMALL)  # a 32-wide checkpoint is not ViT-S
    with pytest.raises(FastmimError, match="not a state dict"):
        convert_released_state_dict({"model": "nope"}, SMALL)
