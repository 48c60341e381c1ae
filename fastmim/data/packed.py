"""The worker half of ``data.augment = "gpu"``: batches of crops (or JPEG bytes) packed back to back, no padding.

A data worker builds a whole batch in one call (:class:`CropBatches`): for each ``(index, sample_seed)`` key it
draws the crop box and flip exactly as the CPU placement does (:meth:`PretrainTransform.sample_params` on a fresh
generator seeded with the sample seed), reads the image and copies only the crop's bytes into one buffer; with
``data.decode = "gpu"`` it copies the image's JPEG bytes instead and the box travels with them. The main process
stages the buffer (pinned memory on CUDA) and the device finishes the batch
(:func:`fastmim.kernels.crop_resize.crop_resize_packed`, after :func:`decode_on_device` for JPEG bytes).

Where the cost went before (ffcv, max side 512, 500 x 375 JPEGs, 1 worker, 224 px; 2-core KVM guest): 0.84 ms of
1.84 CPU-ms per image decoding, ~0.3 ms page faults on a fresh array per decoded image, ~0.65 ms zero-filling a
padded batch and moving it into fresh shared memory; fresh memory costs about 1 GB/s on that machine. So nothing
here touches fresh memory per batch once warm:

- A ``.beton`` source (it knows every image's size and stored bytes without reading it) is read with ``pread``
  into a buffer the worker keeps (raw images: only the crop's rows), decoded there (JPEG), and the crop is copied
  into a slot of a ring of shared-memory buffers made once per loader, :class:`SharedRing`. Only the slot number
  and the per-sample metadata (a few hundred bytes) cross the process boundary.
- Ring slots are reused safely because the DataLoader keeps at most ``prefetch_factor * num_workers`` batches in
  flight and dispatches the next one only when the main process asks for a batch: with one slot more than that,
  the slot a new batch is written to belongs to a batch the main process has already copied out. Each slot's
  header records which batch it holds (negative while being written), and the main process checks it before and
  after copying, so a broken assumption fails loudly instead of mixing images.
- Other sources (folder, demo, synthetic) decode into fresh arrays as before; their crops are packed into a fresh
  shared buffer of the exact size, which torch hands to the main process without another copy.

Unreadable images are replaced exactly as in the CPU placement (:func:`load_or_replace`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from fastmim.config import Placement
from fastmim.data.sources import ImageSource, UnreadableImageError
from fastmim.data.transforms import PretrainTransform
from fastmim.errors import FastmimError, one_line

PREFETCH = 2  # the DataLoader's prefetch_factor: batches in flight per worker (the ring has one slot more in all)
# Replacements for an unreadable image are drawn from (sample seed, this salt); after this many unreadable
# replacements in a row the data is hopeless and the run stops.
_REPLACEMENT_SALT = 0x5EED_BAD1
_MAX_REPLACEMENT_TRIES = 32

T = TypeVar("T")


def load_or_replace(read: Callable[[int], T], index: int, sample_seed: int, num_samples: int) -> tuple[T, str]:
    """``read(index)``, or, when that image is unreadable, ``read`` of a replacement drawn from a generator seeded
    by ``sample_seed``: deterministic (resume stays exact, batches stay full) and different every epoch. Returns
    the result and a note: empty, or ``"path\\0reason"`` of the unreadable image."""
    try:
        return read(index), ""
    except UnreadableImageError as err:
        bad = err
    rng = np.random.default_rng([sample_seed, _REPLACEMENT_SALT])
    for _ in range(_MAX_REPLACEMENT_TRIES):
        try:
            return read(int(rng.integers(num_samples))), f"{bad.path}\0{bad.reason}"
        except UnreadableImageError:
            continue
    raise FastmimError(
        f"cannot read image {one_line(bad.path)} ({bad.reason}), nor any of {_MAX_REPLACEMENT_TRIES} "
        "replacements drawn at random; most of data.path is unreadable: check its files."
    )


def shared_bytes(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] in shared memory whose pages are touched only as they are written (torch's DataLoader
    collate allocates the same way; ``.share_memory_()`` would first copy, touching every page)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


class SharedRing:
    """``slots`` buffers of ``capacity`` bytes in memory shared with the data workers, made once, plus a header
    per slot: the position of the batch it holds, ``-(position + 1)`` while a worker writes it."""

    def __init__(self, slots: int, capacity: int, shared: bool) -> None:
        self.data = shared_bytes(slots * capacity) if shared else torch.empty(slots * capacity, dtype=torch.uint8)
        self.data = self.data.view(slots, capacity)
        self.header = torch.full((slots,), -1, dtype=torch.int64)
        if shared:
            self.header.share_memory_()
        self.slots, self.capacity = slots, capacity

    def check(self, slot: int, position: int) -> None:
        if int(self.header[slot]) != position:
            raise RuntimeError(
                f"loader ring slot {slot} holds batch {int(self.header[slot])}, expected {position}: the DataLoader "
                f"had more than {self.slots - 1} batches in flight; please report this."
            )


class BatchTasks(Sampler[tuple[int, int, np.ndarray]]):
    """One task per batch, in order: ``(ring slot, position, keys [B, 2])``; positions count from 0 and slots cycle
    through ``slots``."""

    def __init__(self, key_batches: Iterable[np.ndarray], slots: int) -> None:
        self.key_batches, self.slots = key_batches, slots

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for position, keys in enumerate(self.key_batches):
            yield position % self.slots, position, keys


def identity(batch: Any) -> Any:
    """The DataLoader's collate_fn for tasks that already return whole batches (module level: picklable)."""
    return batch


