"""The measuring harness every fastmim benchmark uses (docs/performance.md section 5).

- Providers: ``released`` (a literal transcription of the released code's way of computing the op, where one
  exists), ``eager`` (the ``_ref``), ``compile`` (torch.compile of the ``_ref``), ``triton`` (the kernel).
- Modes: ``fwd``, ``bwd`` (backward only, from a saved forward), ``full`` (forward + backward).
- A correctness gate runs first: each provider's output (and, for bwd/full, its input gradients under a fixed random
  upstream gradient) is compared with the reference provider; a wrong provider is reported and never timed.
- Warm-up (compilation, autotuning, cudnn selection) happens outside the timed region. On CUDA the timing is
  ``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions); on CPU wall-clock repetitions. Median and
  20/80 % quantiles are reported.
- Bytes and FLOPs per call give GB/s and TFLOP/s.
- Results: a fixed-width table on stdout and a JSON record
  ``{"bench", "created", "git_sha", "gpu", "torch", "triton", "cuda", "argv", "rows"}`` written under
  benchmarks/results/ (or ``--out DIR``) as ``<bench>-<gpu>-pt<torch>-<yyyymmdd>.json``; an existing file is never
  overwritten (a numeric suffix is added).
- The ``triton`` provider is refused under the Triton interpreter: interpreter timings mean nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastmim import files

MODES = ("fwd", "bwd", "full")
PROVIDERS = ("released", "eager", "compile", "triton")
DEFAULT_RESULTS = Path("benchmarks") / "results"


class CorrectnessError(RuntimeError):
    """A provider's output differs from the reference beyond tolerance."""


# ----------------------------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    """'cpu' or the CUDA device's marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_sha() -> str | None:
    """The commit of the working tree (with '-dirty' when it has uncommitted changes); outside git (a copy of the
    tree, as on a lent GPU machine) the commit passed in as FASTMIM_GIT_COMMIT, else None."""
    passed_in = os.environ.get("FASTMIM_GIT_COMMIT") or None
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return passed_in
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return passed_in


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git_sha": git_sha(),
    }


