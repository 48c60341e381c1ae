"""State-dict key translation shared by the released-checkpoint converters (fastmim.models.released for ViT and
MAE, fastmim.models.swin_weights for Swin): checkpoint unwrapping, name templates with named fields, and the
released HOG layers (``hog_enc.{k}.conv``: the fixed Sobel kernels, checked on import and written back on export,
and the frozen per-scale bias, which becomes the target's ``bias`` buffer [4, 2])."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from fastmim.errors import FastmimError
from fastmim.targets.hog import SOBEL_WEIGHT

HOG_LAYER = re.compile(r"hog_enc\.([0-3])\.conv\.(weight|bias)")


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Accept a bare state dict or a checkpoint dict with a "model" entry; strip a DDP "module." prefix."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FastmimError("this is not a state dict or a released checkpoint (a dict with a 'model' entry).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def template_pattern(template: str, fields: dict[str, str]) -> re.Pattern[str]:
    """A regex that matches ``template``, each ``{name}`` in it a named group matching ``fields[name]``."""
    pattern = re.escape(template)
    for name, regex in fields.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{regex})")
    return re.compile(pattern)


def take_hog_layer(key: str, value: Tensor, biases: dict[int, Tensor]) -> bool:
    """Whether ``key`` is a released HOG layer. Its weight must be the fixed Sobel kernels (values are checked on
    real tensors only: the translation also runs on the meta device); its bias goes to ``biases`` by scale."""
    hog = HOG_LAYER.fullmatch(key)
    if hog is None:
        return False
    if hog.group(2) == "bias":
        biases[int(hog.group(1))] = value
    elif value.shape != SOBEL_WEIGHT.shape or not (value.is_meta or torch.equal(value.float().cpu(), SOBEL_WEIGHT)):
        raise FastmimError(f"{key} is not the fixed Sobel kernel of method 3.1; this checkpoint is not LocalMIM's.")
    return True


def stacked_hog_bias(biases: dict[int, Tensor]) -> dict[str, Tensor]:
    """``{"target.bias": [4, 2]}`` from the released per-scale biases collected by :func:`take_hog_layer`; empty
    when the checkpoint has none (no hog_bias)."""
    if not biases:
        return {}
    if sorted(biases) != [0, 1, 2, 3]:
        raise FastmimError(f"the checkpoint has HOG biases for scales {sorted(biases)}, expected all of 0-3.")
    return {"target.bias": torch.stack([biases[k].reshape(2) for k in range(4)])}


def released_hog_biases(bias: Tensor) -> dict[str, Tensor]:
    """The released per-scale HOG biases from the target's ``bias`` [4, 2]."""
    return {f"hog_enc.{k}.conv.bias": bias[k].clone() for k in range(4)}


def released_sobel_weights() -> dict[str, Tensor]:
    """The released HOG layers' fixed Sobel kernels, one per scale."""
    return {f"hog_enc.{k}.conv.weight": SOBEL_WEIGHT.clone() for k in range(4)}
