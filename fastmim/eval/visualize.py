"""Reconstruction pictures: ``visualize(src, out, ...)`` writes one PNG grid for a few images.

One row per image: the input, the masked input (removed patches greyed), then for every scale the target and the
model's prediction at the masked cells (the only cells the loss sees; visible cells are left blank). HOG targets are
drawn as orientation glyphs (one line per bin along the edge direction, brightness = the bin's value, averaged over
R, G, B; ``hog_style="glyphs"``) or as one map per bin (``"bins"``); pixel targets as images (per-cell normalised
values shown at +-2 standard deviations when norm_pix is on).

Orientation convention (method 3.1): phi = atan2(G0, G1) with G0 the horizontal and G1 the vertical Sobel response, so
the gradient points along (sin phi, cos phi) in (x right, y down) image coordinates and the edge along
(cos phi, -sin phi); bin b is drawn at its centre angle (b + 1/2) * 180 / nbins degrees.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from fastmim import files
from fastmim.data.sources import DemoSource, load_rgb
from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmim.errors import FastmimError
from fastmim.eval.backbone import timm_name
from fastmim.masking import scale_weights
from fastmim.targets import HOGTarget
from fastmim.train.checkpoint_files import ModelFile

HOG_STYLES = ("glyphs", "bins")
MAX_ROWS = 64  # demo images per grid: one row each, already a very tall picture
GLYPH_PX = 9  # pixels per cell side in glyph panels: enough for a readable line at 9 or 18 orientations


def load_pretraining_model(src: str) -> tuple[str, nn.Module]:
    """A LocalMIM / MAE model (with its decoders) from a pre-training checkpoint or fastmim weights file, rebuilt
    from the arguments the file stores, mask ratio included."""
    file = ModelFile.read(src)
    timm_name(file.name)  # the ViT models only: refuses others with a clear message
    model = file.build()  # weights that do not fit are refused
    model.load_state_dict(file.state, strict=True)
    return file.name, model.eval()


def glyph_stamps(nbins: int, size: int = GLYPH_PX) -> np.ndarray:
    """[nbins, size, size] anti-aliased line images, bin b along its edge direction through the cell centre."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - c
    stamps = []
    for b in range(nbins):
        phi = (b + 0.5) * math.pi / nbins
        ex, ey = math.cos(phi), -math.sin(phi)  # edge direction in (x right, y down)
        across = np.abs(x * ey - y * ex)  # distance from the line
        along = np.abs(x * ex + y * ey)
        stamps.append(np.clip(1.0 - across, 0.0, 1.0) * (along <= c + 0.5))
    return np.stack(stamps)


def hog_glyphs(cells: np.ndarray, nbins: int) -> np.ndarray:
    """[g, g, 3 * nbins] HOG cells -> [g * GLYPH_PX, g * GLYPH_PX] glyph image in [0, 1]."""
    hist = np.clip(cells.reshape(*cells.shape[:2], 3, nbins).mean(axis=2), 0.0, None)
    hist = hist / max(float(hist.max()), 1e-12)
    g = hist.shape[0]
    img = np.einsum("ijb,byx->iyjx", hist, glyph_stamps(nbins))
    return np.clip(img.reshape(g * GLYPH_PX, g * GLYPH_PX), 0.0, 1.0)


def hog_bin_maps(cells: np.ndarray, nbins: int) -> np.ndarray:
    """[g, g, 3 * nbins] HOG cells -> montage of the nbins per-bin maps (RGB-averaged), 1-px separated, in [0, 1]."""
    hist = np.clip(cells.reshape(*cells.shape[:2], 3, nbins).mean(axis=2), 0.0, None)
    hist = hist / max(float(hist.max()), 1e-12)
    g, cols = hist.shape[0], math.ceil(math.sqrt(nbins))
    rows = math.ceil(nbins / cols)
    out = np.full((rows * (g + 1) - 1, cols * (g + 1) - 1), 0.25)
    for b in range(nbins):
        r, c = divmod(b, cols)
        out[r * (g + 1) : r * (g + 1) + g, c * (g + 1) : c * (g + 1) + g] = hist[:, :, b]
    return out


