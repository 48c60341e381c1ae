"""``fastmim data convert``: write an image folder to an FFCV dataset (a ``.beton``, laid out as
:mod:`fastmim.data.beton` describes and reads it).

Writing uses FFCV's ``DatasetWriter`` after a checking pass: FFCV's writer processes cannot skip a sample (an
exception in one leaves the parent waiting forever), so every file is first decoded once, in parallel, and only
the readable ones are handed to the writer. Hostile files (empty, truncated, not an image, over PIL's
decompression-bomb limit, too large for FFCV's 16-bit sizes) are skipped and listed by reason; grayscale, palette,
CMYK, 16-bit and alpha images are converted to RGB (alpha composited on white) and counted. The file is written
under a temporary name next to the destination and takes its final name only when complete; an existing
destination is never replaced.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastmim import files
from fastmim.data.beton import MAX_SIDE_FFCV, require_ffcv
from fastmim.data.sources import FolderSource, UnreadableImageError, decode_image
from fastmim.errors import FastmimError

_MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB); a page must hold the largest image

# Modes PIL opens that need a conversion to RGB, grouped as the summary reports them.
_CONVERSIONS = {
    "L": "grayscale",
    "1": "grayscale",
    "LA": "alpha",
    "La": "alpha",
    "RGBA": "alpha",
    "RGBa": "alpha",
    "PA": "alpha",
    "P": "palette",
    "CMYK": "CMYK",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I;16N": "16-bit",
    "I": "32-bit integer",
    "F": "float",
    "YCbCr": "YCbCr",
    "LAB": "LAB",
    "HSV": "HSV",
}


@dataclass
class ConvertSummary:
    """What ``fastmim data convert`` did."""

    path: str
    written: int = 0
    bytes: int = 0
    seconds: float = 0.0
    resized: int = 0
    converted: dict[str, int] = field(default_factory=dict)  # kind of conversion -> images
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files

    @property
    def num_skipped(self) -> int:
        return sum(len(names) for names in self.skipped.values())

    def lines(self, examples: int = 3) -> list[str]:
        """Human-readable summary: totals, conversions, and skipped files grouped by reason (a few named each)."""
        out = [
            f"wrote {self.written} images to {self.path} ({self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s; "
            f"{self.resized} resized, {self.num_skipped} skipped"
        ]
        if self.converted:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.converted.items()))
            out.append(f"converted to RGB: {kinds}")
        for reason, names in sorted(self.skipped.items()):
            more = f", ... ({len(names) - examples} more)" if len(names) > examples else ""
            named = ", ".join(names[:examples]) + more
            out.append(f"skipped {len(names)} ({reason}): {named}")
        return out


def stored_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size an image is stored at: shrunk (never enlarged) so its longest side is at most ``max_side``."""
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(path: str, max_side: int) -> tuple[np.ndarray, str]:
    """Decode ``path`` to RGB at its stored size: uint8 ``[H, W, 3]`` and the file's PIL mode."""
    img, mode, _ = decode_image(path, max_side)
    size = stored_size(img.width, img.height, max_side)
    if size != img.size:
        # Bicubic with antialiasing, as method 5's crops; reducing_gap first box-reduces by an integer factor, within
        # 1/255 of the exact result, 3-5x faster for large photos.
        img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img), mode


def _check_file(job: tuple[str, int]) -> tuple[str | None, str, tuple[int, int], bool]:
    """Checking pass for one file: (skip reason or None, PIL mode, stored (width, height), shrunk?)."""
    path, max_side = job
    try:
        img, mode, original = decode_image(path, max_side)
    except UnreadableImageError as err:
        return err.reason, "", (0, 0), False
    size = stored_size(img.width, img.height, max_side)
    if max(size) > MAX_SIDE_FFCV:
        return f"larger than FFCV's {MAX_SIDE_FFCV} px per side; set --max-side", mode, size, False
    return None, mode, size, max_side > 0 and max(original) > max_side


class _WriterDataset:
    """What FFCV's writer processes index: ``(uint8 [H, W, 3], label)`` per kept file. Never raises (a raising
    writer process hangs FFCV): a file that fails now although it passed the check (changed on disk meanwhile) gives
    a 1 x 1 placeholder and is counted in ``failures``, and the conversion is then abandoned."""

    def __init__(self, paths: list[str], labels: list[int], max_side: int, failures) -> None:
        self.paths, self.labels, self.max_side, self.failures = paths, labels, max_side, failures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return prepare_image(self.paths[index], self.max_side)[0], self.labels[index]
        except Exception:  # any failure must become a placeholder: see the class docstring
            with self.failures.get_lock():
                self.failures.value += 1
            return np.zeros((1, 1, 3), np.uint8), self.labels[index]


def _page_size(sizes: Iterable[tuple[int, int]]) -> int:
    """A power-of-two FFCV page that holds the largest image, raw or as JPEG (which can exceed raw for noise)."""
    largest = max((w * h * 3 for w, h in sizes), default=0)
    need = 2 * largest + (1 << 16)
    return max(_MIN_PAGE, 1 << (need - 1).bit_length())


