"""Tests for fastmim.data.beton: folder -> .beton -> batches, hostile files, the reader, the install hint, and
`fastmim data convert` (FFCV's writer runs here: the README's test command installs the ffcv extra)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.cli import main
from fastmim.config import DataConfig
from fastmim.data import beton as bt
from fastmim.data import build_loader
from fastmim.data.sources import FolderSource
from fastmim.errors import FastmimError
from tests.data._config import data_config
from tests.data._images import HOSTILE_CONVERTED, HOSTILE_SKIPPED, start_conversion

MAX_SIDE = 64


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _cfg(path: str, **overrides: object) -> DataConfig:
    return data_config(source="ffcv", path=path, **overrides)


@pytest.fixture(scope="module")
def converted(hostile_folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("beton") / "hostile.beton"
    summary = bt.convert_folder(
        str(hostile_folder), str(dst), max_side=MAX_SIDE, quality=95, workers=2, progress=False, log=lambda _: None
    )
    return summary, dst


def test_conversion_skips_and_converts_every_hostile_kind(converted, hostile_folder):
    summary, dst = converted
    assert {reason.split(" (")[0]: [Path(p).name for p in files] for reason, files in summary.skipped.items()} == {
        reason: [name] for name, reason in HOSTILE_SKIPPED.items()
    }
    assert summary.converted == {kind: 1 for kind in HOSTILE_CONVERTED.values()}
    total = len(FolderSource(str(hostile_folder)))
    assert summary.written == total - len(HOSTILE_SKIPPED) == len(bt.BetonSource(str(dst)))
    # Demo images are 48-96 px a side: those over 64 are shrunk, as is the 2400 x 1600 JPEG.
    assert 1 <= summary.resized < summary.written
    assert summary.bytes == dst.stat().st_size > 0
    lines = summary.lines()
    assert lines[0].startswith(f"wrote {summary.written} images to {dst}") and "4 skipped" in lines[0]
    assert any(line.startswith("skipped 1 (empty file): ") and "zero.jpg" in line for line in lines)
    # Nothing but the finished file is left next to it.
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]


def test_round_trip_labels_exact_pixels_within_jpeg_tolerance(converted, hostile_folder):
    _, dst = converted
    folder = FolderSource(str(hostile_folder))
    kept = [i for i, p in enumerate(folder.paths) if Path(p).name not in HOSTILE_SKIPPED]
    source = bt.BetonSource(str(dst))
    assert source.labels.tolist() == [folder.labels[i] for i in kept]
    for j, i in enumerate(kept):
        expected, _ = bt.prepare_image(folder.paths[i], MAX_SIDE)
        array, label = source.load_array(j)
        assert label == folder.labels[i] and array.dtype == np.uint8 and array.shape == expected.shape
        assert max(array.shape[:2]) <= MAX_SIDE
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


def test_raw_conversion_round_trips_exactly_through_the_cli(tmp_path, capsys):
    src = tmp_path / "src"
    for label, colour in enumerate([(255, 0, 0), (0, 128, 255)]):
        (src / f"class{label}").mkdir(parents=True)
        noise = np.random.default_rng(label).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(noise).save(src / f"class{label}" / "x.png")
        Image.new("RGB", (30, 20), colour).save(src / f"class{label}" / "y.png")
    dst = tmp_path / "raw.beton"
    assert main(["data", "convert", str(src), str(dst), "--raw", "--workers", "1"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    source, folder = bt.BetonSource(str(dst)), FolderSource(str(src))
    for i in range(4):
        array, label = source.load_array(i)
        assert label == folder.labels[i] and np.array_equal(array, np.asarray(Image.open(folder.paths[i])))
    # The destination is never replaced: a second conversion refuses and leaves the file as it was.
    before = dst.read_bytes()
    assert main(["data", "convert", str(src), str(dst), "--workers", "1"]) == 2
    assert "already exists" in capsys.readouterr().err and dst.read_bytes() == before


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
    bt.convert_folder(str(tmp_path), str(dst), raw=True, workers=1, progress=False, log=lambda _: None)
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


def test_conversion_errors_leave_nothing_behind(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FastmimError, match="none of the 1 images"):
        bt.convert_folder(str(src), str(out / "x.beton"), workers=1, progress=False)
    with pytest.raises(FastmimError, match="does not exist"):
        bt.convert_folder(str(src), str(tmp_path / "missing" / "x.beton"), workers=1, progress=False)
    with pytest.raises(FastmimError, match="--quality"):
        bt.convert_folder(str(src), str(out / "x.beton"), quality=0)
    assert os.listdir(out) == []


def test_stored_size_shrinks_the_longest_side_only():
    assert bt.stored_size(2400, 1600, 64) == (64, 43)
    assert bt.stored_size(30, 80, 64) == (24, 64)
    assert bt.stored_size(50, 40, 64) == (50, 40) and bt.stored_size(5000, 10, 0) == (5000, 10)


def test_sigterm_during_a_conversion_leaves_nothing_behind(tmp_path):
    """SIGTERM killed `fastmim data convert` outright and left its hidden temporary file behind. Signalled while
    writing (the temporary file exists): one line, exit 128 + 15, neither it nor the destination left."""
    # Enough images that writing outlasts the repeat of a signal swallowed at the writer start.
    proc, dst = start_conversion(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(dst.parent.glob(".data.beton.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "fastmim: interrupted by SIGTERM" in output and "Traceback" not in output, output
    assert list(dst.parent.iterdir()) == []
