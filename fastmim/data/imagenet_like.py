"""An ImageNet-like folder of JPEGs made from the photograph that ships with matplotlib, for ``fastmim bench data``.

Decode cost depends on pixel count, chroma subsampling and entropy-coded bytes, so the images imitate ImageNet's
training JPEGs in those: 500 x 375 (one in four portrait, 375 x 500), 4:2:0, quality 90, with photographic detail
at about ImageNet's density. Each image is a 2 x 2 or 3 x 3 mosaic of downscaled crops of the photo (so edges and
texture are as dense as in a photo of a whole scene, not as sparse as in one upscaled portrait), with a per-tile
colour gain, random flips and a faint sensor-like grain. The result averages about 85 KB per file (ImageNet's
train JPEGs: about 110 KB at about 400 x 350, re-encoded at quality 90 somewhat less). Every image is a function of
its index only, so the folder is the same on every machine with the same Pillow.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from fastmim import files
from fastmim.errors import FastmimError

_SALT = 0x5EED_1A6E
_SIZE = (500, 375)  # ImageNet's most common training-image size (landscape)
_GRAIN = 6.0  # standard deviation of the added grain, in levels of 255


def _photo() -> Image.Image:
    """matplotlib's bundled photograph (512 x 600), the one real photo among its sample data."""
    from matplotlib import cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def imagenet_like_image(index: int, photo: Image.Image) -> Image.Image:
    """Image ``index`` of the folder (see the module docstring): RGB, 500 x 375 or 375 x 500."""
    rng = np.random.default_rng((_SALT, index))
    width, height = _SIZE if rng.random() < 0.75 else _SIZE[::-1]
    tiles = int(rng.integers(2, 4))
    xs = np.linspace(0, width, tiles + 1).astype(int)
    ys = np.linspace(0, height, tiles + 1).astype(int)
    canvas = np.empty((height, width, 3), np.float32)
    for row in range(tiles):
        for col in range(tiles):
            tw, th = xs[col + 1] - xs[col], ys[row + 1] - ys[row]
            shrink = rng.uniform(1.5, 3.0)  # source pixels per output pixel: detail denser than the portrait's
            cw, ch = min(photo.width, math.ceil(tw * shrink)), min(photo.height, math.ceil(th * shrink))
            left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
            tile = photo.resize((tw, th), Image.BICUBIC, box=(left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas[ys[row] : ys[row + 1], xs[col] : xs[col + 1]] = np.asarray(tile) * rng.uniform(0.7, 1.3, 3)
    canvas += rng.normal(0.0, _GRAIN, canvas.shape)
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_imagenet_like(dst: str, images: int = 512, quality: int = 90) -> int:
    """Write ``images`` JPEGs (``00000.jpg`` ...) as a flat folder ``dst``; returns the bytes written.

    The folder is filled under a temporary name next to ``dst``, synced and renamed when complete
    (fastmim.files); an existing ``dst`` is never touched."""
    if images < 1:
        raise FastmimError(f"--images is {images}; set it to a positive number of images.")
    if not 1 <= quality <= 100:
        raise FastmimError(f"--quality is {quality}; set it between 1 and 100.")
    out = files.fresh_output(dst, "destination")
    photo = _photo()
    total = 0
    with files.reported(out), files.output(out, overwrite=False, directory=True) as tmp:
        for index in range(images):
            path = os.path.join(tmp, f"{index:05d}.jpg")
            imagenet_like_image(index, photo).save(path, "JPEG", quality=quality)
            total += os.path.getsize(path)
    return total
