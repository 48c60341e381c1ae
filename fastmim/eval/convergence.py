"""Time to accuracy: ``fastmim bench convergence`` pre-trains LocalMIM (HOG) and MAE (pixels) and probes both.

    fastmim bench convergence [--config convergence_fmnist_cpu] [--section.key=value ...] [--work DIR]
                              [--points 5] [--probe-train N] [--test-images N] [--finetune-steps N] [--holdout N]

1. Both methods get the recipe's encoder, resolution, batch, optimizer, seed and schedule (``train.steps``); only
   the model name differs (``localmim_vit_X_patch16`` -> ``mae_vit_X_patch16``; model.decoder_dim applies to both,
   0 = each method's own default). Pre-training runs in ``--points`` interleaved segments (LocalMIM segment 1, MAE
   segment 1, LocalMIM segment 2, ...), each a resumed run of the whole schedule that stops at its point, so that
   machine noise hits both methods alike. Pre-training seconds are the wall time of the segments (start-up and
   checkpoint saves included), per method; evaluation time is measured apart.
2. After each segment: a k-NN probe (cosine, k = 20) and a linear probe on frozen features
   (:mod:`fastmim.eval.probes`). Before the first: the random init (the same architecture, same seed) and raw pixels
   under both probes.
3. At the end: each final encoder and the random init fine-tuned for the same budget.
4. Everything done so far is kept in ``--work``/state.json after each phase; rerunning the same command with the same
   ``--work`` continues where it stopped (a finished phase is not redone). A record (JSON, with a ``summary``) and a
   PNG of top-1 against pre-training seconds are written to ``--out`` (default benchmarks/results).

Data (``data.source``): ``fashion_mnist`` (probes fit on train images, scored on the 10,000 test images; with
``--holdout N`` pre-training leaves the last N train images out and the probes are scored on those instead: the
mode for choosing hyper-parameters) or ``folder`` (``data.path`` = ROOT/train of an ImageNet-style tree; probes are
scored on ROOT/val).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastmim import files
from fastmim.config import Config, dump_toml, load_config
from fastmim.errors import FastmimError

if TYPE_CHECKING:  # torch, timm and the probes load when the bench runs, not with the command line
    import torch

    from fastmim.eval.probes import ProbeSets

DEFAULT_RECIPE = "convergence_fmnist_cpu"
METHODS = ("localmim", "mae")
PROBES = ("knn", "linear", "finetune")


@dataclasses.dataclass
class FinetuneBudget:
    """The fine-tuning budget every encoder gets: ``steps`` AdamW steps of ``batch_size`` images, peak ``lr``
    after ``warmup`` steps (cosine to 1e-6), layer decay, weight decay, stochastic depth, label smoothing."""

    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 15
    layer_decay: float = 1.0  # none: a random init is fine-tuned with the same recipe, and decay would slow it
    weight_decay: float = 0.05
    drop_path: float = 0.1
    smoothing: float = 0.1
    seed: int = 0


@dataclasses.dataclass
class Options:
    """The bench's own settings (the rest is the pre-training recipe)."""

    points: int = 5
    probe_train: int = 0  # images of the probes' training set, evenly spaced over it (0 = all)
    test_images: int = 0  # images scored, evenly spaced over the test split (0 = all)
    holdout: int = 0  # fashion_mnist: score on the last N train images, pre-train without them
    linprobe: tuple[str, ...] = ()  # eval overrides of the linear probe, e.g. --linprobe.epochs=20
    finetune: FinetuneBudget = dataclasses.field(default_factory=FinetuneBudget)


def progress(text: str) -> None:
    print(f"[convergence {datetime.datetime.now():%H:%M:%S}] {text}", flush=True)


def method_configs(recipe: str, overrides: list[str], work: Path, holdout: int) -> dict[str, Config]:
    """The two pre-training configs: the recipe for LocalMIM, the same with the MAE model for MAE."""
    base = load_config(recipe, overrides)
    name = base.model.name
    if not name.startswith("localmim_vit_"):
        raise FastmimError(f"model.name is {name}; give a LocalMIM ViT (e.g. localmim_vit_tiny_patch16).")
    if base.train.steps < 1:
        raise FastmimError("train.steps is 0; set the schedule length in steps, e.g. --train.steps=600.")
    mae = "mae_" + name.removeprefix("localmim_")
    from fastmim.models.registry import list_models

    if mae not in list_models():
        raise FastmimError(f"{name} has no MAE counterpart ({mae} is not registered); use ViT-Ti, ViT-B or ViT-L.")
    extra = [f"--data.holdout={holdout}"] if holdout else []
    return {
        m: load_config(
            recipe,
            [*overrides, *extra, f"--model.name={n}", f"--train.out_dir={work / m}", "--train.resume=auto"],
        )
        for m, n in (("localmim", name), ("mae", mae))
    }


