"""Checkpoints: atomic writes, safe loads (no code execution), finding the newest one in a run directory.

A checkpoint is a dict saved with torch.save: ``format`` ("fastmim-checkpoint"), ``version``, ``model_name``,
``model`` (state dict), ``optimizer``, ``scaler``, ``step``, ``data`` ({"epoch", "batch"}: the next batch to
read), ``rng`` (torch CPU / CUDA generator states) and ``config`` (the resolved config as TOML text).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastmim.errors import FastmimError

FORMAT = "fastmim-checkpoint"
VERSION = 1
_NAME = re.compile(r"checkpoint-(\d+)\.pt")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:07d}.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``: a crash mid-save leaves
    either the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a fastmim checkpoint with ``weights_only=True`` (never unpickles code) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FastmimError(f"checkpoint '{path}' does not exist; give an existing file or train.resume=auto.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = type(e).__name__
        raise FastmimError(f"'{path}' is not a readable checkpoint ({reason}); give a fastmim checkpoint.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FastmimError(
            f"'{path}' is not a fastmim checkpoint; for the authors' released weights use `fastmim import-checkpoint`."
        )
    if ckpt.get("version") != VERSION:
        raise FastmimError(f"'{path}' has checkpoint version {ckpt.get('version')}; this fastmim reads {VERSION}.")
    return ckpt


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``out_dir``, or None."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*.pt") if (m := _NAME.fullmatch(p.name))]
    return max(found)[1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
