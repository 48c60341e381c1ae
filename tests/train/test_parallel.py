import pytest
import torch

from fastmim import create_model
from fastmim.train.optim import build_optimizer
from fastmim.train.parallel import apply_compile, compile_wanted

TINY = {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2}


def test_compile_policy():
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))


def _eager_and_compiled(name: str, blocks: int, **kw):
    """Two copies of one model, the second regionally compiled (aot_eager: the graphs, without inductor's code)."""
    torch.manual_seed(0)
    eager, compiled = create_model(name, **kw), create_model(name, **kw)
    compiled.load_state_dict(eager.state_dict())
    assert apply_compile(compiled, backend="aot_eager") == blocks
    return eager, compiled


def _assert_same_step(eager, compiled, imgs, noise) -> None:
    """Same loss and every gradient; checkpoint keys unchanged by compilation."""
    a, b = eager(imgs, noise), compiled(imgs, noise)
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict()), "compilation must not rename checkpoint keys"


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_regional_compile_matches_eager_values_and_gradients(impl):
    """Encoder blocks + one block per decoder are compiled (impl = "fast": also the grouped decoder block, one
    function for all decoders)."""
    eager, compiled = _eager_and_compiled("localmim_vit_small_patch16", 4 + 4, impl=impl, **TINY)
    if impl == "fast":  # Module.compile() works in place: the module's calls go through its compiled form
        assert compiled.grouped_block._compiled_call_impl is not None
        assert eager.grouped_block._compiled_call_impl is None
    _assert_same_step(eager, compiled, torch.randn(2, 3, 32, 32), torch.rand(2, 4))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_regional_compile_of_localmim_swin_matches_eager(impl):
    """Swin: its decoder blocks are compiled (the sparse window blocks stay eager)."""
    eager, compiled = _eager_and_compiled("localmim_swin_nano_patch4_window4", 4, img_size=64, impl=impl)
    _assert_same_step(eager, compiled, torch.randn(2, 3, 64, 64), torch.rand(4))


def test_fused_flag_reaches_adamw():
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), fused=True).defaults["fused"] is True
    assert not build_optimizer(model, 1e-3, 0.05, (0.9, 0.95)).defaults["fused"]
