"""`fastmim bench step`, `bench data` and `profile` run on CPU with the tiny recipe and write what they promise."""

import json
import sys
from pathlib import Path

import torch

from fastmim.cli import main

TINY = ["--model.img_size=32", "--model.decoder_dim=32", "--data.num_images=16", "--train.batch_size=4"]


def _record(out: Path, bench: str) -> dict:
    (path,) = out.glob(f"{bench}-cpu-*.json")
    return json.loads(path.read_text())


def test_bench_step_rows_side_by_side(tmp_path, capsys):
    # the fast impl's Triton kernels run through the interpreter here: keep the step count minimal
    args = ["--steps", "2", "--warmup", "0", "--breakdown-steps", "1", "--out", str(tmp_path), "--plot"]
    assert main(["bench", "step", *TINY, *args]) == 0
    record = _record(tmp_path, "step")
    assert record["bench"] == "step" and record["gpu"] == "cpu" and "[model]" in record["config"]
    impls = [r["impl"] for r in record["rows"]]
    assert impls == ["reference", "fast"]
    for row in record["rows"]:
        for key in (
            "model",
            "batch",
            "dtype",
            "img_per_s",
            "ms_per_step",
            "mfu",
            "peak_mem_gib",
            "data_ms",
            "forward_ms",
            "backward_ms",
            "optimizer_ms",
            "flops_per_step",
        ):
            assert key in row
        assert row["batch"] == 4 and row["dtype"] == "fp32" and row["img_per_s"] > 0 and row["flops_per_step"] > 0
        assert row["mfu"] is None  # no peak is claimed for a CPU
    assert record["rows"][0]["speedup_vs_reference"] == 1.0
    # the FLOP count is a property of the model and batch, identical for both impls
    assert record["rows"][0]["flops_per_step"] == record["rows"][1]["flops_per_step"]
    assert (tmp_path / next(tmp_path.glob("step-*.json")).name.replace(".json", ".png")).exists()
    assert "speedup_vs_reference" in capsys.readouterr().out


def test_bench_step_swin_reference_and_fast(monkeypatch):
    """LocalMIM-Swin through bench step's runner (issue #10): both impls side by side, the fast one through the HOG
    and fused-loss kernels. They are interpreted here, so one round of one timed step and one breakdown step, at
    64 px, batch 2, without the HOG bias (the command adds only the table and the record, tested above)."""
    from fastmim.bench.profile import stage_of
    from fastmim.bench.step import run_step_bench
    from fastmim.config import load_config
    from fastmim.kernels import hog as hk
    from fastmim.kernels import recon_loss as rl

    calls = []
    for module, fn in ((hk, "hog_fwd"), (rl, "recon_loss_fwd")):
        original = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _f=original, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    cfg = load_config(
        None,
        [
            "--model.name=localmim_swin_nano_patch4_window4",
            "--model.img_size=64",
            "--model.hog_bias=off",
            "--data.num_images=4",
            "--train.batch_size=2",
            "--train.precision=fp32",
        ],
    )
    rows, _ = run_step_bench(
        cfg, ["reference", "fast"], steps=1, warmup=0, breakdown_steps=1, rounds=1, log=lambda *_: None
    )
    assert [(r["impl"], r["model"]) for r in rows] == [
        ("reference", "localmim_swin_nano_patch4_window4"),
        ("fast", "localmim_swin_nano_patch4_window4"),
    ]
    for row in rows:
        assert row["batch"] == 2 and row["img_size"] == 64 and row["img_per_s"] > 0 and row["steps"] == 1
        assert all(row[f"{s}_ms"] > 0 for s in ("data", "forward", "backward", "optimizer"))
    assert rows[0]["flops_per_step"] == rows[1]["flops_per_step"] > 0
    # the fast impl's two steps (timed + breakdown) ran both kernels; the reference impl never does
    assert calls.count("hog_fwd") == calls.count("recon_loss_fwd") == 2
    assert stage_of("encoder.layers.2.blocks.0") == "encoder blocks"  # `fastmim profile` attributes Swin stages


