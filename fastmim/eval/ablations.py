"""Ablations of the time-to-accuracy recipe: ``fastmim bench ablations``, scored on held-out train images only.

    fastmim bench ablations [--config convergence_fmnist_cpu] [--section.key=value ...] [--work DIR]
                            [--holdout 10000] [--only LABEL,...] [--probe-train N] [--test-images N]

Each :data:`VARIANTS` entry is one method (LocalMIM or MAE, built as ``fastmim bench convergence`` builds them from
the recipe and the command's overrides) with the variant's own overrides on top. Each is pre-trained for the whole
``train.steps`` schedule on the train split without its last ``--holdout`` images, then probed (k-NN, cosine,
k = 20, and a linear probe on frozen features) on those held-out images; the random init and raw pixels are probed
once per resolution used. The test split is never read, so a recipe chosen from this table has not seen it.

Everything finished is kept in ``--work``/state.json (a variant's pre-training also resumes from its own
checkpoints); rerunning the same command continues, and a variant rerun with other settings is refused. The record
(``convergence_ablations-<device>-pt<torch>-<date>.json``) goes to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from fastmim.config import dump_toml
from fastmim.errors import FastmimError
from fastmim.eval.convergence import (
    DEFAULT_RECIPE,
    Options,
    _probe,
    build_sets,
    environment,
    method_configs,
    progress,
    same_settings,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation: ``method`` with ``overrides`` (``--section.key=value``) over the recipe, and the schedule
    ``steps_factor`` times as long; ``question`` says what it isolates."""

    label: str
    method: Literal["localmim", "mae"]
    overrides: tuple[str, ...] = ()
    steps_factor: float = 1.0
    question: str = ""


VARIANTS = (
    Variant("localmim", "localmim", question="the recipe"),
    Variant("mae", "mae", question="the recipe, MAE"),
    Variant("localmim-64px", "localmim", ("--model.img_size=64",), question="4 x 4 patch grid, cells 16x16..2x2"),
    Variant("localmim-128px", "localmim", ("--model.img_size=128",), question="8 x 8 patch grid, cells 32x32..4x4"),
    Variant("mae-128px", "mae", ("--model.img_size=128",), question="8 x 8 patch grid, MAE"),
    Variant("localmim-pixel", "localmim", ("--model.target=pixel",), question="LocalMIM decoders, pixel targets"),
    Variant("localmim-mask0.5", "localmim", ("--model.mask_ratio=0.5",), question="mask ratio 0.5"),
    Variant("mae-mask0.5", "mae", ("--model.mask_ratio=0.5",), question="mask ratio 0.5, MAE"),
    Variant("localmim-dec64", "localmim", ("--model.decoder_dim=64",), question="decoder width 64"),
    Variant("localmim-dec256", "localmim", ("--model.decoder_dim=256",), question="decoder width 256"),
    Variant("localmim-blr3e-3", "localmim", ("--train.blr=3e-3",), question="twice the base learning rate"),
    Variant("mae-blr3e-3", "mae", ("--train.blr=3e-3",), question="twice the base learning rate, MAE"),
    Variant("localmim-2x", "localmim", steps_factor=2.0, question="a schedule twice as long"),
    Variant("mae-2x", "mae", steps_factor=2.0, question="a schedule twice as long, MAE"),
)


