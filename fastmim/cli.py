"""The ``fastmim`` command line.

    fastmim pretrain [--config RECIPE] [--section.key=value ...]   pre-train (default: tiny recipe, built-in data)
    fastmim config [--config RECIPE] [--section.key=value ...]     print the resolved config as TOML
    fastmim config --keys                                          print every config key with its meaning
    fastmim list-models                                            registered model names
    fastmim import-checkpoint SRC --model NAME --out DST           released LocalMIM/MAE weights -> fastmim
    fastmim export-released SRC --out DST                          fastmim weights -> the released layout
    fastmim consolidate CKPT --out DST                             ZeRO checkpoint -> plain fastmim checkpoint
    fastmim finetune [--config RECIPE] [--section.key=value ...]   fine-tune an encoder (method 6), top-1/top-5
    fastmim linprobe [--config RECIPE] [--section.key=value ...]   linear probe of a frozen encoder
    fastmim export CKPT --format timm --out FILE                   encoder -> safetensors for timm's ViT
    fastmim visualize CKPT --out FILE.png [--images IMG ...]       input, mask, targets, predictions
    fastmim bench step|data [--config RECIPE] [overrides] [--out DIR] [--plot]   throughput benchmarks (JSON)
    fastmim bench convergence [--config RECIPE] [overrides] [--work DIR]   time to accuracy, LocalMIM vs MAE (JSON, PNG)
    fastmim bench ablations [--config RECIPE] [overrides] [--only LABELS]  its ablations, on held-out train images
    fastmim bench kernels --static [--arch 80,90] [--out DIR]       kernels compiled for sm_80/90 without a GPU
    fastmim profile [--config RECIPE] [overrides] [--steps N]       profiler trace + per-stage table
    fastmim data convert SRC DST.beton [--max-side N] [--quality Q | --raw] [--workers N]   image folder -> FFCV
    fastmim data imagenet-like DST [--images N]                   ImageNet-like JPEG folder for `bench data`

User errors print one line (``fastmim: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from fastmim.config import ModelConfig, choices
from fastmim.errors import FastmimError, interrupt_on_stop_signals, one_line
from fastmim.files import fresh_output


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RECIPE", help="TOML file or built-in recipe name (default: tiny CPU recipe)")
    p.epilog = "Any config key can be overridden as --section.key=value (see `fastmim config --keys`)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmim", description="Fast LocalMIM masked-image-modeling pre-training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("pretrain", help="pre-train a model (no arguments: the tiny recipe on built-in images)")
    _add_config_args(p)
    p = sub.add_parser("config", help="print the resolved config (TOML) or, with --keys, the key reference")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="print every config key, its type, default and meaning")
    sub.add_parser("list-models", help="list registered model names")
    p = sub.add_parser(
        "bench",
        help="benchmarks: `bench step` (training-step throughput), `bench data` (loaders), "
        "`bench kernels --static` (registers, spills, occupancy for sm_80 / sm_90; no GPU)",
    )
    which = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, text in (
        ("step", "reference vs fast training-step throughput, one process, one device"),
        ("data", "loader throughput of each available data source"),
    ):
        q = which.add_parser(name, help=text)
        _add_config_args(q)
        q.add_argument("--out", help="directory for the JSON record (default benchmarks/results)")
        q.add_argument("--plot", action="store_true", help="also write a PNG chart next to the JSON")
        q.add_argument("--steps", type=int, help="timed steps / batches (default 20 on CUDA, 8 on CPU)")
        q.add_argument("--warmup", type=int, help="untimed steps / batches first (default 5 on CUDA, 2 on CPU)")
    impls = " or ".join(choices(ModelConfig, "impl"))
    which.choices["step"].add_argument(
        "--impls",
        default="reference,fast",
        help=f"comma-separated variants to compare: IMPL, IMPL+compile or IMPL+eager, IMPL = {impls} "
        "(default reference,fast)",
    )
    which.choices["step"].add_argument("--breakdown-steps", type=int, default=3, help="synchronised steps (default 3)")
    which.choices["step"].add_argument(
        "--fixed-batch", action="store_true", help="reuse one batch kept on the device: time the step without input"
    )
    which.choices["data"].add_argument("--sources", help="comma-separated sources (default: every available one)")
    q = which.add_parser("convergence", help="time to accuracy: LocalMIM vs MAE vs random init, probed as they train")
    q.add_argument("--config", metavar="RECIPE", help="pre-training recipe (default convergence_fmnist_cpu)")
    from fastmim.eval.convergence import add_arguments

    add_arguments(q)
    q = which.add_parser("ablations", help="the convergence recipe's ablations, scored on held-out train images")
    q.add_argument("--config", metavar="RECIPE", help="pre-training recipe (default convergence_fmnist_cpu)")
    from fastmim.eval.ablations import add_arguments as add_ablation_arguments

    add_ablation_arguments(q)
    q = which.add_parser("kernels", help="every Triton kernel at every recipe's shapes, compiled ahead of time")
    q.add_argument(
        "--static",
        action="store_true",
        required=True,
        help="compile for GPU targets without a GPU: registers, spills, shared memory, resident warps",
    )
    q.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90)")
    q.add_argument("--recipes", help="comma-separated recipes (default: every pre-training recipe, and ViT-S)")
    q.add_argument("--kernels", help="only kernels whose name contains one of these (comma-separated)")
    q.add_argument("--out", help="directory for the JSON record (default benchmarks/results)")
    q.add_argument("--cache", help="Triton cache directory to reuse (default: a fresh one, so compile_s is real)")
    which.choices["data"].add_argument("--augment", help="comma-separated placements, cpu,gpu (default data.augment)")
    which.choices["data"].add_argument("--decode", help="comma-separated decode modes, cpu,gpu (default data.decode)")
    which.choices["data"].add_argument(
        "--storage", default="jpeg", help="comma-separated storages, jpeg,raw, when converting a folder for ffcv"
    )
    which.choices["data"].add_argument(
        "--max-side", type=int, default=512, help="longest side when converting a folder for source ffcv (512)"
    )
    which.choices["data"].add_argument(
        "--deviation-images", type=int, default=64, help="images compared with the reference pixels (default 64)"
    )
    p = sub.add_parser("data", help="datasets: `data convert` (image folder -> FFCV .beton), `data imagenet-like`")
    which = p.add_subparsers(dest="data", metavar="WHAT", required=True)
    q = which.add_parser("imagenet-like", help="write a folder of ImageNet-like JPEGs made from a bundled photograph")
    q.add_argument("dst", help="output folder (never overwritten; written under a temporary name first)")
    q.add_argument("--images", type=int, default=512, help="number of images (default 512)")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    q = which.add_parser("convert", help="write an image folder (ImageFolder tree or flat) as an FFCV .beton file")
    q.add_argument("src", help="image folder: root/<class>/<images> or a flat folder of images")
    q.add_argument("dst", help="output .beton file (never overwritten; written under a temporary name first)")
    q.add_argument("--max-side", type=int, default=512, help="shrink images to this longest side (0 = keep; 512)")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images (default 90)")
    q.add_argument("--raw", action="store_true", help="store uncompressed RGB (faster to read, ~5-10x larger)")
    q.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU core)")
    p = sub.add_parser("profile", help="torch.profiler trace of a few steps and a per-stage time table")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default 2)")
    p.add_argument("--out", default="profiles", help="parent directory of the output folder (default profiles/)")
    p.add_argument("--top", type=int, default=25, help="rows of the top-ops table (default 25)")
    p = sub.add_parser("import-checkpoint", help="convert the authors' released weights to a fastmim weights file")
    p.add_argument("src", help="released checkpoint (.pth), a dict with a 'model' entry")
    p.add_argument("--model", required=True, help="fastmim model name, e.g. localmim_vit_base_patch16")
    p.add_argument("--out", required=True, help="output file (fastmim weights)")
    p = sub.add_parser("consolidate", help="a ZeRO (DeepSpeed) checkpoint -> a plain checkpoint that resumes anywhere")
    p.add_argument("src", help="checkpoint-*.pt of a train.dist=deepspeed run (its checkpoint-*.zero/ beside it)")
    p.add_argument("--out", required=True, help="output checkpoint (never overwritten)")
    p = sub.add_parser("export-released", help="write fastmim weights in the authors' released layout")
    p.add_argument("src", help="fastmim checkpoint or weights file")
    p.add_argument("--out", required=True, help="output .pth file ({'model': state_dict} with released names)")
    for name, text in (
        ("finetune", "fine-tune a pre-trained encoder (method 6; default: tiny recipe on digits)"),
        ("linprobe", "linear-probe a frozen encoder (MAE protocol; default: tiny recipe on digits)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--keys", action="store_true", help="print every evaluation config key and its meaning")
    p = sub.add_parser("export", help="write an encoder (pre-trained or fine-tuned) as safetensors for timm")
    p.add_argument("src", help="fastmim checkpoint, weights file or fine-tuned checkpoint")
    p.add_argument("--format", default="timm", choices=["timm"], help="target library (default: timm)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p = sub.add_parser("visualize", help="PNG grid: input, mask, per-scale targets and predictions")
    p.add_argument("src", help="pre-training checkpoint or fastmim weights file")
    p.add_argument("--out", required=True, help="output .png file")
    p.add_argument("--images", nargs="+", default=[], metavar="IMG", help="image files (default: built-in demo)")
    p.add_argument("--num", type=int, default=4, help="number of demo images when --images is not given")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--hog-style", default="glyphs", choices=["glyphs", "bins"], help="HOG drawing (default glyphs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # A stop signal outside the training loop (which saves and stops instead): start-up, a conversion, an
    # evaluation have nothing to finish first, so the command ends at once, in one line.
    with interrupt_on_stop_signals() as reported:
        try:
            return _main(argv)
        except KeyboardInterrupt as e:  # Interrupted, or a second signal in training; files are written atomically
            reported()
            name = getattr(e, "signal_name", "SIGINT")
            print(f"fastmim: interrupted by {name}; what was written before is intact.", file=sys.stderr)
            return 128 + signal.Signals[name]


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 0
        if extra and args.command not in ("pretrain", "config", "bench", "profile", "finetune", "linprobe"):
            raise FastmimError(f"unexpected arguments {' '.join(extra)}; see `fastmim {args.command} --help`.")
        return _COMMANDS[args.command](args, extra)
    except FastmimError as e:
        if not getattr(e, "reported_by_rank0", False):  # several processes: one message per run
            print(f"fastmim: error: {_rank_prefix()}{one_line(str(e))}", file=sys.stderr)
        return 2
    except (MemoryError, OverflowError, RuntimeError) as e:
        if (message := _too_large(e)) is not None:
            print(f"fastmim: error: {_rank_prefix()}{message}", file=sys.stderr)
            return 2
        from fastmim.train.distributed import lost_peer  # several processes: another rank died; read its error

        if not isinstance(e, RuntimeError) or not _rank_prefix() or (message := lost_peer(e)) is None:
            raise
        print(f"fastmim: error: {_rank_prefix()}{message}", file=sys.stderr)
        return 1


def _too_large(error: BaseException) -> str | None:
    """One line for a configuration too large for this machine (an allocation that failed, a number that
    overflowed), or None for any other error."""
    text = one_line(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)[:200]
    if isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return (
            f"out of memory ({text}); lower train.batch_size, model.img_size or data.num_images, or use a machine "
            "with more memory."
        )
    if isinstance(error, OverflowError) or "overflow" in text.lower():
        return f"a value is too large to compute with ({text}); use smaller sizes, counts or rates."
    return None


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmim.config import dump_toml, load_config
    from fastmim.train import train
    from fastmim.train.distributed import adopt_srun_env, launched_by_srun

    srun = launched_by_srun()
    adopt_srun_env()  # a task srun started: SLURM's variables as RANK / WORLD_SIZE, so that rank 0 alone prints
    cfg = load_config(args.config, overrides)
    main_rank = _rank_prefix() in ("", "rank 0: ")  # with several processes only rank 0 prints
    if main_rank:
        print("resolved config:\n" + dump_toml(cfg))
    summary = train(cfg)
    if not main_rank:
        return 0
    n, per_node = summary["processes"], summary.get("processes_per_node", summary["processes"])
    launcher = "fastmim" if n == 1 else f"torchrun --nproc_per_node {per_node} -m fastmim"
    if n > per_node:  # several nodes: the same rendezvous as before, on every node
        launcher = f"torchrun --nnodes {n // per_node} --nproc_per_node {per_node} --rdzv-endpoint HOST:PORT -m fastmim"
    if srun:  # README's SLURM recipe: submit the batch script again (it resumes), or in it:
        launcher = "srun python -m fastmim"
    resume = f"{launcher} pretrain --config {summary['config']} --train.resume=auto"
    if summary["stopped_by"]:  # pre-emption is not a failure: the last completed step is saved
        print(
            f"stopped by {summary['stopped_by']} at step {summary['steps']} of {summary['total_steps']}; "
            f"saved {summary['checkpoint']}\n  resume with: {resume}"
        )
        return 0
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    skipped = f" ({summary['skipped_steps']} non-finite steps skipped)" if summary["skipped_steps"] else ""
    if summary.get("skipped_images"):
        skipped += f" ({summary['skipped_images']} unreadable images replaced; see the warnings above)"
    print(
        f"done: {summary['model']} trained to step {summary['steps']} ({summary['steps_this_run']} steps this run) "
        f"on {summary['device']} at {summary['img_per_s']:.1f} img/s{_startup(summary)}; final loss {loss}{skipped}\n"
        f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
        f"  loss plot:  {summary['plot']}\n  continue with: {resume} --train.steps=N"
    )
    return 0


def _startup(summary: dict) -> str:
    """How long the run took to reach its steady rate (which the img/s figure is: the steps after the first)."""
    if summary.get("startup_s") is None:
        return ""
    return f" (steady; start-up {summary['startup_s']:.1f} s: building, data workers, first batch and step)"


def _rank_prefix() -> str:
    """The prefix "rank R: " in a process started by a distributed launcher (torchrun, deepspeed, srun), else ""."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def cmd_consolidate(args: argparse.Namespace, extra: list[str]) -> int:
    from fastmim.train.zero import consolidate

    s = consolidate(args.src, fresh_output(args.out, "--out"))
    print(
        f"consolidated the ZeRO-{s['zero_stage']} checkpoint of {s['world_size']} process(es) at step {s['step']} "
        f"-> {s['out']}\n  fp32 weights, step, data position and config kept; AdamW moments restart.\n"
        f"  continue it on any number of processes: fastmim pretrain --config CONFIG --train.dist=auto "
        f"--train.zero_stage=0 --train.resume={s['out']}"
        + ("" if _same_dir(s["out"], args.src) else " --train.out_dir=NEW_DIR (a run directory holds one run)")
    )
    return 0


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve().parent == Path(b).resolve().parent


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmim.config import dump_toml, load_config, reference_markdown

    print(reference_markdown() if args.keys else dump_toml(load_config(args.config, overrides)))
    return 0


