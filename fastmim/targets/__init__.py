"""Multi-scale reconstruction targets: HOG (method 3.1, 3.3) and normalised pixels (method 3.2)."""

from __future__ import annotations

from collections.abc import Sequence

from fastmim.targets.hog import HOGTarget, hog_histograms
from fastmim.targets.pixel import PixelTarget, pixel_target

__all__ = ["HOGTarget", "PixelTarget", "hog_histograms", "make_target", "pixel_target"]


def make_target(target: str, cell_sizes: Sequence[int], nbins: int, hog_bias: bool) -> HOGTarget | PixelTarget:
    """The target module of a model: "hog" (``nbins`` bins, with or without the frozen Sobel bias) or "pixel"
    (normalised pixels), one output per cell size."""
    if target == "hog":
        return HOGTarget(cell_sizes, nbins=nbins, bias=hog_bias)
    if target == "pixel":
        return PixelTarget(cell_sizes, norm_pix=True)
    raise ValueError(f"unknown target '{target}'; use 'hog' or 'pixel'")
