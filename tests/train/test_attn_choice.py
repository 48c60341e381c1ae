"""model.attn = "auto": the backend is measured per attention shape and the fastest is kept."""

import pytest
import torch

from fastmim import create_model
from fastmim.models.vit import Attention, set_attention_backend
from fastmim.train.attn_choice import attention_shapes, choose_attention, describe, time_backends

TINY = {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2}


def _model(**kw):
    torch.manual_seed(0)
    return set_attention_backend(create_model("localmim_vit_small_patch16", **TINY, **kw), "auto")


def test_shapes_are_recorded_per_module():
    model = _model()
    shapes = attention_shapes(model, torch.randn(3, 3, 32, 32), torch.rand(3, 4), None)
    assert len(shapes) == 8  # 4 encoder blocks + 4 decoder blocks
    # 4 patches, 75 % masked: 1 cls + 1 visible in the encoder; 1 + 4 in the decoders
    assert sorted(set(shapes.values())) == [(3, 2, 2, 16), (3, 2, 5, 16)]


def test_the_fastest_backend_per_shape_is_chosen():
    """A fake timer that makes "math" fastest at the encoder shape and "sdpa" at the decoder shape."""
    model = _model()

    def fake_time(shape, dtype, device, candidates, calls=10, timer=None):
        assert candidates == ("sdpa", "math")
        encoder = shape[2] == 2
        return {"sdpa": 2.0 if encoder else 1.0, "math": 1.0 if encoder else 2.0}

    import fastmim.train.attn_choice as ac

    real = ac.time_backends
    ac.time_backends = fake_time
    try:
        rows = choose_attention(model, 2, 32, None, torch.device("cpu"), candidates=("sdpa", "math"))
    finally:
        ac.time_backends = real
    assert [r["choice"] for r in rows] == ["math", "sdpa"]
    enc = {m.backend for m in model.encoder.modules() if isinstance(m, Attention)}
    dec = {m.backend for m in model.decoders.modules() if isinstance(m, Attention)}
    assert enc == {"math"} and dec == {"sdpa"}
    assert "math" in describe(rows) and "tokens" in describe(rows)


def test_real_measurement_on_cpu_and_unchanged_values():
    """Measured for real (CPU, sdpa vs math): a valid choice; the model computes the same loss as with sdpa; the
    global RNG is untouched by the trial forward."""
    model, ref = _model(), _model()
    set_attention_backend(ref, "sdpa")
    state = torch.random.get_rng_state()
    rows = choose_attention(model, 2, 32, None, torch.device("cpu"), candidates=("sdpa", "math"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(r["choice"] in ("sdpa", "math") and set(r["ms"]) == {"sdpa", "math"} for r in rows)
    assert all(m.backend in ("sdpa", "math") for m in model.modules() if isinstance(m, Attention))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    torch.testing.assert_close(model(imgs, noise).loss, ref(imgs, noise).loss)


def test_cpu_auto_is_sdpa_without_measuring():
    model = _model()
    rows = choose_attention(model, 2, 32, None, torch.device("cpu"))
    assert rows[0]["choice"] == "sdpa" and rows[0]["ms"] == {}
    assert all(m.backend == "sdpa" for m in model.modules() if isinstance(m, Attention))


def test_a_backend_that_cannot_run_a_shape_is_skipped():
    def timer(fn, calls):
        fn()
        return 1.0

    def failing(fn, calls):
        raise RuntimeError("No available kernel")

    ms = time_backends((1, 2, 5, 16), torch.float32, torch.device("cpu"), ("sdpa",), timer=timer)
    assert set(ms) == {"sdpa"}
    assert time_backends((1, 2, 5, 16), torch.float32, torch.device("cpu"), ("sdpa",), timer=failing) == {}


@pytest.mark.gpu
def test_cuda_auto_measures_every_available_backend():
    model = _model().cuda()
    rows = choose_attention(model, 8, 32, torch.bfloat16, torch.device("cuda"))
    assert rows and all(r["ms"] and r["choice"] in r["ms"] for r in rows)
    assert all(m.backend != "auto" for m in model.modules() if isinstance(m, Attention))
