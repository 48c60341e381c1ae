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

from fastmim.models.grouped import GroupedBlock
from fastmim.models.vit import Block


def compile_wanted(setting: str, device: torch.device) -> bool:
    """train.compile: "auto" = on for CUDA, off on CPU (inductor's CPU compile costs more than it saves on the
    tiny CPU recipe); "on"; "off"."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every transformer Block of ``model`` in place, and its GroupedBlock (impl = "fast": the decoders'
    blocks as one grouped computation, compiled once for all decoders); returns how many Blocks are covered.
    Compilation itself happens lazily at the first forward (see :func:`timed_first_call` to report its cost), so a
    region the model's impl does not run costs nothing. Swin's sparse window blocks stay eager (their packed shapes
    change with every mask); Swin's decoder blocks are compiled. ``mode``: torch.compile's mode (None = its default;
    `bench step` measures the others)."""
    regions = [m for m in model.modules() if isinstance(m, (Block, GroupedBlock))]
    for region in regions:
        region.compile(backend=backend, dynamic=False, mode=mode)
    return sum(isinstance(m, Block) for m in regions)


def timed_first_call(fn, *args, **kwargs) -> tuple[object, float]:
    """(result, seconds) of one call, synchronised on CUDA: the compile time when it is the first step."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
