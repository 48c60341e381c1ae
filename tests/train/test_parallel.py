import pytest
import torch

from fastmim import create_model
from fastmim.train.optim import build_optimizer
from fastmim.train.parallel import apply_compile, compile_wanted

TINY = {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2}


def test_compile_policy():
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))


@pytest.mark.parametrize("impl,blocks", [("reference", 4 + 4), ("fast", 4 + 4)])
def test_regional_compile_matches_eager_values_and_gradients(impl, blocks):
    """Encoder blocks + one block per decoder are compiled (impl = "fast": also the grouped decoder block, one
    function for all decoders); loss and every gradient equal the eager model's; checkpoint keys unchanged."""
    torch.manual_seed(0)
    eager = create_model("localmim_vit_small_patch16", impl=impl, **TINY)
    compiled = create_model("localmim_vit_small_patch16", impl=impl, **TINY)
    compiled.load_state_dict(eager.state_dict())
    assert apply_compile(compiled, backend="aot_eager") == blocks
    if impl == "fast":
        assert compiled.grouped_block_fn is not eager.grouped_block_fn
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    a, b = eager(imgs, noise), compiled(imgs, noise)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict()), "compilation must not rename checkpoint keys"


def test_fused_flag_reaches_adamw():
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), fused=True).defaults["fused"] is True
    assert not build_optimizer(model, 1e-3, 0.05, (0.9, 0.95)).defaults["fused"]


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_regional_compile_of_localmim_swin_matches_eager(impl):
    """Swin: its decoder blocks are compiled (the sparse window blocks stay eager); same loss and gradients."""
    torch.manual_seed(0)
    eager = create_model("localmim_swin_nano_patch4_window4", img_size=64, impl=impl)
    compiled = create_model("localmim_swin_nano_patch4_window4", img_size=64, impl=impl)
    compiled.load_state_dict(eager.state_dict())
    assert apply_compile(compiled, backend="aot_eager") == 4  # one block per decoder
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(4)
    a, b = eager(imgs, noise), compiled(imgs, noise)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, msg=name)
