"""Real training processes for the reliability tests, started cheaply, signalled and killed for real.

Importing torch costs 3-10 s per process on a 2-core machine, so instead of one ``python -m fastmim`` per run, a
multiprocessing *forkserver* imports torch and fastmim once and forks a fresh process for each run (before any
torch computation, so no thread pool is inherited). Each run is an OS process of its own, in its own process group:
it installs its own signal handlers, receives real SIGTERM / SIGINT / SIGUSR1 / SIGKILL, writes real files and
exits with a real status. ``crash_at`` arms a SIGKILL (or other signals) that the process sends itself at an exact
point of a save.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot  # noqa: F401  (imported once in the forkserver: each run plots its losses)
import torch

import fastmim.cli
from fastmim.config import load_config
from fastmim.models import register_model
from fastmim.models.localmim import LocalMIMViT
from fastmim.train import checkpoint_files, trainer
from fastmim.train.metrics import read_metrics


@register_model
def localmim_micro_test(impl: str = "reference", **overrides) -> LocalMIMViT:
    """Test-only LocalMIM ViT (32 wide, 4 blocks, ~0.1 M parameters): checkpoints of ~1 MB keep saves cheap."""
    return LocalMIMViT(**{"embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_heads": 2, **overrides}, impl=impl)


# The micro model at 32 px (4 patches), 16-wide decoders, 8 demo images in batches of 2 (4 per epoch), fp32 on CPU.
FAST = [
    "--model.name=localmim_micro_test",
    "--model.img_size=32",
    "--model.decoder_dim=16",
    "--data.num_images=8",
    "--train.batch_size=2",
    "--train.precision=fp32",
    "--train.device=cpu",
    "--train.log_every=1",
    "--train.warmup_steps=2",
]

# In-process runs use a constant learning rate, so that a short run is a prefix of a longer one.
CONSTANT_LR = ["--train.lr=1e-3", "--train.min_lr=1e-3", "--train.warmup_steps=0"]
STEPS = 8  # the reference run's length: two epochs of 4 batches, so resumes cross an epoch boundary

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload([__name__])


def _crash_at(point: str, n: int, signals: tuple[int, ...] = (signal.SIGKILL,)) -> None:
    """Send this process ``signals`` (default: SIGKILL) the n-th time (1-based) a save reaches ``point``:

    - "mid-write": 64 KiB into writing a checkpoint's temporary data file (inside the file write, where the handler
      of a signal that arrives during a save runs);
    - "before-record": data written and fsync'ed, its record not yet renamed into place;
    - "before-rename": record in place, data not yet renamed into place;
    - "after-rename": data renamed into place, before the directory fsync and the rotation;
    - "mid-prune": an old checkpoint deleted by the rotation, its record not yet.
    """
    hits = [0]

    def hit() -> None:
        hits[0] += 1
        if hits[0] == n:
            for signum in signals:
                os.kill(os.getpid(), signum)

    if point == "mid-write":
        write = checkpoint_files._HashingWriter.write

        class Signalling:
            def __init__(self, f) -> None:
                self.f = f

            def write(self, data):
                written = self.f.write(data)
                self.f.flush()  # the bytes reach the file, as they would from a process killed mid-write
                hit()
                return written

        def patched_write(self, data):
            if not self.size < 64 << 10 <= self.size + memoryview(data).nbytes:
                return write(self, data)
            real, self.f = self.f, Signalling(self.f)
            try:
                return write(self, data)
            finally:
                self.f = real

        checkpoint_files._HashingWriter.write = patched_write
        return
    if point == "mid-prune":
        unlink = Path.unlink

        def patched_unlink(self, missing_ok=False):
            unlink(self, missing_ok=missing_ok)
            if re.fullmatch(r"checkpoint-\d+\.pt", self.name):
                hit()

        Path.unlink = patched_unlink
        return
    replace = os.replace
    pattern = {
        "before-record": r"checkpoint-\d+\.pt\.json",
        "before-rename": r"checkpoint-\d+\.pt",
        "after-rename": r"checkpoint-\d+\.pt",
    }[point]

    def patched_replace(src, dst, *args, **kwargs):
        matches = re.fullmatch(pattern, Path(dst).name) is not None
        if matches and point != "after-rename":
            hit()
        result = replace(src, dst, *args, **kwargs)
        if matches and point == "after-rename":
            hit()
        return result

    os.replace = patched_replace


def _child(argv: list[str], log: str, crash: tuple | None, fsize_limit: int | None, sandbox) -> None:
    multiprocessing.set_start_method(None, force=True)  # data workers: the platform default, as in a shell
    os.setpgrp()  # its own process group: killpg reaches it and its data workers, never the test runner
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)  # the same in every run, so runs compare bit for bit; fast on a busy 2-core machine
    trainer.plot_losses = lambda *args: None  # the loss plot is tested elsewhere; it would double each run's time
    if sandbox is not None:  # working directory, HOME and TMPDIR of the run
        os.chdir(sandbox["work"])
        os.environ.update(HOME=str(sandbox["home"]), TMPDIR=str(sandbox["tmp"]))
        tempfile.tempdir = None
    if crash is not None:
        _crash_at(*crash)
    if fsize_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))  # writes past it fail with EFBIG
    code = fastmim.cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Proc:
    """``fastmim <argv>`` in a process of its own; stdout and stderr go to ``log``."""

    def __init__(self, argv: list[str], log: Path, crash=None, fsize_limit=None, sandbox=None) -> None:
        self.log = log
        self.process = _CTX.Process(target=_child, args=(argv, str(log), crash, fsize_limit, sandbox))
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int, group: bool = False) -> None:
        (os.killpg if group else os.kill)(self.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        """The exit status (negative: killed by that signal)."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"run did not finish in {timeout} s; output:\n{self.output()}")
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def run(argv: list[str], log: Path, **kwargs) -> tuple[int, str]:
    proc = Proc(argv, log, **kwargs)
    code = proc.wait()
    return code, proc.output()


def pretrain_args(out_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", *FAST, f"--train.out_dir={out_dir}", *extra]


def config(out_dir: Path, *extra: str):
    """The config of an in-process run: the harness's, with a constant learning rate."""
    return load_config(None, [*FAST, *CONSTANT_LR, f"--train.out_dir={out_dir}", *extra])


def wait_for_rows(metrics: Path, n: int, proc: Proc, timeout: float = 120) -> None:
    """Wait until ``metrics`` holds at least n rows (log_every = 1: n steps done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if not proc.process.is_alive():
            raise AssertionError(f"run ended before step {n}:\n{proc.output()}")
        time.sleep(0.02)
    raise TimeoutError(f"no step {n} within {timeout} s:\n{proc.output()}")


class RunResult:
    """The logged rows (step, loss, per-scale losses) and the final model and optimizer state of a run directory."""

    def __init__(self, out_dir):
        self.rows = [(r["step"], r["loss"], r["losses"]) for r in read_metrics(out_dir / "metrics.jsonl")]
        ckpt = checkpoint_files.load_checkpoint(checkpoint_files.latest_checkpoint(out_dir))
        self.step, self.model, self.optimizer = ckpt["step"], ckpt["model"], ckpt["optimizer"]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(out_dir, reference: RunResult) -> None:
    """Same logged losses, same final weights and optimizer state, bit for bit (CPU fp32)."""
    got = RunResult(out_dir)
    assert got.step == reference.step
    assert got.rows == reference.rows
    assert _equal(got.model, reference.model)
    assert _equal(got.optimizer, reference.optimizer)
