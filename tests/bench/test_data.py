"""`fastmim bench data` (fastmim/bench/data.py): rows per source, storage, placement and decode mode from one image
folder (converted to temporary .beton files on the way), with the loader's CPU cost per image, the cores a node
needs, stored bytes, and the pixel deviation from the full decode + Pillow bicubic reference."""

import json

import pytest
from PIL import Image

from fastmim.bench import data as bench_data
from fastmim.cli import main
from fastmim.data.sources import DemoSource

TINY = ["--model.img_size=32", "--train.batch_size=4"]


def test_rows_per_source_storage_placement_and_decode(tmp_path, capsys, monkeypatch):
    from fastmim.kernels import crop_resize

    monkeypatch.setattr(crop_resize, "_use_kernel", lambda x: False)  # the interpreter would take ~1 s per batch
    folder = tmp_path / "images" / "only"
    folder.mkdir(parents=True)
    demo = DemoSource(12, 40)
    for i in range(12):
        demo.load(i)[0].save(folder / f"{i}.jpg", quality=90)
    argv = [
        "bench",
        "data",
        *TINY,
        f"--data.path={folder.parent}",
        "--sources",
        "folder,ffcv",
        "--augment",
        "cpu,gpu",
        "--decode",
        "cpu,gpu",
        "--storage",
        "jpeg,raw",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--max-side",
        "0",
        "--deviation-images",
        "8",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    (path,) = (tmp_path / "out").glob("data-cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["source"], r["storage"], r["augment"], r["decode"]) for r in rows] == [
        ("folder", "files", "cpu", "cpu"),
        ("folder", "files", "gpu", "cpu"),
        ("ffcv", "jpeg", "cpu", "cpu"),
        ("ffcv", "jpeg", "gpu", "cpu"),
        ("ffcv", "jpeg", "gpu", "gpu"),
        ("ffcv", "raw", "cpu", "cpu"),
        ("ffcv", "raw", "gpu", "cpu"),
    ]
    out = capsys.readouterr().out
    assert "skipping folder (files), augment gpu, decode gpu" in out and "cpu_s_per_1k_img" in out
    for row in rows:
        assert row["img_per_s"] > 0 and row["cpu_s_per_1k_img"] > 0 and row["deviation_images"] == 8
        assert abs(row["img_per_s_per_core"] * row["cpu_s_per_1k_img"] - 1e3) < 1e-6 * 1e3
        assert abs(row["cores_per_8gpu_node"] - row["cpu_s_per_1k_img"] * 104) < 1e-9
        assert ("not timed" in row["augment_device"]) == (row["augment"] == "gpu")
    by = {(r["source"], r["storage"], r["augment"], r["decode"]): r for r in rows}
    # The reference itself deviates by nothing; raw storage keeps the decoded source pixels, so only Pillow >= 13's
    # pass order (see tests/kernels/test_crop_resize.py) moves a few pixels; JPEG storage re-encodes (quality 90).
    assert by["folder", "files", "cpu", "cpu"]["pixel_diff_max"] == 0
    assert by["ffcv", "raw", "cpu", "cpu"]["pixel_diff_max"] == 0
    assert by["ffcv", "raw", "gpu", "cpu"]["pixel_diff_mean"] < 0.5
    assert 0 < by["ffcv", "jpeg", "cpu", "cpu"]["pixel_diff_mean"] < 3
    # Decoding on the (CPU stand-in) device gives the workers' pixels.
    assert by["ffcv", "jpeg", "gpu", "gpu"]["pixel_diff_mean"] == by["ffcv", "jpeg", "gpu", "cpu"]["pixel_diff_mean"]
    assert all(by["ffcv", s, "cpu", "cpu"]["deviation_reference"] == "source files" for s in ("jpeg", "raw"))
    jpeg, raw = by["ffcv", "jpeg", "gpu", "cpu"], by["ffcv", "raw", "gpu", "cpu"]
    assert jpeg["payload_bytes_per_image"] < raw["payload_bytes_per_image"] <= raw["bytes_per_image"]
    assert raw["beton"] == {"max_side": 0, "images": 12, "bytes": raw["beton"]["bytes"], "skipped": 0, "resized": 0}


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--sources", "web", "data.source = 'web' is not one of"),
        ("--augment", "tpu", "data.augment = 'tpu' is not one of 'cpu', 'gpu'."),
        ("--decode", "nvjpeg", "data.decode = 'nvjpeg' is not one of 'cpu', 'gpu'."),
    ],
)
def test_listed_sources_placements_and_decode_modes_are_validated(tmp_path, capsys, flag, value, message):
    """The lists set data keys that no recipe parser saw: validate checks them before any loader is built."""
    argv = ["bench", "data", *TINY, "--sources", "synthetic", flag, value, "--steps", "1", "--warmup", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_sources_available_from_the_data_path(tmp_path, monkeypatch):
    from fastmim.config import load_config

    (tmp_path / "x.beton").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert bench_data.available_sources(load_config(None, [])) == ["demo", "synthetic"]
    assert bench_data.available_sources(load_config(None, [f"--data.path={tmp_path / 'x.beton'}"]))[-1] == "ffcv"
    monkeypatch.setattr(bench_data, "ffcv_installed", lambda: False)
    assert bench_data.available_sources(load_config(None, [f"--data.path={tmp_path}"])) == [
        "demo",
        "synthetic",
        "folder",
    ]


def test_process_tree_cpu_time_counts_worker_processes():
    import multiprocessing

    before = bench_data._children_cpu_seconds()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pool.apply(sum, (range(5_000_000),))  # ~0.1-0.3 s of CPU, in the child only
        alive = bench_data._children_cpu_seconds()  # the live worker, read from /proc
    assert alive - before > 0.03
    assert bench_data._children_cpu_seconds() >= alive - 0.02  # reaped now: counted by getrusage instead


def test_worker_cpu_time_is_found_without_the_kernels_children_list(monkeypatch):
    """Where /proc/self/task/*/children does not exist (a kernel without CONFIG_PROC_CHILDREN), the live workers
    are found by their parent in /proc/PID/stat, not silently dropped."""
    import multiprocessing

    real = bench_data.Path.read_text

    def no_children_list(self, *args, **kwargs):
        if self.name == "children":
            raise FileNotFoundError(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(bench_data.Path, "read_text", no_children_list)
    before, others = bench_data._children_cpu_seconds(), set(bench_data._live_children())  # earlier tests' helpers
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pool.apply(sum, (range(5_000_000),))
        workers = set(bench_data._live_children()) - others
        alive = bench_data._children_cpu_seconds()
    assert len(workers) == 1
    assert alive - before > 0.03