def _evenly(dataset: Any, n: int) -> Any:
    """``n`` items spread evenly over ``dataset`` (every item when n is 0 or at least its length)."""
    import numpy as np
    from torch.utils.data import Subset

    if n <= 0 or n >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())


def build_sets(cfg: Config, opts: Options) -> ProbeSets:
    """The labelled sets the probes read (module doc), at the pre-training resolution."""
    import torch

    from fastmim.eval.probes import GreyImages, ProbeSets

    d, size = cfg.data, cfg.model.resolved_img_size
    if d.source == "fashion_mnist":
        from fastmim.data.sources import fashion_mnist_arrays

        train_x, train_y = (torch.from_numpy(a) for a in fashion_mnist_arrays(d.path, "train"))
        if opts.holdout:
            test_x, test_y = train_x[-opts.holdout :], train_y[-opts.holdout :]
            train_x, train_y = train_x[: -opts.holdout], train_y[: -opts.holdout]
            where = f"last {opts.holdout} train images (held out of pre-training)"
        else:
            test_x, test_y = (torch.from_numpy(a) for a in fashion_mnist_arrays(d.path, "t10k"))
            where = "test split"
        probe_train = GreyImages(train_x, train_y, size)
        test = GreyImages(test_x, test_y, size)
        finetune = GreyImages(train_x, train_y, size, augment=True)
        name, classes = "Fashion-MNIST", 10
    elif d.source == "folder":
        from fastmim.data.sources import FolderSource
        from fastmim.eval.data import LabelledImages, eval_transform, train_transform

        root = Path(d.path).parent
        train_src, val_src = FolderSource(d.path), FolderSource(str(root / "val"))
        if train_src.classes != val_src.classes:
            raise FastmimError(f"{d.path} and {root / 'val'} have different class folders; give both the same.")
        probe_train = LabelledImages(train_src, eval_transform(size))
        test = LabelledImages(val_src, eval_transform(size))
        finetune = LabelledImages(train_src, train_transform(size, "", 0.0))
        name, classes, where = f"folder {d.path}", len(train_src.classes), f"{root / 'val'}"
    else:
        raise FastmimError(f"data.source is {d.source}; bench convergence reads fashion_mnist or folder.")
    probe_train, test = _evenly(probe_train, opts.probe_train), _evenly(test, opts.test_images)
    text = f"{name}: probes fit on {len(probe_train)} train images, scored on {len(test)} ({where})"
    return ProbeSets(probe_train, test, finetune, classes, text)


