import json
import re

import pytest
import torch

from fastmim.bench.harness import (
    Case,
    CorrectnessError,
    KernelBench,
    check_provider,
    format_table,
    measure,
    quantiles,
    run_kernel_bench,
    write_record,
)

CPU = torch.device("cpu")


class _WrongGrad(torch.autograd.Function):
    """Right values, wrong gradient: only a bwd/full gate can catch it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 3


def _bench():
    case = Case({"N": 64}, torch.float32, lambda: (torch.randn(64, requires_grad=True),), bytes=64 * 4 * 2)
    providers = {
        "eager": lambda x: x * 2,
        "good": lambda x: x + x,
        "wrong_values": lambda x: x * 2 + 1e-2,
        "wrong_grad": _WrongGrad.apply,
        "triton": lambda x: x * 2,
    }
    return KernelBench("toy", providers, [case], modes=("fwd", "full"), reference="eager")


def test_gate_rejects_wrong_values_and_wrong_gradients():
    bench = _bench()
    case = bench.cases[0]
    assert check_provider(bench, "good", case, "full") == 0.0
    with pytest.raises(CorrectnessError, match="differs from eager"):
        check_provider(bench, "wrong_values", case, "fwd")
    check_provider(bench, "wrong_grad", case, "fwd")  # the forward values are right...
    with pytest.raises(CorrectnessError):
        check_provider(bench, "wrong_grad", case, "full")  # ...the gradient is not


def test_run_times_only_correct_providers_and_refuses_triton_on_cpu():
    messages = []
    rows = run_kernel_bench(_bench(), CPU, warmup_ms=1, rep_ms=2, log=messages.append)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert by[("good", "full")]["ok"] and by[("good", "full")]["ms_p50"] > 0
    assert by[("wrong_values", "fwd")]["ok"] is False and "ms_p50" not in by[("wrong_values", "fwd")]
    assert by[("wrong_grad", "fwd")]["ok"] and by[("wrong_grad", "full")]["ok"] is False
    assert "never under the interpreter" in by[("triton", "fwd")]["skipped"]
    assert any("wrong_values" in m for m in messages)
    good = by[("good", "fwd")]
    assert good["ms_p20"] <= good["ms_p50"] <= good["ms_p80"]
    assert good["gbps"] == pytest.approx(64 * 4 * 2 / good["ms_p50"] / 1e6)


def test_quantiles_and_measure():
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    calls = []
    p50, p20, p80 = measure(lambda: calls.append(1), CPU, warmup_ms=0.1, rep_ms=0.1, min_reps=7)
    assert len(calls) >= 8 and p20 <= p50 <= p80  # first call untimed, then >= 7 timed


def test_record_schema_name_and_never_overwrites(tmp_path):
    rows = run_kernel_bench(_bench(), CPU, providers=["eager", "good"], modes=["fwd"], warmup_ms=1, rep_ms=2)
    first = write_record("toy", rows, CPU, tmp_path, argv=["bench", "toy"])
    second = write_record("toy", rows, CPU, tmp_path, argv=["bench", "toy"])
    assert re.fullmatch(r"toy-cpu-pt[0-9.]+-\d{8}\.json", first.name)
    assert second.name == first.name.replace(".json", "-2.json") and first.exists()
    record = json.loads(first.read_text())
    assert set(record) == {"bench", "created", "git_sha", "gpu", "torch", "triton", "cuda", "argv", "rows"}
    assert record["gpu"] == "cpu" and record["argv"] == ["bench", "toy"] and record["torch"] == torch.__version__
    for row in record["rows"]:
        assert {"provider", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "gbps", "max_abs_err"} <= set(row)


def test_table_is_fixed_width():
    text = format_table([{"a": 1.23456, "b": None}, {"a": 123456.0, "b": "x"}], ["a", "b"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1 and "-" in lines[2]