def select(only: str) -> list[Variant]:
    """The variants named in ``only`` (comma-separated labels, in the table's order; empty = all)."""
    if not only:
        return list(VARIANTS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {v.label for v in VARIANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise FastmimError(f"--only names unknown ablations {', '.join(unknown)}; choose from {', '.join(known)}.")
    return [v for v in VARIANTS if v.label in wanted]


def variant_config(recipe: str, overrides: list[str], work: Path, holdout: int, v: Variant) -> Any:
    """The pre-training config of ``v``: its method's config from the recipe, with the variant's overrides."""
    base = method_configs(recipe, overrides, work / v.label, holdout)[v.method]
    extra = list(v.overrides)
    if v.steps_factor != 1.0:
        extra.append(f"--train.steps={round(base.train.steps * v.steps_factor)}")
    return method_configs(recipe, [*overrides, *extra], work / v.label, holdout)[v.method]


def run_ablations(recipe: str, overrides: list[str], work: Path, opts: Options, only: str = "") -> dict[str, Any]:
    """Every selected variant not yet in ``work``/state.json (module doc); returns the record."""
    from fastmim.bench.harness import git_sha
    from fastmim.eval.backbone import load_backbone
    from fastmim.eval.common import resolve_device, write_json
    from fastmim.train import train

    sha = git_sha()  # the code that runs; the tree may change while the ablations run

    if opts.holdout < 1:
        raise FastmimError("ablations choose hyper-parameters, so they score held-out train images: give --holdout N.")
    chosen = select(only)
    cfgs = {v.label: variant_config(recipe, overrides, work, opts.holdout, v) for v in chosen}
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"variants": {}, "baselines": {}}
    work.mkdir(parents=True, exist_ok=True)
    for label, cfg in cfgs.items():
        done = state["variants"].get(label)
        if done and not same_settings(done["config"], dump_toml(cfg)):
            raise FastmimError(
                f"{work} holds ablation {label} with other settings; rerun with those or another --work."
            )
    sets_by_size: dict[int, Any] = {}
    for v in chosen:
        cfg = cfgs[v.label]
        size, t = cfg.model.resolved_img_size, cfg.train
        device = resolve_device(t.device, "train.device")
        if size not in sets_by_size:
            sets_by_size[size] = build_sets(cfg, opts)
            progress(f"{size} px: {sets_by_size[size].description}")
        sets = sets_by_size[size]
        for name, pretrained in (("random", ""), ("pixels", None)):
            key = f"{name}@{size}"
            if key not in state["baselines"]:
                progress(f"{key}: probing")
                bb = None if pretrained is None else load_backbone("", cfg.model.name, size, t.seed)
                state["baselines"][key] = _probe(sets, bb, size, device, opts, cfg.data.num_workers)
                write_json(state, state_path)
                b = state["baselines"][key]
                progress(f"{key}: k-NN {b['knn']:.2f}%  linear {b['linear']:.2f}%")
        if v.label in state["variants"]:
            continue
        progress(f"{v.label} ({v.question}): pre-training {t.steps} steps")
        start = time.perf_counter()
        summary = train(cfg)
        seconds = time.perf_counter() - start
        if summary["steps"] != t.steps:
            raise FastmimError(
                f"{v.label} stopped at step {summary['steps']} ({summary['stopped_by']}); rerun to go on."
            )
        progress(f"{v.label}: {seconds:.0f} s (loss {summary['final_loss']}); probing")
        row = {
            "label": v.label,
            "method": v.method,
            "question": v.question,
            "overrides": list(v.overrides) + ([f"steps x{v.steps_factor:g}"] if v.steps_factor != 1.0 else []),
            "model": cfg.model.name,
            "img_size": size,
            "steps": t.steps,
            "images": t.steps * t.batch_size * t.accum_steps,
            "pretrain_s": seconds,
            "loss": summary["final_loss"],
            "load_average": list(os.getloadavg()),
            "git_sha": sha,
            "config": dump_toml(cfg),
        }
        row.update(_probe(sets, load_backbone(summary["checkpoint"]), size, device, opts, cfg.data.num_workers))
        state["variants"][v.label] = row
        write_json(state, state_path)
        progress(f"{v.label}: k-NN {row['knn']:.2f}%  linear {row['linear']:.2f}%")
    device = resolve_device(next(iter(cfgs.values())).train.device, "train.device")
    return {
        "bench": "convergence_ablations",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **environment(device, sha),
        "data": {f"{size} px": s.description for size, s in sets_by_size.items()},
        "options": dataclasses.asdict(opts) | {"linprobe": list(opts.linprobe), "only": only},
        "baselines": state["baselines"],
        "variants": [state["variants"][v.label] for v in VARIANTS if v.label in state["variants"]],
    }


def format_table(record: dict[str, Any]) -> str:
    """One line per variant and baseline: top-1 on the held-out images, steps and pre-training seconds."""
    lines = [f"{'variant':18}{'k-NN':>8}{'linear':>8}{'steps':>7}{'pretrain s':>12}  question"]
    for r in record["variants"]:
        lines.append(
            f"{r['label']:18}{r['knn']:8.2f}{r['linear']:8.2f}{r['steps']:7d}{r['pretrain_s']:12.0f}  {r['question']}"
        )
    for key, b in record["baselines"].items():
        lines.append(f"{key:18}{b['knn']:8.2f}{b['linear']:8.2f}{'-':>7}{'-':>12}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmim bench ablations` (the recipe comes with --config and overrides)."""
    parser.add_argument("--work", default="runs/ablations", help="working directory: runs, state.json (resumable)")
    parser.add_argument("--out", help="directory for the JSON record (default benchmarks/results)")
    parser.add_argument(
        "--holdout", type=int, default=10000, help="score on the last N train images, kept out of pre-training"
    )
    labels = ", ".join(v.label for v in VARIANTS)
    parser.add_argument("--only", default="", help=f"comma-separated variants (default all: {labels})")
    parser.add_argument("--probe-train", type=int, default=0, help="probe training images, evenly spaced (0 = all)")
    parser.add_argument("--test-images", type=int, default=0, help="held-out images scored, evenly spaced (0 = all)")
    parser.add_argument(
        "--linprobe", action="append", default=[], help="eval override, e.g. --linprobe=--linprobe.epochs=20"
    )


def main(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> int:
    """`fastmim bench ablations`: run (or continue) the selected variants, write the record, print the table."""
    from fastmim.bench.harness import DEFAULT_RESULTS, result_path
    from fastmim.eval.common import write_json

    opts = Options(probe_train=args.probe_train, test_images=args.test_images, holdout=args.holdout)
    opts = dataclasses.replace(opts, linprobe=tuple(args.linprobe))
    record = run_ablations(args.config or DEFAULT_RECIPE, overrides, Path(args.work), opts, args.only)
    record["command"] = " ".join(argv)
    out = Path(args.out) if args.out else DEFAULT_RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, "convergence_ablations", record["machine"]["device"], datetime.datetime.now(datetime.UTC))
    write_json(record, path)
    print(format_table(record))
    print(f"wrote {path}")
    return 0
