"""Reading weight files safely: released checkpoints, fastmim checkpoints and fastmim weights files.

Everything is loaded with ``torch.load(weights_only=True)``, so no code in a file is ever executed. Released
checkpoints may carry an ``argparse.Namespace`` of training arguments, the one non-tensor class allowed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fastmim.errors import FastmimError
from fastmim.models.released import unwrap_state_dict

WEIGHTS_FORMAT = "fastmim-weights"


def safe_load(path: str | Path) -> Any:
    path = Path(path)
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
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") not in (WEIGHTS_FORMAT, "fastmim-checkpoint"):
        raise FastmimError(f"'{path}' is not a fastmim checkpoint or weights file; import it first.")
    return obj["model_name"], obj["model"]
