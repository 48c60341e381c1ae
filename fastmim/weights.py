"""Reading weight files safely: released checkpoints, fastmim checkpoints and fastmim weights files.

Everything is loaded with ``torch.load(weights_only=True)``, so no code in a file is ever executed. Released
checkpoints may carry an ``argparse.Namespace`` of training arguments, the one non-tensor class allowed.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmim.errors import FastmimError, one_line
from fastmim.models.released import unwrap_state_dict

WEIGHTS_FORMAT = "fastmim-weights"


def safe_load(path: str | Path) -> Any:
    path = Path(path)
    if path.is_dir():
        raise FastmimError(f"'{path}' is a directory; give a checkpoint file in it (e.g. {path}/checkpoint-*.pt).")
    if not path.is_file():
        raise FastmimError(f"'{path}' does not exist; give the path of a checkpoint file.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FastmimError(
            f"'{path}' cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}); "
            "give a .pth/.pt file holding tensors."
        ) from None


def load_released_file(path: str | Path) -> dict[str, torch.Tensor]:
    return unwrap_state_dict(safe_load(path))


def load_fastmim_weights(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(model name, state dict) from a fastmim checkpoint or weights file."""
    return checked_weights(safe_load(path), path)


def checked_weights(obj: Any, path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(model name, state dict) of a loaded fastmim checkpoint or weights file; refuses, in one line, another kind
    of file, a model name that is missing or not registered, and a ``model`` that is not a dict of tensors."""
    from fastmim.models import list_models

    if not isinstance(obj, dict) or obj.get("format") not in (WEIGHTS_FORMAT, "fastmim-checkpoint"):
        raise FastmimError(f"'{path}' is not a fastmim checkpoint or weights file; import it first.")
    name, state = obj.get("model_name"), obj.get("model")
    if not isinstance(name, str) or name not in list_models():
        shown = one_line(repr(name))[:80]
        raise FastmimError(f"'{path}' names no registered model (model_name {shown}); give a file written by fastmim.")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastmimError(f"'{path}' holds no model weights (tensors by name); give a file written by fastmim.")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise FastmimError(
            f"'{path}' holds non-finite weights (NaN or inf in {len(broken)} tensor(s), e.g. {one_line(broken[0])}); "
            "give a checkpoint saved before the training diverged."
        )
    return name, state


def model_for_weights(name: str, state: dict[str, torch.Tensor], meta: bool = False, **overrides: Any) -> nn.Module:
    """Model ``name`` at the sizes its weights imply (image size, decoder width, bins, bias: read off the tensors;
    ``overrides`` add what they cannot tell), on the meta device with ``meta`` (shapes only), not loaded. Tensors
    that do not fit ``name`` are refused in one line naming the first that does not fit, also when their shapes
    imply sizes the model cannot be built at (a decoder 1 wide): they are then compared with the model at the
    inferred image size, or else at its defaults."""
    from fastmim.models import create_model
    from fastmim.models.released import _infer_overrides, check_fits

    try:
        inferred = _infer_overrides(state, name)
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError):
        inferred = {}  # a tensor it reads is missing or mis-shaped: check_fits below names it
    fallbacks = [{k: v for k, v in inferred.items() if k == "img_size"}, {}]
    for i, kwargs in enumerate([{**inferred, **overrides}, *fallbacks]):
        try:
            with torch.device("meta") if meta or i else contextlib.nullcontext():
                model = create_model(name, **kwargs)
            break
        except (FastmimError, ValueError, TypeError, ZeroDivisionError, RuntimeError):
            continue
    check_fits(model.state_dict(), state, name)
    if i:  # they fit a model built without what their shapes implied: those shapes contradict each other
        raise FastmimError(
            f"the weights do not fit {name} (their tensor shapes imply sizes it cannot be built at); pick the model "
            "the checkpoint was made for."
        )
    return model
