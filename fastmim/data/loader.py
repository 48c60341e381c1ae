"""Deterministic, resumable pre-training loader.

Order: each epoch is a permutation of the dataset drawn from a generator seeded by ``(seed, epoch)``; it is the
same on every rank. The permutation is truncated to a multiple of ``batch_size * world_size`` (drop_last), and rank
``r`` takes ``perm[r::world_size]``, so ranks see disjoint samples that together cover the kept part of the epoch.

Augmentation: the sampler yields keys ``(index, sample_seed)`` with ``sample_seed = hash(seed, epoch, index)``; the
dataset seeds a fresh ``torch.Generator`` from it for that sample's transform. Nothing reads global RNG, so batch
``k`` of epoch ``e`` is bit-identical whether iteration starts at batch 0 or at ``k`` (exact resume), and whatever
``num_workers`` is.

Placement: with ``"cpu"`` the workers run the SPEC 5 transform (PIL) up to the uint8 pixels, and the batch is
normalised where it is consumed (:meth:`MIMLoader.finish`: bit-identical to normalising per sample, a quarter of the
bytes to copy); with ``"gpu"`` they decode and cut out each sample's crop (uint8, stored resolution) and the main
process resizes, flips and normalises the padded batch on the device in two kernel launches. The parameters are
drawn identically, so the placements differ only by Pillow's pass-order rounding (fastmim.kernels.crop_resize).

Unreadable images (empty, truncated, not an image, too large) do not stop a run: the sample is replaced by another
image drawn from its own seed (batches stay full, resume stays exact), counted in :attr:`MIMLoader.skipped` and
warned about once per file.

Worker processes ignore the stop signals (see :func:`_ignore_stop_signals`), so nothing but their parent ends them:
an epoch's workers are shut down as soon as its batches stop being read (the iterator finished, closed or
abandoned), and any still running when the process exits are shut down then (:func:`stop_workers`); otherwise
Python's exit handler would send them a SIGTERM they ignore and wait for them forever.
"""

from __future__ import annotations

import atexit
import signal
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmim.data.sources import ImageSource, UnreadableImageError, build_source
from fastmim.data.transforms import PretrainTransform, normalize_uint8
from fastmim.errors import STOP_SIGNALS, FastmimError, one_line

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
# torch.multiprocessing re-raises a worker's exception in the main process with this header in the message.
_WORKER_ERROR_HEADER = "Caught FastmimError in DataLoader worker process"
_ERROR_PREFIX = "fastmim.errors.FastmimError: "
PLACEMENTS: tuple[str, ...] = ("cpu", "gpu")
# Replacements for an unreadable image are drawn from (sample seed, this salt); after this many unreadable
# replacements in a row the data is hopeless and the run stops.
_REPLACEMENT_SALT = 0x5EED_BAD1
_MAX_REPLACEMENT_TRIES = 32
# Seconds a worker gets to exit after being asked to (an idle one takes milliseconds) before it is killed.
_WORKER_GRACE_S = 2.0
# DataLoader iterators whose workers may still run: shut down at exit if nothing else did (see the module docstring).
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def mix_seed(*words: int | np.ndarray) -> np.ndarray:
    """Hash integers (or equal-length uint64 arrays) into well-mixed 64-bit seeds, with the splitmix64 finaliser.

    ``torch.Generator.manual_seed`` keeps only the low 32 bits of its seed, so seeds that differ only in high bits
    (as in ``seed * 2**32 + epoch``) would alias; hashing spreads every input bit over the low bits. Returns a uint64
    array (0-d for scalar inputs).
    """
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # uint64 wrap-around is the intended arithmetic
        for word in words:
            # Python ints are reduced mod 2**64 first; int64 arrays wrap the same way through astype.
            x = h ^ np.asarray(word & _MASK64 if isinstance(word, int) else word).astype(np.uint64)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = x ^ (x >> np.uint64(31))
    return np.asarray(h)


