"""Measuring instruments: the kernel benchmark harness, ``bench step``, ``bench data``, ``profile``, plots."""
