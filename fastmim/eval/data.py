"""Labelled image sets for evaluation, and the method 6 transforms (timm's).

Sources (each a train and a val split of ``(PIL RGB image, label)`` with ``classes``):

- ``folder``: ``data.path/train`` and ``data.path/val`` ImageFolder trees (the ImageNet layout) with the same
  class folders; images are read with fastmim's loader (any mode -> RGB; an unreadable file is named).
- ``digits``: scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, 10 classes, installed with the package:
  no download), grey levels 0-16 scaled to 0-255 and upsampled (bicubic) to the evaluation resolution. Fixed
  split: every fifth image (index % 5 == 0, 360 images) is val, the other 1,437 are train.

Transforms: training = timm's ``create_transform`` (RandomResizedCrop bicubic, flip, RandAugment
``rand-m9-mstd0.5-inc1``, normalise, random erasing 0.25 per pixel); evaluation = resize to ``img_size / crop_pct``
(256 for 224) -> centre crop -> normalise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from fastmim.data.sources import FolderSource
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmim.errors import FastmimError
from fastmim.eval.config import EvalDataConfig

DIGITS_VAL_EVERY = 5


@functools.cache
def _load_digits() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FastmimError("data.source = 'digits' needs scikit-learn; run pip install 'fastmim[eval]'.") from None
    return load_digits()


class DigitsSource:
    """scikit-learn's 8 x 8 digits as RGB images of ``size`` px; ``split`` "train" or "val" (see module doc)."""

    def __init__(self, split: str, size: int) -> None:
        digits = _load_digits()
        index = np.arange(len(digits.target))
        keep = index % DIGITS_VAL_EVERY == 0 if split == "val" else index % DIGITS_VAL_EVERY != 0
        self.images = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self.labels = digits.target[keep].astype(int).tolist()
        self.classes = [str(c) for c in range(10)]
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[index], "L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB"), self.labels[index]


@dataclass
class Splits:
    train: Any
    val: Any
    classes: list[str]


def build_splits(data_cfg: EvalDataConfig, img_size: int) -> Splits:
    """The train and val sources named by the (validated) ``data`` section; what is left to check needs the files."""
    if data_cfg.source == "digits":
        return Splits(DigitsSource("train", img_size), DigitsSource("val", img_size), [str(c) for c in range(10)])
    root = Path(data_cfg.path) if data_cfg.path else None
    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FastmimError(
            f"data.path {data_cfg.path or '(empty)'} must hold train/ and val/ class folders; "
            "set data.path to such a root or use data.source=digits."
        )
    train, val = FolderSource(str(root / "train")), FolderSource(str(root / "val"))
    if train.classes != val.classes:
        raise FastmimError(
            f"{root}/train and {root}/val have different class folders ({len(train.classes)} vs {len(val.classes)}); "
            "give both splits the same classes."
        )
    return Splits(train, val, list(train.classes))


class LabelledImages(Dataset):
    """``(transform(image), label)`` pairs of a source."""

    def __init__(self, source: Any, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source.load(index)
        return self.transform(image), label


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits kept (RandAugment's strongest posterize level): Pillow >= 12 refuses
    bits < 1, older Pillow returned a black image, which is what keeping 0 bits means."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(img_size: int, auto_augment: str, reprob: float) -> Callable:
    """method 6 training augmentation through timm."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment, posterize

    transform = create_transform(
        img_size,
        is_training=True,
        auto_augment=auto_augment or None,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    for t in transform.transforms:
        for op in t.ops if isinstance(t, RandAugment) else []:
            if op.aug_fn is posterize:
                op.aug_fn = _posterize
    return transform


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Callable:
    """Resize to img_size / crop_pct (bicubic) -> centre crop img_size -> normalise."""
    from timm.data import create_transform

    return create_transform(
        img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