def same_settings(a: Any, b: Any) -> bool:
    """Whether two stored settings are equal, config texts compared as parsed TOML: a key order written by another
    fastmim version is not another setting."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_settings(a[k], b[k]) for k in a)
    if isinstance(a, str) and isinstance(b, str) and a != b and a.startswith("[") and b.startswith("["):
        try:
            return tomllib.loads(a) == tomllib.loads(b)
        except tomllib.TOMLDecodeError:
            return False
    return a == b


class State:
    """What is done so far, in ``work``/state.json (rewritten atomically after each phase)."""

    def __init__(self, work: Path, identity: dict[str, Any]) -> None:
        self.path = work / "state.json"
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if not same_settings(self.data.get("identity"), identity):
                raise FastmimError(
                    f"{work} holds a convergence run with other settings; rerun with those or choose another --work."
                )
        else:
            work.mkdir(parents=True, exist_ok=True)
            self.data = {"identity": identity, "points": {m: [] for m in METHODS}, "baselines": {}, "finetune": {}}
            self.save()

    def save(self) -> None:
        from fastmim.eval.common import write_json

        write_json(self.data, self.path)


def _probe(sets: ProbeSets, backbone: Any, size: int, device: torch.device, opts: Options, workers: int) -> dict:
    """k-NN and linear top-1 of a backbone (``None``: raw pixels), with the seconds they took."""
    from fastmim.eval.backbone import build_vit
    from fastmim.eval.probes import extract, knn_top1, linear_top1

    start = time.perf_counter()
    encoder = None if backbone is None else build_vit(backbone, 0, 0.0, size).to(device)
    train = extract(encoder, sets.probe_train, device, workers=workers)
    test = extract(encoder, sets.test, device, workers=workers)
    extract_s = time.perf_counter() - start
    knn = knn_top1(*train, *test)
    linear = linear_top1(train, test, sets.num_classes, device, list(opts.linprobe))
    return {"knn": knn, "linear": linear, "extract_s": extract_s, "eval_s": time.perf_counter() - start}


def run_bench(recipe: str, overrides: list[str], work: Path, opts: Options) -> dict[str, Any]:
    """Every phase not yet in ``work``/state.json (module doc); returns the record."""
    from fastmim.bench.harness import git_sha
    from fastmim.eval.backbone import load_backbone
    from fastmim.eval.common import resolve_device
    from fastmim.train import train

    sha = git_sha()
    cfgs = method_configs(recipe, overrides, work, opts.holdout)
    cfg = cfgs["localmim"]
    size, t = cfg.model.resolved_img_size, cfg.train
    identity = {"configs": {m: dump_toml(c) for m, c in cfgs.items()}, "options": _jsonable(opts)}
    state = State(work, identity)
    shas = state.data.setdefault("git_shas", [])
    if not shas or shas[-1] != sha:
        shas.append(sha)
        state.save()
    device = resolve_device(t.device, "train.device")
    sets = build_sets(cfg, opts)
    progress(sets.description)
    workers = cfg.data.num_workers
    base = state.data["baselines"]
    for name, backbone in (("random", "random"), ("pixels", None)):
        if name not in base:
            progress(f"{name}: probing")
            bb = load_backbone("", cfg.model.name, size, t.seed) if backbone else None
            base[name] = _probe(sets, bb, size, device, opts, workers)
            state.save()
            progress(f"{name}: k-NN {base[name]['knn']:.2f}%  linear {base[name]['linear']:.2f}%")
    targets = [round(t.steps * (i + 1) / opts.points) for i in range(opts.points)]
    for i, target in enumerate(targets):
        for m in METHODS:
            points = state.data["points"][m]
            if len(points) <= i:  # not trained yet: the segment's seconds are saved before its probes run
                points.append(_train_segment(train, cfgs[m], m, target, points[-1] if points else None))
                state.save()
            if points[i]["knn"] is None:
                progress(f"{m}: probing step {target}")
                points[i].update(_probe(sets, load_backbone(points[i]["checkpoint"]), size, device, opts, workers))
                state.save()
                progress(f"{m} step {target}: k-NN {points[i]['knn']:.2f}%  linear {points[i]['linear']:.2f}%")
    _finetune_all(state, cfg, sets, size, device, opts, workers)
    return build_record(state, cfgs, sets, opts, device)


def _train_segment(train: Any, cfg: Config, m: str, target: int, last: dict[str, Any] | None) -> dict[str, Any]:
    """Pre-train method ``m`` from its last checkpoint up to step ``target``; the point's record, not yet probed."""
    t = cfg.train
    progress(f"{m}: pre-training steps {last['step'] if last else 0} -> {target} of {t.steps}")
    start = time.perf_counter()
    summary = train(cfg, stop_at=target)
    seconds = time.perf_counter() - start
    if summary["steps"] != target:
        raise FastmimError(f"{m} stopped at step {summary['steps']} ({summary['stopped_by']}); rerun to go on.")
    progress(f"{m}: {seconds:.0f} s for this segment (loss {summary['final_loss']})")
    return {
        "step": target,
        "images": target * t.batch_size * t.accum_steps,
        "pretrain_s": (last["pretrain_s"] if last else 0.0) + seconds,
        "segment_s": seconds,
        "loss": summary["final_loss"],
        "load_average": list(os.getloadavg()),  # 1, 5, 15 min at the segment's end: was the machine shared?
        "checkpoint": summary["checkpoint"],
        "knn": None,
        "linear": None,
    }


