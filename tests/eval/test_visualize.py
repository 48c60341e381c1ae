"""fastmim visualize: one PNG grid, glyphs that point along edges, pixel targets drawn back as images."""

import numpy as np
import torch
from PIL import Image

from fastmim.cli import main
from fastmim.eval.visualize import GLYPH_PX, glyph_stamps, hog_bin_maps, hog_glyphs, pixel_image, visualize
from fastmim.models import create_model
from fastmim.targets import HOGTarget, PixelTarget
from fastmim.train.checkpoint_files import WEIGHTS_FORMAT


def test_glyph_orientation_follows_the_edge():
    """A vertical step edge has a horizontal gradient: its glyphs must be vertical lines (and vice versa)."""
    img = torch.zeros(1, 3, 16, 16)
    img[..., 8:] = 1.0  # dark left half, bright right half: a vertical edge at x = 8
    (cells,) = HOGTarget([8], nbins=9)(img)
    glyphs = hog_glyphs(cells[0].reshape(2, 2, 27).numpy(), 9)
    assert glyphs.shape == (2 * GLYPH_PX, 2 * GLYPH_PX)
    left_cell = glyphs[:GLYPH_PX, :GLYPH_PX]  # the edge runs through the right border column of the left cells
    assert left_cell.sum(axis=0).std() > 3 * left_cell.sum(axis=1).std()  # column-concentrated: a vertical line
    (cells_t,) = HOGTarget([8], nbins=9)(img.transpose(2, 3))
    horizontal = hog_glyphs(cells_t[0].reshape(2, 2, 27).numpy(), 9)[:GLYPH_PX, :GLYPH_PX]
    assert horizontal.sum(axis=1).std() > 3 * horizontal.sum(axis=0).std()


def test_stamps_and_bin_maps():
    stamps = glyph_stamps(9)
    assert stamps.shape == (9, GLYPH_PX, GLYPH_PX) and (stamps.max(axis=(1, 2)) == 1.0).all()
    montage = hog_bin_maps(np.random.default_rng(0).random((4, 4, 27)), 9)
    assert montage.shape == (3 * 5 - 1, 3 * 5 - 1) and montage.min() >= 0 and montage.max() <= 1


def test_pixel_targets_draw_back_as_the_image():
    img = torch.rand(1, 3, 16, 16)
    (cells,) = PixelTarget([4], norm_pix=False)(img)
    drawn = pixel_image(cells[0].reshape(4, 4, 48).numpy(), 4, norm_pix=False)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(drawn, np.clip(img[0].permute(1, 2, 0).numpy() * std + mean, 0, 1), atol=1e-6)


def test_visualize_writes_one_png_grid(tiny_weights, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["visualize", str(tiny_weights), "--out", str(out), "--num", "2"]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 2 rows x (input, mask, 4 x (target, prediction)) = 10 panels of ~1.9 in at 150 dpi.
    assert grid.shape[1] == 10 * 285 and 500 < grid.shape[0] < 700 and grid.std() > 20
    assert main(["visualize", str(tiny_weights), "--out", str(out)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(photo)
    bins = visualize(str(tiny_weights), tmp_path / "bins.png", images=[str(photo)], hog_style="bins")
    assert np.asarray(Image.open(bins)).shape[1] == 10 * 285


def test_visualize_pixel_model(tmp_path):
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", img_size=32, decoder_dim=32, decoder_depth=1)
    path = tmp_path / "mae.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model_name": "mae_vit_tiny_patch16", "model": mae.state_dict()}, path)
    grid = np.asarray(Image.open(visualize(str(path), tmp_path / "mae.png", num=1)))
    assert grid.shape[1] == 4 * 285  # input, mask, one scale's target and prediction