def epoch_keys(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The ``(index, sample_seed)`` keys rank ``rank`` consumes in ``epoch``, in order.

    Returns:
        int64 array ``[steps_per_epoch * batch_size, 2]``; column 0 = dataset index, column 1 = sample seed.
    """
    generator = torch.Generator().manual_seed(int(mix_seed(seed, epoch)))
    perm = torch.randperm(num_samples, generator=generator).numpy()
    kept = num_samples // (batch_size * world_size) * batch_size * world_size
    indices = perm[:kept][rank::world_size]
    # Drop the top bit so the seeds fit int64; the low 32 bits, the only ones manual_seed uses, are untouched.
    seeds = (mix_seed(seed, epoch, indices) & np.uint64(_MASK63)).astype(np.int64)
    return np.stack([indices.astype(np.int64), seeds], axis=1)


class _KeySampler(Sampler[tuple[int, int]]):
    """Yields precomputed ``(index, sample_seed)`` keys; the DataLoader hands each one to the dataset."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((int(i), int(s)) for i, s in self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class _AugmentedSource(Dataset):
    """Map-style dataset over a source, indexed by ``(index, sample_seed)`` keys.

    ``placement = "cpu"`` returns ``(uint8 [3, S, S], label, note)``: the augmented pixels, normalised later on the
    training device (:meth:`MIMLoader.finish`); ``"gpu"`` returns the sample's crop, still
    uint8 ``[h, w, 3]`` at stored resolution, with ``(label, note, flip)``: the device resizes, flips and normalises
    it (:func:`_collate_crops`, :meth:`MIMLoader.iterate`). ``note`` is empty, or ``"path\0reason"`` when the
    image could not be read and another one took its place (:meth:`_load`).
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform, placement: str = "cpu") -> None:
        self.source = source
        self.transform = transform
        self.placement = placement

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, sample_seed = key
        (image, label), note = self._load(index, sample_seed)
        generator = torch.Generator().manual_seed(sample_seed)
        if self.placement == "cpu":
            return self.transform(image, generator, normalize=False), label, note
        (top, left, h, w), flip = self.transform.sample_params(image.shape[1], image.shape[0], generator)
        # Cropping here is a view; the collate copies only the crop, so the device receives 20-100% of the image.
        return image[top : top + h, left : left + w], label, note, flip

    def _read(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        if self.placement == "cpu":
            return self.source.load(index)
        if hasattr(self.source, "load_array"):
            return self.source.load_array(index)
        image, label = self.source.load(index)
        return np.asarray(image), label

    def _load(self, index: int, sample_seed: int) -> tuple[tuple[Image.Image | np.ndarray, int], str]:
        """Sample ``index``, or, when its file is unreadable, a replacement drawn from a generator seeded by
        ``sample_seed``: deterministic (so resume stays exact and batches stay full) and different every epoch."""
        try:
            return self._read(index), ""
        except UnreadableImageError as err:
            bad = err
        rng = np.random.default_rng([sample_seed, _REPLACEMENT_SALT])
        for _ in range(_MAX_REPLACEMENT_TRIES):
            try:
                return self._read(int(rng.integers(len(self.source)))), f"{bad.path}\0{bad.reason}"
            except UnreadableImageError:
                continue
        raise FastmimError(
            f"cannot read image {one_line(bad.path)} ({bad.reason}), nor any of {_MAX_REPLACEMENT_TRIES} "
            "replacements drawn at random; most of data.path is unreadable: check its files."
        )


def _collate_crops(samples: list[tuple]) -> tuple:
    """Pack uint8 crops of different sizes into one zero-padded ``[B, h_max, w_max, 3]`` tensor (in the worker, so
    only the padded crops cross to the main process); returns ``(crops, sizes [B, 2], flips [B], labels, notes)``."""
    crops, labels, notes, flips = zip(*samples)
    h = max(c.shape[0] for c in crops)
    w = max(c.shape[1] for c in crops)
    batch = np.zeros((len(crops), h, w, 3), dtype=np.uint8)
    for i, crop in enumerate(crops):
        batch[i, : crop.shape[0], : crop.shape[1]] = crop
    sizes = torch.tensor([c.shape[:2] for c in crops], dtype=torch.int64)
    return torch.from_numpy(batch), sizes, torch.tensor(flips), torch.tensor(labels, dtype=torch.int64), list(notes)


def _original_message(worker_message: str) -> str:
    """The one-line message of a FastmimError raised in a worker, from the header + remote traceback text that
    torch re-raises in the main process (its last line is ``fastmim.errors.FastmimError: <message>``)."""
    last = next((line for line in reversed(worker_message.splitlines()) if line.strip()), worker_message)
    return last.strip().removeprefix(_ERROR_PREFIX)


class MIMLoader:
    """Batches of augmented images for one rank, deterministic in ``(seed, epoch, batch)``.

    Args:
        placement: where the crop is resized, flipped and normalised: ``"cpu"`` (PIL, in the data workers) or
            ``"gpu"`` (the workers decode and crop; :func:`fastmim.kernels.crop_resize.crop_resize` finishes the
            batch on ``device``). Both draw the same parameters from the same per-sample generators.
        device: where ``"gpu"`` placement runs (default: the current CUDA device, else the CPU); batches come out
            on it. ``"cpu"`` placement yields CPU tensors.

    Attributes:
        num_samples: images in the dataset.
        steps_per_epoch: full batches this rank yields per epoch, ``num_samples // (batch_size * world_size)``.
        skipped: samples whose image could not be read and was replaced, counted as batches are yielded (each
            occurrence: a bad file met in three epochs counts three times), in this process only.
        skipped_files: ``{path: reason}`` of every unreadable file met so far; each is warned about once.
    """

    def __init__(
        self,
        source: ImageSource,
        transform: PretrainTransform,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        placement: str = "cpu",
        device: str | torch.device | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if placement not in PLACEMENTS:
            raise FastmimError(f"data.augment {placement!r} is unknown; set it to one of {', '.join(PLACEMENTS)}.")
        self.dataset = _AugmentedSource(source, transform, placement)
        self.transform = transform
        self.placement = placement
        self.device = torch.device(device) if device is not None else _default_device()
        self.num_samples = len(source)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0
        self.skipped_files: dict[str, str] = {}
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise FastmimError(
                f"dataset has {self.num_samples} images, fewer than one batch of {batch_size} x {world_size}; "
                "lower train.batch_size or add images."
            )

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start_batch .. steps_per_epoch - 1`` of ``epoch``.

        Yields:
            ``(images, labels)``: float32 ``[B, 3, H, W]`` normalised with ImageNet mean / std (on ``device`` for
            ``"gpu"`` placement), int64 ``[B]``.
        """
        for batch in self.raw_batches(epoch, start_batch):
            yield self.finish(batch)

    def raw_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple]:
        """The collated batches as the workers deliver them, before :meth:`finish` (for ``"gpu"`` placement: the
        uint8 crops, their sizes and flips). Counts and warns about replaced samples."""
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside [0, steps_per_epoch={self.steps_per_epoch}]")
        keys = epoch_keys(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world_size)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_KeySampler(keys[start_batch * self.batch_size :]),
            num_workers=self.num_workers,
            collate_fn=_collate_crops if self.placement == "gpu" else None,
            drop_last=True,
            pin_memory=self.device.type == "cuda",  # pinned: the copy to the GPU can run asynchronously
            persistent_workers=False,
            # The DataLoader draws its worker base seed from this generator; without one it would draw from the
            # global RNG and shift the trainer's random stream by one draw per iterate() call.
            generator=torch.Generator().manual_seed(int(mix_seed(self.seed, epoch))),
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
        )
        batches = iter(loader)
        if self.num_workers:
            _LIVE_ITERATORS.add(batches)
        try:
            for batch in batches:
                self._count_skips(batch[-1])
                yield batch
        except FastmimError as err:
            if not str(err).startswith(_WORKER_ERROR_HEADER):
                raise
            raise FastmimError(_original_message(str(err))) from None
        finally:
            stop_workers(batches)

    def finish(self, batch: tuple, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` from a raw batch, the images float32 and normalised on ``device``: the uint8 batch is
        copied there (asynchronously from pinned memory on CUDA), then for ``"cpu"`` placement normalised, for
        ``"gpu"`` placement resized + flipped + normalised. Default device: the CPU for ``"cpu"`` placement, the
        loader's device for ``"gpu"``."""
        t = self.transform
        if self.placement == "cpu":
            pixels = batch[0].to(device or "cpu", non_blocking=True)
            return normalize_uint8(pixels, t.mean, t.std), batch[1]
        from fastmim.kernels.crop_resize import crop_resize  # imports triton: only when this placement is used

        crops, sizes, flips, labels, _ = batch
        boxes = torch.cat([torch.zeros_like(sizes), sizes], dim=1)  # (top, left, h, w): the crop is the whole box
        crops = crops.to(device or self.device, non_blocking=True)
        return crop_resize(crops, boxes, flips, t.img_size, t.mean, t.std), labels

    def _count_skips(self, notes: list[str]) -> None:
        for note in notes:
            if not note:
                continue
            self.skipped += 1
            path, reason = note.split("\0", 1)
            if path not in self.skipped_files:
                self.skipped_files[path] = reason
                warnings.warn(
                    f"skipped unreadable image {one_line(path)} ({reason}); a replacement image takes its place",
                    stacklevel=3,
                )


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers ignore the stop signals (SIGTERM, SIGINT, SIGUSR1, SIGHUP): a scheduler that signals the whole
    process group (scancel, Ctrl-C in a terminal) must not kill them before the trainer has finished its step and
    saved; their parent shuts them down itself (:func:`stop_workers`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(batches) -> None:
    """Shut down the worker processes of DataLoader iterator ``batches`` now, and wait for them.

    torch's own shutdown asks each worker to exit and, for one that does not (busy in a long read), falls back on
    SIGTERM, which ours ignore: a worker still alive after :data:`_WORKER_GRACE_S` is killed (it holds nothing to
    save). Does nothing for an iterator without workers or one already shut down."""
    workers = list(getattr(batches, "_workers", ()))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        worker.join(_WORKER_GRACE_S)
        if worker.is_alive():
            worker.kill()
            worker.join()
    _LIVE_ITERATORS.discard(batches)


@atexit.register
def _stop_workers_at_exit() -> None:
    """Registered after torch.utils.data's own exit hook, so it runs before it (torch's shutdown is a no-op after
    that hook) and before multiprocessing's, which would wait forever for workers that ignore its SIGTERM."""
    for batches in list(_LIVE_ITERATORS):
        stop_workers(batches)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_loader(
    cfg: Any,
    img_size: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> MIMLoader:
    """Build the pre-training loader from the ``data`` config section.

    Reads ``cfg.source``, ``cfg.path``, ``cfg.num_images``, ``cfg.num_workers``, ``cfg.min_scale`` and
    ``cfg.augment``; crops use scale ``(cfg.min_scale, 1.0)`` and ratio ``(3/4, 4/3)`` as in SPEC section 5.
    ``device`` is where ``"gpu"`` augmentation runs (default: the current CUDA device, else the CPU).
    """
    if batch_size < 1:
        raise FastmimError(f"train.batch_size is {batch_size}; set it to a positive integer.")
    if cfg.num_workers < 0:
        raise FastmimError(f"data.num_workers is {cfg.num_workers}; set it to 0 (main process) or more.")
    if not 0.0 < cfg.min_scale <= 1.0:
        raise FastmimError(f"data.min_scale is {cfg.min_scale}; set it in (0, 1], e.g. 0.2.")
    placement = getattr(cfg, "augment", "cpu")
    if placement not in PLACEMENTS:
        raise FastmimError(f"data.augment {placement!r} is unknown; set it to one of {', '.join(PLACEMENTS)}.")
    source = build_source(cfg, img_size)
    transform = PretrainTransform(img_size, scale=(cfg.min_scale, 1.0))
    return MIMLoader(source, transform, batch_size, seed, cfg.num_workers, rank, world_size, placement, device)