# ----------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_REPS = 10  # a provider of 10-30 ms gets at least this many repetitions, whatever the time budget


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    min_reps: int = MIN_REPS,
) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` over about ``rep_ms`` of repetitions, at least ``min_reps`` of
    them; warm-up runs are outside the measurement."""
    if device.type == "cuda":
        from triton.testing import do_bench

        fn()  # first call: compilation, autotuning and allocation, never timed
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()  # a first estimate of one call's time
        torch.cuda.synchronize(device)
        rep_ms = budget_for_reps((time.perf_counter() - start) * 1e3, rep_ms, min_reps)
        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(p50), float(p20), float(p80)
    start = time.perf_counter()
    fn()  # first call: compilation and allocation, never timed
    first = (time.perf_counter() - start) * 1e3
    for _ in range(max(0, math.ceil(warmup_ms / max(first, 1e-3)) - 1)):
        fn()
    reps = max(min_reps, min(1000, math.ceil(rep_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def budget_for_reps(call_ms: float, rep_ms: float, min_reps: int) -> float:
    """The ``rep`` to give triton.testing.do_bench, which repeats ``int(rep / its own estimate of one call)`` times:
    ``rep_ms``, raised so that a call of ``call_ms`` still gets ``min_reps`` repetitions (25 % margin for the
    estimates' noise)."""
    return max(rep_ms, 1.25 * min_reps * call_ms)


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a sample, by linear interpolation."""
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), qs[1], qs[7]


# ----------------------------------------------------------------------------------------------- kernel benches


@dataclass
class Case:
    """One shape of an op: ``make()`` returns fresh inputs (tensors that need gradients have requires_grad set);
    ``bytes``/``flops``: memory traffic and FLOPs of one forward call (backward counted as ``bwd_factor`` times)."""

    shape: dict[str, Any]
    dtype: torch.dtype
    make: Callable[[], tuple]
    bytes: int = 0
    flops: int = 0
    bwd_factor: float = 2.0


@dataclass
class KernelBench:
    """An op under test: providers map name -> callable(*inputs) -> Tensor or tuple of Tensors."""

    name: str
    providers: dict[str, Callable[..., Any]]
    cases: list[Case]
    modes: Sequence[str] = ("fwd",)
    reference: str = "eager"
    atol: float = 1e-4
    rtol: float = 1e-4
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)  # per-provider (atol, rtol)
    cuda_only: tuple[str, ...] = ("triton",)  # providers that are refused on CPU
    low_precision_slack: float = 1e-4  # bf16 / fp16 gate: the allowance above twice torch's own error, x max |value|


def _outputs(out: Any) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


def _grad_inputs(inputs: tuple) -> list[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def _upstream(outs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """A fixed random upstream gradient per output (never .sum(): that hides transposition and scaling errors)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float32).to(o.device, o.dtype) for o in outs]


def _evaluate(fn: Callable, inputs: tuple, mode: str) -> list[torch.Tensor]:
    """The values a provider must get right in ``mode``: outputs, plus input gradients for bwd / full."""
    if mode == "fwd":
        with torch.no_grad():
            return [o.detach().float() for o in _outputs(fn(*inputs))]
    outs = [o for o in _outputs(fn(*inputs)) if o.requires_grad]
    grads = torch.autograd.grad(outs, _grad_inputs(inputs), _upstream(outs), allow_unused=True)
    return [o.detach().float() for o in outs] + [g.float() for g in grads if g is not None]


LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_provider(bench: KernelBench, provider: str, case: Case, mode: str) -> float:
    """The correctness gate: max |provider - reference| over outputs (and gradients); raises CorrectnessError.
    fp32 cases: within the bench's (atol, rtol) of the reference provider. bf16 / fp16 cases: the tests' rule
    (docs/performance.md section 5), see :func:`_check_low_precision`; the value returned is then the error against
    fp64."""
    inputs = case.make()
    if case.dtype in LOW_PRECISION:
        return _check_low_precision(bench, provider, inputs, mode)
    expected = _evaluate(bench.providers[bench.reference], inputs, mode)
    got = _evaluate(bench.providers[provider], inputs, mode)
    atol, rtol = bench.tolerances.get(provider, (bench.atol, bench.rtol))
    _check_shapes(provider, got, expected)
    err = 0.0
    for a, b in zip(got, expected):
        err = max(err, (a - b).abs().max().item() if a.numel() else 0.0)
        if not torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=False):
            raise CorrectnessError(f"{provider} differs from {bench.reference} by up to {err:.3g} in {mode}")
    return err


def _check_low_precision(bench: KernelBench, provider: str, inputs: tuple, mode: str) -> float:
    """A low-precision provider passes when, for every output and gradient, its max error against an fp64
    evaluation of the reference is at most twice the reference provider's own low-precision error, plus
    ``low_precision_slack`` x the largest value. Fixed tolerances cannot do this at real batch sizes: a gradient
    summed over 256 images legitimately differs by one bf16 ulp between two correct summation orders."""
    exact = _evaluate(in_fp64(bench.providers[bench.reference]), inputs, mode)
    own = _evaluate(bench.providers[bench.reference], inputs, mode)
    got = _evaluate(bench.providers[provider], inputs, mode)
    _check_shapes(provider, got, exact)
    worst = 0.0
    for i, (a, b, x) in enumerate(zip(got, own, exact)):
        if not a.numel():
            continue
        err, own_err = (a - x).abs().max().item(), (b - x).abs().max().item()
        allowed = 2 * own_err + bench.low_precision_slack * x.abs().max().item()
        worst = max(worst, err)
        if not err <= allowed:  # also catches NaN
            raise CorrectnessError(
                f"{provider} {mode} output {i}: error {err:.3g} against fp64 exceeds twice {bench.reference}'s own "
                f"{own_err:.3g} + {bench.low_precision_slack:g} x max |value| (allowed {allowed:.3g})"
            )
    return worst


def in_fp64(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every floating-point tensor input cast to float64 (differentiably). Parameters must be inputs;
    autocast leaves float64 alone, so a provider that autocasts computes in fp64."""

    def run(*inputs: Any) -> Any:
        return fn(*(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs))

    return run


def _check_shapes(provider: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    if len(got) != len(expected):
        raise CorrectnessError(f"{provider} returned {len(got)} tensors, the reference {len(expected)}")
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            raise CorrectnessError(f"{provider} returned shape {list(a.shape)}, the reference {list(b.shape)}")


def _timed_fn(fn: Callable, inputs: tuple, mode: str) -> Callable[[], Any]:
    if mode == "fwd":

        def run() -> Any:
            with torch.no_grad():
                return fn(*inputs)

        return run
    grad_inputs = _grad_inputs(inputs)
    if mode == "full":
        upstream = None

        def run_full() -> Any:
            nonlocal upstream
            outs = [o for o in _outputs(fn(*inputs)) if o.requires_grad]
            upstream = upstream or _upstream(outs)
            return torch.autograd.grad(outs, grad_inputs, upstream, allow_unused=True)

        return run_full
    outs = [o for o in _outputs(fn(*inputs)) if o.requires_grad]
    upstream = _upstream(outs)
    return lambda: torch.autograd.grad(outs, grad_inputs, upstream, retain_graph=True, allow_unused=True)


def refusal(
    provider: str, device: torch.device, cuda_only: Sequence[str] = ("triton",), gate_only: bool = False
) -> str | None:
    """Why a provider cannot be timed here (``gate_only``: checked here), or None. Gating the triton provider
    on a CPU checks the fast path with the kernels' PyTorch fallbacks (or the interpreter, when it is on)."""
    if gate_only:
        return (
            f"the {provider} provider runs on CUDA only"
            if provider in cuda_only and provider != "triton" and (device.type != "cuda")
            else None
        )
    if provider == "triton" and (interpreter_active() or device.type != "cuda"):
        return "the triton provider is only timed on a GPU, never under the interpreter"
    if provider in cuda_only and device.type != "cuda":
        return f"the {provider} provider runs on CUDA only"
    return None


def compiles(provider: str) -> bool:
    """Whether a provider is a torch.compile one (its name says so): those run last, as their cold compiles are the
    slow and fragile part of a benchmark."""
    return "compile" in provider


def run_kernel_bench(
    bench: KernelBench,
    device: torch.device,
    providers: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    log: Callable[[str], None] = print,
    on_rows: Callable[[list[dict[str, Any]]], Any] | None = None,
    gate_only: bool = False,
) -> list[dict[str, Any]]:
    """Gate then time every (case, mode, provider); returns result rows. Wrong providers are rows with
    ``"ok": False`` and no timing; refused ones carry ``"skipped"``. The compile providers run after every other
    one, and ``on_rows`` receives the rows so far whenever one finishes, with a last ``"status": "running"`` row
    for the one under way: a cold compile cut by a time limit takes only its own row with it. ``gate_only``:
    the correctness gate alone, no timing (e.g. the GPU shapes checked on a CPU)."""
    chosen = providers or list(bench.providers)
    order = [p for p in chosen if not compiles(p)] + [p for p in chosen if compiles(p)]
    rows: list[dict[str, Any]] = []
    for provider in order:
        for case in bench.cases:
            for mode in modes or bench.modes:
                row: dict[str, Any] = {
                    "provider": provider,
                    "mode": mode,
                    "shape": case.shape,
                    "dtype": str(case.dtype).removeprefix("torch."),
                }
                if on_rows is not None:
                    on_rows([*rows, {**row, "status": "running"}])
                rows.append(_kernel_row(bench, provider, case, mode, row, device, warmup_ms, rep_ms, log, gate_only))
    if on_rows is not None:
        on_rows(rows)
    return rows


def _kernel_row(bench, provider, case, mode, row, device, warmup_ms, rep_ms, log, gate_only) -> dict[str, Any]:
    reason = refusal(provider, device, bench.cuda_only, gate_only)
    if reason:
        return {**row, "skipped": reason}
    try:
        row["max_abs_err"] = check_provider(bench, provider, case, mode)
        if gate_only:
            return {**row, "ok": True}
        fn = _timed_fn(bench.providers[provider], case.make(), mode)
        p50, p20, p80 = measure(fn, device, warmup_ms, rep_ms)
    except CorrectnessError as e:
        log(f"correctness gate: {bench.name} {provider} {mode} {case.shape}: {e}")
        return {**row, "ok": False, "error": str(e)}
    except RuntimeError as e:  # one provider's crash is its row; the other providers are still measured
        message = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        if "No available kernel" in message:  # an SDPA backend that does not take this shape or dtype
            return {**row, "skipped": message}
        log(f"{bench.name} {provider} {mode} {case.shape} failed: {message}")
        return {**row, "ok": False, "error": message}
    factor = {"fwd": 1.0, "bwd": case.bwd_factor, "full": 1.0 + case.bwd_factor}[mode]
    return {
        **row,
        "ok": True,
        "ms_p50": p50,
        "ms_p20": p20,
        "ms_p80": p80,
        "gbps": case.bytes * factor / p50 / 1e6 if case.bytes else None,
        "tflops": case.flops * factor / p50 / 1e9 if case.flops else None,
    }


# ----------------------------------------------------------------------------------------------- reporting


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table; missing values print as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
        if isinstance(value, dict):
            return ",".join(f"{k}={v}" for k, v in value.items())
        return str(value)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def result_path(out_dir: Path, bench: str, gpu: str, when: _dt.datetime) -> Path:
    """``<bench>-<gpu>-pt<torch>-<yyyymmdd>.json``, with -2, -3, ... appended rather than overwriting."""
    torch_ver = torch.__version__.split("+")[0]
    stem = f"{bench}-{slug(gpu)}-pt{torch_ver}-{when:%Y%m%d}"
    path, n = out_dir / f"{stem}.json", 2
    while path.exists():
        path, n = out_dir / f"{stem}-{n}.json", n + 1
    return path


def write_record(
    bench: str,
    rows: list[dict[str, Any]],
    device: torch.device,
    out_dir: str | Path | None = None,
    argv: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the JSON record and return its path."""
    when = _dt.datetime.now(_dt.UTC)
    env = environment(device)
    record = {
        "bench": bench,
        "created": when.isoformat(timespec="seconds"),
        "git_sha": env["git_sha"],
        "gpu": env["gpu"],
        "torch": env["torch"],
        "triton": env["triton"],
        "cuda": env["cuda"],
        "argv": list(sys.argv if argv is None else argv),
        **(extra or {}),
        "rows": rows,
    }
    out = Path(out_dir) if out_dir else DEFAULT_RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, bench, env["gpu"], when)
    files.write_text(path, json.dumps(record, indent=1) + "\n")
    return path


class RecordFile:
    """One JSON record written as its rows finish: created at once (:func:`write_record`, no rows yet) and
    rewritten in place by every :meth:`write`, each time whole (a temporary file renamed over it), so that a
    process killed mid-benchmark leaves a valid record of every row finished until then."""

    def __init__(
        self,
        bench: str,
        device: torch.device,
        out_dir: str | Path | None = None,
        argv: Sequence[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = write_record(bench, [], device, out_dir, argv, extra)
        self.record = json.loads(self.path.read_text())

    def write(self, rows: list[dict[str, Any]]) -> Path:
        self.record["rows"] = rows
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        tmp.replace(self.path)
        return self.path


KERNEL_COLUMNS = ("provider", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "gbps", "tflops", "max_abs_err")


def kernel_main(make_bench: Callable[[torch.device, bool], KernelBench], argv: Sequence[str] | None = None) -> int:
    """Command line shared by benchmarks/bench_<op>.py: ``[--providers a,b] [--modes fwd,full] [--out DIR]
    [--quick] [--rep-ms MS] [--plot] [--device cuda|cpu]``. Exit status 1 when a provider fails the correctness gate."""
    import argparse

    parser = argparse.ArgumentParser(description=make_bench.__doc__)
    parser.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", help="directory for the JSON record (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing (smoke runs)")
    parser.add_argument(
        "--rep-ms", type=float, help="timing budget per measurement in ms (default 100, 20 with --quick)"
    )
    parser.add_argument("--plot", action="store_true", help="also write a PNG chart next to the JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--gate-only",
        action="store_true",
        help="only the correctness gate, no timing, every provider that runs here (e.g. --device cpu at the GPU "
        "shapes: the bf16 gates checked before a GPU is lent)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    bench = make_bench(device, args.quick)
    split = lambda s: s.split(",") if s else None  # noqa: E731
    unknown = sorted(set(split(args.providers) or ()) - set(bench.providers))
    if unknown:
        parser.error(f"unknown provider(s) {', '.join(unknown)}; {bench.name} has {', '.join(bench.providers)}")
    rep = args.rep_ms or (20 if args.quick else 100)
    name = bench.name + ("_gate" if args.gate_only else "")
    record = RecordFile(name, device, args.out, argv=sys.argv if argv is None else ["bench", *argv])

    def publish(rows: list[dict[str, Any]]) -> None:
        add_speedups(rows, bench.reference)
        record.write(rows)

    rows = run_kernel_bench(
        bench,
        device,
        split(args.providers),
        split(args.modes),
        warmup_ms=rep / 4,
        rep_ms=rep,
        on_rows=publish,
        gate_only=args.gate_only,
    )
    print(f"{bench.name} on {device_name(device)} (torch {torch.__version__}, triton {triton_version()})")
    print(format_table(rows, (*KERNEL_COLUMNS, "speedup")))
    print(f"wrote {record.path}")
    if args.plot and not args.gate_only:
        from fastmim.bench.plots import plot_kernel_speedups

        print(f"wrote {plot_kernel_speedups(record.path)}")
    return 1 if any(r.get("ok") is False for r in rows) else 0


def add_speedups(rows: list[dict[str, Any]], reference: str) -> None:
    """speedup = reference ms / provider ms, for rows of the same shape, dtype and mode."""
    key = lambda r: (json.dumps(r["shape"], sort_keys=True), r["dtype"], r["mode"])  # noqa: E731
    ref = {key(r): r["ms_p50"] for r in rows if r["provider"] == reference and "ms_p50" in r}
    for r in rows:
        if "ms_p50" in r and key(r) in ref:
            r["speedup"] = ref[key(r)] / r["ms_p50"]
