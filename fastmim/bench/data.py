"""``fastmim bench data``: loader throughput per available source (img/s and img/s per worker process).

Each source is read through the production loader (decode, RandomResizedCrop, flip, normalise, collate) for
``batches`` batches after ``warmup`` untimed ones (worker start-up excluded). "Per worker" divides by the number of
worker processes (1 when loading in the main process), the figure to plan CPU cores with.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from fastmim.config import Config
from fastmim.data import build_loader


def available_sources(cfg: Config) -> list[str]:
    """demo and synthetic always; folder when data.path names an existing directory."""
    sources = ["demo", "synthetic"]
    if cfg.data.path and Path(cfg.data.path).is_dir():
        sources.append("folder")
    return sources


def bench_source(cfg: Config, source: str, batches: int, warmup: int) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg.data.source = source
    t = cfg.train
    img_size = cfg.model.img_size or 224
    loader = build_loader(cfg.data, img_size, t.batch_size, t.seed)
    needed = warmup + batches
    it = (batch for epoch in range(needed) for batch in loader.iterate(epoch))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    workers = cfg.data.num_workers
    rate = batches * t.batch_size / elapsed
    return {
        "source": source,
        "img_size": img_size,
        "batch": t.batch_size,
        "num_workers": workers,
        "batches": batches,
        "img_per_s": rate,
        "img_per_s_per_worker": rate / max(1, workers),
        "ms_per_batch": elapsed * 1e3 / batches,
    }


def run_data_bench(cfg: Config, sources: list[str] | None, batches: int, warmup: int, log=print) -> list[dict]:
    rows = []
    for source in sources or available_sources(cfg):
        log(f"bench data: {source}, batch {cfg.train.batch_size}, {cfg.data.num_workers} workers ...")
        rows.append(bench_source(cfg, source, batches, warmup))
    return rows


DATA_COLUMNS = ("source", "img_size", "batch", "num_workers", "img_per_s", "img_per_s_per_worker", "ms_per_batch")
