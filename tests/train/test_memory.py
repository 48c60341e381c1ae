"""A step that cannot fit in memory is refused before anything is allocated (fastmim.train.memory): the lower bound
counts what it says, stays below what a real step uses, and a run beyond the machine ends in one line."""

import json
import resource
import subprocess
import sys

import pytest

from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.train import memory, train

TINY = ["--model.decoder_dim=16", "--train.steps=1", "--train.log_every=1", "--train.warmup_steps=0"]


def test_the_bound_counts_images_linear_inputs_and_weights():
    cfg = load_config(None, ["--model.img_size=128", "--train.batch_size=8"])  # ViT-Ti/16: width 192, 12 blocks
    need = memory.step_bytes_lower_bound(cfg)
    visible = 64 // 4  # 8 x 8 patches, a quarter visible
    assert need["images"] == 4 * 8 * 3 * 128 * 128
    assert need["activations"] == 4 * 8 * visible * 12 * (192 + 192 + 192 + 4 * 192)  # qkv, proj, fc1, fc2 inputs
    assert need["total"] == need["images"] + need["activations"] + need["weights"] and need["weights"] > 0
    # Swin: only the first stage has the patch embedding's width (32 for the nano model: 2 blocks)
    swin = load_config(None, ["--model.name=localmim_swin_nano_patch4_window4", "--model.img_size=128"])
    tokens = (128 // 4) ** 2 // 4
    assert memory.step_bytes_lower_bound(swin)["activations"] == 4 * 32 * tokens * 2 * 7 * 32


def test_the_bound_is_below_a_real_steps_peak(tmp_path):
    """In a process of its own: the growth of the resident set's peak over one training step at 384 px (mostly
    activations) is at least the bound; a bound above it would refuse runs that fit."""
    script = f"""
import json, sys
from pathlib import Path
from fastmim.config import load_config
from fastmim.train import memory, train
def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
cfg = load_config(None, {TINY + ["--model.img_size=384", "--train.batch_size=16", f"--train.out_dir={tmp_path}"]!r})
need = memory.step_bytes_lower_bound(cfg)
base = kib("VmRSS:")
train(cfg)
print(json.dumps({{"need": need, "grown": (kib("VmHWM:") - base) * 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    need = result["need"]
    assert need["activations"] > need["weights"]  # the step's own memory dominates what is compared
    assert result["grown"] >= need["total"], result


def test_a_run_that_cannot_fit_is_refused_before_it_writes(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, f"--train.out_dir={tmp_path / 'run'}"])
    total = memory.step_bytes_lower_bound(cfg)["total"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: total - 1)
    with pytest.raises(FastmimError, match=r"one training step needs at least .* GiB available; lower train.batch"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: total)
    assert train(cfg)["steps_this_run"] == 1


def _limit_data_segment() -> None:
    limit = 8 * 2**30  # the run may map at most 8 GiB: an allocation beyond it fails instead of meeting the OOM killer
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def test_a_size_far_beyond_the_machine_ends_in_one_line(tmp_path):
    """model.img_size=65536 (9,600 GiB for one step of the built-in recipe): before, allocations went through
    Linux's overcommit until the OOM killer ended the run with SIGKILL and no message. Now the run stops with one
    line before allocating (under an 8 GiB data limit, an allocation would have said "out of memory" instead)."""
    argv = [sys.executable, "-m", "fastmim", "pretrain", "--model.img_size=65536", f"--train.out_dir={tmp_path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, preexec_fn=_limit_data_segment)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "one training step needs at least 9,600.1 GiB (model.img_size=65536, train.batch_size=32" in errors[0]
