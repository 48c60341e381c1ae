"""Tests for fastmim.data.beton: the reader against the images converted and against FFCV's own reader, batches
from a .beton, the install hint, files that are not datasets (the files are written by fastmim.data.convert: FFCV's
writer runs here, the README's test command installs the ffcv extra)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.cli import main
from fastmim.config import DataConfig
from fastmim.data import beton as bt
from fastmim.data import build_loader
from fastmim.data.convert import convert_folder, prepare_image
from fastmim.data.sources import FolderSource
from fastmim.errors import FastmimError
from tests.data._config import data_config
from tests.data._images import CONVERTED_MAX_SIDE, HOSTILE_SKIPPED


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _cfg(path: str, **overrides: object) -> DataConfig:
    return data_config(source="ffcv", path=path, **overrides)


def test_round_trip_labels_exact_pixels_within_jpeg_tolerance(converted, hostile_folder):
    _, dst = converted
    folder = FolderSource(str(hostile_folder))
    kept = [i for i, p in enumerate(folder.paths) if Path(p).name not in HOSTILE_SKIPPED]
    source = bt.BetonSource(str(dst))
    assert source.labels.tolist() == [folder.labels[i] for i in kept]
    for j, i in enumerate(kept):
        expected, _ = prepare_image(folder.paths[i], CONVERTED_MAX_SIDE)
        array, label = source.load_array(j)
        assert label == folder.labels[i] and array.dtype == np.uint8 and array.shape == expected.shape
        assert max(array.shape[:2]) <= CONVERTED_MAX_SIDE
        # Exactly what a quality-95 JPEG round trip of the prepared image gives, and close to that image.
        assert np.array_equal(array, jpeg_round_trip(expected, 95)), folder.paths[i]
        mse = np.mean((array.astype(np.float64) - expected) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25, folder.paths[i]  # PSNR in dB (sharp synthetic edges)
    names = [Path(folder.paths[i]).name for i in kept]
    gray, _ = source.load_array(names.index("gray.png"))
    assert (np.abs(gray.astype(int) - 90) <= 2).all()  # gray stays gray, equal channels
    alpha, _ = source.load_array(names.index("alpha.png"))
    assert alpha[15, 5].min() >= 250 and alpha[15, 35, 2] >= 250 and alpha[15, 35, 0] <= 5  # white | blue
    deep, _ = source.load_array(names.index("deep.png"))
    assert deep[0, 0, 0] <= 4 and deep[0, -1, 0] >= 250  # 16-bit ramp rescaled, not saturated
    huge, _ = source.load_array(names.index("huge.jpg"))
    assert huge.shape == (43, 64, 3)  # 2400 x 1600 -> longest side 64


def test_reader_agrees_with_ffcv(converted):
    from ffcv.reader import Reader

    _, dst = converted
    reader = Reader(str(dst))
    ours = bt.BetonSource(str(dst))
    image, label = (reader.metadata[name] for name in reader.metadata.dtype.names)
    assert reader.field_names == ["image", "label"]
    assert np.array_equal(label, ours.labels) and np.array_equal(image["width"], ours.widths)
    assert np.array_equal(image["height"], ours.heights)


def test_batches_from_a_beton_on_both_placements(converted, reference_crop_resize):
    _, dst = converted
    cpu = build_loader(_cfg(str(dst)), img_size=32, batch_size=4, seed=3)
    gpu = build_loader(_cfg(str(dst), augment="gpu"), img_size=32, batch_size=4, seed=3, device="cpu")
    labels = set(bt.BetonSource(str(dst)).labels.tolist())
    pairs = list(zip(cpu.iterate(1), gpu.iterate(1), strict=True))
    assert len(pairs) == cpu.steps_per_epoch == len(bt.BetonSource(str(dst))) // 4
    for (xc, yc), (xg, yg) in pairs:
        assert xc.shape == xg.shape == (4, 3, 32, 32) and torch.equal(yc, yg) and set(yc.tolist()) <= labels
        # Same crops and flips; only Pillow >= 13's pass order (see tests/kernels/test_crop_resize.py) differs.
        assert (xc - xg).abs().mean() < 0.01
    # Resume inside the epoch, on the device placement: batch k is the same whether iteration starts at 0 or k.
    resumed = list(gpu.iterate(1, start_batch=2))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, [p[1] for p in pairs][2:], strict=True))


def test_ranks_read_disjoint_samples_of_a_beton(tmp_path, reference_crop_resize):
    # 12 single-colour images: with min_scale 1 every crop is the whole square image, so the batch colour names
    # the sample, whatever the flip.
    colours = [(20 * i, 255 - 20 * i, (97 * i) % 256) for i in range(12)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i:02d}.png")
    dst = tmp_path / "colours.beton"
    convert_folder(str(tmp_path), str(dst), raw=True, workers=1, progress=False, log=lambda _: None)
    seen = []
    for rank in range(2):
        cfg = _cfg(str(dst), min_scale=1.0, augment="gpu")
        loader = build_loader(cfg, img_size=8, batch_size=3, seed=5, rank=rank, world_size=2, device="cpu")
        means = [x.mean(dim=(2, 3)) for x, _ in loader.iterate(0)]
        seen.append({tuple(round(v, 3) for v in row.tolist()) for row in torch.cat(means)})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_install_hint_when_ffcv_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bt, "ffcv_installed", lambda: False)
    with pytest.raises(FastmimError) as info:
        build_loader(_cfg(str(tmp_path / "x.beton")), img_size=16, batch_size=2, seed=0)
    message = str(info.value)
    assert message.startswith('data.source = "ffcv" needs FFCV') and "pip install 'fastmim[ffcv]'" in message
    assert "\n" not in message
    assert main(["data", "convert", str(tmp_path), str(tmp_path / "y.beton")]) == 2
    assert "fastmim data convert needs FFCV" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,expected",
    [(b"", "truncated or not a .beton"), (bytes(range(256)) * 8, "not an FFCV dataset"), (None, "is not a file")],
    ids=["empty", "garbage", "missing"],
)
def test_files_that_are_not_datasets_are_user_errors(tmp_path, content, expected):
    path = tmp_path / "bad.beton"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FastmimError, match=expected):
        bt.BetonSource(str(path))
