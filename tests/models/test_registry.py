"""fastmim.models.registry: the one place the shipped entrypoints are defined, each name registered once."""

import pytest

from fastmim.models import registry

SHIPPED = [  # `fastmim list-models` (tests may register more, e.g. tests/reliability/_harness.py)
    "localmim_swin_base_patch4_window7",
    "localmim_swin_large_patch4_window14",
    "localmim_swin_nano_patch4_window4",
    "localmim_swin_tiny_patch4_window7",
    "localmim_vit_base_patch16",
    "localmim_vit_large_patch16",
    "localmim_vit_small_patch16",
    "localmim_vit_tiny_patch16",
    "mae_vit_base_patch16",
    "mae_vit_large_patch16",
    "mae_vit_tiny_patch16",
]


def test_every_shipped_entrypoint_is_defined_in_the_registry():
    shipped = [name for name in registry.list_models() if registry._REGISTRY[name].__module__.startswith("fastmim")]
    assert shipped == SHIPPED
    assert {registry._REGISTRY[name].__module__ for name in shipped} == {"fastmim.models.registry"}


def test_registering_a_name_twice_is_an_error_naming_both_definitions():
    original = registry._REGISTRY["localmim_vit_base_patch16"]

    def localmim_vit_base_patch16(**kw):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="registered twice") as info:
        registry.register_model(localmim_vit_base_patch16)
    message = str(info.value)
    first = f"fastmim.models.registry.localmim_vit_base_patch16 ({registry.__file__}:"
    second = f"{__name__}.{localmim_vit_base_patch16.__qualname__} ({__file__}:"
    assert first in message and second in message and "\n" not in message
    # The first definition keeps the name.
    assert registry._REGISTRY["localmim_vit_base_patch16"] is original
