"""fastmim's Triton kernels, installed as ``fastmim.kernels``.

This package depends on torch and triton only and never imports fastmim. Kernels run on CUDA tensors, or on CPU
tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported (tests do this).
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Looked up once, without importing triton (importing fixes the interpreter setting): torch.compile of torch 2.11
# refuses to trace importlib's find_spec, which can_run_on would otherwise call inside a compiled region.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether triton can be imported."""
    return _TRITON_FOUND


def interpreter_enabled() -> bool:
    """Whether Triton kernels are set to run on CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor: CUDA with triton, or CPU under the interpreter."""
    if not triton_available():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())
