"""`fastmim bench step --impls` variants: IMPL+compile / IMPL+eager, compile time in the row, baseline choice."""

import copy
import itertools
import json

import pytest
import torch

from fastmim.bench.step import build_bench_run, parse_variant, stage_breakdown
from fastmim.cli import main
from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.train.build import build_run

TINY = ["--model.img_size=32", "--model.decoder_dim=32", "--data.num_images=16", "--train.batch_size=4"]


def test_variant_names():
    assert parse_variant("fast") == ("fast", None, None)
    assert parse_variant("fast+compile") == ("fast", True, None)
    assert parse_variant("reference+eager") == ("reference", False, None)
    assert parse_variant("fast+compile:reduce-overhead") == ("fast", True, "reduce-overhead")
    assert parse_variant("fast+compile:max-autotune-no-cudagraphs")[2] == "max-autotune-no-cudagraphs"
    for bad in ("fastest", "fast+jit", "reference+", "fast+eager:max-autotune", "fast+compile:fastest", "fast:x"):
        with pytest.raises(FastmimError, match="IMPL\\+compile"):
            parse_variant(bad)


def test_compiled_and_eager_reference_side_by_side(tmp_path):
    """The compiled variant reports its compile time; the speedup baseline is the eager reference."""
    args = [
        "--impls",
        "reference+compile,reference+eager",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--breakdown-steps",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(["bench", "step", *TINY, *args]) == 0
    (path,) = tmp_path.glob("step-cpu-*.json")
    compiled, eager = json.loads(path.read_text())["rows"]
    assert compiled["compile"] is True and compiled["compile_s"] > 0
    assert eager["compile"] is False and eager["compile_s"] is None
    assert compiled["compile_mode"] is None and eager["attn"].startswith("auto: -> sdpa")
    assert eager["speedup_vs_reference"] == 1.0
    assert compiled["speedup_vs_reference"] == pytest.approx(compiled["img_per_s"] / eager["img_per_s"])


def test_the_benchmark_runs_the_trainers_run_and_step(tmp_path):
    """The benchmarked run is the one the trainer builds (same weights, schedule, peak lr, optimizer), and the
    stage breakdown times the trainer's step itself, every micro-batch included."""
    steps = ["--train.accum_steps=2", "--train.steps=6", "--train.warmup_steps=2"]
    cfg = load_config(None, [*TINY, *steps, f"--train.out_dir={tmp_path / 'run'}"])
    bench, trained = build_bench_run(cfg, "reference+eager", torch.device("cpu")), build_run(cfg)
    weights = zip(bench.model.state_dict().values(), trained.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)
    schedule = (bench.total_steps, bench.warmup_steps, bench.peak_lr)
    assert schedule == (trained.total_steps, trained.warmup_steps, trained.peak_lr) == (6, 2, cfg.train.blr * 8 / 256)
    assert bench.optimizer.defaults == trained.optimizer.defaults
    images, taken = next(bench.loader.iterate(0))[0], []
    row = stage_breakdown(bench, (taken.append(1) or images for _ in itertools.count()), steps=3)
    assert len(taken) == 6 and bench.pos.step == 3  # 3 steps of 2 micro-batches each
    assert set(row) == {"data_ms", "forward_ms", "backward_ms", "optimizer_ms"} and all(v > 0 for v in row.values())


def _tiny_cfg():
    return load_config(None, [*TINY, "--data.source=synthetic", "--data.num_workers=0"])


def _recorded_builds(monkeypatch) -> list[tuple[str, object]]:
    """Every run bench step builds, as (variant, run)."""
    from fastmim.bench import step

    builds, real_build = [], step.build_bench_run

    def build(cfg, impl, device):
        builds.append((impl, real_build(cfg, impl, device)))
        return builds[-1][1]

    monkeypatch.setattr(step, "build_bench_run", build)
    return builds


def test_rows_are_written_as_each_variant_finishes_and_a_failed_compile_keeps_them(monkeypatch):
    """The eager variants are finished and published before anything compiles; a compile that crashes is its own
    row's error, the others go on; no fourth model is built for the FLOPs when a reference variant is there."""
    from fastmim.bench import step

    builds = _recorded_builds(monkeypatch)

    def crash(*args, **kwargs):
        raise RuntimeError("inductor crashed\nsecond line")

    monkeypatch.setattr(step, "timed_first_call", crash)
    published = []
    impls = ["reference+eager", "fast+compile", "fast+eager"]
    rows, _ = step.run_step_bench(
        _tiny_cfg(),
        impls,
        steps=1,
        warmup=0,
        breakdown_steps=1,
        rounds=1,
        log=lambda *_: None,
        on_rows=lambda rows: published.append(copy.deepcopy(rows)),
    )
    assert [b[0] for b in builds] == [
        "reference+eager",
        "fast+eager",
        "fast+compile",
    ]  # eager phase first; no extra reference
    compiling = next(p for p in published if p[1]["status"] == "compiling")
    assert [r["status"] for r in compiling] == ["ok", "compiling", "ok"] and compiling[0]["img_per_s"] > 0
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and published[-1] == rows
    assert rows[1]["error"] == "RuntimeError: inductor crashed" and "img_per_s" not in rows[1]
    assert rows[0]["speedup_vs_reference"] == 1.0 and rows[2]["flops_per_step"] == rows[0]["flops_per_step"] > 0


def test_flops_come_from_a_temporary_reference_only_when_no_variant_is_one(monkeypatch):
    from fastmim.bench import step

    builds = _recorded_builds(monkeypatch)
    rows, _ = step.run_step_bench(_tiny_cfg(), ["fast+eager"], 1, 0, 1, rounds=1, log=lambda *_: None)
    assert [b[0] for b in builds] == ["fast+eager", "reference+eager"] and rows[0]["flops_per_step"] > 0


def test_attention_is_chosen_once_and_every_variant_runs_the_same_backends(monkeypatch):
    """model.attn = "auto" measures on the first variant only; the others get its backend module by module (here a
    stand-in choice, "math", which CPU SDPA runs; without sharing they would measure again)."""
    from fastmim.bench import step
    from fastmim.models.vit import Attention
    from fastmim.train import build

    choices = []

    def choose(model, *args, **kwargs):
        choices.append(model)
        for m in model.modules():
            if isinstance(m, Attention):
                m.backend = "math"
        return [{"shape": None, "choice": "math", "ms": {}}]

    monkeypatch.setattr(build, "choose_attention", choose)
    runs = []
    real_build = step.build_bench_run
    monkeypatch.setattr(
        step, "build_bench_run", lambda cfg, impl, device: runs.append(real_build(cfg, impl, device)) or runs[-1]
    )
    rows, _ = step.run_step_bench(
        _tiny_cfg(), ["reference+eager", "fast+eager"], 1, 0, 1, rounds=1, log=lambda *_: None
    )
    assert len(choices) == 1
    backends = [{n: m.backend for n, m in r.model.named_modules() if isinstance(m, Attention)} for r in runs]
    assert backends[0] == backends[1] and set(backends[1].values()) == {"math"} and len(backends[1]) > 4
    assert rows[0]["attn"] == rows[1]["attn"] == "auto: -> math (CPU: nothing to measure)"
