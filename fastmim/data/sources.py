"""Image sources: where pre-training images come from, before augmentation.

A source is a finite, indexable collection: ``len(source)`` images, and ``source.load(index)`` returns
``(PIL RGB image, int label)``. Loading is a pure function of the index, so any process (the main one or a
DataLoader worker) gets the same image for the same index.

- ``demo``: built in, no download. Even indices are random crops of the photographs that ship with matplotlib;
  odd indices are procedural images (gratings, shapes, blobs, rings) with edges at many orientations, so HOG
  targets are meaningful. Label = which photo or pattern produced the image.
- ``folder``: an ImageFolder tree (``root/<class>/**/<image>``, labels = sorted class folders) or a flat folder of
  images (all label 0). A file that cannot be decoded raises :class:`UnreadableImageError`; the loader replaces
  that sample and counts it.
- ``ffcv``: a ``.beton`` file written by ``fastmim data convert`` (:mod:`fastmim.data.convert`), read by
  :mod:`fastmim.data.beton`.
- ``fashion_mnist``: Fashion-MNIST (70,000 grey 28 x 28 photographs of clothing, 10 classes) read from its four
  gzipped IDX files, by default where Debian's ``dataset-fashion-mnist`` package puts them. Pre-training reads the
  train split only (minus ``data.holdout`` images kept for choosing hyper-parameters); the test split is for the
  reported numbers (:mod:`fastmim.eval.convergence`).
- ``synthetic``: cheap structured noise generated from the index, label 0; for throughput measurements.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from fastmim.errors import FastmimError, one_line

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Photos in matplotlib's sample_data directory; a label is the position in this tuple, so labels stay fixed even if
# a matplotlib build lacks one of them.
_PHOTO_FILES: tuple[str, ...] = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
_PATTERNS: tuple[str, ...] = ("gratings", "shapes", "blobs", "rings")

# Salts keep the demo and synthetic per-index random streams unrelated to each other.
_DEMO_SALT = 0x5EED_DE30
_SYNTHETIC_SALT = 0x5EED_5717


class UnreadableImageError(FastmimError):
    """An image file that cannot be decoded (empty, truncated, not an image, over PIL's decompression-bomb limit).

    Attributes:
        path: the file.
        reason: a few words on what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {one_line(path)} ({reason}); remove or replace that file.")
        self.path = path
        self.reason = reason


class ImageSource(Protocol):
    """What the loader needs from a source."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Return image ``index`` as an RGB PIL image and its integer label."""
        ...


def to_rgb(img: Image.Image) -> Image.Image:
    """Return a new RGB copy of ``img`` whatever its mode (L, LA, P, RGBA, CMYK, I;16, F, ...)."""
    if img.mode == "F":
        # 32-bit float pixels (float TIFFs) have no stored range; the convention is [0, 1], which PIL's own
        # conversion would clip to the values 0 and 1 of 255: a black image. Other ranges are refused, not guessed.
        arr = np.asarray(img, dtype=np.float64)
        if not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ValueError("32-bit float pixels outside [0, 1]; save it as an 8- or 16-bit image")
        return Image.fromarray(np.round(arr * 255.0).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's own I;16 -> RGB conversion saturates at 255 instead of rescaling, turning most 16-bit images white.
        arr = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # The stored colour of fully transparent pixels is arbitrary (often black); composite onto white so the
        # image looks as it does in a viewer.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(path: str, max_side: int = 0) -> tuple[Image.Image, str, tuple[int, int]]:
    """Decode the image file at ``path``: returns the RGB image, the file's own PIL mode (``"L"``, ``"CMYK"``,
    ``"I;16"``, ``"RGBA"``, ...) and its size in the file. An unreadable file raises :class:`UnreadableImageError`.

    ``max_side > 0`` lets a JPEG decode at a reduced scale (1/2, 1/4 or 1/8, in the DCT) as long as both sides stay
    at least ``max_side``: for conversions that shrink images anyway, it cuts the decode cost of a large photo by up
    to 64x. The image is not resized beyond that.
    """
    try:
        with _open_regular_file(path) as f, Image.open(f) as img:
            size = img.size
            if max_side > 0 and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            # Decode now, so a truncated file fails here with its name rather than later inside the transform.
            img.load()
            return to_rgb(img), img.mode, size
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, "too large: over PIL's decompression-bomb limit") from exc
    except (OSError, ValueError, EOFError, SyntaxError, MemoryError) as exc:
        # PIL's "cannot identify image file '<path>'" would repeat the path; say what it means instead.
        if isinstance(exc, UnidentifiedImageError):
            reason = "empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 else "not a recognised image"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(path, reason) from exc


def _open_regular_file(path: str):
    """``path`` opened for reading, refused unless it is a regular file: opening a FIFO (say, one named
    ``pipe.png``) would block until something writes to it, and a device such as /dev/zero never ends. The open
    itself does not block (O_NONBLOCK, which changes nothing for a regular file)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnreadableImageError(path, "not a regular file (a FIFO, socket or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_rgb(path: str) -> Image.Image:
    """Decode the image file at ``path`` into RGB; an unreadable file raises :class:`UnreadableImageError`."""
    return decode_image(path)[0]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(directory: str) -> list[str]:
    """All image files below ``directory`` (recursive, following links, hidden entries skipped), in sorted order:
    each folder's images, then its sub-folders' in name order, so the listing is the same on every machine.

    Each real folder is listed once: a link to a folder already listed (a loop back to a parent, or a second way
    into the same folder) is skipped, so a loop neither hangs the listing nor repeats images. Image names that are
    not regular files (FIFOs, sockets, devices, broken links) are left out: reading one would block or never end.
    Both are warned about, as are folders that cannot be read.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    repeated, irregular, unlistable = [], [], []
    pending = [directory]
    while pending:
        current = pending.pop()
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in seen:
                repeated.append(current)
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted((e for e in os.scandir(current) if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            unlistable.append(current)
            continue
        for entry in entries:
            if entry.is_dir() or not _is_image(entry.name):
                continue
            (found if entry.is_file() else irregular).append(entry.path)
        pending.extend(reversed([e.path for e in entries if e.is_dir()]))
    for paths, what in (
        (repeated, "links to a folder listed already (e.g. a loop), skipped"),
        (irregular, "image names that are not regular files (FIFOs, devices, broken links), skipped"),
        (unlistable, "folders that cannot be read, skipped"),
    ):
        if paths:
            warnings.warn(f"{len(paths)} {what} under {one_line(directory)}, e.g. {one_line(paths[0])}", stacklevel=3)
    return found


class FolderSource:
    """Images on disk: ImageFolder layout (``root/<class>/...``) or a flat folder of images (all label 0).

    Attributes:
        paths: image file paths, sorted by class then path.
        labels: class index of each path.
        classes: class folder names in label order (``[""]`` for a flat folder).
    """

    def __init__(self, root: str) -> None:
        if not root:
            raise FastmimError("data.path is empty; set data.path=/path/to/images or use data.source=demo.")
        if not os.path.exists(root):
            raise FastmimError(f"data.path {root} does not exist; set data.path to an existing folder of images.")
        if not os.path.isdir(root):
            raise FastmimError(
                f"data.path {root} is a file, not a directory; set data.path to the folder that holds the images."
            )
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
        self.paths: list[str] = []
        self.labels: list[int] = []
        if not class_dirs:
            self.classes = [""]
            self.paths, self.labels = loose, [0] * len(loose)
        elif loose:
            raise FastmimError(
                f"data.path {root} mixes {len(loose)} image files with class folders; "
                "move the loose images into a class folder or remove them."
            )
        else:
            self.classes = [d.name for d in class_dirs]
            for label, class_dir in enumerate(class_dirs):
                images = _images_under(class_dir.path)
                if not images:
                    raise FastmimError(f"class folder {class_dir.path} contains no images; remove it or add images.")
                self.paths.extend(images)
                self.labels.extend([label] * len(images))
        if not self.paths:
            raise FastmimError(
                f"data.path {root} contains no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or point data.path at the folder that holds them."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[index]), self.labels[index]


@functools.lru_cache(maxsize=1)
def _demo_photos() -> tuple[tuple[int, Image.Image], ...]:
    """Decoded matplotlib sample photos as ``(label, RGB image)``, those that exist; decoded once per process."""
    try:
        from matplotlib import cbook
    except ImportError:
        return ()
    photos = []
    for label, name in enumerate(_PHOTO_FILES):
        path = Path(cbook.get_sample_data(name, asfileobj=False))
        if path.is_file():
            photos.append((label, load_rgb(str(path))))
    return tuple(photos)


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light RGB colour in [0, 1] (random order): every channel differs by at least 0.2."""
    dark, light = rng.uniform(0.0, 0.4, 3), rng.uniform(0.6, 1.0, 3)
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def _colourise(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map a ``[H, W]`` field to ``[H, W, 3]`` uint8 between two contrasting colours, plus faint sensor-like noise."""
    lo, hi = float(field.min()), float(field.max())
    t = (field - lo) / max(hi - lo, 1e-6)
    c0, c1 = _two_colours(rng)
    rgb = c0 + t[..., None] * (c1 - c0) + rng.normal(0.0, 0.02, (*field.shape, 3))
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable pixel coordinates ``y [H, 1]``, ``x [1, W]`` (float32)."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _gratings(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sum of 1-3 oriented sine or square-wave gratings: straight edges at random orientations."""
    y, x = _coords(h, w)
    field = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(4.0, max(6.0, min(h, w) / 3))
        wave = np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period + rng.uniform(0, 2 * math.pi))
        field += rng.uniform(0.3, 1.0) * (np.sign(wave) if rng.random() < 0.5 else wave)
    return _colourise(field, rng)


def _shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Rotated rectangles, ellipses, triangles and thick lines in random colours over a linear gradient."""
    y, x = _coords(h, w)
    theta = rng.uniform(0.0, 2 * math.pi)
    img = Image.fromarray(_colourise(x * math.cos(theta) + y * math.sin(theta), rng), "RGB")
    draw = ImageDraw.Draw(img)
    size = min(h, w)
    for _ in range(int(rng.integers(5, 16))):
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.3, 2) * size
        kind = int(rng.integers(4))
        if kind == 0:  # rotated rectangle: edges at an arbitrary angle, not just the pixel axes
            a = rng.uniform(0.0, math.pi)
            ca, sa = math.cos(a), math.sin(a)
            corners = [(-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry)]
            draw.polygon([(cx + u * ca - v * sa, cy + u * sa + v * ca) for u, v in corners], fill=fill)
        elif kind == 1:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif kind == 2:
            angles = rng.uniform(0.0, 2 * math.pi, 3)
            draw.polygon([(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles], fill=fill)
        else:
            draw.line([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, width=int(rng.integers(2, max(3, size // 16))))
    return np.asarray(img)


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Thresholded multi-octave value noise: curved region boundaries (edges at every orientation) with texture."""
    field = np.zeros((h, w), np.float32)
    for octave in range(3):
        cells = 3 * 2**octave
        coarse = rng.random((cells, cells)).astype(np.float32)
        field += np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC)) / 2**octave
    regions = (field > np.median(field)).astype(np.float32)
    return _colourise(regions + 0.25 * field, rng)


