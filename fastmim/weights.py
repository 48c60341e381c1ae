"""Reading weight files safely: the authors' released checkpoints, and the loading step of fastmim's own files
(whose formats and checks are fastmim.train.checkpoint_files').

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
