"""Kernel tests run on CPU through Triton's interpreter: TRITON_INTERPRET must be set before any kernel is decorated."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
