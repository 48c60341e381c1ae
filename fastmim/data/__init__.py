"""Pre-training data: image sources (demo, folder, synthetic), the method 5 augmentation and a deterministic,
resumable loader. The trainer needs only :func:`build_loader` and :class:`MIMLoader`."""

from fastmim.data.loader import MIMLoader, build_loader
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MIMLoader", "PretrainTransform", "build_loader"]
