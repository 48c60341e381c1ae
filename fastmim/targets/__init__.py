"""Multi-scale reconstruction targets: HOG (SPEC 3.1, 3.3) and normalised pixels (SPEC 3.2)."""

from fastmim.targets.hog import HOGTarget, hog_histograms
from fastmim.targets.pixel import PixelTarget, pixel_target

__all__ = ["HOGTarget", "PixelTarget", "hog_histograms", "pixel_target"]
