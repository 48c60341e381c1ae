"""The uninterrupted reference run that every interrupted, killed or corrupted run must reproduce bit for bit."""

import pytest
import torch

from fastmim.train import train
from tests.reliability._harness import STEPS, RunResult, config, pretrain_args, run


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> RunResult:
    out = tmp_path_factory.mktemp("reference") / "run"
    code, output = run(pretrain_args(out, f"--train.steps={STEPS}"), out.parent / "log")
    assert code == 0, output
    return RunResult(out)


@pytest.fixture(scope="session")
def reference_constant_lr(tmp_path_factory) -> RunResult:
    """In process (one thread): STEPS steps at a constant learning rate."""
    out = tmp_path_factory.mktemp("reference_constant_lr") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(out, f"--train.steps={STEPS}"))
    finally:
        torch.set_num_threads(threads)
    return RunResult(out)


@pytest.fixture(autouse=True)
def no_plot(monkeypatch):
    """The loss plot is tested in tests/train; here it would double each run's time."""
    monkeypatch.setattr("fastmim.train.trainer.plot_losses", lambda *args: None)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread like the harness's processes, so that all runs compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
