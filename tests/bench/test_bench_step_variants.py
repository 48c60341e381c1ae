"""`fastmim bench step --impls` variants: IMPL+compile / IMPL+eager, compile time in the row, baseline choice."""

import json

import pytest

from fastmim.bench.step import parse_variant
from fastmim.cli import main
from fastmim.errors import FastmimError

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
    args = ["--impls", "reference+compile,reference+eager", "--steps", "2", "--warmup", "0", "--breakdown-steps",
            "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(["bench", "step", *TINY, *args]) == 0
    (path,) = tmp_path.glob("step-cpu-*.json")
    compiled, eager = json.loads(path.read_text())["rows"]
    assert compiled["compile"] is True and compiled["compile_s"] > 0
    assert eager["compile"] is False and eager["compile_s"] is None
    assert compiled["compile_mode"] is None and eager["attn"].startswith("auto: -> sdpa")
    assert eager["speedup_vs_reference"] == 1.0
    assert compiled["speedup_vs_reference"] == pytest.approx(compiled["img_per_s"] / eager["img_per_s"])
