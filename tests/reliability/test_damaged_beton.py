"""Damaged .beton files: copies cut short (the usual shape: FFCV writes its allocation table last) and headers or
tables holding absurd sizes are one line naming the file and the fix, never numpy's "negative dimensions" or an
"out of memory" that blames the batch size."""

import numpy as np
import pytest
from PIL import Image

from fastmim.cli import main
from fastmim.data import beton as bt
from fastmim.errors import FastmimError

pytest.importorskip("ffcv", reason="FFCV is not installed (the README's test command installs the ffcv extra)")

DAMAGED = "is damaged or incomplete"
FIX = "copy it again, or write it again with `fastmim data convert`"


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """An intact JPEG and raw .beton of 6 small images (2 classes), written by `fastmim data convert`."""
    root = tmp_path_factory.mktemp("damaged_beton")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "src" / f"c{i % 2}" / f"{i}.png")
    out = {}
    for kind, extra in (("jpeg", []), ("raw", ["--raw"])):
        out[kind] = root / f"{kind}.beton"
        assert main(["data", "convert", str(root / "src"), str(out[kind]), "--workers", "1", *extra]) == 0
        assert len(bt.BetonSource(str(out[kind]))) == 6
    return out


def _header(path):
    return np.fromfile(path, dtype=bt._HEADER, count=1)[0]


def _cut(src, dst, size: int):
    dst.write_bytes(src.read_bytes()[:size])
    return dst


@pytest.mark.parametrize("where", ["in the data", "before the table", "inside the table", "one entry short"])
def test_a_copy_cut_short_is_damaged_or_incomplete(tmp_path, betons, where):
    """Before: `ValueError: negative dimensions are not allowed` from np.fromfile (cut before the table)."""
    src = betons["jpeg"]
    table, size = int(_header(src)["alloc_table_ptr"]), src.stat().st_size
    keep = {
        "in the data": table // 2,
        "before the table": table,
        "inside the table": table + (size - table) // 2 + 5,
        "one entry short": size - bt._ALLOC.itemsize,
    }[where]
    cut = _cut(src, tmp_path / "cut.beton", keep)
    with pytest.raises(FastmimError) as info:
        bt.BetonSource(str(cut))
    message = str(info.value)
    assert DAMAGED in message and FIX in message and str(cut) in message and "\n" not in message


def _patched(src, dst, offset: int, value: np.ndarray):
    data = bytearray(src.read_bytes())
    data[offset : offset + value.nbytes] = value.tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _field_offset(name: str) -> int:
    return bt._HEADER.fields[name][1]


@pytest.mark.parametrize(
    "field,value",
    [("num_samples", 1 << 40), ("num_fields", 65535), ("alloc_table_ptr", 1 << 63), ("alloc_table_ptr", 3)],
)
def test_absurd_header_sizes_are_a_damaged_file_not_out_of_memory(tmp_path, betons, field, value):
    """Before: num_samples 2^40 asked numpy for terabytes, which the CLI reported as "out of memory; lower
    train.batch_size"."""
    dtype = bt._HEADER.fields[field][0]
    bad = _patched(betons["jpeg"], tmp_path / "bad.beton", _field_offset(field), np.array(value, dtype))
    with pytest.raises(FastmimError, match=DAMAGED):
        bt.BetonSource(str(bad))


@pytest.mark.parametrize("entry", ["ptr", "size"])
def test_an_allocation_outside_the_file_is_damaged(tmp_path, betons, entry):
    src = betons["jpeg"]
    table = int(_header(src)["alloc_table_ptr"])
    offset = table + bt._ALLOC.fields[entry][1]  # the first allocation's field
    bad = _patched(src, tmp_path / "bad.beton", offset, np.array((1 << 64) - 16, np.uint64))
    with pytest.raises(FastmimError, match=DAMAGED):
        bt.BetonSource(str(bad))


def test_a_raw_image_whose_size_differs_from_its_bytes_is_damaged(tmp_path, betons):
    """A width of 65535 in the sample table would make every loader buffer 65535 x H x 3 bytes."""
    src = betons["raw"]
    fields = int(_header(src)["num_fields"])
    sample_table = bt._HEADER.itemsize + fields * bt._FIELD.itemsize
    width = sample_table + bt._IMAGE_META.fields["width"][1]  # the image field comes first: sample 0's width
    bad = _patched(src, tmp_path / "bad.beton", width, np.array(65535, np.uint16))
    with pytest.raises(FastmimError, match=DAMAGED):
        bt.BetonSource(str(bad))


def test_pretraining_on_a_cut_copy_is_one_line_exit_2(tmp_path, betons, capsys):
    cut = _cut(betons["jpeg"], tmp_path / "cut.beton", int(_header(betons["jpeg"])["alloc_table_ptr"]) - 100)
    argv = ["pretrain", "--data.source=ffcv", f"--data.path={cut}", f"--train.out_dir={tmp_path / 'run'}"]
    argv += ["--model.name=localmim_micro_test", "--model.img_size=32", "--model.decoder_dim=16", "--train.device=cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastmim: error: {cut} {DAMAGED}"), err
    assert "Traceback" not in err and "out of memory" not in err
