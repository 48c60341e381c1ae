"""Fixtures for the data tests: an image folder holding every hostile kind, that folder converted to a .beton, and
the reference device resize."""

from pathlib import Path

import pytest

from fastmim.data.sources import DemoSource
from tests.data._images import CONVERTED_MAX_SIDE, write_hostile


@pytest.fixture(scope="session")
def hostile_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree: classes a/ (6 demo images as JPEG), b/ (6 as PNG) and c/ (the hostile files)."""
    root = tmp_path_factory.mktemp("hostile")
    demo = DemoSource(12, 48)
    for i in range(12):
        image, _ = demo.load(i)
        folder = root / ("a" if i < 6 else "b")
        folder.mkdir(exist_ok=True)
        image.save(folder / (f"{i:02d}.jpg" if i < 6 else f"{i:02d}.png"), quality=95)
    write_hostile(root / "c")
    return root


@pytest.fixture(scope="session")
def converted(hostile_folder, tmp_path_factory):
    """``hostile_folder`` written by `fastmim data convert` (JPEG quality 95, longest side CONVERTED_MAX_SIDE): the
    conversion's summary and the .beton (read by test_beton.py, the conversion checked by test_convert.py)."""
    from fastmim.data.convert import convert_folder

    dst = tmp_path_factory.mktemp("beton") / "hostile.beton"
    summary = convert_folder(
        str(hostile_folder),
        str(dst),
        max_side=CONVERTED_MAX_SIDE,
        quality=95,
        workers=2,
        progress=False,
        log=lambda _: None,
    )
    return summary, dst


@pytest.fixture
def reference_crop_resize(monkeypatch):
    """Run the device placement through crop_resize_ref: the Triton kernel equals it bit for bit
    (tests/kernels/test_crop_resize.py), and under the interpreter it would take ~1 s per batch."""
    from fastmim.kernels import crop_resize  # imported here, after tests/kernels/conftest.py set the interpreter

    monkeypatch.setattr(crop_resize, "_use_kernel", lambda x: False)
