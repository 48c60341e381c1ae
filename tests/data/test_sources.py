"""Tests for fastmim.data.sources: folder scanning and its errors, image decoding, demo and synthetic images."""

import contextlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmim.config import DataConfig
from fastmim.data.loader import build_source
from fastmim.data.sources import (
    DemoSource,
    FolderSource,
    SyntheticSource,
    UnreadableImageError,
    decode_image,
    load_rgb,
)
from fastmim.errors import FastmimError
from tests.data._config import data_config
from tests.data._images import decompression_bomb


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, {"RGB": (10, 20, 30), "L": 77}.get(mode, 0)).save(path, format=fmt)
    return path


def _cfg(**overrides: object) -> DataConfig:
    return data_config(**{"source": "folder", "num_images": 8, **overrides})


def _gray_std(img: Image.Image) -> float:
    return float(np.asarray(img.convert("L"), dtype=np.float32).std())


# ----- folder layout -------------------------------------------------------------------------------------------


def test_folder_class_layout_is_sorted_recursive_and_case_insensitive(tmp_path: Path) -> None:
    _save(tmp_path / "dogs" / "b.png")
    _save(tmp_path / "dogs" / "nested" / "a.JPEG", fmt="JPEG")
    _save(tmp_path / "cats" / "z.BMP", fmt="BMP")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    source = FolderSource(str(tmp_path))
    assert source.classes == ["cats", "dogs"]
    rel = [str(Path(p).relative_to(tmp_path)) for p in source.paths]
    assert rel == ["cats/z.BMP", "dogs/b.png", "dogs/nested/a.JPEG"]
    assert source.labels == [0, 1, 1]
    img, label = source.load(2)
    assert img.mode == "RGB" and img.size == (12, 10) and label == 1


def test_flat_folder_gives_label_zero(tmp_path: Path) -> None:
    for name in ("b.webp", "a.tif", "c.gif"):
        _save(tmp_path / name)
    source = build_source(_cfg(path=str(tmp_path)), img_size=32)
    assert len(source) == 3
    assert [Path(p).name for p in source.paths] == ["a.tif", "b.webp", "c.gif"]
    assert [source.load(i)[1] for i in range(3)] == [0, 0, 0]


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda root: "", "set data.path=/path/to/images or use data.source=demo"),
        (lambda root: str(root / "missing"), "does not exist"),
        (lambda root: str(_save(root / "one.png")), "not a directory"),
        (lambda root: str(root), "contains no images"),
    ],
)
def test_folder_path_errors(tmp_path: Path, make, expected: str) -> None:
    with pytest.raises(FastmimError, match=expected):
        FolderSource(make(tmp_path))


def test_folder_without_images_but_with_other_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FastmimError, match="contains no images"):
        FolderSource(str(tmp_path))


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "full" / "x.png")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FastmimError, match="empty_class contains no images; remove it or add images"):
        FolderSource(str(tmp_path))


def test_loose_images_next_to_class_folders_are_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "cls" / "x.png")
    _save(tmp_path / "stray.png")
    with pytest.raises(FastmimError, match="move the loose images into a class folder"):
        FolderSource(str(tmp_path))


def test_unknown_source_lists_the_valid_ones() -> None:
    valid = "'demo', 'folder', 'synthetic', 'ffcv', 'fashion_mnist'"
    with pytest.raises(FastmimError, match=f"^data.source = 'imagenet' is not one of {valid}.$"):
        _cfg(source="imagenet")  # refused by validate, before any source is built


@contextlib.contextmanager
def _within(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocking call (a listing that loops, an open() of a FIFO)."""

    def fail(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_link_loops_neither_hang_nor_repeat_images(tmp_path: Path) -> None:
    """Two links back to their own folder made the listing branch without end (os.walk follows links without a
    loop check); one made every image appear once per level until the kernel's link limit (41 times)."""
    images = [_save(tmp_path / "a" / "x.png"), _save(tmp_path / "a" / "sub" / "y.png"), _save(tmp_path / "b" / "z.png")]
    (tmp_path / "a" / "loop1").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "sub" / "loop2").symlink_to(tmp_path / "a")
    with _within(20), pytest.warns(UserWarning, match="2 links to a folder listed already .*loop"):
        source = FolderSource(str(tmp_path))
    assert source.paths == [str(p) for p in images] and source.labels == [0, 0, 1]


def test_a_fifo_named_like_an_image_is_neither_listed_nor_opened(tmp_path: Path) -> None:
    image = _save(tmp_path / "c" / "real.png")
    fifo = tmp_path / "c" / "pipe.png"
    os.mkfifo(fifo)
    with _within(20):
        with pytest.warns(UserWarning, match="1 image names that are not regular files"):
            assert FolderSource(str(tmp_path)).paths == [str(image)]
        with pytest.raises(UnreadableImageError, match="not a regular file"):
            load_rgb(str(fifo))  # opening it for reading blocked until a writer came
        with pytest.raises(UnreadableImageError, match="not a regular file"):
            load_rgb("/dev/zero")


# ----- decoding ------------------------------------------------------------------------------------------------


def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _text_png(path: Path) -> None:
    path.write_text("this is not a png")


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:600])