def pixel_image(cells: np.ndarray, cell: int, norm_pix: bool) -> np.ndarray:
    """[g, g, p * p * 3] pixel-target cells (row, column, channel order) -> [g * p, g * p, 3] in [0, 1]."""
    g = cells.shape[0]
    img = cells.reshape(g, g, cell, cell, 3).transpose(0, 2, 1, 3, 4).reshape(g * cell, g * cell, 3)
    if norm_pix:
        return np.clip(img / 4.0 + 0.5, 0.0, 1.0)
    return np.clip(img * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0.0, 1.0)


def _denormalise(img: Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _render(model: nn.Module, cells: Tensor, k: int, hog_style: str) -> np.ndarray:
    """One scale's target or prediction [N_k, C] as a picture."""
    g = math.isqrt(cells.shape[0])
    arr = cells.float().cpu().numpy().reshape(g, g, -1)
    target = model.target
    if isinstance(target, HOGTarget):
        return (hog_glyphs if hog_style == "glyphs" else hog_bin_maps)(arr, target.nbins)
    return pixel_image(arr, target.cell_sizes[k], target.norm_pix)


def load_images(paths: list[str], num: int, img_size: int) -> Tensor:
    """Normalised [B, 3, S, S] batch: the given files (resize + centre crop) or the first ``num`` demo images."""
    pil = [load_rgb(p) for p in paths] if paths else [DemoSource(num, img_size).load(i)[0] for i in range(num)]
    batch = []
    for image in pil:
        image = TF.center_crop(TF.resize(image, img_size, InterpolationMode.BICUBIC, antialias=True), img_size)
        batch.append(TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN), list(IMAGENET_STD)))
    return torch.stack(batch)


def visualize(
    src: str, out: str | Path, images: list[str] | None = None, num: int = 4, seed: int = 0, hog_style: str = "glyphs"
) -> Path:
    """Write the reconstruction grid of model ``src`` for ``images`` (or ``num`` demo images) to ``out`` (PNG)."""
    if hog_style not in HOG_STYLES:
        raise FastmimError(f"unknown HOG style '{hog_style}'; use one of {', '.join(HOG_STYLES)}.")
    if not images and not 1 <= num <= MAX_ROWS:
        raise FastmimError(f"--num is {num}; give 1 to {MAX_ROWS} demo images (one row each), or --images FILES.")
    name, model = load_pretraining_model(src)
    encoder = model.encoder
    imgs = load_images(images or [], num, encoder.grid * encoder.patch_size)
    noise = torch.rand(imgs.shape[0], encoder.num_patches, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        result = model(imgs, noise)
    scales = list(getattr(model, "scales", [1]))
    cell_sizes = model.target.cell_sizes
    titles = ["input", f"mask ({model.mask_ratio:.0%})"]
    for s, c in zip(scales, cell_sizes):
        label = f"s={s:g}" if s >= 1 else "s=1/2"
        titles += [f"{label} target ({c} px)", f"{label} prediction"]
    rows = []
    for i in range(imgs.shape[0]):
        picture = _denormalise(imgs[i])
        patch_mask = result.mask[i].reshape(encoder.grid, encoder.grid).numpy()
        pixel_mask = np.kron(patch_mask, np.ones((encoder.patch_size, encoder.patch_size)))[..., None]
        panels = [picture, picture * (1 - pixel_mask) + 0.5 * pixel_mask]
        for k, s in enumerate(scales):
            weight = scale_weights(result.mask[i : i + 1], encoder.grid, s)[0].unsqueeze(-1)
            panels += [
                _render(model, result.targets[k][i], k, hog_style),
                _render(model, result.preds[k][i] * (weight > 0), k, hog_style),
            ]
        rows.append(panels)
    return _save_grid(rows, titles, Path(out), f"{name} ({Path(src).name})")


def _save_grid(rows: list[list[np.ndarray]], titles: list[str], out: Path, suptitle: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols, 1.9 * n_rows + 0.4), dpi=150, squeeze=False)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    with files.reported(out), files.output(out, overwrite=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
