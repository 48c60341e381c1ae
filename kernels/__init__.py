"""fastmim's Triton kernels, installed as ``fastmim.kernels``.

This package depends on torch and triton only and never imports fastmim. Kernels run on CUDA tensors, or on CPU
tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported (tests do this).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether triton can be imported (without importing it: importing fixes the interpreter setting)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels are set to run on CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_on(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor: CUDA with triton, or CPU under the interpreter."""
    if not triton_available():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_enabled())
