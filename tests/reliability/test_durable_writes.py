"""Every kind of output fastmim writes is durable and atomic (fastmim.files): its data is fsync'ed before it takes
its name, the directory after; a writer killed (SIGKILL, a real process) before the rename leaves the old file or
none, never a partial one, and a conversion killed in the middle of FFCV's write leaves nothing.

Before fastmim.files, seven writers renamed a temporary file without any fsync (a power cut after the rename could
leave an empty file under the final name) and the config and checkpoint record writers did not sync the directory.
"""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim import files
from fastmim.bench.harness import write_record
from fastmim.data.imagenet_like import write_imagenet_like
from fastmim.eval.common import write_json
from fastmim.train.checkpoint_files import atomic_save, clean_partial_saves, write_checkpoint
from fastmim.train.metrics import MetricsLog, plot_losses
from fastmim.train.rundir import save_config
from tests._trace import traced_syscalls  # noqa: F401  (the syscalls fixture)
from tests.data._images import start_conversion
from tests.reliability._harness import _CTX


def _rows(root: Path, steps) -> None:
    rows = [{"step": s, "loss": 1.0 / s, "losses": [1.0 / s, 2.0 / s]} for s in steps]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _images(root: Path) -> Path:
    for i in range(3):
        (root / "src" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 24, 3), 40 * i, np.uint8)).save(root / "src" / "c" / f"{i}.png")
    return root / "src"


def _weights_file(root: Path) -> None:
    from fastmim.models import create_model
    from fastmim.train.checkpoint_files import WEIGHTS_FORMAT

    name = "localmim_vit_tiny_patch16"
    model = create_model(name, img_size=32, decoder_dim=32)
    torch.save({"format": WEIGHTS_FORMAT, "model_name": name, "model": model.state_dict()}, root / "src.pt")


def _timm_export(root: Path) -> None:
    from fastmim.eval.export import export_timm

    export_timm(str(root / "src.pt"), root / "encoder.safetensors")


def _visualize_grid(root: Path) -> None:
    from fastmim.eval.visualize import _save_grid

    _save_grid([[np.zeros((8, 8, 3)), np.ones((8, 8))]], ["input", "target"], root / "grid.png", "title")


def _beton(root: Path) -> None:
    from fastmim.data.convert import convert_folder

    convert_folder(str(root / "src"), str(root / "data.beton"), workers=1, progress=False, log=lambda _: None)


# kind -> (what the run directory holds before, the write). Each writes an output of that kind into ``root``.
KINDS = {
    "checkpoint": (
        lambda r: write_checkpoint({"step": 1, "old": True}, r / "checkpoint-0000001.pt"),
        lambda r: write_checkpoint({"step": 1, "old": False}, r / "checkpoint-0000001.pt"),
    ),
    "weights": (lambda r: None, lambda r: atomic_save({"model": {}}, r / "weights.pt", overwrite=False)),
    "config": (lambda r: (r / "config.toml").write_text("old = 1\n"), lambda r: save_config(r, "new = 1\n", None)),
    "metrics-rewrite": (lambda r: _rows(r, [1, 2, 3]), lambda r: MetricsLog(r, 1)),
    "loss-plot": (lambda r: _rows(r, [1, 2, 3]), lambda r: plot_losses(r / "metrics.jsonl", r / "loss.png", ["a"])),
    "eval-json": (
        lambda r: (r / "result.json").write_text("{}\n"),
        lambda r: write_json({"acc1": 1}, r / "result.json"),
    ),
    "timm-export": (_weights_file, _timm_export),
    "visualize": (lambda r: None, _visualize_grid),
    "bench-record": (lambda r: None, lambda r: write_record("unit", [{"ms": 1.0}], torch.device("cpu"), r, ["x"])),
    "imagenet-like": (lambda r: None, lambda r: write_imagenet_like(str(r / "images"), images=2)),
    "beton": (_images, _beton),
}


RUN_DIRECTORY = ("checkpoint", "config", "metrics-rewrite", "loss-plot")  # the outputs of a pre-training run


def _snapshot(root: Path) -> dict[str, bytes | list]:
    """The visible entries of ``root``: a file's contents, a folder's files (relative names and contents)."""
    out = {}
    for path in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        inside = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else []
        out[path.name] = [(str(q.relative_to(path)), q.read_bytes()) for q in inside] or path.read_bytes()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_is_synced_before_its_name_and_its_folder_after(tmp_path, syscalls, kind):
    before, write = KINDS[kind]
    before(tmp_path)
    old = _snapshot(tmp_path)
    syscalls.clear()
    write(tmp_path)
    new = _snapshot(tmp_path)
    written = [name for name in new if old.get(name) != new[name]]
    assert written, new.keys()
    for name in written:
        target = tmp_path / name
        published = [i for i, c in enumerate(syscalls) if c[0] == "publish" and c[2] == target]
        assert len(published) == 1, (name, syscalls)
        tmp = syscalls[published[0]][1]
        assert tmp.parent == tmp_path and tmp.name.startswith(f".{name}."), tmp
        assert ("fsync", tmp) in syscalls[: published[0]], (name, syscalls)  # the data, before the name
        assert ("fsync", tmp_path) in syscalls[published[0] + 1 :], (name, syscalls)  # the name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _killed_child(kind: str, root: str, marker: str) -> None:
    """Run the writer of ``kind``; when its data is written and about to be synced and renamed, say so (marker)
    and wait for the SIGKILL."""
    multiprocessing.set_start_method(None, force=True)  # FFCV's writer processes: the platform default, as in a shell
    os.setpgrp()  # its own group: the kill reaches them too
    sync = files.sync

    def stop_before_sync(path: Path) -> None:
        if path.name.startswith("."):  # an output's temporary file or folder
            Path(marker).write_text(str(path))
            time.sleep(600)
        sync(path)

    files.sync = stop_before_sync
    KINDS[kind][1](Path(root))
    os._exit(0)


# The conversion is killed in the middle of FFCV's write instead (below): a stronger case, and a second conversion
# here would cost a minute of FFCV start-up on the 2-core machine.
@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "beton"])
def test_a_writer_killed_before_the_rename_leaves_the_old_file_or_none(tmp_path, kind):
    root, marker = tmp_path / "out", tmp_path / "marker"
    root.mkdir()
    KINDS[kind][0](root)
    old = _snapshot(root)
    proc = _CTX.Process(target=_killed_child, args=(kind, str(root), str(marker)))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.is_alive() and time.monotonic() < deadline, f"{kind}: the writer ended before its rename"
            time.sleep(0.01)
        temporary = Path(marker.read_text())
        assert temporary.exists() and temporary.parent == root
        os.killpg(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
    assert _snapshot(root) == old  # the old file, or none; at most a hidden temporary file besides
    if kind in RUN_DIRECTORY:  # what `--train.resume=auto` removes before it goes on
        assert clean_partial_saves(root) and not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_conversion_killed_in_the_middle_of_ffcvs_write_leaves_no_dataset(tmp_path):
    """SIGKILL to `fastmim data convert`'s process group while FFCV's writer fills the temporary file."""
    import subprocess

    pytest.importorskip("ffcv")
    proc, dst = start_conversion(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in dst.parent.glob(".data.beton.*.tmp") if p.stat().st_size > 1 << 20]:
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it was killed"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [p.name for p in dst.parent.iterdir() if not p.name.startswith(".")] == []
