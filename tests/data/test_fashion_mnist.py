"""data.source = "fashion_mnist": the IDX reader against tiny IDX files written here, and its errors."""

import gzip
import struct

import numpy as np
import pytest

from fastmim.config import load_config
from fastmim.data import sources
from fastmim.data.loader import build_source
from fastmim.data.sources import FashionMNISTSource, fashion_mnist_arrays, read_idx
from fastmim.errors import FastmimError


def write_idx(path, array, compress=True):
    """An IDX file of a uint8 array: magic 0, 0, 0x08, ndim, big-endian sizes, then the bytes."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


def write_fashion(root, n_train=12, n_test=6, compress=True):
    """Train / t10k IDX files whose image i is filled with the value i and whose label is i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
        images[:, 0, :5] = 255  # a top-left mark, to check orientation
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_read_back_exactly(tmp_path, compress):
    root = write_fashion(tmp_path / "f", compress=compress)
    images, labels = fashion_mnist_arrays(str(root), "train")
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(12)]
    assert images[7, 5, 5] == 7 and images[7, 0, 4] == 255 and images[7, 1, 0] == 7
    assert fashion_mnist_arrays(str(root), "t10k")[0].shape == (6, 28, 28)


def test_source_gives_rgb_images_labels_and_keeps_the_holdout_out(tmp_path):
    root = write_fashion(tmp_path / "f")
    source = FashionMNISTSource(str(root), "train", holdout=4)
    assert len(source) == 8 and source.classes[9] == "ankle boot"
    image, label = source.load(3)
    assert image.mode == "RGB" and image.size == (28, 28) and label == 3
    assert np.asarray(image)[10, 10].tolist() == [3, 3, 3]
    cfg = load_config("tiny_cpu", ["--data.source=fashion_mnist", f"--data.path={root}", "--data.holdout=2"])
    assert len(build_source(cfg.data, 64)) == 10  # the pre-training loader's view: train split minus the holdout
    with pytest.raises(FastmimError, match="data.holdout"):
        FashionMNISTSource(str(root), "train", holdout=12)


def test_missing_files_name_the_apt_package_or_data_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FastmimError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTSource()
    with pytest.raises(FastmimError, match="point data.path at the IDX files"):
        FashionMNISTSource(str(tmp_path / "elsewhere"))


def test_malformed_idx_files_are_refused_with_their_name(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float elements: not Fashion-MNIST
    with pytest.raises(FastmimError, match="bad-images"):
        read_idx(bad)
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")  # header says 10 values, 3 follow
    with pytest.raises(FastmimError, match="holds 3 values"):
        read_idx(short)
