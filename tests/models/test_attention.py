import warnings

import pytest
import torch

from fastmim.config import load_config
from fastmim.models import model_from_config
from fastmim.models.vit import ATTN_BACKENDS, Attention, attention, set_attention_backend


def _explicit(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_every_backend_computes_attention_on_cpu(backend):
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attention(q, k, v, backend)
    ref = _explicit(q, k, v)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g))


def test_cuda_only_backend_falls_back_once_with_a_message(monkeypatch):
    import fastmim.models.vit as vit

    monkeypatch.setattr(vit, "_fallback_warned", set())
    q = torch.randn(1, 1, 4, 8)
    with pytest.warns(UserWarning, match="'flash' runs on CUDA only; using torch SDPA"):
        attention(q, q, q, "flash")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        attention(q, q, q, "flash")


def test_config_key_reaches_every_attention_module():
    cfg = load_config(None, ["--model.attn=math", "--model.img_size=32"])
    model = model_from_config(cfg.model)
    backends = {m.backend for m in model.modules() if isinstance(m, Attention)}
    assert backends == {"math"} and sum(isinstance(m, Attention) for m in model.modules()) == 12 + 4
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    ref = set_attention_backend(model_from_config(cfg.model), "sdpa")
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(imgs, noise).loss, ref(imgs, noise).loss)
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(model, "fastest")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash", "cudnn", "efficient", "math", "xformers"])
def test_backends_on_gpu_bf16(backend):
    q, k, v = (torch.randn(4, 8, 197, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend)
    ref = _explicit(q.float(), k.float(), v.float())
    low = _explicit(q, k, v)  # PyTorch's own bf16 error sets the bar (STYLE 3)
    assert (out.float() - ref).abs().max() <= 2 * (low.float() - ref).abs().max() + 1e-2
