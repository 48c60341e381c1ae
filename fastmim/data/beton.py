"""FFCV datasets (``.beton`` files): their layout, and the reader that serves one as a training source.

A fastmim ``.beton`` is an ordinary FFCV 1.0 dataset with two fields, ``image`` (FFCV's RGBImageField: JPEG or raw
RGB, longest side at most ``max_side``) and ``label`` (IntField), in the folder's sorted order; FFCV's own loaders
read it as they read the ffcv-imagenet files. :mod:`fastmim.data.convert` writes one (``fastmim data convert``).

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

import importlib.util
import os
import weakref

import numpy as np
from PIL import Image

from fastmim.data.jpeg import Decoder, JpegError
from fastmim.data.sources import UnreadableImageError
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
MAX_SIDE_FFCV = 65535  # width and height are stored as uint16


def ffcv_installed() -> bool:
    """Whether the FFCV package is importable (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("ffcv") is not None


def require_ffcv(what: str) -> None:
    """Raise the one-line install hint unless FFCV (with its OpenCV) is installed."""
    if not ffcv_installed() or importlib.util.find_spec("cv2") is None:
        raise FastmimError(f"{what} needs FFCV, which is not installed; {INSTALL_HINT}.")


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
