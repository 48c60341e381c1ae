"""``fastmim profile``: a torch.profiler trace of a few training steps and a per-stage time table.

The profiled steps are the trainer's own (:func:`fastmim.train.trainer.train_step` on the run its builder makes).
Stages are profiler ranges (``fastmim.models.base.stage_range``): forward hooks open one around the modules of each
stage (patch embed, encoder blocks, decoders, heads, targets); the parts of the model that run as functions (impl
"fast": the fused patch embed, the grouped decoders, the heads with the fused loss) open their own; the rest of the
model's forward (masking, loss) falls in "loss + masking"; the step's data and optimizer stages get their own ranges
(through its ``stage`` hook). Every profiled op is charged to the innermost stage range above it. Backward ops carry
the sequence number of the forward op that created them, so each is charged to that forward op's stage (shown in the
"bwd" column).

Outputs: ``<out>/trace.json`` (open in chrome://tracing or Perfetto), ``<out>/stages.txt`` and ``<out>/ops.txt``
(top ops by self time), and the same two tables on stdout. Times are device self-times on CUDA, CPU self-times on CPU.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fastmim import files
from fastmim.config import Config
from fastmim.models.base import STAGE_RANGE, stage_range
from fastmim.train.build import resolve_device
from fastmim.train.trainer import train_step

from .harness import format_table
from .step import build_bench_run, device_batches

# (stage, module-name prefixes). The first match wins; ModuleLists are expanded to their children.
STAGE_PREFIXES = (
    ("patch embed", ("encoder.patch_embed",)),
    ("encoder blocks", ("encoder.blocks", "encoder.layers", "tap_norms", "norm")),  # ViT blocks, Swin stages
    ("heads", ("pred",)),
    ("targets", ("target",)),
    ("decoders", ("decoder", "decoders")),
)
OTHER = "loss + masking"
# The stage of each part of the training step (its ranges); its backward needs none (see stage_table).
STEP_STAGES = {"data": "data", "forward": OTHER, "optimizer": "optimizer"}


def stage_of(name: str) -> str | None:
    for stage, prefixes in STAGE_PREFIXES:
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            if stage == "decoders" and ".head" in f".{name}.":
                return "heads"
            return stage
    return None


@contextlib.contextmanager
def stage_hooks(model: nn.Module) -> Iterator[None]:
    """Forward hooks that wrap each stage's outermost modules in the stage's profiler range."""
    handles = []

    def opener(stage: str):
        def pre(module: nn.Module, args: Any) -> None:
            module._fastmim_range = stage_range(stage)
            module._fastmim_range.__enter__()

        return pre

    def closer(module: nn.Module, args: Any, output: Any) -> None:
        module._fastmim_range.__exit__(None, None, None)

    hooked: dict[str, str] = {}  # module name -> stage, for modules that open a range
    for name, module in model.named_modules():
        stage = stage_of(name)
        if stage is None or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue  # containers are never called: their children open the ranges
        ancestors = [a for a in hooked if name.startswith(a + ".")]
        if ancestors and hooked[max(ancestors, key=len)] == stage:
            continue  # already inside a range of the same stage
        hooked[name] = stage
        handles += [module.register_forward_pre_hook(opener(stage)), module.register_forward_hook(closer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _enclosing(event, prefix: str):
    while event is not None and not event.name.startswith(prefix):
        event = event.cpu_parent
    return event


def stage_table(events, use_device: bool) -> list[dict[str, Any]]:
    """Per-stage forward / backward / other self time (ms) from profiler events."""
    time_of = (lambda e: e.self_device_time_total) if use_device else (lambda e: e.self_cpu_time_total)
    # Ops that create no autograd node report the counter's next value, so several ops share a sequence number;
    # the node's creator is the last of them in time: keep the stage of the latest.
    seq_stage: dict[int, str] = {}
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            marker = _enclosing(e, STAGE_RANGE)
            if marker is not None:
                seq_stage[e.sequence_nr] = marker.name.removeprefix(STAGE_RANGE)
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0, "other": 0.0})
    for e in events:
        if e.name.startswith((STAGE_RANGE, "ProfilerStep")):
            continue
        backward = _enclosing(e, "autograd::engine::evaluate_function")
        if backward is not None:
            totals[seq_stage.get(backward.sequence_nr, "backward (unattributed)")]["bwd"] += time_of(e)
            continue
        marker = _enclosing(e, STAGE_RANGE)
        stage = marker.name.removeprefix(STAGE_RANGE) if marker is not None else "unattributed"
        kind = "other" if stage in ("data", "optimizer", "unattributed") else "fwd"
        totals[stage][kind] += time_of(e)
    total = sum(sum(v.values()) for v in totals.values()) or 1.0
    rows = [
        {
            "stage": s,
            "fwd_ms": v["fwd"] / 1e3,
            "bwd_ms": v["bwd"] / 1e3,
            "other_ms": v["other"] / 1e3,
            "total_ms": sum(v.values()) / 1e3,
            "share": sum(v.values()) / total,
        }
        for s, v in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["total_ms"])


def _step_range(stage: str) -> contextlib.AbstractContextManager:
    return stage_range(STEP_STAGES[stage]) if stage in STEP_STAGES else contextlib.nullcontext()


def run_profile(cfg: Config, steps: int, warmup: int, out_dir: Path, top: int = 25, log=print) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    # Eager unless compilation is asked for explicitly: compiled blocks fuse ops across the stage boundaries.
    run = build_bench_run(cfg, cfg.model.impl + ("+compile" if cfg.train.compile == "on" else "+eager"), device)
    batches = device_batches(run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = cfg.train
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    with stage_hooks(run.model), profile(activities=activities, schedule=schedule, acc_events=True) as prof:
        for _ in range(warmup + steps):
            train_step(run, batches, stage=_step_range)
            prof.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    use_device = device.type == "cuda"
    stages = stage_table(prof.events(), use_device)
    sort_key = "self_cuda_time_total" if use_device else "self_cpu_time_total"
    ops = prof.key_averages().table(sort_by=sort_key, row_limit=top)
    stage_text = format_table(stages, ("stage", "fwd_ms", "bwd_ms", "other_ms", "total_ms", "share"))
    header = f"{cfg.model.name} impl={cfg.model.impl} batch={t.batch_size} on {device}, {steps} profiled steps"
    files.write_text(out_dir / "stages.txt", header + "\n" + stage_text + "\n")
    files.write_text(out_dir / "ops.txt", header + "\n" + ops + "\n")
    log(header)
    log(stage_text)
    log(ops)
    return {"trace": trace, "stages": stages, "out_dir": out_dir}