@pytest.mark.parametrize(
    "name,write",
    [("zero.jpg", _zero_byte), ("text.png", _text_png), ("cut.jpg", _truncated_jpeg), ("bomb.png", decompression_bomb)],
)
def test_unreadable_image_names_the_file_and_the_fix(tmp_path: Path, name: str, write) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(str(path))
    message = str(info.value)
    assert str(path) in message and "remove or replace" in message
    assert "\n" not in message
    assert info.value.path == str(path) and info.value.reason in message


def test_a_newline_in_a_file_name_stays_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad\nname.png"
    path.write_text("not a png")
    with pytest.raises(UnreadableImageError) as info:
        load_rgb(str(path))
    assert "\n" not in str(info.value) and "bad\\nname.png" in str(info.value)


def test_float_tiff_is_scaled_from_0_1_not_black(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.tile(np.linspace(0, 1, 256, dtype=np.float32), (4, 1)), "F").save(path)
    row = np.asarray(load_rgb(str(path)))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1
    Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), "F").save(path)
    with pytest.raises(UnreadableImageError, match="float pixels outside"):
        load_rgb(str(path))


def test_image_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    gray = _save(tmp_path / "gray.png", "L")
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(cmyk, format="JPEG")  # pure red in CMYK
    palette = tmp_path / "palette.gif"
    Image.new("RGB", (12, 10), (0, 0, 255)).convert("P").save(palette)
    for path in (gray, cmyk, palette):
        img = load_rgb(str(path))
        assert img.mode == "RGB" and img.size == (12, 10)
    assert load_rgb(str(gray)).getpixel((3, 3)) == (77, 77, 77)
    r, g, b = load_rgb(str(cmyk)).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60
    assert load_rgb(str(palette)).getpixel((0, 0)) == (0, 0, 255)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent black: must not show up as black
    rgba.save(path)
    img = load_rgb(str(path))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (255, 0, 0)


def test_sixteen_bit_png_is_rescaled_not_saturated(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (4, 1))).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    row = np.asarray(load_rgb(str(path)))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1
    assert np.all(np.diff(row) >= 0)


# ----- demo and synthetic --------------------------------------------------------------------------------------


def test_demo_is_deterministic_per_index() -> None:
    a, b = DemoSource(12, 32), DemoSource(12, 32)
    for i in (0, 1, 7):
        (img_a, label_a), (img_b, label_b) = a.load(i), b.load(i)
        assert label_a == label_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert not np.array_equal(np.asarray(a.load(2)[0].resize((8, 8))), np.asarray(a.load(4)[0].resize((8, 8))))


def test_demo_images_have_structure_at_many_orientations() -> None:
    source = DemoSource(24, 48)
    labels, hist = set(), np.zeros(6)
    for i in range(len(source)):
        img, label = source.load(i)
        labels.add(label)
        assert img.mode == "RGB" and min(img.size) >= 48 and max(img.size) <= 2 * 48 * 2
        assert _gray_std(img) > 12, f"demo image {i} is nearly flat"
        # Magnitude-weighted histogram of gradient orientations (mod 180 degrees), as HOG would see them.
        gray = np.asarray(img.convert("L"), dtype=np.float32)
        gy, gx = np.gradient(gray)
        angle = np.mod(np.arctan2(gy, gx), np.pi)
        hist += np.histogram(angle, bins=6, range=(0, np.pi), weights=np.hypot(gx, gy))[0]
    assert (hist / hist.sum()).min() > 0.08, "demo edges are concentrated at a few orientations"
    assert len(labels) >= 4


def test_demo_alternates_photos_and_patterns() -> None:
    source = DemoSource(10, 32)
    labels = [source.load(i)[1] for i in range(10)]
    assert all(label >= 3 for label in labels[1::2])  # odd indices: procedural patterns (labels 3..6)
    # Even indices: crops of matplotlib's sample photos (labels 0..2); matplotlib is a declared dependency.
    assert all(label < 3 for label in labels[0::2])


def test_synthetic_images_are_cheap_deterministic_and_not_flat() -> None:
    source = build_source(_cfg(source="synthetic", num_images=5), img_size=40)
    assert isinstance(source, SyntheticSource) and len(source) == 5
    img, label = source.load(3)
    assert img.size == (40, 40) and img.mode == "RGB" and label == 0
    assert np.array_equal(np.asarray(img), np.asarray(source.load(3)[0]))
    assert not np.array_equal(np.asarray(img), np.asarray(source.load(4)[0]))
    assert _gray_std(img) > 10


def test_demo_needs_at_least_one_image() -> None:
    with pytest.raises(FastmimError, match=r"^data\.num_images must be positive\.$"):
        _cfg(source="demo", num_images=0)  # refused by validate, before any source is built


def test_decode_reports_the_file_mode_and_drafts_large_jpegs(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(path, quality=90)
    full, mode, size = decode_image(str(path))
    assert mode == "RGB" and size == (1600, 1200) and full.size == (1600, 1200)
    # A reduced-scale JPEG decode keeps both sides >= max_side: 1/4 scale here (400 x 300 >= 256).
    drafted, _, size = decode_image(str(path), max_side=256)
    assert drafted.size == (400, 300) and size == (1600, 1200)
    assert decode_image(str(_save(tmp_path / "g.png", "L")))[1] == "L"
