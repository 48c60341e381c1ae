"""Tests for fastmim.data.convert (`fastmim data convert`): hostile files skipped or converted, the CLI's raw round
trip, errors and signals that leave nothing behind (FFCV's writer runs here: the README's test command installs the
ffcv extra)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmim.cli import main
from fastmim.data.beton import BetonSource
from fastmim.data.convert import convert_folder, stored_size
from fastmim.data.sources import FolderSource
from fastmim.errors import FastmimError
from tests.data._images import HOSTILE_CONVERTED, HOSTILE_SKIPPED, start_conversion


def test_conversion_skips_and_converts_every_hostile_kind(converted, hostile_folder):
    summary, dst = converted
    assert {reason.split(" (")[0]: [Path(p).name for p in files] for reason, files in summary.skipped.items()} == {
        reason: [name] for name, reason in HOSTILE_SKIPPED.items()
    }
    assert summary.converted == {kind: 1 for kind in HOSTILE_CONVERTED.values()}
    total = len(FolderSource(str(hostile_folder)))
    assert summary.written == total - len(HOSTILE_SKIPPED) == len(BetonSource(str(dst)))
    # Demo images are 48-96 px a side: those over 64 are shrunk, as is the 2400 x 1600 JPEG.
    assert 1 <= summary.resized < summary.written
    assert summary.bytes == dst.stat().st_size > 0
    lines = summary.lines()
    assert lines[0].startswith(f"wrote {summary.written} images to {dst}") and "4 skipped" in lines[0]
    assert any(line.startswith("skipped 1 (empty file): ") and "zero.jpg" in line for line in lines)
    # Nothing but the finished file is left next to it.
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]


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
    source, folder = BetonSource(str(dst)), FolderSource(str(src))
    for i in range(4):
        array, label = source.load_array(i)
        assert label == folder.labels[i] and np.array_equal(array, np.asarray(Image.open(folder.paths[i])))
    # The destination is never replaced: a second conversion refuses and leaves the file as it was.
    before = dst.read_bytes()
    assert main(["data", "convert", str(src), str(dst), "--workers", "1"]) == 2
    assert "already exists" in capsys.readouterr().err and dst.read_bytes() == before


def test_conversion_errors_leave_nothing_behind(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FastmimError, match="none of the 1 images"):
        convert_folder(str(src), str(out / "x.beton"), workers=1, progress=False)
    with pytest.raises(FastmimError, match="does not exist"):
        convert_folder(str(src), str(tmp_path / "missing" / "x.beton"), workers=1, progress=False)
    with pytest.raises(FastmimError, match="--quality"):
        convert_folder(str(src), str(out / "x.beton"), quality=0)
    assert os.listdir(out) == []


def test_stored_size_shrinks_the_longest_side_only():
    assert stored_size(2400, 1600, 64) == (64, 43)
    assert stored_size(30, 80, 64) == (24, 64)
    assert stored_size(50, 40, 64) == (50, 40) and stored_size(5000, 10, 0) == (5000, 10)


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
