"""Model registry: ``@register_model`` entrypoints, ``create_model(name, impl=..., **overrides)``, ``list_models()``.

Every shipped entrypoint is defined here, at the end of this module. Names follow the architecture (timm style);
a name is registered once (a second definition of it is an error that names both). Sizes (width / depth / heads):
ViT-Ti 192/12/3 (a CPU-friendly debug size), ViT-S 384/12/6, ViT-B 768/12/12, ViT-L 1024/24/16, all patch 16
(method 2.1); Swin-T 96, Swin-B 128, Swin-L 192 wide (method 4), patch 4, and a CPU debug Swin 32 wide.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fastmim.config import ModelConfig
from fastmim.errors import FastmimError
from fastmim.models.localmim import LocalMIMViT
from fastmim.models.mae import MAEViT
from fastmim.models.swin import LocalMIMSwin
from fastmim.models.vit import set_attention_backend

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name; raises ValueError if another definition already holds that name."""
    name = fn.__name__
    if name in _REGISTRY:
        first = _definition(_REGISTRY[name])
        raise ValueError(f"model '{name}' is registered twice: {first} and {_definition(fn)}; rename one of them.")
    _REGISTRY[name] = fn
    return fn


def _definition(fn: Callable[..., nn.Module]) -> str:
    """Where ``fn`` is defined: ``module.qualname (file:line)``."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{fn.__module__}.{fn.__qualname__}{where}"


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, impl: str = "reference", **overrides: Any) -> nn.Module:
    """Build a registered model with ``impl`` "reference" or "fast" (fastmim.models.base: the one place a model's
    impl is set); ``overrides`` replace constructor defaults (e.g. img_size=64, nbins=18).

    The model keeps what it was built from as ``model.model_args`` = {"name", "kwargs": overrides}: every fastmim
    checkpoint and weights file stores it, and readers rebuild the model from it (fastmim.train.checkpoint_files).
    ``impl`` is left out: it picks how the same weights are computed, not what they are."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see `fastmim list-models`."
        raise FastmimError(f"unknown model '{name}'; {hint}")
    try:
        model = _REGISTRY[name](impl=impl, **overrides)
    except (TypeError, ValueError) as e:
        raise FastmimError(f"cannot build {name} with {overrides}: {e}.") from None
    model.model_args = {"name": name, "kwargs": dict(overrides)}
    return model


def model_from_config(mcfg: ModelConfig) -> nn.Module:
    """Build the model a ModelConfig describes (0 / "" / "default" fields keep the entrypoint's default)."""
    overrides: dict[str, Any] = {"img_size": mcfg.resolved_img_size, "mask_ratio": mcfg.mask_ratio}
    if mcfg.decoder_dim:
        overrides["decoder_dim"] = mcfg.decoder_dim
    if name_is_localmim(mcfg.name):
        if mcfg.target:
            overrides["target"] = mcfg.target
        if mcfg.nbins:
            overrides["nbins"] = mcfg.nbins
        if mcfg.hog_bias != "default":
            overrides["hog_bias"] = mcfg.hog_bias == "on"
    elif mcfg.target not in ("", "pixel") or mcfg.nbins or mcfg.hog_bias != "default":
        raise FastmimError(f"{mcfg.name} always uses normalised-pixel targets; unset model.target/nbins/hog_bias.")
    if name_is_swin(mcfg.name):
        overrides["mask_rule"] = mcfg.mask_rule
        if mcfg.swin_coords != "default":
            overrides["swin_coords"] = mcfg.swin_coords
    elif mcfg.mask_rule != "exact" or mcfg.swin_coords != "default":
        key = "mask_rule" if mcfg.mask_rule != "exact" else "swin_coords"
        raise FastmimError(f"model.{key} applies to Swin models only; unset it for {mcfg.name}.")
    return set_attention_backend(create_model(mcfg.name, impl=mcfg.impl, **overrides), mcfg.attn)


def name_is_localmim(name: str) -> bool:
    return name.startswith("localmim_")


def name_is_swin(name: str) -> bool:
    return name.startswith("localmim_swin_")


def _vit(depth: int, dim: int, heads: int) -> dict[str, int]:
    return {"patch_size": 16, "embed_dim": dim, "depth": depth, "num_heads": heads}


@register_model
def localmim_vit_tiny_patch16(**kw: Any) -> LocalMIMViT:
    """ViT-Ti/16 LocalMIM (not a published recipe: the CPU debug size)."""
    return LocalMIMViT(**{**_vit(12, 192, 3), **kw})


@register_model
def localmim_vit_small_patch16(**kw: Any) -> LocalMIMViT:
    """ViT-S/16 LocalMIM, HOG with 9 bins."""
    return LocalMIMViT(**{**_vit(12, 384, 6), **kw})


@register_model
def localmim_vit_base_patch16(**kw: Any) -> LocalMIMViT:
    """ViT-B/16 LocalMIM, HOG with 9 bins (method 5)."""
    return LocalMIMViT(**{**_vit(12, 768, 12), **kw})


@register_model
def localmim_vit_large_patch16(**kw: Any) -> LocalMIMViT:
    """ViT-L/16 LocalMIM, HOG with 18 bins and the frozen Sobel bias (method 5); taps 1, 3, 21, 23."""
    return LocalMIMViT(**{**_vit(24, 1024, 16), "nbins": 18, "hog_bias": True, **kw})


@register_model
def mae_vit_tiny_patch16(**kw: Any) -> MAEViT:
    """ViT-Ti/16 MAE (the CPU debug size)."""
    return MAEViT(**{**_vit(12, 192, 3), **kw})


@register_model
def mae_vit_base_patch16(**kw: Any) -> MAEViT:
    """ViT-B/16 MAE with the 8-block 512-wide decoder."""
    return MAEViT(**{**_vit(12, 768, 12), **kw})


@register_model
def mae_vit_large_patch16(**kw: Any) -> MAEViT:
    """ViT-L/16 MAE with the 8-block 512-wide decoder."""
    return MAEViT(**{**_vit(24, 1024, 16), **kw})


@register_model
def localmim_swin_nano_patch4_window4(**kw: Any) -> LocalMIMSwin:
    """The CPU debug size (32 wide, depths 2, 2, 2, 2, not a Swin of the literature), window 4: at 64 px the maps of
    16, 8, 4, 2 tokens split into whole windows, so it exports to timm exactly."""
    return LocalMIMSwin(**{"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 4, **kw})


@register_model
def localmim_swin_tiny_patch4_window7(**kw: Any) -> LocalMIMSwin:
    """Swin-T (96 wide, depths 2, 2, 6, 2), window 7; not a published LocalMIM recipe."""
    return LocalMIMSwin(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), **kw})


@register_model
def localmim_swin_base_patch4_window7(**kw: Any) -> LocalMIMSwin:
    """Swin-B (128 wide, depths 2, 2, 18, 2), window 7, HOG with 18 bins and the frozen Sobel bias (method 4, 5)."""
    return LocalMIMSwin(
        **{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 7, **kw}
    )


@register_model
def localmim_swin_large_patch4_window14(**kw: Any) -> LocalMIMSwin:
    """Swin-L (192 wide, depths 2, 2, 18, 2), window 14, HOG with 18 bins and the frozen Sobel bias (method 4, 5)."""
    return LocalMIMSwin(
        **{"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 14, **kw}
    )