def _finetune_all(
    state: State, cfg: Config, sets: ProbeSets, size: int, device: torch.device, opts: Options, workers: int
) -> None:
    """Fine-tune both final encoders and the random init with the same budget (each once)."""
    from fastmim.eval.backbone import load_backbone
    from fastmim.eval.probes import finetune_top1

    for name in (*METHODS, "random"):
        if name in state.data["finetune"]:
            continue
        progress(f"{name}: fine-tuning {opts.finetune.steps} steps")
        start = time.perf_counter()
        pretrained = state.data["points"][name][-1]["checkpoint"] if name in METHODS else ""
        backbone = load_backbone(pretrained, cfg.model.name, size, cfg.train.seed)
        top1 = finetune_top1(backbone, size, sets, opts.finetune, device, workers)
        state.data["finetune"][name] = {"top1": top1, "seconds": time.perf_counter() - start}
        state.save()
        progress(f"{name}: fine-tuned top-1 {top1:.2f}%")


def seconds_to_reach(points: list[dict[str, Any]], probe: str, goal: float) -> float | None:
    """Pre-training seconds at the first point whose ``probe`` top-1 reaches ``goal`` (None: never)."""
    return next((p["pretrain_s"] for p in points if p[probe] >= goal), None)


def summarize(state: dict[str, Any]) -> dict[str, Any]:
    """The record's ``summary`` (issue #26): final top-1 per method and probe, pre-training seconds, and the
    seconds LocalMIM took to reach MAE's final top-1 on each probe (None when it never did)."""
    pts, base, ft = state["points"], state["baselines"], state["finetune"]
    out: dict[str, Any] = {}
    for m in METHODS:
        out[m] = {"knn": pts[m][-1]["knn"], "linear": pts[m][-1]["linear"], "finetune": ft[m]["top1"]}
        out[m]["pretrain_seconds"] = pts[m][-1]["pretrain_s"]
    out["random"] = {"knn": base["random"]["knn"], "linear": base["random"]["linear"], "finetune": ft["random"]["top1"]}
    out["pixels"] = {"knn": base["pixels"]["knn"], "linear": base["pixels"]["linear"]}
    reach = {p: seconds_to_reach(pts["localmim"], p, out["mae"][p]) for p in ("knn", "linear")}
    final = out["localmim"]["pretrain_seconds"]
    reach["finetune"] = final if out["localmim"]["finetune"] >= out["mae"]["finetune"] else None
    out["localmim_seconds_to_mae_final"] = reach
    return out


def _jsonable(opts: Options) -> dict[str, Any]:
    out = dataclasses.asdict(opts)
    out["linprobe"] = list(opts.linprobe)
    return out


