"""Refuse, before anything is allocated, a run whose step cannot fit in this machine's memory.

A configuration far beyond the machine (``model.img_size=65536``, a batch of millions) used to start allocating;
on Linux, which overcommits memory, the allocations succeed and the kernel's OOM killer then ends the process with
SIGKILL: no message, no exit status a script can read. :func:`check_step_fits` compares a *lower bound* of what one
training step holds with the memory this process can still get, and refuses a run that cannot fit in one line. The
bound counts only what any step must hold, so a run it lets through may still run out of memory (the allocator's
error is then reported in one line too, see ``fastmim.cli``); a run it refuses could never have fit:

- the float image batch: ``batch x 3 x img_size^2`` values;
- in every encoder block at the patch embedding's width (a ViT's every block, a Swin's first stage), the input of
  each linear layer, which autograd keeps to compute the layer's weight gradient: ``batch x visible tokens x
  in_features`` values per layer (7 x width per transformer block: qkv, projection, fc1 and the 4 x wide fc2);
- the parameters with their gradients and AdamW's two moments (4 values each), counted at ``min(img_size, 224)``
  (position embeddings only grow with the size).

Values are counted at 4 bytes (fp32; autocast keeps fp32 weights and the loss's inputs). The geometry comes from
the model built on the ``meta`` device (no memory, no initialisation) at ``min(img_size, 224)``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from fastmim.config import Config
from fastmim.errors import FastmimError
from fastmim.models import model_from_config

GEOMETRY_SIZE = 224  # the size the meta model is built at when model.img_size is larger


def step_bytes_lower_bound(cfg: Config) -> dict[str, int]:
    """Bytes one training step must hold at least, by part ("images", "activations", "weights") and in "total"."""
    m, batch = cfg.model, cfg.train.batch_size
    img = m.resolved_img_size
    with torch.device("meta"):
        model = model_from_config(dataclasses.replace(m, img_size=min(img, GEOMETRY_SIZE)))
    patch_embed = model.encoder.patch_embed.proj
    width, patch = patch_embed.out_channels, patch_embed.kernel_size[0]
    saved_per_token = sum(  # the linear layers' inputs, per visible token, over the blocks at the first width
        layer.in_features
        for block in model.encoder.modules()
        if isinstance(norm := getattr(block, "norm1", None), nn.LayerNorm) and norm.normalized_shape == (width,)
        for layer in block.modules()
        if isinstance(layer, nn.Linear)
    )
    visible = math.floor((img // patch) ** 2 * (1 - m.mask_ratio))
    parts = {
        "images": 4 * batch * 3 * img * img,
        "activations": 4 * batch * visible * saved_per_token,
        "weights": 4 * 4 * sum(p.numel() for p in model.parameters()),
    }
    return {**parts, "total": sum(parts.values())}


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still get on ``device``: the GPU's free memory; on the CPU, MemAvailable plus free
    swap, capped by the cgroup's limit (a container's). None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def check_step_fits(cfg: Config, device: torch.device) -> None:
    """Refuse, in one line, a run whose step needs more memory than ``device`` has available (see the module)."""
    free = available_bytes(device)
    if free is None:
        return
    need = step_bytes_lower_bound(cfg)
    if need["total"] <= free:
        return
    gib = 2**30
    where = "the GPU has" if device.type == "cuda" else "this machine has"
    raise FastmimError(
        f"one training step needs at least {need['total'] / gib:,.1f} GiB (model.img_size="
        f"{cfg.model.resolved_img_size}, train.batch_size={cfg.train.batch_size}: images {need['images'] / gib:,.1f}, "
        f"activations {need['activations'] / gib:,.1f}, weights and optimizer {need['weights'] / gib:,.1f} GiB) and "
        f"{where} {free / gib:,.1f} GiB available; lower train.batch_size or model.img_size, or use a machine with "
        "more memory."
    )
