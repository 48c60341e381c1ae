"""benchmarks/gpu_suite.sh checked without a GPU: GPU time comes in short leases, so the script itself must not be
what fails there. GPU_SUITE_SMOKE=1 runs every stage at CPU sizes, through the same steps and commands (fastmim
imported through benchmarks/srcpath, the install path that needs no build)."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def _env(**env: str) -> dict[str, str]:
    env = {**os.environ, "GPU_SUITE_SMOKE": "1", "PYTHON": sys.executable, **env}
    env.pop("TRITON_INTERPRET", None)  # the suite sets it to 0 itself; the kernels' torch paths run on a CPU
    return env


def _suite(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    cmd = ["bash", str(SCRIPT), str(out)]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


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
    # the budget is the GPU's; a CPU at smoke sizes only checks that every step runs
    proc = _suite(tmp_path, timeout=1800, GPU_SUITE_BUDGET="3000")
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
    (vit_b,) = [r for r in records["step"] if [row["impl"] for row in r["rows"]][-1] == "fast+compile"]
    assert [(r["impl"], r["status"], r["compile"]) for r in vit_b["rows"]] == [
        ("reference+eager", "ok", False),
        ("fast+eager", "ok", False),
        ("fast+compile", "ok", True),  # inductor on the CPU: the smoke run's one compile
    ]
    # stage 1: every kernel benchmark without compile providers; stage 2: again with them (their references here)
    assert {b: len(records[b]) for b in ("hog", "heads_loss", "gather", "decoders", "attention")} == {
        "hog": 2,
        "heads_loss": 2,
        "gather": 2,
        "decoders": 2,
        "attention": 1,
    }
    assert "data" in records
    summary = (tmp_path / "summary.md").read_text()
    assert "| localmim_swin_nano_patch4_window4 | fast+eager |" in summary and "| decoders | grouped |" in summary
    log = (tmp_path / "suite.log").read_text()
    for stage in (1, 2, 3):
        assert f"stage {stage} done" in log
    assert "FAILED" not in log and "SKIPPED" not in log and "install: srcpath" in log
    assert "skipped" in (tmp_path / "pytest-gpu.log").read_text()  # the gpu-marked tests ran (and skip on a CPU)


def test_a_step_that_no_longer_fits_the_budget_is_skipped_and_the_stage_still_reports(tmp_path):
    proc = _suite(tmp_path, timeout=300, GPU_SUITE_BUDGET="30", GPU_SUITE_STAGES="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (tmp_path / "suite.log").read_text()
    assert "SKIPPED (out of time): bench step localmim ViT-B" in log and "SKIPPED (out of time): bench_attention" in log
    assert "stage 1 done: 0 records so far" in log and "stage 2" not in log
    assert (tmp_path / "summary.md").read_text().strip() == "no benchmark records found"
    assert tarfile.is_tarfile(tmp_path / "gpu_suite.tar.gz")


def test_a_stage_1_failure_stops_the_suite_and_old_setuptools_takes_the_no_build_install(tmp_path):
    """The stages after a failed stage 1 would spend the lease on a broken build: the suite stops. And with a
    setuptools older than 68 (an editable install would fail with "invalid command 'bdist_wheel'"), the install
    goes through benchmarks/srcpath instead of pip."""
    old_setuptools = tmp_path / "old" / "setuptools"
    old_setuptools.mkdir(parents=True)
    (old_setuptools / "__init__.py").write_text('__version__ = "65.5.0"\n')
    # a python that fails every benchmark: stage 1 cannot succeed
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *"bench step"*|*benchmarks/bench_*) exit 3;; esac\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    out = tmp_path / "out"
    proc = _suite(
        out,
        timeout=300,
        PYTHON=str(python),
        GPU_SUITE_INSTALL="auto",
        GPU_SUITE_STAGES="1,2",
        PYTHONPATH=str(old_setuptools.parent),
    )
    assert proc.returncode == 1
    log = (out / "suite.log").read_text()
    assert "setuptools 65.5.0 (an editable install needs >= 68" in log and "install: srcpath" in log
    assert "FAILED: bench step localmim ViT-B (status 3)" in log and "stage 1 failed: stopping here" in log
    assert "bench_hog (torch.compile providers)" not in log and "stage 2" not in log


def test_srcpath_imports_this_tree_in_a_fresh_environment_without_any_install(tmp_path):
    """benchmarks/srcpath (the install that needs no build) maps fastmim, fastmim.kernels -> kernels/ and
    fastmim.recipes -> configs/ in an interpreter that has no fastmim installed, from any working directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    code = (
        "import importlib.util, fastmim, fastmim.recipes\n"
        "from fastmim.config import list_recipes\n"
        "print(fastmim.__file__, importlib.util.find_spec('fastmim.kernels').origin, fastmim.recipes.__file__)\n"
        "assert 'vit_base_100' in list_recipes()\n"
    )
    python = tmp_path / "venv" / "bin" / "python"
    env = {"PATH": os.environ["PATH"]}
    bare = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and "No module named 'fastmim'" in bare.stderr  # nothing installed there
    env["PYTHONPATH"] = str(ROOT / "benchmarks" / "srcpath")
    proc = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(ROOT / d / "__init__.py") for d in ("fastmim", "kernels", "configs")]


def test_a_run_killed_mid_stage_still_returns_every_finished_record(tmp_path):
    """SIGTERM while bench step compiles its last variant: the suite stops the step and returns the tarball and
    summary with every row finished before (the eager variants, written as they finished) and the cut one named,
    also when whoever read its output is gone (its stdout a closed pipe)."""
    work, out = tmp_path / "work", tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(out)],
        env=_env(GPU_SUITE_STAGES="1", GPU_SUITE_WORK=str(work), GPU_SUITE_BUDGET="3000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, compiling = time.monotonic() + 1500, False  # tens of seconds on an idle CPU
        while time.monotonic() < deadline and proc.poll() is None and not compiling:
            rows = [r for f in work.glob("step-*.json") for r in json.loads(f.read_text())["rows"]]
            compiling = any(r["impl"] == "fast+compile" and r["status"] == "compiling" for r in rows)
            time.sleep(0.5)
        assert compiling and proc.poll() is None, "the suite never reached its compile variant"
        proc.stdout.close()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and time.monotonic() - sent < 30
    (record,) = _records(out)["step"]
    assert [(r["impl"], r["status"]) for r in record["rows"]] == [
        ("reference+eager", "ok"),
        ("fast+eager", "ok"),
        ("fast+compile", "compiling"),
    ]
    assert all(r["img_per_s"] > 0 for r in record["rows"][:2])
    summary = (out / "summary.md").read_text()
    assert "| localmim_vit_tiny_patch16 | fast+eager | 2 |" in summary and "| fast+compile | **compiling** |" in summary
    log = (out / "suite.log").read_text()
    assert "interrupted by SIGTERM" in log and "bench_hog" not in log and "done in" in log
    assert not list(out.glob(".*"))  # no temporary left behind