def environment(device: torch.device, sha: str) -> dict[str, Any]:
    """The record's ``git_sha`` (``sha``: the commit when the command started, whose code ran; the tree may change
    while a long bench runs), ``machine`` and ``versions`` (shared with ``fastmim bench ablations``)."""
    import timm
    import torch

    from fastmim.bench.harness import device_name

    return {
        "git_sha": sha,
        "machine": {
            "device": device_name(device),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": torch.multiprocessing.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
    }


def build_record(
    state: State, cfgs: dict[str, Config], sets: ProbeSets, opts: Options, device: torch.device
) -> dict[str, Any]:
    data = state.data
    return {
        "bench": "convergence",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **environment(device, data["git_shas"][-1]),
        "git_shas": data["git_shas"],  # one per invocation that ran phases of this --work, in order
        "data": sets.description,
        "options": _jsonable(opts),
        "configs": data["identity"]["configs"],
        "points": data["points"],
        "baselines": data["baselines"],
        "finetune": data["finetune"],
        "eval_seconds": sum(p["eval_s"] for m in METHODS for p in data["points"][m])
        + sum(b["eval_s"] for b in data["baselines"].values()),
        "finetune_seconds": sum(f["seconds"] for f in data["finetune"].values()),
        "summary": summarize(data),
    }


def plot_record(record: dict[str, Any], png: Path) -> Path:
    """Top-1 against pre-training seconds: a line per method and probe (fine-tuning: one marker at the end),
    the random init and raw pixels as horizontal lines."""
    import torch

    from fastmim.bench.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    colours = {"localmim": "tab:blue", "mae": "tab:orange"}
    styles = {"knn": "-", "linear": "--"}
    base, s = record["baselines"], record["summary"]
    for m in METHODS:
        pts = record["points"][m]
        for probe in ("knn", "linear"):
            x = [0.0] + [p["pretrain_s"] for p in pts]
            y = [base["random"][probe]] + [p[probe] for p in pts]
            ax.plot(x, y, styles[probe], marker="o", color=colours[m], label=f"{m} {probe}")
        ax.plot([s[m]["pretrain_seconds"]], [s[m]["finetune"]], "*", ms=12, color=colours[m], label=f"{m} fine-tune")
    for name, colour in (("random", "grey"), ("pixels", "black")):
        for probe in PROBES:
            if probe in s[name]:
                style = {"knn": "-", "linear": "--", "finetune": ":"}[probe]
                ax.axhline(s[name][probe], color=colour, ls=style, lw=0.8, label=f"{name} {probe}")
    ax.set_xlabel("pre-training seconds (wall, per method)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(
        f"time to accuracy: {record['data']}\n{record['machine']['device']}, torch {torch.__version__}", fontsize=8
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no line hidden
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.write_figure(fig, png)
    plt.close(fig)
    return png


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a fixed-width table (top-1 %, pre-training seconds)."""
    lines = [f"{'':10}{'k-NN':>8}{'linear':>8}{'fine-tune':>10}{'pretrain s':>12}"]
    for name in (*METHODS, "random", "pixels"):
        row = s[name]
        cells = [f"{row[p]:8.2f}" if p in row else f"{'-':>8}" for p in ("knn", "linear")]
        ft = f"{row['finetune']:10.2f}" if "finetune" in row else f"{'-':>10}"
        secs = f"{row['pretrain_seconds']:12.0f}" if "pretrain_seconds" in row else f"{'-':>12}"
        lines.append(f"{name:10}{''.join(cells)}{ft}{secs}")
    reach = s["localmim_seconds_to_mae_final"]
    text = ", ".join(f"{p} {'never' if v is None else f'{v:.0f} s'}" for p, v in reach.items())
    return "\n".join([*lines, f"LocalMIM reached MAE's final top-1 at: {text}"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmim bench convergence` (the pre-training recipe comes with --config and overrides)."""
    b = FinetuneBudget()
    parser.add_argument("--work", default="runs/convergence", help="working directory: runs, state.json (resumable)")
    parser.add_argument("--out", help="directory for the JSON record and PNG (default benchmarks/results)")
    parser.add_argument("--points", type=int, default=5, help="evaluation points per method (default 5)")
    parser.add_argument("--probe-train", type=int, default=0, help="probe training images, evenly spaced (0 = all)")
    parser.add_argument("--test-images", type=int, default=0, help="scored images, evenly spaced (0 = all)")
    parser.add_argument("--holdout", type=int, default=0, help="fashion_mnist: score on the last N train images")
    parser.add_argument(
        "--linprobe",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="eval override, e.g. --linprobe=--linprobe.epochs=20",
    )
    parser.add_argument("--finetune-steps", type=int, default=b.steps, help=f"fine-tuning steps (default {b.steps})")
    parser.add_argument("--finetune-batch", type=int, default=b.batch_size, help=f"batch (default {b.batch_size})")
    parser.add_argument("--finetune-lr", type=float, default=b.lr, help=f"peak fine-tuning lr (default {b.lr})")


def options_from(args: argparse.Namespace) -> Options:
    if args.points < 1 or args.finetune_steps < 1 or args.finetune_batch < 1:
        raise FastmimError("--points, --finetune-steps and --finetune-batch must be positive.")
    budget = FinetuneBudget(
        steps=args.finetune_steps,
        batch_size=args.finetune_batch,
        lr=args.finetune_lr,
        warmup=max(1, args.finetune_steps // 10),
    )
    return Options(args.points, args.probe_train, args.test_images, args.holdout, tuple(args.linprobe), budget)


def main(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> int:
    """`fastmim bench convergence`: run (or continue) the bench, write the record and PNG, print the summary."""
    from fastmim.bench.harness import DEFAULT_RESULTS, result_path
    from fastmim.eval.common import write_json

    record = run_bench(args.config or DEFAULT_RECIPE, overrides, Path(args.work), options_from(args))
    record["command"] = " ".join(argv)
    out = Path(args.out) if args.out else DEFAULT_RESULTS
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if record["machine"]["device"] == "cpu" else record["machine"]["device"]
    path = result_path(out, "convergence", device, datetime.datetime.now(datetime.UTC))
    write_json(record, path)
    plot_record(record, path.with_suffix(".png"))
    print(format_summary(record["summary"]))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
