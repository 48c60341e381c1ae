"""Shared test fixtures. Tests run on CPU; `gpu`-marked tests are skipped without CUDA."""

import os

# Triton kernels run through the interpreter on CPU. This must happen before anything imports triton: triton decides
# at its own import whether triton.language's jit helpers (tl.zeros, tl.sum) are interpreted, and collecting
# tests/bench already imports it (torch.utils.flop_counter does), before tests/kernels/conftest.py is read.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fp64():
    """Build modules and constants in float64 for the duration of a test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
