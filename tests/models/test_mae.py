"""MAEViT with impl "fast": the fused encoder and decoder inputs (fastmim.kernels.masked_gather, interpreted on CPU)
give the reference's loss and gradients."""

import torch

from fastmim import create_model
from fastmim.kernels import masked_gather

MAE = {"img_size": 64, "decoder_dim": 32, "decoder_depth": 2, "decoder_heads": 2}


def test_fast_impl_runs_the_fused_inputs_and_matches_the_reference(monkeypatch):
    calls = []  # the references of the fused ops: the reference impl runs them, the fast one the kernels instead
    for fn in ("encoder_input_ref", "decoder_input_ref"):
        original = getattr(masked_gather, fn)
        monkeypatch.setattr(masked_gather, fn, lambda *a, _f=original, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    ref = create_model("mae_vit_tiny_patch16", **MAE)
    fast = create_model("mae_vit_tiny_patch16", impl="fast", **MAE)
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(2, 3, 64, 64, generator=g), torch.rand(2, 16, generator=g)
    want = ref(imgs, noise)
    assert calls == ["encoder_input_ref", "decoder_input_ref"]
    got = fast(imgs, noise)
    assert calls == ["encoder_input_ref", "decoder_input_ref"]  # the kernels ran, not their references
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    want.loss.backward()
    got.loss.backward()
    grads = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        scale = p.grad.abs().max().item()
        assert (grads[name].grad - p.grad).abs().max().item() <= 1e-5 * scale, name
