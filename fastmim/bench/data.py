"""``fastmim bench data``: loader throughput per source and augmentation placement, in img/s and per CPU core.

Each (source, placement) pair is read through the production loader (decode, crop, resize, flip, normalise,
collate; for ``gpu`` placement the resize, flip and normalisation run on the device) for ``batches`` batches after
``warmup`` untimed ones (worker start-up excluded). Rows:

- ``img_per_s``: wall-clock images per second.
- ``cpu_s_per_1k_img``: CPU seconds the loader's whole process tree (main process, its threads and every data
  worker) spent per 1,000 images: the number of cores needed per 1,000 img/s, the figure to plan a node with
  (the goal for ``ffcv`` + ``gpu`` is <= 1). It is measured, not estimated from wall time, so it stays meaningful
  on a machine shared with other jobs.
- ``img_per_s_per_core``: its inverse, images per CPU-second.
- for ``gpu`` placement on a CPU device (no GPU present), ``loader_cpu_s_per_1k_img`` is measured in a second
  pass that stops before the device half (the resize a GPU would take over): the CPU cost the GPU claim is about.
  The row's other figures include the stand-in resize on the CPU and say nothing about a GPU node.

Source ``ffcv`` reads ``data.path`` when it is a .beton file; when it is an image folder, the folder is first
converted into a temporary .beton (``--max-side``, JPEG quality 90), and that conversion is not timed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastmim.config import Config
from fastmim.data import build_loader
from fastmim.data.beton import convert_folder, ffcv_installed
from fastmim.errors import FastmimError

DATA_COLUMNS = ("source", "augment", "augment_device", "img_size", "batch", "num_workers", "img_per_s",
                "cpu_s_per_1k_img", "loader_cpu_s_per_1k_img", "img_per_s_per_core", "ms_per_batch")  # fmt: skip


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
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            for pid in Path(f"/proc/self/task/{tid}/children").read_text().split():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    # Fields after the ")" closing the command name: utime and stime are the 12th and 13th.
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its children."""
    return time.process_time() + _children_cpu_seconds()


def _timed(loader, batches: int, warmup: int, finish: bool, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process-tree CPU seconds) for ``batches`` batches after ``warmup``, with or without the
    device half of the augmentation (``loader.finish``)."""
    raw = (batch for epoch in range(warmup + batches) for batch in loader.raw_batches(epoch))
    step = loader.finish if finish else (lambda batch: batch)
    for _ in range(warmup):
        step(next(raw))
    _sync(device)
    cpu0, start = _tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        step(next(raw))
    _sync(device)
    return time.perf_counter() - start, _tree_cpu_seconds() - cpu0


def bench_source(cfg: Config, source: str, batches: int, warmup: int, augment: str | None = None) -> dict[str, Any]:
    """Time one (source, placement) pair; see the module docstring for the row's fields."""
    cfg = copy.deepcopy(cfg)
    cfg.data.source = source
    cfg.data.augment = augment or cfg.data.augment
    t = cfg.train
    img_size = cfg.model.img_size or 224
    device = bench_device(cfg)
    loader = build_loader(cfg.data, img_size, t.batch_size, t.seed, device=device)
    elapsed, cpu = _timed(loader, batches, warmup, True, device)
    images = batches * t.batch_size
    workers = cfg.data.num_workers
    placement = cfg.data.augment
    # Without a GPU the device half runs on the CPU and its cost says nothing about a GPU node: time the loader
    # again without it (what the CPU does on a GPU machine, less the kernel launches).
    stand_in = placement == "gpu" and device.type == "cpu"
    loader_cpu = _timed(loader, batches, warmup, False, device)[1] if stand_in else None
    where = "cpu" if placement == "cpu" else str(device) + (" (stand-in: not the GPU figure)" if stand_in else "")
    return {
        "source": source,
        "augment": placement,
        "augment_device": where,
        "img_size": img_size,
        "batch": t.batch_size,
        "num_workers": workers,
        "batches": batches,
        "img_per_s": images / elapsed,
        "img_per_s_per_worker": images / elapsed / max(1, workers),
        "cpu_s_per_1k_img": 1e3 * cpu / images,
        "loader_cpu_s_per_1k_img": 1e3 * loader_cpu / images if stand_in else None,
        "img_per_s_per_core": images / cpu if cpu > 0 else None,
        "ms_per_batch": elapsed * 1e3 / batches,
        "cpu_count": os.cpu_count(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _beton_for(cfg: Config, max_side: int, log) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """data.path as a .beton: itself when it is a file, else a temporary conversion of the folder."""
    path = Path(cfg.data.path)
    if path.is_file():
        yield str(path), None
        return
    with tempfile.TemporaryDirectory(prefix="fastmim-bench-") as tmp:
        dst = str(Path(tmp) / "bench.beton")
        log(f"bench data: converting {path} to a temporary .beton (max side {max_side}) ...")
        summary = convert_folder(str(path), dst, max_side=max_side, progress=False, log=lambda _: None)
        yield dst, {"max_side": max_side, "images": summary.written, "bytes": summary.bytes}


def run_data_bench(cfg: Config, sources: list[str] | None, batches: int, warmup: int,
                   augments: list[str] | None = None, max_side: int = 512, log=print) -> list[dict]:  # fmt: skip
    """One row per (source, placement): sources default to :func:`available_sources`, placements to
    ``data.augment``."""
    rows = []
    with contextlib.ExitStack() as stack:
        for source in sources or available_sources(cfg):
            run_cfg = cfg
            beton = None
            if source == "ffcv":
                if not cfg.data.path:
                    raise FastmimError("bench data --sources ffcv needs --data.path: a .beton file or an image folder.")
                run_cfg = copy.deepcopy(cfg)
                run_cfg.data.path, beton = stack.enter_context(_beton_for(cfg, max_side, log))
            for augment in augments or [cfg.data.augment]:
                log(f"bench data: {source}, augment {augment}, batch {cfg.train.batch_size}, "
                    f"{cfg.data.num_workers} workers ...")  # fmt: skip
                row = bench_source(run_cfg, source, batches, warmup, augment)
                if beton is not None:
                    row["beton"] = beton
                rows.append(row)
    return rows
