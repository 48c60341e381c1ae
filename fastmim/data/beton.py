"""FFCV datasets (``.beton`` files): write one from an image folder (``fastmim data convert``), read one as a source.

A fastmim ``.beton`` is an ordinary FFCV 1.0 dataset with two fields, ``image`` (FFCV's RGBImageField: JPEG or raw
RGB, longest side at most ``max_side``) and ``label`` (IntField), in the folder's sorted order; FFCV's own loaders
read it as they read the ffcv-imagenet files.

Writing uses FFCV's ``DatasetWriter`` after a checking pass: FFCV's writer processes cannot skip a sample (an
exception in one leaves the parent waiting forever), so every file is first decoded once, in parallel, and only
the readable ones are handed to the writer. Hostile files (empty, truncated, not an image, over PIL's
decompression-bomb limit, too large for FFCV's 16-bit sizes) are skipped and listed by reason; grayscale, palette,
CMYK, 16-bit and alpha images are converted to RGB (alpha composited on white) and counted. The file is written
under a temporary name next to the destination and takes its final name only when complete; an existing
destination is never replaced.

Reading needs numpy and libjpeg-turbo's TurboJPEG library (installed with the ``ffcv`` extra's system packages),
not FFCV's loader: the header, field table, per-sample metadata and allocation table are four numpy structured
arrays, and each sample's bytes are read with one ``pread`` into a buffer the caller keeps (:mod:`fastmim.data.jpeg`
decodes into another), so a data worker touches no fresh memory per image. FFCV's ``Loader`` is not used because
its order and crops come from numba's global RNG (no ``(seed, epoch, index)`` determinism, no resume inside an
epoch), its crop resize is OpenCV's INTER_AREA rather than method 5's bicubic, and importing it JIT-compiles numba code
for ~10 CPU-seconds in every process. A ``.beton`` is read by the same :class:`~fastmim.data.loader.MIMLoader`
as every other source, with the same sharding, seeding and resume.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import multiprocessing
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastmim import files
from fastmim.data.jpeg import Decoder, JpegError
from fastmim.data.sources import FolderSource, UnreadableImageError, decode_image
from fastmim.errors import FastmimError, one_line

INSTALL_HINT = (
    "install FFCV with `apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && "
    "pip install 'fastmim[ffcv]'` (see the README's Data section)"
)

# On-disk layout of FFCV's format version 2 (ffcv/types.py, ffcv/fields/*.py: metadata_type).
_VERSION = 2
_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_INT_TYPE, _IMAGE_TYPE = 1, 2
_META_BY_TYPE = {0: np.dtype("<f8"), _INT_TYPE: np.dtype("<i8"), _IMAGE_TYPE: _IMAGE_META}
_JPEG_MODE, _RAW_MODE = 0, 1
_MAX_SIDE_FFCV = 65535  # width and height are stored as uint16
_MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB); a page must hold the largest image


def ffcv_installed() -> bool:
    """Whether the FFCV package is importable (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("ffcv") is not None


def require_ffcv(what: str) -> None:
    """Raise the one-line install hint unless FFCV (with its OpenCV) is installed."""
    if not ffcv_installed() or importlib.util.find_spec("cv2") is None:
        raise FastmimError(f"{what} needs FFCV, which is not installed; {INSTALL_HINT}.")


# ----------------------------------------------------------------------------------------------- reading


class BetonSource:
    """Images and labels of a ``.beton`` file (see the module docstring); ``load`` returns ``(PIL RGB, label)``,
    ``load_array`` ``(uint8 [H, W, 3], label)`` without the PIL wrapper, and ``read_pixels`` / ``read_encoded``
    read into a buffer the caller keeps.

    Attributes:
        path: the file.
        widths, heights: stored size of every image.
        labels: int64 label of every image.
        jpeg: whether every image is stored as JPEG (none raw).
        stored_bytes: bytes of every stored sample (its JPEG, or its raw pixels).
        max_pixel_bytes, max_encoded_bytes: the largest decoded image (H * W * 3) and stored sample, in bytes.
    """

    def __init__(self, path: str) -> None:
        require_ffcv('data.source = "ffcv"')
        if not path:
            raise FastmimError("data.path is empty; set data.path=/path/to/dataset.beton (see `fastmim data convert`).")
        if not os.path.isfile(path):
            raise FastmimError(
                f"data.path {path} is not a file; set data.path to a .beton file written by `fastmim data convert`."
            )
        self.path = path
        self._size = os.path.getsize(path)
        header = self._read(_HEADER, 1, 0)[0]
        if int(header["version"]) != _VERSION:
            raise FastmimError(
                f"{path} is not an FFCV dataset (format version {int(header['version'])}, expected {_VERSION}); "
                "write one with `fastmim data convert`."
            )
        fields = self._read(_FIELD, int(header["num_fields"]), _HEADER.itemsize, "its field table")
        types = [int(t) for t in fields["type_id"]]
        names = [bytes(n).rstrip(b"\0").decode("ascii", "replace") for n in fields["name"]]
        if any(t not in _META_BY_TYPE for t in types) or types.count(_IMAGE_TYPE) != 1 or _INT_TYPE not in types:
            raise FastmimError(
                f"{path} holds fields {', '.join(names)}; fastmim reads .beton files with one RGB image field and an "
                "integer label field, as `fastmim data convert` writes them."
            )
        meta_type = np.dtype([("", _META_BY_TYPE[t]) for t in types], align=True)
        meta = self._read(meta_type, int(header["num_samples"]), _HEADER.itemsize + fields.nbytes, "its sample table")
        image = meta[meta_type.names[types.index(_IMAGE_TYPE)]]
        self.labels = meta[meta_type.names[types.index(_INT_TYPE)]].astype(np.int64)
        self.widths = image["width"].astype(np.int64)
        self.heights = image["height"].astype(np.int64)
        self._modes = image["mode"].copy()
        self._ptrs = image["data_ptr"].astype(np.int64)
        # FFCV writes the allocation table last, at the end of the file: a copy cut short loses it first.
        table = int(header["alloc_table_ptr"])
        if not _HEADER.itemsize <= table <= self._size or (self._size - table) % _ALLOC.itemsize:
            raise self._damaged("it ends before its allocation table is complete")
        alloc = self._read(_ALLOC, (self._size - table) // _ALLOC.itemsize, table, "its allocation table")
        order = np.argsort(alloc["ptr"])
        ptrs, sizes = alloc["ptr"][order].astype(np.int64), alloc["size"][order].astype(np.int64)
        found = np.clip(np.searchsorted(ptrs, self._ptrs), 0, max(len(ptrs) - 1, 0))
        if len(self._ptrs) and (len(ptrs) == 0 or not np.array_equal(ptrs[found], self._ptrs)):
            raise self._damaged("an image has no allocation")
        start, length = alloc["ptr"].astype(np.uint64), alloc["size"].astype(np.uint64)
        if not ((start <= table) & (length <= table - np.minimum(start, table))).all():  # no uint64 wrap-around
            raise self._damaged("an image lies outside the file")
        self.stored_bytes = sizes[found] if len(ptrs) else np.zeros(0, np.int64)
        raw = self._modes == _RAW_MODE
        if not np.isin(self._modes, (_JPEG_MODE, _RAW_MODE)).all() or not np.array_equal(
            self.stored_bytes[raw], (self.widths * self.heights * 3)[raw]
        ):
            raise self._damaged("an image's mode or size differs from its stored bytes")
        self.jpeg = bool((self._modes == _JPEG_MODE).all())
        self.max_pixel_bytes = int((self.widths * self.heights).max(initial=0)) * 3
        self.max_encoded_bytes = int(self.stored_bytes.max(initial=0))
        self._decoder = Decoder()
        self._fd: int | None = None  # opened on first use, in the process that reads

    def _read(self, dtype: np.dtype, count: int, offset: int, part: str = "") -> np.ndarray:
        """``count`` records of ``dtype`` at ``offset``, after checking that the file holds them: a size read from
        a damaged header (billions of samples) must not become an allocation."""
        if offset + count * dtype.itemsize > self._size:
            if not part:  # the header itself
                raise FastmimError(
                    f"{self.path} is truncated or not a .beton file; write it with `fastmim data convert`."
                )
            raise self._damaged(f"{part} runs past its end")
        try:
            array = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
        except (OSError, ValueError) as exc:
            raise FastmimError(f"cannot read {self.path} ({exc}); is it a .beton file?") from exc
        if len(array) != count:
            raise self._damaged(f"{part or 'its header'} is cut short")
        return array

    def _damaged(self, why: str) -> FastmimError:
        return FastmimError(
            f"{one_line(self.path)} is damaged or incomplete ({why}: {self._size} bytes, copied or written only in "
            "part?); copy it again, or write it again with `fastmim data convert`."
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn receive the source pickled: they open the file themselves.
        return {**self.__dict__, "_fd": None}

    def _pread(self, out: np.ndarray, offset: int, index: int) -> np.ndarray:
        """Fill ``out`` (uint8, C-contiguous) from the file at ``offset``; a short read means a damaged file."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)
        if os.preadv(self._fd, [out], offset) != out.size:
            raise UnreadableImageError(f"{self.path}[{index}]", "the dataset file ends inside this image")
        return out

    def _stored(self, index: int, out: np.ndarray | None) -> np.ndarray:
        size = int(self.stored_bytes[index])
        return self._pread((np.empty(size, np.uint8) if out is None else out)[:size], int(self._ptrs[index]), index)

    def _unreadable(self, index: int, err: Exception | str) -> UnreadableImageError:
        reason = err if isinstance(err, str) else f"corrupt JPEG data in the dataset: {err}"
        return UnreadableImageError(f"{self.path}[{index}]", reason)

    def read_encoded(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Sample ``index`` as stored (its JPEG bytes) in the first bytes of ``out`` (uint8, C-contiguous, at least
        ``max_encoded_bytes``; default a fresh array); the JPEG headers are checked against the stored size."""
        data = self._stored(index, out)
        if self._modes[index] == _JPEG_MODE:
            try:
                shape = self._decoder.size(data)
            except JpegError as err:
                raise self._unreadable(index, err) from err
            if shape != (int(self.widths[index]), int(self.heights[index])):
                raise self._unreadable(index, "JPEG size differs from the stored size")
        return data

    def read_pixels(
        self,
        index: int,
        out: np.ndarray | None = None,
        rows: tuple[int, int] | None = None,
        scratch: np.ndarray | None = None,
    ) -> np.ndarray:
        """Image ``index`` (or its rows ``rows[0]:rows[1]``) as uint8 ``[h, W, 3]``, a view into ``out`` (uint8,
        C-contiguous, at least ``max_pixel_bytes``; default a fresh array). A JPEG is read into ``scratch``
        (at least ``max_encoded_bytes``) and decoded whole into ``out``; a raw image reads only those rows."""
        h, w = int(self.heights[index]), int(self.widths[index])
        top, bottom = rows or (0, h)
        out = np.empty(h * w * 3, np.uint8) if out is None else out
        if self._modes[index] == _RAW_MODE:
            span = out[: (bottom - top) * w * 3]
            return self._pread(span, int(self._ptrs[index]) + top * w * 3, index).reshape(bottom - top, w, 3)
        try:
            image = self._decoder.decode_into(self._stored(index, scratch), out)
        except JpegError as err:
            raise self._unreadable(index, err) from err
        if image.shape[:2] != (h, w):
            raise self._unreadable(index, "JPEG size differs from the stored size")
        return image[top:bottom]

    def load_array(self, index: int) -> tuple[np.ndarray, int]:
        """Image ``index`` as uint8 ``[H, W, 3]`` (a fresh array) and its label."""
        return self.read_pixels(index), int(self.labels[index])

    def load(self, index: int) -> tuple[Image.Image, int]:
        array, label = self.load_array(index)
        return Image.fromarray(array, "RGB"), label


# ----------------------------------------------------------------------------------------------- writing

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
    if max(size) > _MAX_SIDE_FFCV:
        return f"larger than FFCV's {_MAX_SIDE_FFCV} px per side; set --max-side", mode, size, False
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