def _rings(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Concentric rings or spokes around a random centre: edges that sweep through all orientations."""
    y, x = _coords(h, w)
    dy, dx = y - rng.uniform(0, h), x - rng.uniform(0, w)
    if rng.random() < 0.5:
        wave = np.sin(2 * math.pi * np.hypot(dx, dy) / rng.uniform(6.0, max(8.0, min(h, w) / 4)))
    else:
        wave = np.sin(int(rng.integers(3, 16)) * np.arctan2(dy, dx) + rng.uniform(0, 2 * math.pi))
    return _colourise(np.sign(wave) if rng.random() < 0.5 else wave, rng)


_PATTERN_FNS = (_gratings, _shapes, _blobs, _rings)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as an array: magic 0, 0, dtype code, ndim, then ndim
    big-endian uint32 sizes, then the elements. A malformed file raises FastmimError naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise FastmimError(f"cannot read {path} ({exc}); reinstall the data set or fix data.path.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FastmimError(f"{path} is not an IDX file of uint8; reinstall the data set or fix data.path.")
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, 4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise FastmimError(
            f"{path} holds {data.size} values, its header says {shape}; reinstall the data set or fix data.path."
        )
    return data.reshape(shape).copy()  # writable, as torch.from_numpy wants


def fashion_mnist_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST's ``split`` ("train" or "t10k") under
    ``root`` (empty = the Debian package's directory); files may be gzipped or not."""
    directory = Path(root or FASHION_MNIST_DIR)
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{split}-{kind}-ubyte"
        path = next((p for p in (directory / f"{name}.gz", directory / name) if p.is_file()), None)
        if path is None:
            fix = "apt-get install dataset-fashion-mnist" if not root else "point data.path at the IDX files"
            raise FastmimError(f"Fashion-MNIST file {directory / name}.gz not found; run `{fix}`.")
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise FastmimError(f"Fashion-MNIST {split} images {images.shape} and labels {labels.shape} do not match.")
    return images, labels.astype(np.int64)


class FashionMNISTSource:
    """Fashion-MNIST ``split`` as 28 x 28 RGB images (grey repeated) with their class; ``holdout`` > 0 drops the
    last ``holdout`` images (the pre-training loader's view when a validation part is kept apart)."""

    def __init__(self, root: str = "", split: str = "train", holdout: int = 0) -> None:
        images, labels = fashion_mnist_arrays(root, split)
        if not 0 <= holdout < len(images):
            raise FastmimError(f"data.holdout is {holdout}; set it between 0 and {len(images) - 1}.")
        keep = len(images) - holdout
        self.images, self.labels = images[:keep], labels[:keep]
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], "L").convert("RGB"), int(self.labels[index])