def cmd_list_models(args: argparse.Namespace, extra: list[str]) -> int:
    from fastmim.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_import_checkpoint(args: argparse.Namespace, extra: list[str]) -> int:
    from fastmim.models.released import import_released
    from fastmim.train.checkpoint_files import write_weights
    from fastmim.weights import load_released_file

    out = fresh_output(args.out, "--out")
    model = import_released(load_released_file(args.src), args.model)
    write_weights(model, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.src} as {args.model} ({n / 1e6:.1f} M parameters) -> {out}")
    return 0


def cmd_export_released(args: argparse.Namespace, extra: list[str]) -> int:
    from fastmim.models.released import export_released_state_dict
    from fastmim.train.checkpoint_files import ModelFile, atomic_save

    out = fresh_output(args.out, "--out")
    file = ModelFile.read(args.src)
    atomic_save({"model": export_released_state_dict(file.state, file.name)}, out, overwrite=False)
    print(f"exported {args.src} ({file.name}) in the released layout -> {out}")
    return 0


def _evaluate(args: argparse.Namespace, overrides: list[str], command: str) -> dict | None:
    """`fastmim finetune` / `linprobe`: with --keys the evaluation keys are printed (None); else the resolved config
    is printed and ``fastmim.eval.<command>.<command>(cfg)`` run; its summary is returned."""
    import importlib

    from fastmim.eval.config import dump_toml, eval_reference_markdown, load_eval_config

    if args.keys:
        print(eval_reference_markdown())
        return None
    run = getattr(importlib.import_module(f"fastmim.eval.{command}"), command)
    cfg = load_eval_config(args.config, overrides)
    print("resolved config:\n" + dump_toml(cfg))
    return run(cfg)


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    if (s := _evaluate(args, overrides, "finetune")) is not None:
        last = s["last"] or {}
        print(
            f"done: {s['model']} fine-tuned for {s['steps']} steps on {s['device']}; best top-1 "
            f"{s['best_acc1']:.2f}%, last top-1 {last.get('acc1', float('nan')):.2f}% / top-5 "
            f"{last.get('acc5', float('nan')):.2f}%\n  best: {s['best']}\n  last: {s['last_checkpoint']}\n  "
            f"metrics: {s['metrics']}\n  curves: {s['plot']}"
        )
    return 0


