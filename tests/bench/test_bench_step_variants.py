"""`fastmim bench step --impls` variants: IMPL+compile / IMPL+eager, compile time in the row, baseline choice."""

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
