"""Tests for fastmim.data.loader: exact resume, worker independence, rank sharding, epochs, unreadable images
(replaced, counted, warned) and the device ("gpu") placement of the augmentation, run on CPU tensors."""

import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmim.config import DataConfig
from fastmim.data import MIMLoader, PretrainTransform, build_loader
from fastmim.data.loader import epoch_keys
from fastmim.data.packed import CropBatches
from fastmim.errors import STOP_SIGNALS, FastmimError
from tests.data._config import data_config
from tests.data._images import HOSTILE_CONVERTED, HOSTILE_SKIPPED, write_hostile


def _cfg(**overrides: object) -> DataConfig:
    return data_config(**{"source": "demo", "num_images": 16, **overrides})


class _IndexSource:
    """A tiny source whose label is the sample index, so batches reveal which samples they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.new("RGB", (8, 8), (index % 256, 0, 0)), index


def _labels(loader: MIMLoader, epoch: int) -> list[int]:
    return [int(i) for _, labels in loader.iterate(epoch) for i in labels]


def test_batches_have_the_documented_shapes_and_statistics() -> None:
    loader = build_loader(_cfg(), img_size=32, batch_size=4, seed=0)
    assert loader.num_samples == 16 and loader.steps_per_epoch == 4
    batches = list(loader.iterate(0))
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    # ImageNet-normalised natural-ish images: channel means near 0 and stds near 1 (demo images are brighter and
    # more contrasted than ImageNet, hence the loose bounds).
    x = torch.cat([b[0] for b in batches])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1.0
    std = x.std(dim=(0, 2, 3))
    assert (std > 0.5).all() and (std < 1.8).all()


def test_resume_from_a_batch_reproduces_it_exactly() -> None:
    loader = build_loader(_cfg(), img_size=32, batch_size=4, seed=5)
    full = list(loader.iterate(3))
    for k in (1, 3):
        resumed = list(loader.iterate(3, start_batch=k))
        assert len(resumed) == loader.steps_per_epoch - k
        for (xa, ya), (xb, yb) in zip(full[k:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(loader.iterate(3, start_batch=loader.steps_per_epoch)) == []
    with pytest.raises(ValueError):
        next(loader.iterate(0, start_batch=loader.steps_per_epoch + 1))


def test_output_does_not_depend_on_num_workers() -> None:
    serial = build_loader(_cfg(num_workers=0), img_size=32, batch_size=4, seed=1)
    parallel = build_loader(_cfg(num_workers=2), img_size=32, batch_size=4, seed=1)
    pairs = list(zip(serial.iterate(2), parallel.iterate(2), strict=True))
    assert len(pairs) == 4
    for (xa, ya), (xb, yb) in pairs:
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_iterating_leaves_the_global_rng_alone() -> None:
    loader = build_loader(_cfg(num_images=8), img_size=16, batch_size=4, seed=0)
    state = torch.get_rng_state()
    list(loader.iterate(0))
    assert torch.equal(state, torch.get_rng_state())


def test_ranks_get_disjoint_slices_of_one_shared_permutation() -> None:
    transform = PretrainTransform(8)
    ranks = [MIMLoader(_IndexSource(16), transform, 3, seed=9, rank=r, world_size=2) for r in range(2)]
    assert [r.steps_per_epoch for r in ranks] == [2, 2]  # 16 // (3 * 2)
    seen = [_labels(r, 4) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 6
    assert not set(seen[0]) & set(seen[1])
    # Interleaving the two ranks rebuilds the first 12 entries of the single-process epoch permutation.
    single = MIMLoader(_IndexSource(16), transform, 12, seed=9)
    assert [i for pair in zip(*seen) for i in pair] == _labels(single, 4)


def test_epochs_and_seeds_change_the_order_and_the_augmentation() -> None:
    loader = MIMLoader(_IndexSource(32), PretrainTransform(8), 8, seed=0)
    orders = [_labels(loader, epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(32)) for order in orders)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert _labels(loader, 1) == orders[1]
    assert _labels(MIMLoader(_IndexSource(32), PretrainTransform(8), 8, seed=1), 0) != orders[0]
    # The same sample gets a different crop in another epoch.
    demo = build_loader(_cfg(num_images=4), img_size=16, batch_size=4, seed=0)
    (x0, y0), (x1, y1) = next(demo.iterate(0)), next(demo.iterate(1))
    a, b = x0[torch.argsort(y0)], x1[torch.argsort(y1)]
    assert not torch.equal(a, b)


def test_too_few_images_for_one_batch_is_a_user_error() -> None:
    expected = r"dataset has 5 images, fewer than one batch of 4 x 2; lower train\.batch_size"
    with pytest.raises(FastmimError, match=expected):
        build_loader(_cfg(num_images=5), img_size=16, batch_size=4, seed=0, rank=1, world_size=2)


def test_bad_settings_are_user_errors() -> None:
    # Values are validate's to refuse (before any loader is built); a folder that is not there, the loader's.
    with pytest.raises(FastmimError, match="data.source = 'imagenet' is not one of 'demo', 'folder', 'synthetic'"):
        _cfg(source="imagenet")
    with pytest.raises(FastmimError, match=r"^data\.min_scale must be in \(0, 1\], e.g\. 0\.2\.$"):
        _cfg(min_scale=0.0)
    with pytest.raises(FastmimError, match=r"data\.path"):
        build_loader(_cfg(source="folder"), img_size=16, batch_size=4, seed=0)


def test_min_scale_reaches_the_crop() -> None:
    # With min_scale = 1 every crop of a square image is the whole image, and a flip keeps the pixel sum, so each
    # epoch yields the same multiset of per-sample sums; with the default 0.2 the crops (and the sums) differ.
    def sums(min_scale: float, epoch: int) -> torch.Tensor:
        cfg = _cfg(source="synthetic", num_images=4, min_scale=min_scale)
        images, _ = next(build_loader(cfg, img_size=16, batch_size=4, seed=0).iterate(epoch))
        return images.sum(dim=(1, 2, 3)).sort().values

    assert torch.allclose(sums(1.0, 0), sums(1.0, 7), atol=1e-3)
    assert not torch.allclose(sums(0.2, 0), sums(0.2, 7), atol=1e-3)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_images_are_replaced_counted_and_warned_once(tmp_path: Path, num_workers: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB").save(tmp_path / f"ok{i}.png")
    write_hostile(tmp_path / "bad")  # empty, text, truncated, decompression bomb, and readable odd modes
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in [*tmp_path.glob("ok*.png"), *(tmp_path / "bad").iterdir()]:
        path.rename(flat / path.name)
    cfg = _cfg(source="folder", path=str(flat), num_workers=num_workers)
    loader = build_loader(cfg, img_size=16, batch_size=3, seed=0)
    assert loader.num_samples == 6 + len(HOSTILE_SKIPPED) + len(HOSTILE_CONVERTED) + 1
    with pytest.warns(UserWarning, match="skipped unreadable image") as record:
        first = list(loader.iterate(0))
    assert len(first) == loader.steps_per_epoch and all(x.shape == (3, 3, 16, 16) for x, _ in first)
    assert {Path(p).name for p in loader.skipped_files} == set(HOSTILE_SKIPPED)
    assert loader.skipped == len(HOSTILE_SKIPPED)  # every image is read once per epoch here (15 = 5 x 3)
    assert len(record) == len(HOSTILE_SKIPPED)
    # Deterministic: the same epoch again, or resumed at batch 2, gives the same batches; files are warned about
    # once per loader, but every replaced sample is counted.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = list(loader.iterate(0))
        resumed = list(loader.iterate(0, start_batch=2))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first[2:], resumed, strict=True))
    assert loader.skipped == 2 * len(HOSTILE_SKIPPED) + _skipped_in(loader, 0, 2)


def _skipped_in(loader: MIMLoader, epoch: int, start_batch: int) -> int:
    """How many of the samples of batches start_batch.. of epoch fall on the unreadable files."""
    keys = epoch_keys(loader.num_samples, loader.batch_size, loader.seed, epoch, 0, 1)
    paths = loader.dataset.source.paths
    return sum(Path(paths[i]).name in HOSTILE_SKIPPED for i in keys[start_batch * loader.batch_size :, 0])


def test_a_folder_of_unreadable_files_is_a_user_error(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    loader = build_loader(_cfg(source="folder", path=str(tmp_path)), img_size=16, batch_size=2, seed=0)
    with pytest.raises(FastmimError) as info:
        list(loader.iterate(0))
    message = str(info.value)
    assert message.startswith("cannot read image ") and "nor any of 32 replacements" in message
    assert "\n" not in message and "Traceback" not in message


def test_gpu_placement_repeats_the_cpu_placement(reference_crop_resize) -> None:
    cpu = build_loader(_cfg(num_images=12), img_size=32, batch_size=4, seed=2)
    gpu = build_loader(_cfg(num_images=12, augment="gpu"), img_size=32, batch_size=4, seed=2, device="cpu")
    assert gpu.device == torch.device("cpu")
    diffs = []
    for (xc, yc), (xg, yg) in zip(cpu.iterate(1), gpu.iterate(1), strict=True):
        assert xg.dtype == torch.float32 and xg.shape == xc.shape and torch.equal(yc, yg)
        diffs.append((xc - xg).abs())
    diff = torch.cat(diffs)
    # Same crops, flips and arithmetic; Pillow >= 13 reorders its two passes for some boxes (see
    # tests/kernels/test_crop_resize.py), which moves a few pixels by a few levels of 255 (1 level = 0.017 here).
    assert diff.mean() < 0.005 and (diff == 0).float().mean() > 0.8


def test_gpu_placement_resumes_exactly_and_ignores_num_workers(reference_crop_resize) -> None:
    make = lambda workers: build_loader(  # noqa: E731
        _cfg(num_images=12, augment="gpu", num_workers=workers), img_size=24, batch_size=4, seed=7, device="cpu"
    )
    full = list(make(0).iterate(2))
    for (xa, ya), (xb, yb) in zip(full[1:], make(2).iterate(2, start_batch=1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_gpu_placement_ships_the_crop_the_sample_seed_draws() -> None:
    # The worker half of the device placement: the crop box and flip are the CPU transform's draws for that seed.
    source = _IndexSource(4)
    transform = PretrainTransform(8)
    keys = np.array([[2, 12345], [0, 77]])
    slot, position, pixels, nbytes, offsets, shapes, boxes, flips, labels, notes = CropBatches(source, transform)[
        (0, 5, keys)
    ]
    assert (slot, position, nbytes) == (0, 5, int(offsets[-1])) and labels.tolist() == [2, 0] and notes == ["", ""]
    for b, (index, seed) in enumerate(keys):
        image = np.asarray(source.load(int(index))[0])
        (top, left, h, w), flip = transform.sample_params(8, 8, torch.Generator().manual_seed(int(seed)))
        crop = pixels[offsets[b] : offsets[b + 1]].numpy().reshape(h, w, 3)
        assert np.array_equal(crop, image[top : top + h, left : left + w]) and flips[b] == flip
        assert shapes[b].tolist() == [h, w] and boxes[b].tolist() == [0, 0, h, w]


def test_unknown_placement_is_a_user_error() -> None:
    with pytest.raises(FastmimError, match=r"^data\.augment = 'tpu' is not one of 'cpu', 'gpu'\.$"):
        _cfg(augment="tpu")


def test_data_workers_survive_stop_signals_sent_to_the_process_group() -> None:
    """scancel / Ctrl-C signal every process of the group: the workers must outlive the signal so that the trainer
    can finish its step and save; they end when the trainer stops iterating."""
    loader = MIMLoader(_IndexSource(64), PretrainTransform(8), batch_size=4, seed=0, num_workers=1)
    batches = loader.iterate(0)
    first = next(batches)
    workers = [p.pid for p in multiprocessing.active_children()]
    assert workers, "the DataLoader worker should be running"
    for pid in workers:
        for sig in STOP_SIGNALS:
            os.kill(pid, sig)
    time.sleep(0.5)  # a killed worker would be reported by torch's SIGCHLD handler here or at the next batch
    labels = [int(i) for _, lab in [first, *batches] for i in lab]
    assert sorted(labels) == list(range(64))


# A loader's batches read once, then abandoned in a reference cycle that only the garbage collector could free.
_ABANDONED = """
from fastmim.config import DataConfig
from fastmim.data import build_loader
batches = build_loader(DataConfig(num_workers=2, num_images=8), 16, 2, 0).raw_batches(0)
next(batches)
cycle = [batches]
cycle.append(cycle)
print("exiting", flush=True)
"""


def test_workers_end_when_the_batches_are_closed_and_at_exit() -> None:
    """Workers ignore the stop signals, so their parent must end them: as soon as its batches are closed, and at
    exit for batches nobody closed (Python's own exit handler would SIGTERM them and wait forever)."""
    loader = MIMLoader(_IndexSource(64), PretrainTransform(8), batch_size=4, seed=0, num_workers=2)
    batches = loader.iterate(0)
    next(batches)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()
    result = subprocess.run([sys.executable, "-c", _ABANDONED], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr[-2000:]


# (ids: a test whose keywords include a bare "gpu" is taken for a CUDA test and skipped without one)
@pytest.mark.parametrize("augment", ["cpu", "gpu"], ids=["cpu-placement", "device-placement"])
def test_stream_runs_epoch_after_epoch_through_one_set_of_workers(augment, reference_crop_resize) -> None:
    loader = build_loader(
        _cfg(num_images=12, num_workers=2, augment=augment), img_size=16, batch_size=4, seed=3, device="cpu"
    )
    expected = [(1, 3, b) for b in loader.raw_batches(1, start_batch=2)] + [
        (e, k + 1, b) for e in (2, 3) for k, b in enumerate(loader.raw_batches(e))
    ]
    stream = loader.stream(1, 2)
    got = [next(stream)]
    workers = {p.pid for p in multiprocessing.active_children()}
    got += [next(stream) for _ in range(len(expected) - 1)]
    assert {p.pid for p in multiprocessing.active_children()} == workers and len(workers) == 2
    stream.close()
    assert (
        [(e, k) for e, k, _ in got]
        == [(e, k) for e, k, _ in expected]
        == [(1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)]
    )
    for (_, _, a), (_, _, b) in zip(got, expected, strict=True):
        assert torch.equal(loader.finish(a)[0], loader.finish(b)[0]) and torch.equal(a[-2], b[-2])
