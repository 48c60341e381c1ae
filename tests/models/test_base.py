"""fastmim.models.base: a model's impl is set in one place and reaches every submodule that declares one (the
modules whose computation it changes; SwinDecoder inherits MaskedDecoder's, which its input does not use)."""

import pytest

from fastmim import create_model

CASES = [
    ("mae_vit_tiny_patch16", {"img_size": 64, "decoder_dim": 32}, {"MaskedViTEncoder", "MaskedDecoder"}),
    (
        "localmim_vit_small_patch16",
        {"img_size": 64, "decoder_dim": 32},
        {"MaskedViTEncoder", "MaskedDecoder", "HOGTarget"},
    ),
    ("localmim_swin_nano_patch4_window4", {"img_size": 64}, {"HOGTarget", "SwinDecoder"}),
]


@pytest.mark.parametrize("name,kw,changed", CASES)
def test_impl_is_set_in_one_place_and_reaches_every_module_that_declares_one(name, kw, changed):
    model = create_model(name, **kw)
    owners = [m for m in model.modules() if m is not model and hasattr(m, "impl")]
    assert {type(m).__name__ for m in owners} == changed
    assert model.impl == "reference" and all(m.impl == "reference" for m in owners)
    model.impl = "fast"
    assert all(m.impl == "fast" for m in owners)
    with pytest.raises(ValueError, match="unknown impl 'quick'; use one of reference, fast"):
        model.impl = "quick"
    assert model.impl == "fast"
