"""Pieces shared by fine-tuning and linear probing: device choice, top-k accuracy, run directories, curve plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastmim import files
from fastmim.errors import FastmimError


def resolve_device(name: str, key: str) -> torch.device:
    """ "auto" = CUDA when present, else CPU; ``key`` names the config key in the error."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FastmimError(f"{key} = 'cuda' but no CUDA device is visible; use --{key}=cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...]) -> list[Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (k is capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return [hits[:, : min(k, logits.shape[1])].any(dim=1).sum() for k in ks]


def check_fresh_run_dir(out_dir: Path, key: str, resumable: bool) -> None:
    """Refuse to start a fresh run in a directory that already holds one (nothing written is ever overwritten)."""
    if (out_dir / "metrics.jsonl").exists() or any(out_dir.glob("checkpoint-*.pt")):
        hint = f"continue it with --{key}.resume=auto or " if resumable else ""
        raise FastmimError(f"{out_dir} already holds a run; {hint}pick a new --{key}.out_dir.")


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON in ``path``, written the way of fastmim.files; a failure is an OutputError."""
    write_text(json.dumps(obj, indent=2) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """``text`` in ``path``, written the way of fastmim.files; a failure is an OutputError."""
    with files.reported(path):
        files.write_text(path, text)


def plot_curves(rows: list[dict[str, Any]], png_path: Path, title: str) -> Path | None:
    """Two panels against epoch: losses (train, val) and val accuracy (top-1, top-5), as a PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker=".", label="val")
    ax_loss.set_ylabel("loss")
    ax_acc.plot(epochs, [r["acc1"] for r in rows], marker=".", label="top-1")
    ax_acc.plot(epochs, [r["acc5"] for r in rows], marker=".", label="top-5")
    ax_acc.set_ylabel("val accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    files.write_figure(fig, png_path)
    plt.close(fig)
    return png_path