def test_bench_data(tmp_path):
    assert main(["bench", "data", *TINY, "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    rows = _record(tmp_path, "data")["rows"]
    assert [r["source"] for r in rows] == ["demo", "synthetic"]
    assert all(r["img_per_s"] > 0 and r["img_per_s_per_worker"] == r["img_per_s"] for r in rows)
    assert all(r["pixel_diff_max"] == 0 for r in rows)  # the default placement is the reference itself


def test_profile_trace_and_stage_table(tmp_path, capsys):
    assert main(["profile", *TINY, "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    trace = json.loads((run_dir / "trace.json").read_text())
    assert trace["traceEvents"]
    stages = (run_dir / "stages.txt").read_text()
    for stage in ("patch embed", "encoder blocks", "decoders", "heads", "targets", "optimizer", "data"):
        assert stage in stages
    assert "aten::" in (run_dir / "ops.txt").read_text()


def test_wrong_provider_fails_the_kernel_command(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_hog

    original = bench_hog.make_bench

    def broken(device, quick):
        bench = original(device, quick)
        bench.providers["compile"] = lambda img: [t + 1 for t in bench.providers["eager"](img)]
        return bench

    monkeypatch.setattr(bench_hog, "make_bench", broken)
    code = bench_hog.kernel_main(
        bench_hog.make_bench, ["--quick", "--providers", "eager,compile", "--out", str(tmp_path)]
    )
    rows = _record(tmp_path, "hog")["rows"]
    assert code == 1 and [r.get("ok") for r in rows] == [True, False]


def test_summary_tables(tmp_path):
    from fastmim.bench.harness import write_record
    from fastmim.bench.summary import summarize

    step = {
        "impl": "fast",
        "model": "m",
        "batch": 8,
        "dtype": "bf16",
        "img_per_s": 1234.4,
        "ms_per_step": 6.48,
        "speedup_vs_reference": 2.5,
        "mfu": 0.41,
        "peak_mem_gib": 3.21,
    }
    kernel = {
        "provider": "triton",
        "mode": "fwd",
        "shape": {"B": 2},
        "dtype": "float32",
        "ms_p50": 0.1234,
        "gbps": 2500.0,
        "speedup": 51.0,
    }
    compiled = {
        **step,
        "impl": "fast+compile:reduce-overhead",
        "compile_mode": "reduce-overhead",
        "compile_s": 41.7,
        "attn": "auto: B8 x 12 heads x 50 tokens x 64: flash 0.1 ms (sdpa 0.2)",
    }
    data = {
        "source": "ffcv",
        "storage": "raw",
        "decode": "cpu",
        "augment": "gpu",
        "cpu_s_per_1k_img": 0.1234,
        "img_per_s_per_core": 8103.7,
        "cores_per_8gpu_node": 12.83,
        "bytes_per_image": 704536.0,
        "pixel_diff_mean": 0.049,
        "pixel_diff_max": 13.0,
        "augment_device": "cpu (not timed)",
    }
    write_record("step", [step, compiled], torch.device("cpu"), tmp_path)
    write_record("hog", [kernel], torch.device("cpu"), tmp_path)
    write_record("data", [data, {"source": "demo"}], torch.device("cpu"), tmp_path)  # the second: an older record
    (tmp_path / "convergence-x.json").write_text('{"bench": "convergence-digits", "pretrain": {}}')  # no rows
    text = summarize([tmp_path])
    assert "| m | fast | 8 | bf16 | 1234 | 6.48 | 2.50 | 41.0% | 3.2 | - | cpu |" in text
    assert "| m | fast+compile:reduce-overhead | 8 | bf16 | 1234 | 6.48 | 2.50 | 41.0% | 3.2 | 42 |" in text
    assert "- attention, m on cpu: auto: B8 x 12 heads x 50 tokens x 64: flash 0.1 ms (sdpa 0.2)" in text
    assert "| hog | triton | fwd | B=2 | float32 | 0.123 | 2500 | 51.00 | cpu |" in text
    assert "| ffcv | raw | cpu | gpu | 0.123 | 8104 | 13 | 704,536 | 0.05 / 13 | cpu (not timed) |" in text
    assert "| demo |" not in text
