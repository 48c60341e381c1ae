"""``fastmim bench data``: the loader's CPU cost per data source, storage, decode mode and augmentation placement.

Each row reads the production loader (:meth:`MIMLoader.stream`: one set of data workers, as in training) for
``batches`` batches after ``warmup`` untimed ones, and reports:

- ``cpu_s_per_1k_img``: CPU seconds the loader's whole process tree (main process, its threads, every data worker)
  spent per 1,000 images, measured (not inferred from wall time, so it stays meaningful on a shared machine). It is
  the loader side only: on CUDA the host side of the device half (copies, launches, nvJPEG's host work) counts; on a
  machine without a GPU the device half is not run while timing, and pixels are staged into one reused buffer, as
  CUDA's caching pinned allocator does. The PERFORMANCE goal for ffcv + ``augment=gpu`` is <= 0.4.
- ``img_per_s_per_core``: its inverse; ``cores_per_8gpu_node``: the cores eight GPUs at 13,000 img/s each need for
  loading alone; ``img_per_s``: wall-clock images per second of the timed pass.
- ``bytes_per_image``: stored bytes per image (the .beton file, or the source files, over the images);
  ``payload_bytes_per_image`` for a .beton: its samples alone, without the padding of FFCV's pages.
- ``pixel_diff_mean`` / ``pixel_diff_max``: absolute difference, in levels of 255, of the mode's 224 px crops
  (``deviation_images`` of them, the first of epoch 0: same keys, so the same seeded crops and flips) from the
  reference: the image decoded in full by Pillow and augmented on the CPU (Pillow's bicubic), from the source
  files when the .beton was converted here from a folder without skipping any, else from the stored images.

Source ``ffcv`` reads ``data.path`` when it is a .beton; when it is an image folder, the folder is converted into a
temporary .beton per storage (``--storage jpeg,raw``; ``--max-side``, JPEG quality 90), and that is not timed.
``decode=gpu`` rows need ``augment=gpu`` and JPEG storage; other combinations are skipped with a note.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastmim.config import Config, validate
from fastmim.data import build_loader
from fastmim.data.beton import BetonSource, ffcv_installed
from fastmim.data.convert import convert_folder
from fastmim.data.sources import FolderSource
from fastmim.errors import FastmimError

DATA_COLUMNS = (
    "source",
    "storage",
    "decode",
    "augment",
    "num_workers",
    "batch",
    "img_size",
    "cpu_s_per_1k_img",
    "img_per_s_per_core",
    "cores_per_8gpu_node",
    "img_per_s",
    "bytes_per_image",
    "pixel_diff_mean",
    "pixel_diff_max",
)
NODE_GPUS, GPU_IMG_PER_S = 8, 13_000  # docs/performance.md section 3: 8 GPUs at the step-rate goal


def available_sources(cfg: Config) -> list[str]:
    """demo and synthetic always; folder when data.path names a directory; ffcv when it names a file, or a
    directory and FFCV is installed (the folder is converted first)."""
    sources = ["demo", "synthetic"]
    path = Path(cfg.data.path) if cfg.data.path else None
    if path is not None and path.is_dir():
        sources.append("folder")
    if path is not None and (path.is_file() or (path.is_dir() and ffcv_installed())):
        sources.append("ffcv")
    return sources


def bench_device(cfg: Config) -> torch.device:
    """Where ``gpu`` placement runs: CUDA unless train.device is "cpu" or there is none."""
    return torch.device("cuda") if cfg.train.device != "cpu" and torch.cuda.is_available() else torch.device("cpu")


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's children: reaped ones (getrusage) plus live ones (/proc, Linux)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _live_children():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a child that has just exited
            total += sum(int(v) for v in _stat_fields(pid)[11:13]) / tick  # utime, stime
    return total


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the ")" that closes the command name: state, ppid, ..., utime (12th),
    stime (13th)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _live_children() -> list[int]:
    """This process's live children: /proc/self/task/*/children, where the kernel provides it
    (CONFIG_PROC_CHILDREN), else every /proc/PID/stat whose parent is this process. Never an empty list for want
    of a way to read them (the workers' CPU time would silently go missing): an error says so instead."""
    try:
        tasks = os.listdir("/proc/self/task")
        return [int(p) for tid in tasks for p in Path(f"/proc/self/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError as e:
        raise FastmimError(
            "bench data measures its data workers' CPU time through /proc, which cannot be read here; run it on Linux."
        ) from e
    me, children = os.getpid(), []
    for entry in entries:
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(_stat_fields(entry)[1]) == me:
                children.append(int(entry))
    return children


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its children."""
    return time.process_time() + _children_cpu_seconds()


def _timed(loader, batches: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process-tree CPU seconds) of the loader side for ``batches`` batches after ``warmup``."""
    cuda = device.type == "cuda"
    capacity = None if cuda or loader.placement == "cpu" else loader.dataset.capacity(loader.batch_size)
    staging = torch.empty(capacity, dtype=torch.uint8) if capacity else None
    stream = loader.stream(0, 0, staging)
    step = (lambda raw: loader.finish(raw)) if cuda else (lambda raw: raw)
    try:
        for _ in range(warmup):
            step(next(stream)[2])
        _sync(device)
        cpu0, start = _tree_cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            step(next(stream)[2])
        _sync(device)
        return time.perf_counter() - start, _tree_cpu_seconds() - cpu0
    finally:
        stream.close()


def _levels(loader, images: int) -> torch.Tensor:
    """The first ``images`` augmented images of epoch 0 as int16 levels of 255, [N, 3, S, S]."""
    out = []
    for raw in itertools.islice(loader.raw_batches(0), math.ceil(images / loader.batch_size)):
        if loader.placement == "cpu":
            out.append(raw[0].to(torch.int16))  # uint8 pixels straight from the CPU transform
            continue
        x = loader.finish(raw)[0].cpu()
        mean = torch.tensor(loader.transform.mean).view(1, 3, 1, 1)
        std = torch.tensor(loader.transform.std).view(1, 3, 1, 1)
        out.append(((x * std + mean) * 255).round().clamp(0, 255).to(torch.int16))  # exact: the LUT is invertible
    return torch.cat(out)[:images]


def bench_row(cfg: Config, batches: int, warmup: int, reference: Config, deviation_images: int) -> dict[str, Any]:
    """Time the loader ``cfg.data`` describes and measure its pixels against ``reference``'s."""
    for checked in (cfg, reference):  # the data keys were set here (the --sources, --augment, --decode lists)
        validate(checked)
    t, img_size, device = cfg.train, cfg.model.resolved_img_size, bench_device(cfg)
    loader = build_loader(cfg.data, img_size, t.batch_size, t.seed, device=device)
    elapsed, cpu = _timed(loader, batches, warmup, device)
    images = batches * t.batch_size
    ref_loader = build_loader(reference.data, img_size, t.batch_size, t.seed)
    diff = (_levels(loader, deviation_images) - _levels(ref_loader, deviation_images)).abs().float()
    cpu_per_1k = 1e3 * cpu / images
    where = "cpu" if cfg.data.augment == "cpu" else str(device) + ("" if device.type == "cuda" else " (not timed)")
    return {
        "source": cfg.data.source,
        "decode": cfg.data.decode,
        "augment": cfg.data.augment,
        "augment_device": where,
        "img_size": img_size,
        "batch": t.batch_size,
        "num_workers": cfg.data.num_workers,
        "batches": batches,
        "img_per_s": images / elapsed,
        "img_per_s_per_worker": images / elapsed / max(1, cfg.data.num_workers),
        "cpu_s_per_1k_img": cpu_per_1k,
        "img_per_s_per_core": images / cpu if cpu > 0 else None,
        "cores_per_8gpu_node": cpu_per_1k * NODE_GPUS * GPU_IMG_PER_S / 1e3,
        "pixel_diff_mean": float(diff.mean()),
        "pixel_diff_max": float(diff.max()),
        "deviation_images": len(diff),
        "cpu_count": os.cpu_count(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with(cfg: Config, **data: Any) -> Config:
    out = copy.deepcopy(cfg)
    for key, value in data.items():
        setattr(out.data, key, value)
    return out


@contextlib.contextmanager
def _betons(cfg: Config, storages: list[str], max_side: int, log) -> Iterator[list[tuple[str, str, dict | None]]]:
    """``(storage, path, conversion info)`` per .beton to read: data.path itself when it is one, else a temporary
    conversion of the folder per storage."""
    path = Path(cfg.data.path)
    if path.is_file():
        source = BetonSource(str(path))
        yield [("jpeg" if source.jpeg else "raw", str(path), None)]
        return
    with tempfile.TemporaryDirectory(prefix="fastmim-bench-") as tmp:
        out = []
        for storage in storages:
            dst = str(Path(tmp) / f"{storage}.beton")
            log(f"bench data: converting {path} to a temporary .beton ({storage}, max side {max_side}) ...")
            summary = convert_folder(
                str(path), dst, max_side=max_side, raw=storage == "raw", progress=False, log=lambda _: None
            )
            info = {
                "max_side": max_side,
                "images": summary.written,
                "bytes": summary.bytes,
                "skipped": summary.num_skipped,
                "resized": summary.resized,
            }
            out.append((storage, dst, info))
        yield out


def _cases(cfg: Config, source: str, stack: contextlib.ExitStack, storages: list[str], max_side: int, log):
    """``(data config, reference config, storage, bytes per image, extra row fields)`` per storage of ``source``."""
    if source != "ffcv":
        stored = None
        if source == "folder":
            paths = FolderSource(cfg.data.path).paths
            stored = sum(os.path.getsize(p) for p in paths) / len(paths)
        run = _with(cfg, source=source)
        yield run, run, "files" if source == "folder" else "generated", stored, {}
        return
    if not cfg.data.path:
        raise FastmimError("bench data --sources ffcv needs --data.path: a .beton file or an image folder.")
    folder = Path(cfg.data.path).is_dir()
    for storage, path, info in stack.enter_context(_betons(cfg, storages, max_side, log)):
        run = _with(cfg, source="ffcv", path=path)
        from_files = folder and info["skipped"] == info["resized"] == 0  # the folder's images, in its order
        reference = _with(cfg, source="folder") if from_files else run
        extra = {"deviation_reference": "source files" if from_files else "stored images"}
        if info is not None:
            extra["beton"] = info
        beton = BetonSource(path)
        extra["payload_bytes_per_image"] = float(beton.stored_bytes.mean())  # without FFCV's page padding
        yield run, reference, storage, os.path.getsize(path) / len(beton), extra


def _skip_reason(source: str, storage: str, augment: str, decode: str) -> str | None:
    if decode == "gpu" and (augment != "gpu" or source != "ffcv" or storage != "jpeg"):
        return "decode=gpu needs augment=gpu and a JPEG .beton"
    return None


def run_data_bench(
    cfg: Config,
    sources: list[str] | None,
    batches: int,
    warmup: int,
    augments: list[str] | None = None,
    max_side: int = 512,
    log=print,
    decodes: list[str] | None = None,
    storages: list[str] | None = None,
    deviation_images: int = 64,
) -> list[dict]:
    """One row per (source, storage, placement, decode): sources default to :func:`available_sources`, placements
    and decode modes to ``data.augment`` / ``data.decode``, storages (for a folder converted to ffcv) to jpeg."""
    rows = []
    with contextlib.ExitStack() as stack:
        for source in sources or available_sources(cfg):
            for run, reference, storage, stored, extra in _cases(
                cfg, source, stack, storages or ["jpeg"], max_side, log
            ):
                for augment, decode in itertools.product(augments or [cfg.data.augment], decodes or [cfg.data.decode]):
                    why = _skip_reason(source, storage, augment, decode)
                    if why:
                        log(f"bench data: skipping {source} ({storage}), augment {augment}, decode {decode}: {why}")
                        continue
                    log(
                        f"bench data: {source} ({storage}), augment {augment}, decode {decode}, batch "
                        f"{cfg.train.batch_size}, {cfg.data.num_workers} workers ..."
                    )
                    reference_cfg = _with(reference, augment="cpu", decode="cpu")
                    row = bench_row(
                        _with(run, augment=augment, decode=decode), batches, warmup, reference_cfg, deviation_images
                    )
                    rows.append({**row, "storage": storage, "bytes_per_image": stored, **extra})
    return rows