def _check_all(paths: list[str], max_side: int, workers: int, progress: bool) -> list[tuple]:
    from tqdm import tqdm

    jobs = [(p, max_side) for p in paths]
    bar = tqdm(total=len(jobs), desc="checking", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else _InProcess() as pool:
        for result in pool.imap(_check_file, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))):
            results.append(result)
            bar.update(1)
        # Done: let the workers exit on their own. Pool.__exit__ terminates instead, i.e. SIGTERMs workers that
        # may be inside the task queue's lock; one killed there leaves the others blocked and the join hanging.
        pool.close()
        pool.join()
    bar.close()
    return results


@contextlib.contextmanager
def _swapped(module: object, name: str, value: object) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class _InProcess:
    """The ``Pool`` interface for one worker: runs in this process (no fork, easy to debug and to test)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def imap(fn: Callable, jobs: Iterable, chunksize: int = 1):
        return map(fn, jobs)

    def close(self) -> None:
        return None

    join = close


def convert_folder(
    src: str,
    dst: str,
    max_side: int = 512,
    quality: int = 90,
    raw: bool = False,
    workers: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ConvertSummary:
    """Write the images under ``src`` (ImageFolder tree or flat folder) to the FFCV dataset ``dst``.

    Args:
        max_side: longest side of a stored image (larger ones are shrunk, bicubic); 0 keeps every size.
        quality: JPEG quality (1-100) of the stored images; ignored when ``raw``.
        raw: store uncompressed RGB instead of JPEG (no decode cost when reading, ~5-10x the bytes).
        workers: processes (0 = one per CPU core).
    """
    require_ffcv("fastmim data convert")
    if not 1 <= quality <= 100:
        raise FastmimError(f"--quality is {quality}; set it between 1 and 100 (90 keeps ImageNet visually lossless).")
    if max_side < 0:
        raise FastmimError(f"--max-side is {max_side}; set it to a positive size, or 0 to keep every image's size.")
    out = files.fresh_output(dst, "destination")
    source = FolderSource(src)
    workers = workers if workers > 0 else os.cpu_count() or 1
    start = time.perf_counter()
    summary = ConvertSummary(path=dst)
    checks = _check_all(source.paths, max_side, workers, progress)
    keep = [i for i, check in enumerate(checks) if check[0] is None]
    skipped = collections.defaultdict(list)
    for path, (reason, mode, _, _) in zip(source.paths, checks):
        if reason is not None:
            skipped[reason].append(path)
        elif mode in _CONVERSIONS:
            summary.converted[_CONVERSIONS[mode]] = summary.converted.get(_CONVERSIONS[mode], 0) + 1
    summary.skipped = dict(skipped)
    if not keep:
        raise FastmimError(f"none of the {len(source)} images under {src} can be read; nothing to write.")
    summary.resized = sum(checks[i][3] for i in keep)
    _write(out, src, source, keep, [checks[i][2] for i in keep], max_side, quality, raw, workers, progress, log)
    summary.written = len(keep)
    summary.bytes = out.stat().st_size
    summary.seconds = time.perf_counter() - start
    return summary


def _write(
    out: Path,
    src: str,
    source: FolderSource,
    keep: list[int],
    sizes: list[tuple[int, int]],
    max_side: int,
    quality: int,
    raw: bool,
    workers: int,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """FFCV-write the kept images to a temporary file next to ``out``, then give it its final name (fastmim.files:
    synced, and never over a file that appeared meanwhile)."""
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from tqdm import tqdm

    with files.reported(out), files.output(out, overwrite=False) as tmp:
        try:
            failures = multiprocessing.get_context("fork").Value("l", 0)
            paths, labels = [source.paths[i] for i in keep], [source.labels[i] for i in keep]
            dataset = _WriterDataset(paths, labels, max_side, failures)
            fields = {
                "image": RGBImageField(write_mode="raw" if raw else "jpg", jpeg_quality=quality),
                "label": IntField(),
            }
            log(f"writing {len(keep)} images ({'raw RGB' if raw else f'JPEG quality {quality}'}) ...")
            processes = min(workers, len(keep))
            writer = ffcv.writer.DatasetWriter(str(tmp), fields, page_size=_page_size(sizes), num_workers=processes)
            # The writer draws its own progress bar: name it like ours, or hide it.
            bar = functools.partial(tqdm, desc="writing", unit="img", disable=not progress, dynamic_ncols=True)
            with _swapped(ffcv.writer, "tqdm", bar):
                writer.from_indexed_dataset(dataset, chunksize=max(1, min(100, len(keep) // workers)))
            if failures.value:
                raise FastmimError(
                    f"{failures.value} images under {src} changed while they were being converted; "
                    "run the conversion again."
                )
        except BaseException:
            # Interrupted (a stop signal) or failed while FFCV's writer processes run: they would go on writing, and
            # multiprocessing's exit handler would wait for them (and they for a reader of their result queue)
            # forever.
            for child in multiprocessing.active_children():
                child.kill()
                child.join()
            raise
