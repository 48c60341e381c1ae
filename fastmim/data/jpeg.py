"""JPEG decoding into caller-owned memory, through libjpeg-turbo's TurboJPEG library (the one FFCV links against).

The data workers decode every stored JPEG into one buffer they keep (no fresh array per image: on the 2-core
development VM, first-touch page faults on fresh memory cost about as much as a third of the decode itself) and
copy only the crop out. The decoder settings are libjpeg's defaults (accurate integer IDCT, smooth chroma
upsampling), which OpenCV's and torchvision's CPU decoders also use: the pixels are the same bit for bit (tested).

Faster settings were measured and not offered: on 500 x 375 quality-90 JPEGs, fast IDCT + plain chroma upsampling
saved 0-5 % of the decode time (entropy decoding dominates) for up to 54 levels of 255 of difference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import numpy as np

from fastmim.errors import FastmimError

_TJPF_RGB = 0
_INT = ctypes.POINTER(ctypes.c_int)


@functools.cache
def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("turbojpeg")
    if name is None:
        raise FastmimError(
            "reading JPEGs from a .beton needs libjpeg-turbo's TurboJPEG library; install it with "
            "`apt-get install -y libturbojpeg0-dev` (the README's test command does)."
        )
    lib = ctypes.CDLL(name)
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, _INT, _INT, _INT, _INT]
    pointer, size = ctypes.c_void_p, ctypes.c_ulong
    lib.tjDecompress2.argtypes = [pointer, pointer, size, pointer, *[ctypes.c_int] * 5]
    lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
    lib.tjGetErrorStr2.restype = ctypes.c_char_p
    return lib


class JpegError(ValueError):
    """The data is not a JPEG TurboJPEG can decode to RGB (the message says why)."""


class Decoder:
    """A TurboJPEG decompressor for this process (a handle must not cross a fork: a new one is made after it)."""

    def __init__(self) -> None:
        self._pid, self._handle = -1, None

    def _lib_handle(self) -> tuple[ctypes.CDLL, int]:
        lib = _library()
        if self._pid != os.getpid():
            self._pid, self._handle = os.getpid(), lib.tjInitDecompress()
            if not self._handle:
                raise MemoryError("tjInitDecompress failed")
        return lib, self._handle

    def size(self, data: np.ndarray) -> tuple[int, int]:
        """``(width, height)`` from the JPEG headers of ``data`` (uint8 [N]); raises :class:`JpegError`."""
        lib, handle = self._lib_handle()
        w, h, subsamp, colorspace = (ctypes.c_int() for _ in range(4))
        if lib.tjDecompressHeader3(handle, data.ctypes.data, data.size, w, h, subsamp, colorspace) != 0:
            raise JpegError(lib.tjGetErrorStr2(handle).decode(errors="replace"))
        return w.value, h.value

    def decode_into(self, data: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Decode ``data`` (uint8 [N]) to RGB in the first ``H * W * 3`` bytes of ``out`` (uint8, C-contiguous);
        returns that part as a ``[H, W, 3]`` view. Corrupt data raises :class:`JpegError`, and so does what
        libjpeg only warns about (a truncated scan it would fill in grey): OpenCV, the reader's earlier decoder,
        and Pillow, the folder source's, refuse such files too."""
        width, height = self.size(data)
        if width * height * 3 > out.size:
            raise JpegError(f"{width} x {height} image does not fit the {out.size}-byte buffer")
        lib, handle = self._lib_handle()
        if (
            lib.tjDecompress2(
                handle, data.ctypes.data, data.size, out.ctypes.data, width, width * 3, height, _TJPF_RGB, 0
            )
            != 0
        ):
            raise JpegError(lib.tjGetErrorStr2(handle).decode(errors="replace"))
        return out[: width * height * 3].reshape(height, width, 3)