class CropBatches(Dataset):
    """The data workers' batch builder for the device placement (see the module docstring).

    ``batches[(slot, position, keys)]`` returns ``(slot, position, pixels, nbytes, offsets [B + 1], shapes [B, 2],
    boxes [B, 4], flips [B], labels [B], notes)`` (numpy arrays; ``pixels`` is None when the batch is in ring slot
    ``slot``, else a fresh uint8 tensor). Image b is ``data[offsets[b]:offsets[b + 1]]``: its crop, uint8 ``[h, w, 3]``
    with ``shapes[b] = (h, w)`` and box ``(0, 0, h, w)``; or with ``decode = "gpu"`` its JPEG, ``shapes[b]`` the
    image's size and ``boxes[b]`` the crop inside it.
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform, decode: Placement = "cpu") -> None:
        self.source, self.transform, self.decode = source, transform, decode
        self.ring: SharedRing | None = None  # set by the loader before its workers start
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None  # this process's read and decode buffers

    def capacity(self, batch_size: int) -> int | None:
        """Bytes a ring slot needs for any batch (sources that know their sizes), else None: no ring."""
        if not hasattr(self.source, "read_pixels"):
            return None
        per_image = self.source.max_encoded_bytes if self.decode == "gpu" else self.source.max_pixel_bytes
        return batch_size * max(per_image, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, task: tuple[int, int, np.ndarray]) -> tuple:
        slot, position, keys = task
        if self.ring is None:
            return slot, position, *self._generic(keys)
        self.ring.header[slot] = -(position + 1)
        batch = self._from_beton(keys, self.ring.data[slot].numpy())
        self.ring.header[slot] = position
        return slot, position, *batch

    def _params(self, width: int, height: int, sample_seed: int) -> tuple[tuple[int, int, int, int], bool]:
        return self.transform.sample_params(width, height, torch.Generator().manual_seed(sample_seed))

    def _from_beton(self, keys: np.ndarray, out: np.ndarray) -> tuple:
        """Each sample straight into ``out`` (a ring slot): its crop's pixels, or its JPEG bytes."""
        src = self.source
        if self._scratch is None:
            self._scratch = (np.empty(src.max_encoded_bytes, np.uint8), np.empty(src.max_pixel_bytes, np.uint8))
        encoded, pixels = self._scratch
        offsets, shapes, boxes, flips, labels, notes = [0], [], [], [], [], []

        def read(i: int, seed: int) -> tuple:
            width, height = int(src.widths[i]), int(src.heights[i])
            (top, left, h, w), flip = self._params(width, height, seed)
            start = offsets[-1]
            if self.decode == "gpu":
                data = src.read_encoded(i, out[start:])
                return data.size, (height, width), (top, left, h, w), flip, int(src.labels[i])
            rows = src.read_pixels(i, pixels, rows=(top, top + h), scratch=encoded)
            out[start : start + h * w * 3].reshape(h, w, 3)[...] = rows[:, left : left + w]
            return h * w * 3, (h, w), (0, 0, h, w), flip, int(src.labels[i])

        for index, seed in keys:
            sample = functools.partial(read, seed=int(seed))
            (size, shape, box, flip, label), note = load_or_replace(sample, int(index), int(seed), len(src))
            offsets.append(offsets[-1] + size)
            shapes.append(shape), boxes.append(box), flips.append(flip), labels.append(label), notes.append(note)
        return None, offsets[-1], *_arrays(offsets, shapes, boxes, flips, labels), notes

    def _generic(self, keys: np.ndarray) -> tuple:
        """Any source: decode each image (a fresh array), then pack the crops into one buffer of the exact size."""

        def read(i: int) -> tuple[np.ndarray, int]:
            image, label = self.source.load(i)
            return np.asarray(image), label

        crops, shapes, flips, labels, notes = [], [], [], [], []
        for index, seed in keys:
            (image, label), note = load_or_replace(read, int(index), int(seed), len(self.source))
            (top, left, h, w), flip = self._params(image.shape[1], image.shape[0], int(seed))
            crops.append(image[top : top + h, left : left + w])
            shapes.append((h, w)), flips.append(flip), labels.append(label), notes.append(note)
        offsets = np.cumsum([0] + [c.size for c in crops])
        # In a worker, straight into shared memory: torch then passes it to the main process without a copy.
        nbytes = int(offsets[-1])
        pixels = shared_bytes(nbytes) if get_worker_info() else torch.empty(nbytes, dtype=torch.uint8)
        flat = pixels.numpy()
        for start, crop in zip(offsets, crops):
            flat[start : start + crop.size].reshape(crop.shape)[...] = crop
        boxes = [(0, 0, h, w) for h, w in shapes]
        return pixels, nbytes, *_arrays(offsets, shapes, boxes, flips, labels), notes


