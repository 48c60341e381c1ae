from pathlib import Path

import torch

import fastmim.kernels as kernels


def test_kernel_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.interpreter_enabled() and not kernels.can_run_on(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.interpreter_enabled()
    assert kernels.can_run_on(cpu) == kernels.triton_available()
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert not kernels.can_run_on(cpu)


def test_kernels_never_import_fastmim():
    modules = sorted(Path(kernels.__file__).parent.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "_common.py", "hog.py", "recon_loss.py"}
    for module in modules:
        source = module.read_text()
        assert "import fastmim" not in source and "from fastmim" not in source, module.name
