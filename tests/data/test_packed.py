"""fastmim.data.packed: the device placement's packed batches from a .beton (crops straight into a shared ring slot,
or JPEG bytes for device decoding), the same crops, flips and replacements as the CPU placement, and decoding on
the device equal to decoding in the workers."""

import io
import shutil

import numpy as np
import pytest
import torch

from fastmim.config import DataConfig
from fastmim.data import PretrainTransform, build_loader
from fastmim.data import beton as bt
from fastmim.data.convert import convert_folder
from fastmim.data.packed import CropBatches, SharedRing
from fastmim.data.sources import DemoSource
from fastmim.errors import FastmimError
from tests.data._config import data_config


def _cfg(path, **overrides) -> DataConfig:
    return data_config(**{"source": "ffcv", "path": str(path), "augment": "gpu", **overrides})


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """The same 16 demo images (32-64 px a side) as a JPEG .beton and a raw one."""
    pytest.importorskip("ffcv")  # writing needs FFCV (the README's test command installs it; the GPU suite does not)
    root = tmp_path_factory.mktemp("packed")
    folder = root / "images"
    folder.mkdir()
    demo = DemoSource(16, 32)
    for i in range(16):
        demo.load(i)[0].save(folder / f"{i:02d}.jpg", quality=90)
    out = {}
    for kind in ("jpeg", "raw"):
        out[kind] = root / f"{kind}.beton"
        convert_folder(str(folder), str(out[kind]), raw=kind == "raw", workers=1, progress=False, log=lambda _: None)
    return out


@pytest.mark.parametrize("kind,decode", [("jpeg", "cpu"), ("raw", "cpu"), ("jpeg", "gpu")])
def test_beton_batches_hold_each_samples_crop_or_jpeg(betons, kind, decode):
    source = bt.BetonSource(str(betons[kind]))
    transform = PretrainTransform(16)
    batches = CropBatches(source, transform, decode)
    batches.ring = SharedRing(2, batches.capacity(4), shared=False)
    keys = np.array([[3, 11], [0, 12], [15, 13], [3, 14]])
    slot, position, pixels, nbytes, offsets, shapes, boxes, flips, labels, notes = batches[(1, 7, keys)]
    assert (slot, position, pixels) == (1, 7, None) and int(batches.ring.header[1]) == 7
    data = batches.ring.data[1, :nbytes].numpy()
    for b, (index, seed) in enumerate(keys):
        image, label = source.load_array(int(index))
        (top, left, h, w), flip = transform.sample_params(
            image.shape[1], image.shape[0], torch.Generator().manual_seed(int(seed))
        )
        assert flips[b] == flip and labels[b] == label and notes[b] == ""
        stored = data[offsets[b] : offsets[b + 1]]
        if decode == "gpu":
            assert np.array_equal(stored, source.read_encoded(int(index)))
            assert shapes[b].tolist() == list(image.shape[:2]) and boxes[b].tolist() == [top, left, h, w]
        else:
            assert np.array_equal(stored.reshape(h, w, 3), image[top : top + h, left : left + w])
            assert shapes[b].tolist() == [h, w] and boxes[b].tolist() == [0, 0, h, w]


@pytest.mark.parametrize("kind", ["jpeg", "raw"])
def test_beton_on_the_device_placement_matches_the_cpu_placement(betons, kind, reference_crop_resize):
    cpu = build_loader(_cfg(betons[kind], augment="cpu"), img_size=24, batch_size=4, seed=1)
    gpu = build_loader(_cfg(betons[kind], num_workers=2), img_size=24, batch_size=4, seed=1, device="cpu")
    for (xc, yc), (xg, yg) in zip(cpu.iterate(2), gpu.iterate(2), strict=True):
        assert torch.equal(yc, yg)
        # Same crops and flips; only Pillow >= 13's pass order (see tests/kernels/test_crop_resize.py) differs.
        assert (xc - xg).abs().mean() < 0.01


def test_decoding_on_the_device_equals_decoding_in_the_workers(betons, reference_crop_resize):
    # On a CPU "device" the JPEGs are decoded by torchvision's libjpeg-turbo: the same pixels as the workers'.
    workers = build_loader(_cfg(betons["jpeg"]), img_size=24, batch_size=4, seed=4, device="cpu")
    device = build_loader(
        _cfg(betons["jpeg"], decode="gpu", num_workers=2), img_size=24, batch_size=4, seed=4, device="cpu"
    )
    pairs = list(zip(workers.iterate(0), device.iterate(0), strict=True))
    assert len(pairs) == 4
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in pairs)


def test_the_ring_is_reused_and_staging_into_one_buffer_gives_the_same_batches(betons, reference_crop_resize):
    loader = build_loader(_cfg(betons["raw"], num_workers=1), img_size=24, batch_size=4, seed=2, device="cpu")
    first = [loader.finish(b)[0] for b in loader.raw_batches(5)]
    ring = loader._rings[0]
    staging = torch.empty(loader.dataset.capacity(4), dtype=torch.uint8)
    again = [loader.finish(b)[0] for b in loader.raw_batches(5, staging=staging)]
    assert loader._rings == [ring] and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # An abandoned iteration keeps its ring; a second one alive at the same time gets another.
    alive = loader.raw_batches(0)
    next(alive)
    next(loader.raw_batches(1))
    assert len(loader._rings) == 1
    alive.close()
    assert len(loader._rings) == 2