def _arrays(offsets, shapes, boxes, flips, labels) -> tuple[np.ndarray, ...]:
    shapes, boxes = np.asarray(shapes, np.int64).reshape(-1, 2), np.asarray(boxes, np.int64).reshape(-1, 4)
    return np.asarray(offsets, np.int64), shapes, boxes, np.asarray(flips, bool), np.asarray(labels, np.int64)


def decode_on_device(data: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor, device: torch.device):
    """The JPEGs ``data[offsets[b]:offsets[b + 1]]`` (host uint8) decoded on ``device`` (nvJPEG through torchvision on
    CUDA; torchvision's libjpeg-turbo decoder on the CPU) and packed channels-first: ``(pixels [N], starts [B])``
    for :func:`~fastmim.kernels.crop_resize.crop_resize_packed` with ``channels_last=False``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    bounds = offsets.tolist()
    parts = [data[a:b] for a, b in itertools.pairwise(bounds)]
    try:
        images = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        raise FastmimError(
            f"a JPEG of this batch cannot be decoded on {device} ({str(err).splitlines()[0]}); run with "
            "data.decode=cpu, which replaces and reports unreadable images."
        ) from None
    if [tuple(im.shape[1:]) for im in images] != [tuple(s) for s in shapes.tolist()]:
        raise FastmimError(f"JPEGs decoded on {device} differ in size from the dataset's record; write it again.")
    starts = torch.tensor([0, *np.cumsum([im.numel() for im in images])[:-1].tolist()], dtype=torch.int64)
    return torch.cat([im.reshape(-1) for im in images]), starts
