"""CPU convergence check: does a few minutes of LocalMIM pre-training beat a random encoder under a linear probe?

    python -m fastmim.eval.convergence [--steps 600] [--work runs/convergence] [--json FILE] [-- PRETRAIN OVERRIDES]
    e.g. OMP_NUM_THREADS=1 python -m fastmim.eval.convergence --steps 600 -- --train.lr=1e-3

1. Writes scikit-learn's bundled 8 x 8 digits (no download) as a 64 px ImageFolder tree (train split only: the
   val images are never seen in pre-training).
2. Pre-trains the tiny recipe (``tiny_cpu``: ViT-Ti/16 at 64 px, HOG targets) on it for ``--steps`` steps.
3. Linear-probes (``eval_tiny_cpu``: BatchNorm + linear, SGD, features extracted once) the pre-trained encoder and
   the same model freshly initialised with the same seed, with average-pooled and cls features.
4. Prints a table and writes a JSON record (machine, versions, git commit, command, accuracies, timings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastmim.config import load_config
from fastmim.errors import FastmimError
from fastmim.eval.backbone import load_backbone
from fastmim.eval.config import load_eval_config
from fastmim.eval.data import DigitsSource
from fastmim.eval.linprobe import probe_backbone
from fastmim.train.metrics import MetricsLog


def write_digits_tree(root: Path, size: int) -> int:
    """The digits train split as ``root/<digit>/<index>.png`` (RGB, ``size`` px); returns the image count."""
    source = DigitsSource("train", size)
    for c in source.classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(len(source)):
        image, label = source.load(i)
        image.save(root / source.classes[label] / f"{i:04d}.png")
    return len(source)


def _git_commit() -> str:
    """HEAD of the checkout this module runs from, with "+dirty" when its tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=here,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_check(work: Path, steps: int, pretrain_overrides: list[str], probe_overrides: list[str]) -> dict[str, Any]:
    """Pre-train, then probe the pre-trained and the random encoder; returns the record written as JSON."""
    if work.exists() and any(work.iterdir()):
        raise FastmimError(f"{work} is not empty; choose another --work directory (nothing is overwritten).")
    commit = _git_commit()  # the code that runs, not whatever HEAD is when the run ends
    data = work / "digits_train"
    num_images = write_digits_tree(data, 64)
    overrides = [
        "--data.source=folder",
        f"--data.path={data}",
        f"--train.steps={steps}",
        f"--train.warmup_steps={max(1, steps // 10)}",
        f"--train.out_dir={work / 'pretrain'}",
        "--train.log_every=50",
        *pretrain_overrides,
    ]
    cfg = load_config("tiny_cpu", overrides)
    from fastmim.train import train

    start = time.perf_counter()
    summary = train(cfg)
    pretrain_s = time.perf_counter() - start
    probes: dict[str, Any] = {}
    for init in ("pretrained", "random"):
        for pool in ("avg", "cls"):
            ecfg = load_eval_config(
                "eval_tiny_cpu",
                [
                    f"--model.name={cfg.model.name}",
                    f"--linprobe.pool={pool}",
                    f"--model.img_size={cfg.model.resolved_img_size}",
                    f"--linprobe.out_dir={work / f'probe_{init}_{pool}'}",
                    *probe_overrides,
                ],
            )
            pretrained = summary["checkpoint"] if init == "pretrained" else ""
            backbone = load_backbone(pretrained, cfg.model.name, cfg.model.img_size, cfg.train.seed)
            out_dir = Path(ecfg.linprobe.out_dir)
            out_dir.mkdir(parents=True)
            log = MetricsLog(out_dir, None)
            try:
                result = probe_backbone(ecfg, backbone, log)
            finally:
                log.close()
            probes[f"{init}_{pool}"] = {k: v for k, v in result.items() if k != "rows"}
            print(f"linear probe, {init} encoder, {pool} features: top-1 {result['acc1']:.2f}%", flush=True)
    return {
        "bench": "convergence-digits",
        "command": "python -m fastmim.eval.convergence " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "git_commit": commit,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": _version("timm"),
            "scikit-learn": _version("sklearn"),
        },
        "data": {
            "name": "scikit-learn load_digits, 8x8 upsampled to 64 px",
            "pretrain_images": num_images,
            "probe_train": probes["random_avg"]["num_train"],
            "probe_val": probes["random_avg"]["num_val"],
        },
        "pretrain": {
            "recipe": "tiny_cpu",
            "model": cfg.model.name,
            "steps": summary["steps"],
            "batch_size": cfg.train.batch_size,
            "final_loss": summary["final_loss"],
            "seconds": pretrain_s,
            "overrides": pretrain_overrides,
        },
        "probe": {"recipe": "eval_tiny_cpu", "overrides": probe_overrides, "results": probes},
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmim.eval.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="pre-training steps (default 600)")
    parser.add_argument("--work", default="runs/convergence", help="working directory (must be new or empty)")
    parser.add_argument("--json", help="also write the record here (e.g. benchmarks/results/...json)")
    parser.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="eval override for the probes, e.g. --probe=--linprobe.epochs=100 (repeatable)",
    )
    args, pretrain_overrides = parser.parse_known_args(argv)
    try:
        record = run_check(Path(args.work), args.steps, [a for a in pretrain_overrides if a != "--"], args.probe)
    except FastmimError as e:
        print(f"fastmim: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(record, indent=2) + "\n"
    (Path(args.work) / "convergence.json").write_text(text)
    if args.json:
        if Path(args.json).exists():
            print(f"fastmim: error: {args.json} already exists; choose another --json.", file=sys.stderr)
            return 2
        Path(args.json).write_text(text)
    r = record["probe"]["results"]
    print(f"pre-trained {record['pretrain']['steps']} steps in {record['pretrain']['seconds']:.0f} s")
    for pool in ("avg", "cls"):
        print(
            f"  {pool} features: pre-trained {r[f'pretrained_{pool}']['acc1']:.2f}%  "
            f"random init {r[f'random_{pool}']['acc1']:.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