def test_an_overwritten_ring_slot_fails_loudly():
    ring = SharedRing(3, 16, shared=True)
    ring.header[1] = 4
    ring.check(1, 4)
    ring.header[1] = 7  # the batch three positions later took the slot
    with pytest.raises(RuntimeError, match="holds batch 7, expected 4"):
        ring.check(1, 4)


def test_an_unreadable_sample_is_replaced_as_in_the_cpu_placement(betons, tmp_path, reference_crop_resize):
    damaged = tmp_path / "damaged.beton"
    shutil.copy(betons["jpeg"], damaged)
    source = bt.BetonSource(str(damaged))
    with open(damaged, "r+b") as f:  # sample 5's JPEG headers overwritten with garbage
        f.seek(int(source._ptrs[5]))
        f.write(b"\x00" * 64)
    runs = []
    for augment in ("cpu", "gpu"):
        loader = build_loader(_cfg(damaged, augment=augment), img_size=24, batch_size=4, seed=0, device="cpu")
        with pytest.warns(UserWarning, match=r"damaged\.beton\[5\]"):
            runs.append([labels for _, labels in loader.iterate(0)])
        assert loader.skipped == 1 and list(loader.skipped_files) == [f"{damaged}[5]"]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_decode_choices_are_checked(betons):
    # The choice and the placement it needs are validate's to check; whether the .beton holds JPEGs, the loader's.
    with pytest.raises(FastmimError, match="data.decode = 'gpu' needs data.augment = 'gpu' and data.source = 'ffcv'"):
        _cfg(betons["jpeg"], decode="gpu", augment="cpu")
    raw = r"^data\.decode = \"gpu\" needs a \.beton of JPEGs .*converted without --raw"
    with pytest.raises(FastmimError, match=raw):
        build_loader(_cfg(betons["raw"], decode="gpu"), img_size=16, batch_size=4, seed=0, device="cpu")
    with pytest.raises(FastmimError, match=r"^data\.decode = 'nvjpeg' is not one of 'cpu', 'gpu'\.$"):
        _cfg(betons["jpeg"], decode="nvjpeg")


@pytest.mark.gpu
def test_cuda_decoding_stays_close_to_the_workers_decoding(betons):
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, so the pixels may differ slightly: this bounds
    the difference on the device (one level of 255 is 0.017 in normalised units)."""
    workers = build_loader(_cfg(betons["jpeg"]), img_size=32, batch_size=4, seed=4, device="cuda")
    device = build_loader(_cfg(betons["jpeg"], decode="gpu"), img_size=32, batch_size=4, seed=4, device="cuda")
    for (a, la), (b, lb) in zip(workers.iterate(0), device.iterate(0), strict=True):
        assert b.is_cuda and torch.equal(la, lb)
        diff = (a - b).abs() / 0.0175  # in levels of 255 (the largest channel's level, roughly)
        assert diff.mean() < 1.0 and diff.max() < 40


@pytest.mark.gpu
def test_cuda_decode_and_packed_channels_first_resize_match_the_cpu():
    """Without a .beton: JPEG bytes decoded by nvJPEG vs libjpeg-turbo, then the channels-first packed resize. The
    decoded pixels may differ slightly (see the bound above); the resize of identical pixels must not."""
    from fastmim.data.packed import decode_on_device
    from fastmim.kernels.crop_resize import crop_resize_packed

    demo = DemoSource(6, 64)
    parts = []
    for i in range(6):
        buffer = io.BytesIO()
        demo.load(i)[0].save(buffer, "JPEG", quality=90)
        parts.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    data = torch.cat(parts)
    offsets = torch.tensor([0, *np.cumsum([len(p) for p in parts]).tolist()])
    shapes = torch.tensor([demo.load(i)[0].size[::-1] for i in range(6)])
    cpu, starts = decode_on_device(data, offsets, shapes, torch.device("cpu"))
    cuda, cuda_starts = decode_on_device(data, offsets, shapes, torch.device("cuda"))
    assert cuda.is_cuda and torch.equal(starts, cuda_starts)
    levels = (cpu.float() - cuda.cpu().float()).abs()
    assert levels.mean() < 1.0 and levels.max() < 40
    boxes = torch.cat([torch.zeros(6, 2, dtype=torch.int64), shapes // 2], 1)
    flips = torch.tensor([True, False] * 3)
    args = (boxes, flips, 56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False)
    on_cuda = crop_resize_packed(cpu.cuda(), starts, shapes, *args)
    assert torch.equal(on_cuda.cpu(), crop_resize_packed(cpu, starts, shapes, *args))
