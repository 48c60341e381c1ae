"""Execution wrappers applied to a model from outside it (models contain no parallelism or compilation code).

Regional compilation: each transformer block is compiled on its own (``Block.compile()``), so identical blocks
share one compiled graph (parameters are graph inputs), compile time stays a few blocks' worth instead of a whole
model's, and anything outside the blocks (masking, gathers, fastmim's Triton custom ops) stays eager without
breaking a graph.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from fastmim.models import fast_path
from fastmim.models.vit import Block


def compile_wanted(setting: str, device: torch.device) -> bool:
    """train.compile: "auto" = on for CUDA, off on CPU (inductor's CPU compile costs more than it saves on the
    tiny CPU recipe); "on"; "off"."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every transformer Block of ``model`` in place, and the grouped decoder block of ``impl = "fast"``
    (a function, compiled once for all decoders); returns how many blocks are covered. Compilation itself happens
    lazily at the first forward (see :func:`timed_first_call` to report its cost). Swin's sparse window blocks stay
    eager (their packed shapes change with every mask); Swin's decoder blocks are compiled. ``mode``: torch.compile's
    mode (None = its default; `bench step` measures the others)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend, dynamic=False, mode=mode)
    for m in model.modules():
        if getattr(m, "grouped_block_fn", None) is not None:
            m.grouped_block_fn = torch.compile(fast_path.grouped_block, backend=backend, dynamic=False, mode=mode)
    return len(blocks)


def timed_first_call(fn, *args, **kwargs) -> tuple[object, float]:
    """(result, seconds) of one call, synchronised on CUDA: the compile time when it is the first step."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