class DemoSource:
    """The built-in demo set: ``num_images`` deterministic images, each a function of its index only.

    Image sizes vary between ``img_size`` and ``2 * img_size`` per side (aspect ratios up to 2:1), like ImageNet
    photos relative to a 224 crop, so RandomResizedCrop behaves as it does on real data.
    """

    def __init__(self, num_images: int, img_size: int) -> None:
        self.num_images = num_images
        self.img_size = img_size
        # Decode the photos here so forked workers inherit them instead of each decoding its own copy.
        self._photo_labels = [label for label, _ in _demo_photos()]

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> tuple[Image.Image, int]:
        rng = np.random.default_rng((_DEMO_SALT, index))
        if index % 2 == 0 and self._photo_labels:
            return self._photo_crop(rng)
        kind = int(rng.integers(len(_PATTERN_FNS)))
        h, w = (self.img_size * rng.uniform(1.0, 2.0, 2)).astype(int)
        return Image.fromarray(_PATTERN_FNS[kind](rng, int(h), int(w)), "RGB"), len(_PHOTO_FILES) + kind

    def _photo_crop(self, rng: np.random.Generator) -> tuple[Image.Image, int]:
        """A random crop (30-100% of the area, aspect 1:2 to 2:1) of one photo, resized to a short side in
        [img_size, 2 * img_size]."""
        photos = _demo_photos()
        label, photo = photos[int(rng.integers(len(photos)))]
        area = photo.width * photo.height * rng.uniform(0.3, 1.0)
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        cw = int(np.clip(round(math.sqrt(area * aspect)), 1, photo.width))
        ch = int(np.clip(round(math.sqrt(area / aspect)), 1, photo.height))
        left = int(rng.integers(0, photo.width - cw + 1))
        top = int(rng.integers(0, photo.height - ch + 1))
        short = self.img_size * rng.uniform(1.0, 2.0)
        factor = short / min(cw, ch)
        size = (max(1, round(cw * factor)), max(1, round(ch * factor)))
        return photo.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch)), label


class SyntheticSource:
    """``num_images`` square ``img_size`` images of coloured smooth noise plus pixel noise, label 0.

    Generated from the index in well under a millisecond, with no storage; meant for measuring throughput.
    """

    def __init__(self, num_images: int, img_size: int) -> None:
        self.num_images = num_images
        self.img_size = img_size

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> tuple[Image.Image, int]:
        rng = np.random.default_rng((_SYNTHETIC_SALT, index))
        s = self.img_size
        cells = max(2, s // 16)
        coarse = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8), "RGB")
        smooth = np.asarray(coarse.resize((s, s), Image.BILINEAR), dtype=np.int16)
        noisy = smooth + rng.integers(-24, 25, (s, s, 3), dtype=np.int16)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), 0
