"""fastmim.bench.suite: the GPU suite's kernel benchmarks and their providers per stage come from the benchmarks."""

from pathlib import Path

from fastmim.bench.suite import kernel_bench_scripts, main, plan

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_benchmark_runs_each_provider_in_its_stage(capsys):
    rows = {op: (first, second) for op, first, second in plan(ROOT / "benchmarks")}
    assert set(rows) == {p.stem.removeprefix("bench_") for p in kernel_bench_scripts(ROOT / "benchmarks")}
    assert rows["hog"] == (["released", "eager", "triton"], ["eager", "compile", "triton"])
    assert rows["recon_loss"] == (["eager", "triton"], ["eager", "compile", "triton", "fast_compile"])
    assert rows["decoders"] == (["separate", "grouped"], ["separate", "grouped", "separate_compile", "grouped_compile"])
    assert rows["attention"][1] == []  # no torch.compile provider: no stage 2
    assert main([str(ROOT / "benchmarks"), "--smoke"]) == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["hog"] == "released,eager,triton eager,triton" and lines["attention"].endswith(" -")


NEW_BENCH = """
from fastmim.bench.harness import KernelBench


def make_bench(device, quick):
    return KernelBench("new_op", {"eager": abs, "triton": abs, "compile": abs}, [])
"""


def test_a_new_benchmark_needs_no_edit_in_the_suite(tmp_path):
    (tmp_path / "bench_new_op.py").write_text(NEW_BENCH)
    (tmp_path / "helper.py").write_text("")  # not a benchmark
    assert plan(tmp_path) == [("new_op", ["eager", "triton"], ["eager", "triton", "compile"])]
    assert plan(tmp_path, smoke=True) == [("new_op", ["eager", "triton"], ["eager", "triton"])]
