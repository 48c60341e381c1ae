"""The kernel benchmarks of the GPU suite (benchmarks/gpu_suite.sh) and the providers each of its stages runs, read
from the benchmarks themselves: a new ``benchmarks/bench_<op>.py``, or a new provider in one, needs no edit there.

Stage 1 runs every provider but the torch.compile ones (their cold compiles are the slow and fragile part of a
benchmark, ``harness.compiles``). Stage 2, for the benchmarks that have torch.compile providers, runs them beside
every other provider except ``released`` (the released code's way, timed in stage 1): each kernel against
torch.compile of its reference, in one process. The CPU smoke run (``--smoke``) leaves the compile providers out of
stage 2 as well: it checks that every step runs, and inductor's compiles would cost it minutes.

    python -m fastmim.bench.suite [DIR] [--smoke]

prints one line per benchmark of DIR (default benchmarks): ``<op> <stage-1 providers> <stage-2 providers>``, the
providers comma-separated, ``-`` for a stage the benchmark sits out.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .harness import KernelBench, compiles

BENCHMARKS = Path("benchmarks")
STAGE_1_ONLY = ("released",)  # providers stage 2 does not repeat


def kernel_bench_scripts(directory: Path = BENCHMARKS) -> list[Path]:
    """Every kernel benchmark, ``<directory>/bench_<op>.py``, in name order."""
    return sorted(Path(directory).glob("bench_*.py"))


def load_make_bench(script: Path) -> Callable[[torch.device, bool], KernelBench]:
    """A kernel benchmark script's ``make_bench(device, quick) -> KernelBench``."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_bench


def stage_providers(bench: KernelBench, smoke: bool = False) -> tuple[list[str], list[str]]:
    """(stage 1, stage 2) providers of one benchmark (module docstring); stage 2 is empty for a benchmark without
    torch.compile providers."""
    first = [p for p in bench.providers if not compiles(p)]
    if not any(compiles(p) for p in bench.providers):
        return first, []
    second = [p for p in bench.providers if p not in STAGE_1_ONLY and not (smoke and compiles(p))]
    return first, second


def plan(directory: Path = BENCHMARKS, smoke: bool = False) -> list[tuple[str, list[str], list[str]]]:
    """(op, stage-1 providers, stage-2 providers) of every kernel benchmark in ``directory``."""
    rows = []
    for script in kernel_bench_scripts(directory):
        # provider names only: the CPU and --quick shapes build nothing large
        bench = load_make_bench(script)(torch.device("cpu"), True)
        rows.append((script.stem.removeprefix("bench_"), *stage_providers(bench, smoke)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmim.bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default=str(BENCHMARKS), help="where bench_<op>.py are")
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke run's stage 2 (no compile providers)")
    args = parser.parse_args(argv)
    for op, first, second in plan(Path(args.directory), args.smoke):
        print(op, ",".join(first) or "-", ",".join(second) or "-")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
