"""`fastmim bench data` (fastmim/bench/data.py): folder, ffcv + CPU augmentation and ffcv + device augmentation
rows with img/s and CPU cost per image, from one image folder (converted to a temporary .beton on the way)."""

import json

from PIL import Image

from fastmim.bench import data as bench_data
from fastmim.cli import main
from fastmim.data.sources import DemoSource

TINY = ["--model.img_size=32", "--train.batch_size=4"]


def test_folder_and_ffcv_rows_on_both_placements(tmp_path, capsys, monkeypatch):
    from fastmim.kernels import crop_resize

    monkeypatch.setattr(crop_resize, "_use_kernel", lambda x: False)  # the interpreter would take ~1 s per batch
    folder = tmp_path / "images" / "only"
    folder.mkdir(parents=True)
    demo = DemoSource(12, 40)
    for i in range(12):
        demo.load(i)[0].save(folder / f"{i}.jpg", quality=90)
    argv = ["bench", "data", *TINY, f"--data.path={folder.parent}", "--sources", "folder,ffcv", "--augment",
            "cpu,gpu", "--steps", "2", "--warmup", "1", "--max-side", "64", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    (path,) = (tmp_path / "out").glob("data-cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["source"], r["augment"]) for r in rows] == [("folder", "cpu"), ("folder", "gpu"), ("ffcv", "cpu"),
                                                           ("ffcv", "gpu")]  # fmt: skip
    for row in rows:
        assert row["img_per_s"] > 0 and row["cpu_s_per_1k_img"] > 0
        assert abs(row["img_per_s_per_core"] * row["cpu_s_per_1k_img"] - 1e3) < 1e-6 * 1e3
        stand_in = row["augment"] == "gpu"
        assert ("stand-in" in row["augment_device"]) == stand_in
        # Without a GPU the device share is the CPU's own resize time: the loader's part excludes it.
        assert (row["loader_cpu_s_per_1k_img"] is not None) == stand_in
        if stand_in:
            assert 0 < row["loader_cpu_s_per_1k_img"] < row["cpu_s_per_1k_img"]
    assert rows[2]["beton"] == {"max_side": 64, "images": 12, "bytes": rows[2]["beton"]["bytes"]}
    assert "cpu_s_per_1k_img" in capsys.readouterr().out


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
