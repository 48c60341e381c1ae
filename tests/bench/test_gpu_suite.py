"""benchmarks/gpu_suite.sh checked without a GPU: GPU time comes in short leases, so the script itself must not be
what fails there. GPU_SUITE_SMOKE=1 runs every stage at CPU sizes, through the same steps and commands."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.sh"


def _suite(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_SUITE_SMOKE": "1", "PYTHON": sys.executable, **env}
    env.pop("TRITON_INTERPRET", None)  # the suite sets it to 0 itself; the kernels' torch paths run on a CPU
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=timeout)


def _records(out: Path) -> dict[str, list[dict]]:
    with tarfile.open(out / "gpu_suite.tar.gz") as tar:
        files = [m for m in tar.getmembers() if m.name.endswith(".json")]
        loaded = [json.load(tar.extractfile(m)) for m in files]
    by_bench: dict[str, list[dict]] = {}
    for record in loaded:
        by_bench.setdefault(record["bench"], []).append(record)
    return by_bench


@pytest.mark.slow
def test_every_stage_runs_and_leaves_its_records(tmp_path):
    proc = _suite(tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    records = _records(tmp_path)
    # stage 1 and 3: bench step for ViT-B, MAE, Swin-B, ViT-L (the smoke run's tiny stand-ins)
    models = sorted(r["rows"][0]["model"] for r in records["step"])
    assert models == [
        "localmim_swin_nano_patch4_window4",
        "localmim_vit_tiny_patch16",
        "localmim_vit_tiny_patch16",
        "mae_vit_tiny_patch16",
    ]
    # stage 2: every kernel benchmark; stage 3: the data loader
    assert {"hog", "heads_loss", "gather", "decoders", "attention", "data"} <= set(records)
    summary = (tmp_path / "summary.md").read_text()
    assert "| localmim_swin_nano_patch4_window4 | fast+eager |" in summary and "| decoders | grouped |" in summary
    log = (tmp_path / "suite.log").read_text()
    for stage in (1, 2, 3):
        assert f"stage {stage} done" in log
    assert "FAILED" not in log and "SKIPPED" not in log
    assert "skipped" in (tmp_path / "pytest-gpu.log").read_text()  # the gpu-marked tests ran (and skip on a CPU)


def test_a_step_that_no_longer_fits_the_budget_is_skipped_and_the_stage_still_reports(tmp_path):
    proc = _suite(tmp_path, timeout=120, GPU_SUITE_BUDGET="30", GPU_SUITE_STAGES="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (tmp_path / "suite.log").read_text()
    assert "SKIPPED (out of time): pytest -m gpu: kernels and no-sync" in log
    assert "stage 1 done: 0 records so far" in log and "stage 2" not in log
    assert (tmp_path / "summary.md").read_text().strip() == "no benchmark records found"
    assert tarfile.is_tarfile(tmp_path / "gpu_suite.tar.gz")
