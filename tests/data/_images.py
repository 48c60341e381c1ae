"""Hostile image files for the data tests: one of every kind the loader and the converter must survive."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# File name -> what the conversion and the folder loader must do with it.
HOSTILE_SKIPPED = {
    "zero.jpg": "empty file",
    "text.jpg": "not a recognised image",
    "truncated.jpg": "image file is truncated",
    "bomb.png": "too large: over PIL's decompression-bomb limit",
}
HOSTILE_CONVERTED = {"gray.png": "grayscale", "cmyk.jpg": "CMYK", "deep.png": "16-bit", "alpha.png": "alpha"}
CONVERTED_MAX_SIDE = 64  # the longest side of the hostile folder's images once converted (conftest's `converted`)


def decompression_bomb(path: Path, side: int = 30000) -> None:
    """A 60-byte PNG that declares a side x side RGB image (900 megapixels): PIL refuses to open it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def write_hostile(directory: Path) -> None:
    """One file of every hostile kind into ``directory`` (see HOSTILE_SKIPPED / HOSTILE_CONVERTED), plus an
    enormous-but-readable 2400 x 1600 JPEG (``huge.jpg``) that conversion shrinks from a reduced-scale decode."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "zero.jpg").write_bytes(b"")
    (directory / "text.jpg").write_text("this is not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(directory / "whole.jpg", quality=90)
    data = (directory / "whole.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(data[: len(data) // 2])
    os.remove(directory / "whole.jpg")
    decompression_bomb(directory / "bomb.png")
    Image.new("L", (40, 30), 90).save(directory / "gray.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(directory / "cmyk.jpg", quality=95)  # pure red
    Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))).save(directory / "deep.png")
    alpha = Image.new("RGBA", (40, 30), (0, 0, 255, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half transparent: must come out white, not black
    alpha.save(directory / "alpha.png")
    y, x = np.mgrid[0:1600, 0:2400]
    huge = np.stack([x * 255 // 2400, y * 255 // 1600, (x + y) * 255 // 4000], -1).astype(np.uint8)
    Image.fromarray(huge).save(directory / "huge.jpg", quality=90)


def start_conversion(tmp_path: Path, **popen) -> tuple[subprocess.Popen, Path]:
    """`fastmim data convert` (one worker) of 300 random 128 px JPEGs written under ``tmp_path/src/a``, started with
    ``popen``'s keyword arguments: writing them takes about a second (~300 img/s), long enough to signal or kill the
    converter in the middle of it. Returns the process and its destination, ``tmp_path/out/data.beton``."""
    rng = np.random.default_rng(0)
    (tmp_path / "src" / "a").mkdir(parents=True)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "src" / "a" / f"{i}.jpg")
    dst = tmp_path / "out" / "data.beton"
    dst.parent.mkdir()
    argv = [sys.executable, "-m", "fastmim", "data", "convert", str(tmp_path / "src"), str(dst), "--workers", "1"]
    return subprocess.Popen(argv, **popen), dst
