"""``fastmim bench step``: end-to-end training-step throughput, reference and fast impls side by side.

Both impls run in one process on one device with the same config, data and seed. For each impl:

1. Throughput: ``warmup`` steps untimed, then ``steps`` steps of the production step
   (:func:`fastmim.train.trainer.train_step`: data, forward, backward, optimizer) timed as a whole, with one device
   synchronisation at each end: ``ms_per_step`` and ``img_per_s``. The run is the trainer's, from its own builder
   (:func:`fastmim.train.build.build_run`: model, attention choice, compilation, loader, lr schedule, AdamW), in one
   process, without a run directory.
2. Breakdown: a few more production steps with a synchronisation at every stage boundary (which costs some
   overlap, so these numbers are for attribution, not throughput): data wait / forward / backward / optimizer, in
   ms, each summed over the step's micro-batches.
3. Model FLOPs of one forward + backward, counted once with torch.utils.flop_counter on the reference impl (never
   hand-typed) and used for every impl; MFU = FLOPs per step / step time / the device's dense peak for the step's
   dtype (CUDA only; the peak used is in the row).
4. Peak memory: on CUDA each variant's own (``peak_mem_gib``: its state plus the peak of its breakdown steps) and
   the process's over its group's timed rounds (``peak_mem_all_gib``); on CPU the process's peak resident set.

Variants run in two groups: the eager ones, then the compiled ones; within a group, timed steps alternate between
variants in rounds, so drift does not favour the one that runs first. Each row is published (``on_rows``: the
command rewrites its JSON record) whenever it changes, so what finished survives a later crash or time limit.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastmim.config import Config, ModelConfig, choices
from fastmim.errors import FastmimError
from fastmim.models.vit import Attention
from fastmim.train.build import Run, build_run, resolve_device
from fastmim.train.distributed import Dist
from fastmim.train.metrics import peak_memory_gib
from fastmim.train.parallel import compile_wanted, timed_first_call
from fastmim.train.trainer import STAGES, input_stream, mask_noise, train_step

from .harness import RecordFile, format_table, quantiles, synchronize

# Dense tensor-core peaks (TFLOP/s, no sparsity) used for MFU; from the vendors' data sheets.
PEAK_TFLOPS = {
    ("h100", "bf16"): 989.4,
    ("h100", "fp16"): 989.4,
    ("h200", "bf16"): 989.4,
    ("h200", "fp16"): 989.4,
    ("a100", "bf16"): 312.0,
    ("a100", "fp16"): 312.0,
    ("h100", "fp32"): 494.7,  # TF32
    ("h200", "fp32"): 494.7,
    ("a100", "fp32"): 156.0,
}


def peak_tflops(device: torch.device, dtype_name: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for (gpu, dt), v in PEAK_TFLOPS.items() if gpu in name and dt == dtype_name), None)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_variant(name: str) -> tuple[str, bool | None, str | None]:
    """``"fast"``, ``"fast+compile"``, ``"reference+eager"``, ``"fast+compile:reduce-overhead"`` ... -> (impl,
    compile: True / False / None = as train.compile says, torch.compile mode or None = its default)."""
    impl, plus, rest = name.partition("+")
    how, colon, mode = rest.partition(":")
    impls = choices(ModelConfig, "impl")
    known = impl in impls and how in ("", "compile", "eager") and (how or not plus)
    if not known or (colon and (how != "compile" or mode not in COMPILE_MODES)):
        raise FastmimError(
            f"bench step variant {name!r} is unknown; write IMPL or IMPL+compile or IMPL+eager, IMPL = "
            f"{' or '.join(impls)}, optionally IMPL+compile:MODE with MODE one of {', '.join(COMPILE_MODES)} (e.g. "
            "--impls reference+eager,fast+compile)."
        )
    return impl, {"": None, "compile": True, "eager": False}[how], mode or None


def build_bench_run(cfg: Config, impl: str, device: torch.device) -> Run:
    """The trainer's run of ``cfg`` (its own builder) in one process on ``device``, as variant ``impl``
    (:func:`parse_variant`): model.impl, and train.compile unless the variant says eager or compile."""
    cfg = copy.deepcopy(cfg)
    cfg.model.impl, compile_now, compile_mode = parse_variant(impl)
    if compile_now is not None:
        cfg.train.compile = "on" if compile_now else "off"
    return build_run(cfg, Dist(), device, compile_mode)


def device_batches(run: Run, fixed: bool = False) -> Iterator[torch.Tensor]:
    """Batches on the device, as the trainer reads them (:func:`fastmim.train.trainer.input_stream`); ``fixed``:
    the first batch, reused every step (measures the step without input loading, as docs/performance.md's step
    figures do)."""
    if fixed:
        images, _ = next(run.loader.iterate(0))
        yield from itertools.repeat(images.to(run.device))
    yield from input_stream(run)


def count_flops(run: Run, images: torch.Tensor) -> int:
    """FLOPs of one forward + backward of the model on ``images`` (optimizer excluded)."""
    noise = mask_noise(0, 0, 0, images.shape[0], run.model.num_patches).to(run.device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            loss = run.model(images, noise).loss
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def stage_breakdown(run: Run, batches: Iterator[torch.Tensor], steps: int) -> dict[str, float]:
    """Median ms per stage of :data:`~fastmim.train.trainer.STAGES` over ``steps`` production steps, synchronising
    at each stage boundary."""
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    for _ in range(steps):
        spent = dict.fromkeys(STAGES, 0.0)

        @contextlib.contextmanager
        def timed(stage: str, spent=spent) -> Iterator[None]:
            start = _now(run.device)
            yield
            spent[stage] += (_now(run.device) - start) * 1e3

        train_step(run, batches, stage=timed)
        for stage, ms in spent.items():
            samples[stage].append(ms)
    return {f"{s}_ms": sorted(v)[len(v) // 2] for s, v in samples.items()}


def _now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def _timed_steps(run: Run, batches: Iterator[torch.Tensor], steps: int) -> float:
    """ms per production step over ``steps`` steps, synchronised only at both ends."""
    start = _now(run.device)
    for _ in range(steps):
        train_step(run, batches)
    return (_now(run.device) - start) * 1e3 / steps


def run_step_bench(
    cfg: Config,
    impls: list[str],
    steps: int,
    warmup: int,
    breakdown_steps: int,
    fixed_batch: bool = False,
    rounds: int = 4,
    log=print,
    on_rows: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> tuple[list[dict[str, Any]], torch.device]:
    """Time every variant in ``rounds`` alternating rounds (A B, B A, ...) so that drift (thermal, caches, other
    processes) does not favour whichever runs first; ms_per_step is the median round, p20/p80 the spread.

    Two phases: the eager variants, then the compiled ones (each phase's variants alternate among themselves). The
    eager rows are finished before anything compiles, and ``on_rows`` receives every row (finished, failed or
    still pending: ``status``) whenever one changes, so a compile that crashes, or a time limit that kills the
    process mid-compile, cannot take the finished rows with it. A variant that fails becomes a row with its
    ``error``; the others go on. The attention backend is chosen once, by the first variant built (model.attn =
    "auto" measures on CUDA), and every other variant runs the same backend in the same module: a speedup never
    mixes attention backends. The FLOPs are counted on a reference variant (built only when none is asked for)."""
    bench = _StepBench(cfg, impls, resolve_device(cfg.train.device), fixed_batch, log, on_rows)
    bench.publish()
    for phase in ([n for n in impls if not bench.compiles(n)], [n for n in impls if bench.compiles(n)]):
        if phase:
            bench.run_phase(phase, steps, warmup, breakdown_steps, rounds)
    return [bench.rows[n] for n in impls], bench.device


class _StepBench:
    """The state of one :func:`run_step_bench`: its rows (one per variant, published whenever one changes), the
    attention backends every variant shares, and the FLOPs per step."""

    def __init__(self, cfg: Config, impls: list[str], device: torch.device, fixed_batch: bool, log, on_rows) -> None:
        self.parsed = {name: parse_variant(name) for name in impls}  # every name checked before anything is built
        self.cfg, self.impls, self.device, self.fixed_batch = cfg, impls, device, fixed_batch
        self.log, self.on_rows = log, on_rows
        pending = {"model": cfg.model.name, "status": "pending"}
        self.rows: dict[str, dict[str, Any]] = {n: {"impl": n, **pending} for n in impls}
        self.shared = _SharedAttention(cfg)
        self.flops: int | None = None

    def publish(self) -> None:
        rows = [self.rows[n] for n in self.impls]
        _add_speedups(rows)
        if self.on_rows is not None:
            self.on_rows(rows)

    def compiles(self, name: str) -> bool:
        wanted = self.parsed[name][1]
        return compile_wanted(self.cfg.train.compile, self.device) if wanted is None else wanted

    def failed(self, name: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
        self.log(f"bench step: impl={name} failed: {message}")
        self.rows[name].update(status="error", error=message)
        self.rows[name].pop("round_ms", None)
        self.publish()

    def run_phase(self, names: list[str], steps: int, warmup: int, breakdown_steps: int, rounds: int) -> None:
        """Build, compile, warm up, time and break down the variants ``names``, publishing each row as it changes.
        Any failure of a variant (a compile error, running out of memory) ends that variant only. The phase's runs
        are freed at its end, so the next phase's models do not share the device with them."""
        cfg, device, rows = self.cfg, self.device, self.rows
        runs, streams = {}, {}
        for name in names:
            try:
                self.log(f"bench step: building {cfg.model.name} impl={name} batch={cfg.train.batch_size} on {device}")
                runs[name] = self.shared.build(name, device)
                streams[name] = device_batches(runs[name], self.fixed_batch)
            except Exception as e:
                runs.pop(name, None)
                self.failed(name, e)
        if self.flops is None and runs:
            self.flops = _reference_flops(cfg, runs, self.shared, device, self.fixed_batch)
        for name in list(runs):
            rows[name].update(flops_per_step=self.flops, round_ms=[])
            try:
                if runs[name].compiled_blocks:  # the first step compiles: its time is the compile cost, reported
                    self.log(f"bench step: compiling {runs[name].compiled_blocks} blocks of impl={name} ...")
                    rows[name]["status"] = "compiling"
                    self.publish()
                    rows[name]["compile_s"] = timed_first_call(train_step, runs[name], streams[name])[1]
                for _ in range(warmup):
                    train_step(runs[name], streams[name])
                rows[name]["status"] = "timing"
                self.publish()
            except Exception as e:
                del runs[name]
                self.failed(name, e)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_round = max(1, steps // rounds)
        for r in range(rounds):
            for name in [n for n in (names if r % 2 == 0 else names[::-1]) if n in runs]:
                try:
                    rows[name]["round_ms"].append(_timed_steps(runs[name], streams[name], per_round))
                except Exception as e:
                    del runs[name]
                    self.failed(name, e)
        for name in [n for n in names if n in runs]:
            try:
                row = _row(cfg, name, runs[name], rows[name], device, per_round * rounds, self.fixed_batch)
                base = _allocated(device)
                row.update(stage_breakdown(runs[name], streams[name], breakdown_steps))
                if device.type == "cuda":
                    row.update(_own_memory(runs[name], base, device))
                rows[name] = row
                self.publish()
            except Exception as e:
                self.failed(name, e)
        runs.clear()
        streams.clear()
        _free(device)


def _reference_flops(cfg: Config, runs: dict[str, Run], shared: _SharedAttention, device, fixed_batch) -> int:
    """Model FLOPs of one step, counted on a reference variant: the fast impl skips work (e.g. predictions that
    never reach the loss), and MFU must credit only the work the method defines, the same for every impl. A
    reference run of this phase is reused; otherwise one is built for the count and freed."""
    run = next((r for n, r in runs.items() if parse_variant(n)[0] == "reference"), None)
    temporary = run is None
    if temporary:
        run = shared.build("reference+eager", device)
    flops = count_flops(run, next(device_batches(run, fixed_batch))) * cfg.train.accum_steps
    if temporary:
        del run
        _free(device)
    return flops


def _free(device: torch.device) -> None:
    """Give the memory of runs no longer referenced back to the device (their parts may refer to each other)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _SharedAttention:
    """Builds every variant's run with the attention backends the first one chose: model.attn = "auto" measures
    once (:func:`fastmim.train.build.build_run`), and each later run is built with "sdpa" (nothing measured) and
    then given the first run's backend module by module (modules have the same names in every impl; the fast
    impl's grouped decoders read their first decoder's choice)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.backends: dict[str, str] | None = None
        self.attn = ""

    def build(self, variant: str, device: torch.device) -> Run:
        if self.backends is None or self.cfg.model.attn != "auto":
            run = build_bench_run(self.cfg, variant, device)
            if self.backends is None:
                self.backends = _attention_backends(run.model)
                self.attn = run.attn
            return run
        cfg = copy.deepcopy(self.cfg)
        cfg.model.attn = "sdpa"
        run = build_bench_run(cfg, variant, device)
        for name, module in _attention_modules(run.model):
            module.backend = self.backends.get(name, "sdpa")
        run.attn = self.attn
        return run


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, Attention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def _attention_backends(model: torch.nn.Module) -> dict[str, str]:
    return {name: module.backend for name, module in _attention_modules(model)}


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_reference of every timed row. The baseline: the reference impl as the released code runs it
    (eager), else whatever timed reference row there is."""
    timed = [r for r in rows if "img_per_s" in r]
    refs = sorted((r for r in timed if r["impl"].startswith("reference")), key=lambda r: r["compile"])
    base = refs[0]["img_per_s"] if refs else None
    for row in timed:
        row["speedup_vs_reference"] = row["img_per_s"] / base if base else None


def _allocated(device: torch.device) -> int:
    """Bytes held by the CUDA allocator now, its peak counter reset (0 on CPU)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _own_memory(run: Run, base: int, device: torch.device) -> dict[str, float]:
    """Memory one variant needs on its own, although every variant's model lives on the device at once: its
    parameters and optimizer state, plus the peak its breakdown steps allocated above what was held before them
    (activations, gradients, workspaces). ``peak_mem_all_gib`` is the process's peak over the timed rounds."""
    state = [p for p in run.model.parameters()]
    state += [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    state_gib = sum(t.numel() * t.element_size() for t in state) / 2**30
    step_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return {"state_gib": state_gib, "step_peak_gib": step_gib, "peak_mem_gib": state_gib + step_gib}


def _row(
    cfg: Config, impl: str, run: Run, timing: dict[str, Any], device: torch.device, steps: int, fixed_batch: bool
) -> dict[str, Any]:
    ms, p20, p80 = quantiles(timing["round_ms"])
    batch = cfg.train.batch_size * cfg.train.accum_steps
    flops = timing["flops_per_step"]
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[run.amp_dtype]
    peak = peak_tflops(device, dtype_name)
    return {
        "impl": impl,
        "status": "ok",
        "compile": bool(run.compiled_blocks),
        "compile_s": timing.get("compile_s"),
        "compile_mode": run.compile_mode,
        "attn": run.attn,
        "model": cfg.model.name,
        "batch": batch,
        "dtype": dtype_name,
        "img_size": cfg.model.resolved_img_size,
        "data_source": cfg.data.source,
        "data_mode": "fixed batch on device" if fixed_batch else "loader",
        "img_per_s": batch / (ms / 1e3),
        "ms_per_step": ms,
        "ms_p20": p20,
        "ms_p80": p80,
        "steps": steps,
        "flops_per_step": flops,
        "tflops": flops / (ms / 1e3) / 1e12,
        "peak_tflops": peak,
        "mfu": flops / (ms / 1e3) / (peak * 1e12) if peak else None,
        "peak_mem_gib": None,  # CUDA: this variant's own peak, filled in by _own_memory after the rounds
        "peak_mem_all_gib": peak_memory_gib(device) if device.type == "cuda" else None,
        "peak_rss_gib": peak_memory_gib(torch.device("cpu")),
    }


def step_command(cfg: Config, args, steps: int, warmup: int, argv: list[str], extra: dict[str, Any]) -> int:
    """``fastmim bench step``: the record is created first and rewritten as each variant's row finishes (a later
    variant that crashes or is cut by a time limit, e.g. in a cold torch.compile, cannot take the finished rows
    with it); exit status 1 when a variant failed."""
    from fastmim.bench.plots import plot_step_breakdown

    record = RecordFile("step", resolve_device(cfg.train.device), args.out, argv=argv, extra=extra)
    impls = args.impls.split(",")
    rows, _ = run_step_bench(cfg, impls, steps, warmup, args.breakdown_steps, args.fixed_batch, on_rows=record.write)
    print(format_table(rows, STEP_COLUMNS))
    print(f"wrote {record.path}")
    if args.plot and any("img_per_s" in r for r in rows):
        print(f"wrote {plot_step_breakdown(record.path)}")
    failed = [f"{r['impl']} ({r['error']})" for r in rows if r["status"] == "error"]
    if failed:
        print(f"fastmim: bench step: {len(failed)} variant(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


STEP_COLUMNS = (
    "impl",
    "status",
    "compile_s",
    "model",
    "batch",
    "dtype",
    "img_per_s",
    "ms_per_step",
    "speedup_vs_reference",
    "mfu",
    "peak_mem_gib",
    "data_ms",
    "forward_ms",
    "backward_ms",
    "optimizer_ms",
)
