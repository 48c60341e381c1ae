"""The step and kernel micro-benchmarks as pytest-benchmark tests.

    pytest benchmarks --benchmark-only [--benchmark-autosave]      # time them
    pytest-benchmark compare                                       # compare saved runs across commits

Cases that cannot run here (the triton provider without a GPU) are skipped with the reason. The correctness gate
of the harness runs before each kernel benchmark.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from fastmim.bench.harness import _timed_fn, check_provider, refusal
from fastmim.bench.step import build_bench_run, device_batches
from fastmim.bench.suite import kernel_bench_scripts, load_make_bench
from fastmim.config import load_config
from fastmim.train.trainer import train_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HERE = Path(__file__).parent


def _kernel_benches():
    for path in kernel_bench_scripts(HERE):
        bench = load_make_bench(path)(DEVICE, DEVICE.type == "cpu")
        for provider, case, mode in itertools.product(bench.providers, bench.cases[:1], bench.modes):
            yield pytest.param(bench, provider, case, mode, id=f"{bench.name}-{provider}-{mode}")


@pytest.mark.parametrize("bench,provider,case,mode", list(_kernel_benches()))
def test_kernel(benchmark, bench, provider, case, mode):
    reason = refusal(provider, DEVICE, bench.cuda_only)
    if reason:
        pytest.skip(reason)
    check_provider(bench, provider, case, mode)
    fn = _timed_fn(bench.providers[provider], case.make(), mode)
    fn()  # warm-up (compilation) outside the measurement

    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{bench.name}-{mode}"
    benchmark(run)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_train_step(benchmark, impl):
    overrides = ["--data.num_images=64", "--train.batch_size=16"] if DEVICE.type == "cpu" else []
    cfg = load_config(None, overrides)
    run = build_bench_run(cfg, impl, DEVICE)
    batches = device_batches(run, fixed=True)
    train_step(run, batches)  # warm-up

    def step():
        train_step(run, batches)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "train_step"
    benchmark(step)