def cmd_linprobe(args: argparse.Namespace, overrides: list[str]) -> int:
    if (s := _evaluate(args, overrides, "linprobe")) is not None:
        print(
            f"done: linear probe of the {s['encoder']}: top-1 {s['acc1']:.2f}%, top-5 {s['acc5']:.2f}% "
            f"({s['num_train']} train / {s['num_val']} val images; features in {s['extract_s']:.1f} s, "
            f"probe in {s['probe_s']:.1f} s)\n  result: {s['result']}\n  curves: {s['plot']}"
        )
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from fastmim.eval.export import export_timm

    out = fresh_output(args.out, "--out")
    meta = export_timm(args.src, out)
    print(
        f"exported {args.src} ({meta['fastmim_model']}) for timm -> {out}\n  load with: "
        f"timm.create_model('{meta['timm_model']}', **{meta['timm_kwargs']}) + load_state_dict(load_file('{out}'))"
    )
    return 0


def cmd_visualize(args: argparse.Namespace, extra: list[str]) -> int:
    from fastmim.eval.visualize import visualize

    out = fresh_output(args.out, "--out")
    print(f"wrote {visualize(args.src, out, args.images, args.num, args.seed, args.hog_style)}")
    return 0


def cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.bench == "kernels":
        from fastmim.bench.static import run_in_subprocess

        if overrides:
            raise FastmimError(f"unexpected arguments {' '.join(overrides)}; see `fastmim bench kernels --help`.")
        options = {
            "--arch": args.arch,
            "--recipes": args.recipes,
            "--kernels": args.kernels,
            "--out": args.out,
            "--cache": args.cache,
        }
        return run_in_subprocess([f"{k}={v}" for k, v in options.items() if v])
    if args.bench == "convergence":
        from fastmim.eval.convergence import main

        return main(args, overrides, ["fastmim", *sys.argv[1:]])
    if args.bench == "ablations":
        from fastmim.eval.ablations import main as ablations_main

        return ablations_main(args, overrides, ["fastmim", *sys.argv[1:]])
    import torch

    from fastmim.bench.harness import format_table, write_record
    from fastmim.config import load_config

    if args.steps is not None and args.steps < 1:
        raise FastmimError(f"--steps is {args.steps}; give a positive number of timed steps, e.g. 8.")
    cfg = load_config(args.config, overrides)
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    steps = args.steps or (20 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    if args.bench == "step":  # writes each variant's row as it finishes
        from fastmim.bench.step import step_command

        return step_command(cfg, args, steps, warmup, ["fastmim", *sys.argv[1:]], {"config": _toml(cfg)})
    else:
        from fastmim.bench.data import DATA_COLUMNS, bench_device, run_data_bench

        lists = [value.split(",") if value else None for value in (args.sources, args.augment, args.decode)]
        sources, augments, decodes = lists
        rows = run_data_bench(
            cfg,
            sources,
            steps,
            warmup,
            augments,
            args.max_side,
            decodes=decodes,
            storages=args.storage.split(","),
            deviation_images=args.deviation_images,
        )
        device, columns, plot = bench_device(cfg), DATA_COLUMNS, None
    print(format_table(rows, columns))
    argv = ["fastmim", *sys.argv[1:]]
    path = write_record(args.bench, rows, device, args.out, argv=argv, extra={"config": _toml(cfg)})
    print(f"wrote {path}")
    if args.plot and plot is not None:
        print(f"wrote {plot(path)}")
    return 0


def cmd_profile(args: argparse.Namespace, overrides: list[str]) -> int:
    import datetime

    from fastmim.bench.harness import device_name, slug
    from fastmim.bench.profile import run_profile
    from fastmim.config import load_config
    from fastmim.train.build import resolve_device

    cfg = load_config(args.config, overrides)
    gpu = slug(device_name(resolve_device(cfg.train.device)))
    out = Path(args.out) / f"{cfg.model.name}-{cfg.model.impl}-{gpu}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    result = run_profile(cfg, args.steps, args.warmup, out, args.top)
    print(f"wrote {result['trace']} (open in chrome://tracing or ui.perfetto.dev), stages.txt, ops.txt")
    return 0


def cmd_data(args: argparse.Namespace, _: list[str]) -> int:
    if args.data == "imagenet-like":
        from fastmim.data.imagenet_like import write_imagenet_like

        written = write_imagenet_like(args.dst, args.images, args.quality)
        print(f"wrote {args.images} JPEGs to {args.dst} ({written / args.images / 1e3:.1f} KB each on average)")
        return 0
    from fastmim.data.convert import convert_folder

    summary = convert_folder(args.src, args.dst, args.max_side, args.quality, args.raw, args.workers)
    print("\n".join(summary.lines()))
    return 0


def _toml(cfg) -> str:
    from fastmim.config import dump_toml

    return dump_toml(cfg)


_COMMANDS = {
    "pretrain": cmd_pretrain,
    "config": cmd_config,
    "list-models": cmd_list_models,
    "import-checkpoint": cmd_import_checkpoint,
    "export-released": cmd_export_released,
    "finetune": cmd_finetune,
    "linprobe": cmd_linprobe,
    "export": cmd_export,
    "visualize": cmd_visualize,
    "bench": cmd_bench,
    "profile": cmd_profile,
    "data": cmd_data,
    "consolidate": cmd_consolidate,
}
