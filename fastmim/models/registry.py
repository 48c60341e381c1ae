"""Model registry: ``@register_model`` entrypoints, ``create_model(name, impl=..., **overrides)``, ``list_models()``.

Entrypoint names follow the architecture (timm style). Sizes: ViT-Ti 192/12/3 (a CPU-friendly debug size),
ViT-S 384/12/6, ViT-B 768/12/12, ViT-L 1024/24/16, all patch 16 (method 2.1). The Swin entrypoints live in swin.py.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from fastmim.config import ModelConfig
from fastmim.errors import FastmimError
from fastmim.models.localmim import LocalMIMViT
from fastmim.models.mae import MAEViT
from fastmim.models.vit import set_attention_backend

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


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
