import pytest
import torch

from fastmim import create_model, list_models
from fastmim.errors import FastmimError
from fastmim.models.base import masked_mse

TINY = {"img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2}


def test_registry():
    names = list_models()
    for name in [
        "localmim_vit_small_patch16",
        "localmim_vit_base_patch16",
        "localmim_vit_large_patch16",
        "mae_vit_base_patch16",
        "mae_vit_large_patch16",
    ]:
        assert name in names
    with pytest.raises(FastmimError, match="did you mean 'localmim_vit_base_patch16'"):
        create_model("localmim_vit_bse_patch16")


def test_published_sizes():
    with torch.device("meta"):
        base = create_model("localmim_vit_base_patch16")
        large = create_model("localmim_vit_large_patch16")
        mae = create_model("mae_vit_base_patch16")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert round(count(base) / 1e6, 1) == 89.9  # docs/performance.md section 1
    assert round(count(mae) / 1e6, 1) == 111.7
    assert large.taps == [1, 3, 21, 23] and base.taps == [1, 3, 9, 11]
    assert large.target.nbins == 18 and large.target.bias is not None and base.target.bias is None
    assert [d.head.proj.out_channels for d in base.decoders] == [27] * 4


@pytest.mark.parametrize("img_size,patch", [(64, 16), (32, 8)])
def test_shapes_and_noise_reproduces_mask(img_size, patch):
    model = create_model("localmim_vit_small_patch16", **{**TINY, "img_size": img_size, "patch_size": patch})
    imgs = torch.randn(3, 3, img_size, img_size)
    grid = img_size // patch
    noise = torch.rand(3, grid * grid)
    out = model(imgs, noise)
    assert [p.shape for p in out.preds] == [(3, (grid * s) ** 2, 27) for s in (4, 2, 1)] + [(3, grid**2 // 4, 27)]
    assert out.mask.shape == (3, grid * grid) and out.mask.sum() == 3 * (grid * grid - max(1, grid * grid // 4))
    again = model(imgs, noise)
    assert torch.equal(out.mask, again.mask) and torch.equal(out.loss, again.loss)
    assert len(out.losses) == 4 and torch.allclose(out.loss, sum(out.losses))


def test_masked_mse_hand_case():
    pred = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]])
    target = torch.zeros(1, 3, 2)
    weight = torch.tensor([[1.0, 0.0, 0.5]])
    # per-cell means: 5, 0, 4 -> (1 * 5 + 0.5 * 4) / 1.5
    assert masked_mse(pred, target, weight).item() == pytest.approx(7 / 1.5)


def test_every_trainable_parameter_gets_a_gradient_and_frozen_stay_frozen():
    model = create_model("localmim_vit_small_patch16", **TINY, hog_bias=True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("pos_embed") or k == "target.bias"}
    assert len(frozen) == 6  # encoder + 4 decoder position embeddings, and the HOG bias
    assert not any(k in dict(model.named_parameters()) for k in frozen), "frozen tensors must not be parameters"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(2, 3, 64, 64)).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []
        opt.step()
        opt.zero_grad()
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v)


def test_prediction_ignores_masked_pixels():
    model = create_model("localmim_vit_small_patch16", **TINY).eval()
    imgs, noise = torch.randn(1, 3, 64, 64), torch.rand(1, 16)
    out = model(imgs, noise)
    masked = out.mask[0].nonzero().flatten()
    row, col = divmod(int(masked[0]), 4)
    edited = imgs.clone()
    edited[..., row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = 5.0
    out2 = model(edited, noise)
    for p, q in zip(out.preds, out2.preds):
        torch.testing.assert_close(p, q)


def test_pixel_target_variant():
    model = create_model("localmim_vit_small_patch16", **TINY, target="pixel")
    out = model(torch.randn(2, 3, 64, 64))
    assert [p.shape[-1] for p in out.preds] == [48, 192, 768, 3072]
    assert torch.isfinite(out.loss)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(FastmimError, match="must be integers dividing the image size"):
        create_model("localmim_vit_small_patch16", **{**TINY, "patch_size": 6, "img_size": 60})
    with pytest.raises(FastmimError, match="even"):
        create_model("localmim_vit_small_patch16", **{**TINY, "img_size": 48})


def test_mae_forward():
    model = create_model("mae_vit_tiny_patch16", img_size=64, decoder_dim=32, decoder_depth=2, decoder_heads=2)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.preds[0].shape == (2, 16, 768) and out.mask.sum() == 2 * 12
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_impl_reaches_the_hog_target_and_a_wrong_impl_is_a_clear_error():
    model = create_model("localmim_vit_small_patch16", **TINY)
    model.impl = "fast"
    assert model.target.impl == model.encoder.impl == model.decoders[0].impl == "fast"
    with pytest.raises(FastmimError, match="unknown impl 'quick'"):
        create_model("localmim_vit_small_patch16", impl="quick", **TINY)
