"""Per-sample pre-training augmentation (method 5), driven by an explicit generator.

The recipe is the MAE / LocalMIM one: RandomResizedCrop(img_size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) ->
horizontal flip with probability 0.5 -> ToTensor -> Normalize(ImageNet mean, std). HOG / pixel targets are computed
later on exactly this normalised tensor.

Every random draw comes from the ``torch.Generator`` passed to :meth:`PretrainTransform.__call__`, never from global
RNG. The loader seeds that generator from (seed, epoch, sample index), so a sample's augmentation does not depend on
which worker process handles it or on where in the epoch iteration started; that is what makes resume exact.
torchvision's ``RandomResizedCrop.get_params`` draws from global RNG, so :func:`sample_crop` re-states the same
standard algorithm with a generator argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The standard RandomResizedCrop gives up after 10 rejected proposals and falls back to a centre crop.
_CROP_TRIES = 10


def sample_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Draw RandomResizedCrop parameters for a ``width`` x ``height`` image.

    Up to 10 proposals: area fraction ~ U(scale), aspect ratio (w / h) log-uniform in ``ratio``; the first proposal
    that fits inside the image is placed uniformly at random. If none fits, return a centre crop whose aspect ratio
    is the image's, clamped to ``ratio``.

    Returns:
        ``(top, left, h, w)`` in pixels, with ``0 <= top``, ``top + h <= height``, ``0 <= left``,
        ``left + w <= width`` and ``h, w >= 1``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        u_area, u_ratio = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w

    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, max(1, round(width / min(ratio)))
    elif image_ratio > max(ratio):
        w, h = max(1, round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """RandomResizedCrop (bicubic) -> random horizontal flip -> ToTensor -> Normalize.

    Args:
        img_size: side of the square output.
        scale: bounds of the crop's area as a fraction of the image area.
        ratio: bounds of the crop's aspect ratio (width / height).
        mean, std: per-channel normalisation applied to the [0, 1] tensor.
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.img_size = img_size
        self.scale = scale
        self.ratio = ratio
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, img: Image.Image, generator: torch.Generator, normalize: bool = True) -> torch.Tensor:
        """Augment one RGB PIL image; returns a float32 tensor ``[3, img_size, img_size]``, or with ``normalize=False``
        the uint8 pixels ``[3, img_size, img_size]`` that :func:`normalize_uint8` turns into exactly that tensor
        (the loader ships uint8, a quarter of the bytes, and normalises on the training device).

        Draws its parameters with :meth:`sample_params`.
        """
        (top, left, h, w), flip = self.sample_params(img.width, img.height, generator)
        out = TF.resized_crop(
            img, top, left, h, w, [self.img_size, self.img_size], InterpolationMode.BICUBIC, antialias=True
        )
        if flip:
            out = TF.hflip(out)
        if not normalize:
            return TF.pil_to_tensor(out)
        return TF.normalize(TF.to_tensor(out), self.mean, self.std)

    def sample_params(
        self, width: int, height: int, generator: torch.Generator
    ) -> tuple[tuple[int, int, int, int], bool]:
        """The random part of the augmentation of a ``width`` x ``height`` image: the crop box ``(top, left, h, w)``
        and whether to flip. Draw order (fixed, so a seed always means the same augmentation): crop parameters,
        then the flip coin. The device placement (``data.augment = "gpu"``) draws the same parameters on the CPU and
        hands them to :func:`fastmim.kernels.crop_resize.crop_resize`, so both placements augment alike."""
        box = sample_crop(width, height, self.scale, self.ratio, generator)
        return box, float(torch.rand(1, generator=generator)) < 0.5

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
            f"mean={tuple(self.mean)}, std={tuple(self.std)})"
        )


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel, on the tensor's device.

    The same float32 operations in the same order as ``TF.normalize(TF.to_tensor(pil), mean, std)``, each
    correctly rounded, so the result is bit-identical to the per-sample PIL path wherever it runs."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(m).div_(s)
