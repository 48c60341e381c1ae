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
4. Peak GPU memory of the timed steps (CUDA, all impls together: the larger one sets it); on CPU the process's peak
   resident set.

Timed steps alternate between impls in rounds, so drift does not favour the impl that runs first.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastmim.config import Config, ModelConfig, choices
from fastmim.errors import FastmimError
from fastmim.train.build import Run, build_run, resolve_device
from fastmim.train.distributed import Dist
from fastmim.train.metrics import peak_memory_gib
from fastmim.train.parallel import timed_first_call
from fastmim.train.trainer import STAGES, input_stream, mask_noise, train_step

from .harness import quantiles, synchronize

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
    the first batch, reused every step (measures the step without input loading, as PERFORMANCE.md's step figures
    do)."""
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
) -> tuple[list[dict[str, Any]], torch.device]:
    """Time every impl in ``rounds`` alternating rounds (A B, B A, ...) so that drift (thermal, caches, other
    processes) does not favour whichever runs first; ms_per_step is the median round, p20/p80 the spread."""
    device = resolve_device(cfg.train.device)
    runs, streams, rows = {}, {}, {}
    for impl in impls:
        log(f"bench step: building {cfg.model.name} impl={impl} batch={cfg.train.batch_size} on {device} ...")
        runs[impl] = build_bench_run(cfg, impl, device)
        streams[impl] = device_batches(runs[impl], fixed_batch)
    # Model FLOPs, counted once on the reference impl: the fast impl skips work (e.g. predictions that never reach
    # the loss), and MFU must credit only the work the method defines, the same for every impl.
    reference = runs.get("reference") or build_bench_run(cfg, "reference", device)
    flops = count_flops(reference, next(device_batches(reference, fixed_batch))) * cfg.train.accum_steps
    for impl in impls:
        rows[impl] = {"flops_per_step": flops, "round_ms": []}
        if runs[impl].compiled_blocks:  # the first step compiles: its time is the compile cost, reported
            log(f"bench step: compiling {runs[impl].compiled_blocks} blocks of impl={impl} ...")
            rows[impl]["compile_s"] = timed_first_call(train_step, runs[impl], streams[impl])[1]
        for _ in range(warmup):
            train_step(runs[impl], streams[impl])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            rows[impl]["round_ms"].append(_timed_steps(runs[impl], streams[impl], per_round))
    out = [_row(cfg, impl, runs[impl], rows[impl], device, per_round * rounds, fixed_batch) for impl in impls]
    for impl, row in zip(impls, out):
        base = _allocated(device)
        row.update(stage_breakdown(runs[impl], streams[impl], breakdown_steps))
        if device.type == "cuda":
            row.update(_own_memory(runs[impl], base, device))
    # The baseline: the reference impl as the released code runs it (eager), else whatever reference row there is.
    refs = sorted((r for r in out if r["impl"].startswith("reference")), key=lambda r: r["compile"])
    base = refs[0]["img_per_s"] if refs else None
    for row in out:
        row["speedup_vs_reference"] = row["img_per_s"] / base if base else None
    return out, device


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


STEP_COLUMNS = (
    "impl",
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
