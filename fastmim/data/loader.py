"""Deterministic, resumable pre-training loader.

Order: each epoch is a permutation of the dataset drawn from a generator seeded by ``(seed, epoch)``; it is the
same on every rank. The permutation is truncated to a multiple of ``batch_size * world_size`` (drop_last), and rank
``r`` takes ``perm[r::world_size]``, so ranks see disjoint samples that together cover the kept part of the epoch.

Augmentation: the sampler yields keys ``(index, sample_seed)`` with ``sample_seed = hash(seed, epoch, index)``; the
dataset seeds a fresh ``torch.Generator`` from it for that sample's transform. Nothing reads global RNG, so batch
``k`` of epoch ``e`` is bit-identical whether iteration starts at batch 0 or at ``k`` (exact resume), and whatever
``num_workers`` is.

Placement: with ``"cpu"`` the workers run the method 5 transform (PIL) up to the uint8 pixels, and the batch is
normalised where it is consumed (:meth:`MIMLoader.finish`: bit-identical to normalising per sample, a quarter of the
bytes to copy); with ``"gpu"`` each worker builds a whole batch of crops, packed back to back in shared memory
(:mod:`fastmim.data.packed`), and the main process resizes, flips and normalises it on the device in two kernel
launches. The parameters are drawn identically, so the placements differ only by Pillow's pass-order rounding
(fastmim.kernels.crop_resize). ``decode = "gpu"`` (a JPEG ``.beton`` with the device placement) ships each image's
JPEG bytes instead of its decoded crop and decodes them on the device.

Unreadable images (empty, truncated, not an image, too large) do not stop a run: the sample is replaced by another
image drawn from its own seed (batches stay full, resume stays exact), counted in :attr:`MIMLoader.skipped` and
warned about once per file.

A worker that delivers nothing (stuck in a read of a hung file system, or stopped) is not waited for blindly
when the caller of :meth:`MIMLoader.stream` passes a ``watch`` (the trainer's fastmim.train.stall.StallWatch): the
batch is then waited for in slices of :data:`WAIT_SLICE_S` (the DataLoader's ``timeout``, after which its iterator
can be asked again), and after each slice the watch is told how long the wait has lasted and which worker (and
process id) owes the batch; it may end the wait by raising, which shuts the workers down like any other way out.

Worker processes ignore the stop signals (see :func:`_ignore_stop_signals`), so nothing but their parent ends them:
an epoch's workers are shut down as soon as its batches stop being read (the iterator finished, closed or
abandoned), and any still running when the process exits are shut down then (:func:`stop_workers`); otherwise
Python's exit handler would send them a SIGTERM they ignore and wait for them forever.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import itertools
import signal
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, assert_never

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmim.config import DataConfig, Placement
from fastmim.data import packed
from fastmim.data.beton import BetonSource
from fastmim.data.packed import CropBatches, SharedRing, load_or_replace
from fastmim.data.sources import (
    DemoSource,
    FashionMNISTSource,
    FolderSource,
    ImageSource,
    SyntheticSource,
)
from fastmim.data.transforms import PretrainTransform, normalize_uint8
from fastmim.errors import STOP_SIGNALS, FastmimError, one_line

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
# torch.multiprocessing re-raises a worker's exception in the main process with this header in the message.
_WORKER_ERROR_HEADER = "Caught FastmimError in DataLoader worker process"
_ERROR_PREFIX = "fastmim.errors.FastmimError: "
# Seconds a worker gets to exit after being asked to (an idle one takes milliseconds) before it is killed.
_WORKER_GRACE_S = 2.0
# A watched wait for a batch (see the module docstring) checks in this often; it bounds how late a stop signal that
# arrives during a stall is acted on.
WAIT_SLICE_S = 0.5
# torch's DataLoader raises a RuntimeError with this text when its ``timeout`` passes without a batch.
_TIMEOUT_TEXT = "DataLoader timed out after"
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


class Watch(Protocol):
    """What a caller of :meth:`MIMLoader.stream` is told while a batch is late (fastmim.train.stall.StallWatch)."""

    def waiting(self, waited_s: float, who: str) -> None:
        """The wait has lasted ``waited_s`` so far; ``who`` owes the batch. May raise to end the wait."""

    def delivered(self, waited_s: float) -> None:
        """The batch came after ``waited_s`` of waiting (at least one slice)."""


class _KeySampler(Sampler[tuple[int, int]]):
    """Yields the ``(index, sample_seed)`` keys of a sequence of batches; the DataLoader hands each to the dataset."""

    def __init__(self, key_batches: Iterable[np.ndarray]) -> None:
        self.key_batches = key_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((int(i), int(s)) for keys in self.key_batches for i, s in keys)


class _AugmentedSource(Dataset):
    """Map-style dataset over a source for the CPU placement, indexed by ``(index, sample_seed)`` keys: returns
    ``(uint8 [3, S, S], label, note)``, the augmented pixels (normalised later on the training device,
    :meth:`MIMLoader.finish`); ``note`` is empty, or ``"path\0reason"`` when the image could not be read and
    another one took its place (:func:`~fastmim.data.packed.load_or_replace`).
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, sample_seed = key
        (image, label), note = load_or_replace(self.source.load, index, sample_seed, len(self.source))
        generator = torch.Generator().manual_seed(sample_seed)
        return self.transform(image, generator, normalize=False), label, note


def _original_message(worker_message: str) -> str:
    """The one-line message of a FastmimError raised in a worker, from the header + remote traceback text that
    torch re-raises in the main process (its last line is ``fastmim.errors.FastmimError: <message>``)."""
    last = next((line for line in reversed(worker_message.splitlines()) if line.strip()), worker_message)
    return last.strip().removeprefix(_ERROR_PREFIX)


class MIMLoader:
    """Batches of augmented images for one rank, deterministic in ``(seed, epoch, batch)``.

    Args:
        placement: where the crop is resized, flipped and normalised: ``"cpu"`` (PIL, in the data workers) or
            ``"gpu"`` (the workers decode and crop; :func:`fastmim.kernels.crop_resize.crop_resize_packed`
            finishes the batch on ``device``). Both draw the same parameters from the same per-sample generators.
        device: where ``"gpu"`` placement runs (default: the current CUDA device, else the CPU); batches come out
            on it. ``"cpu"`` placement yields CPU tensors.
        decode: ``"cpu"`` (the workers decode) or ``"gpu"`` (``"gpu"`` placement, a .beton of JPEGs: the workers
            ship the JPEG bytes and ``device`` decodes them).

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
        placement: Placement = "cpu",
        device: str | torch.device | None = None,
        decode: Placement = "cpu",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if decode == "gpu" and not getattr(source, "jpeg", False):
            # The one check of data.decode that validate cannot make: what the .beton holds is known once it is open.
            raise FastmimError(
                'data.decode = "gpu" needs a .beton of JPEGs (data.source = "ffcv", converted without --raw); set '
                'data.decode = "cpu".'
            )
        gpu = placement == "gpu"
        self.dataset = CropBatches(source, transform, decode) if gpu else _AugmentedSource(source, transform)
        self.transform = transform
        self.placement = placement
        self.decode = decode
        self.device = torch.device(device) if device is not None else _default_device()
        self.num_samples = len(source)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0
        self.skipped_files: dict[str, str] = {}
        self._rings: list[SharedRing] = []  # idle rings, reused by the next epoch's iteration
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

    def raw_batches(self, epoch: int, start_batch: int = 0, staging: torch.Tensor | None = None) -> Iterator[tuple]:
        """Batches ``start_batch ..`` of ``epoch`` as the workers deliver them, before :meth:`finish`. Counts and
        warns about replaced samples.

        ``"cpu"`` placement: ``(uint8 [B, 3, S, S], labels, notes)``. ``"gpu"`` placement: ``(data uint8 [N],
        offsets [B + 1], shapes [B, 2], boxes [B, 4], flips [B], labels [B], notes)``, the packed crops or JPEGs of
        :class:`~fastmim.data.packed.CropBatches`, copied out of the workers' shared memory into memory of their own
        (pinned on CUDA), or into ``staging`` (uint8, large enough) when given: a caller that finishes each batch
        before asking for the next may reuse one buffer, as CUDA's caching pinned allocator does.
        """
        self._check_start(start_batch)
        schedule = itertools.islice(self._schedule(epoch, start_batch), self.steps_per_epoch - start_batch)
        yield from self._batches(self._key_batches(schedule), epoch, staging)

    def stream(
        self, epoch: int = 0, start_batch: int = 0, staging: torch.Tensor | None = None, watch: Watch | None = None
    ) -> Iterator[tuple]:
        """Endless ``(epoch, next_batch, raw batch)`` from batch ``start_batch`` of ``epoch`` on, epoch after epoch,
        through one set of data workers (started once, not once per epoch); ``(epoch, next_batch)`` is the position
        after the batch. The batches are :meth:`raw_batches`'. With data workers, ``watch`` is told about late
        batches and may end the wait (see the module docstring)."""
        self._check_start(start_batch)
        raws = self._batches(self._key_batches(self._schedule(epoch, start_batch)), epoch, staging, watch)
        try:
            for (e, b), raw in zip(self._schedule(epoch, start_batch), raws):
                yield e, b + 1, raw
        finally:
            raws.close()  # stops the workers now, when the stream is closed or dropped

    def _check_start(self, start_batch: int) -> None:
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside [0, steps_per_epoch={self.steps_per_epoch}]")

    def _schedule(self, epoch: int, start_batch: int) -> Iterator[tuple[int, int]]:
        """Endless ``(epoch, batch)`` positions from ``(epoch, start_batch)`` on."""
        for e in itertools.count(epoch):
            for b in range(start_batch if e == epoch else 0, self.steps_per_epoch):
                yield e, b

    def _key_batches(self, schedule: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        """The ``(index, sample_seed)`` keys [B, 2] of each scheduled batch."""
        current, keys, size = None, None, self.batch_size
        for e, b in schedule:
            if e != current:
                current, keys = e, epoch_keys(self.num_samples, size, self.seed, e, self.rank, self.world_size)
            yield keys[b * size : (b + 1) * size]

    def _batches(
        self, key_batches: Iterator[np.ndarray], epoch: int, staging: torch.Tensor | None, watch: Watch | None = None
    ) -> Iterator:
        """The raw batches of ``key_batches``, read by one DataLoader (``watch``: see :meth:`stream`)."""
        watch = watch if self.num_workers else None  # without workers the main process reads: nothing to watch
        # The DataLoader draws its worker base seed from this generator; without one it would draw from the global
        # RNG and shift the trainer's random stream by one draw per iteration.
        common = {
            "num_workers": self.num_workers,
            "persistent_workers": False,
            "generator": torch.Generator().manual_seed(int(mix_seed(self.seed, epoch))),
            "worker_init_fn": _ignore_stop_signals if self.num_workers else None,
            "timeout": WAIT_SLICE_S if watch is not None else 0,
        }
        if self.placement == "cpu":
            # pinned: the copy to the GPU can run asynchronously
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=_KeySampler(key_batches),
                drop_last=True,
                pin_memory=self.device.type == "cuda",
                **common,
            )
            yield from self._deliver(loader, packed.identity, watch)
            return
        slots = self.num_workers * packed.PREFETCH + 1 if self.num_workers else 1
        capacity = self.dataset.capacity(self.batch_size)
        ring = self._take_ring(slots, capacity) if capacity else None
        dataset = copy.copy(self.dataset)  # its own ring: another iteration may be alive (an abandoned generator)
        dataset.ring = ring
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=packed.BatchTasks(key_batches, slots),
            collate_fn=packed.identity,
            prefetch_factor=packed.PREFETCH if self.num_workers else None,
            **common,
        )
        try:
            yield from self._deliver(loader, functools.partial(self._stage, ring=ring, staging=staging), watch)
        finally:
            if ring is not None:
                self._rings.append(ring)  # the workers are gone (_deliver shut them down): safe to reuse

    def _take_ring(self, slots: int, capacity: int) -> SharedRing:
        for i, ring in enumerate(self._rings):
            if (ring.slots, ring.capacity) == (slots, capacity):
                return self._rings.pop(i)
        return SharedRing(slots, capacity, shared=self.num_workers > 0)

    def _deliver(self, loader: DataLoader, receive, watch: Watch | None) -> Iterator[tuple]:
        with _shared_by_name():
            iterator = iter(loader)  # starts the workers (forked: they keep the sharing strategy set now)
        if self.num_workers:
            _LIVE_ITERATORS.add(iterator)
        try:
            while True:
                try:
                    item = next(iterator) if watch is None else _watched_next(iterator, watch)
                except StopIteration:
                    return
                batch = receive(item)
                self._count_skips(batch[-1])
                yield batch
        except FastmimError as err:
            if not str(err).startswith(_WORKER_ERROR_HEADER):
                raise
            raise FastmimError(_original_message(str(err))) from None
        finally:
            stop_workers(iterator)

    def _stage(self, item: tuple, ring: SharedRing | None, staging: torch.Tensor | None) -> tuple:
        """A worker's packed batch with its bytes in memory of their own (see :meth:`raw_batches`)."""
        slot, position, pixels, nbytes, *arrays, notes = item
        cuda = self.device.type == "cuda"
        if pixels is not None and staging is None and not cuda:
            data = pixels  # already a buffer of its own
        else:
            data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) if staging is None else staging[:nbytes]
            if pixels is None:
                ring.check(slot, position)
            # numpy's copy: one thread, ~18 GB/s on the development VM; torch's copy_ of uint8 took 6x the CPU time.
            np.copyto(data.numpy(), (ring.data[slot, :nbytes] if pixels is None else pixels).numpy())
            if pixels is None:
                ring.check(slot, position)  # not rewritten while it was copied
        return data, *(torch.from_numpy(a) for a in arrays), notes

    def finish(self, batch: tuple, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` from a raw batch, the images float32 and normalised on ``device``: the uint8 batch is
        copied there (asynchronously from pinned memory on CUDA), then for ``"cpu"`` placement normalised, for
        ``"gpu"`` placement (JPEGs decoded first, with ``decode = "gpu"``) resized + flipped + normalised. Default
        device: the CPU for ``"cpu"`` placement, the loader's device for ``"gpu"``."""
        t = self.transform
        if self.placement == "cpu":
            pixels = batch[0].to(device or "cpu", non_blocking=True)
            return normalize_uint8(pixels, t.mean, t.std), batch[1]
        from fastmim.kernels.crop_resize import crop_resize_packed  # imports triton: only for this placement

        data, offsets, shapes, boxes, flips, labels, _ = batch
        device = torch.device(device or self.device)
        if self.decode == "gpu":
            data, starts = packed.decode_on_device(data, offsets, shapes, device)
        else:
            data, starts = data.to(device, non_blocking=True), offsets[:-1]
        channels_last = self.decode != "gpu"
        images = crop_resize_packed(data, starts, shapes, boxes, flips, t.img_size, t.mean, t.std, channels_last)
        return images, labels

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
                    stacklevel=4,
                )


@contextlib.contextmanager
def _shared_by_name() -> Iterator[None]:
    """Within the block, torch shares tensors between processes through named shared-memory files ("file_system").
    Its default, "file_descriptor", hands each tensor's file descriptor over a connection the *sending* process
    serves: a batch that a data worker queued just before it stopped (SIGSTOP, a frozen cgroup) then blocks the
    main process inside torch's queue read, where no timeout or stop signal reaches it. Named files are opened
    without the sender. Only the workers forked within the block share this way; the previous strategy returns
    after it."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def _watched_next(iterator, watch: Watch) -> Any:
    """The next item of a DataLoader iterator built with ``timeout = WAIT_SLICE_S``, waited for slice by slice: its
    ``__next__`` leaves its state as it was when the timeout passes, so it can be asked again."""
    start, late = time.monotonic(), False
    while True:
        try:
            item = next(iterator)
        except RuntimeError as err:
            if not str(err).startswith(_TIMEOUT_TEXT):
                raise
            late = True
            watch.waiting(time.monotonic() - start, _late_worker(iterator))
            continue
        if late:
            watch.delivered(time.monotonic() - start)
        return item


def _late_worker(iterator) -> str:
    """The worker that owes the iterator's next batch, as "data worker N (pid P)" (torch's in-order iterator records
    the worker of each outstanding task), or "a data worker" when its internals say otherwise."""
    info = getattr(iterator, "_task_info", {}).get(getattr(iterator, "_rcvd_idx", None))
    workers = getattr(iterator, "_workers", [])
    if not info or not isinstance(info[0], int) or not 0 <= info[0] < len(workers):
        return "a data worker"
    return f"data worker {info[0]} (pid {workers[info[0]].pid})"


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


def build_source(data: DataConfig, img_size: int) -> ImageSource:
    """The source ``data.source`` names, from ``data.path``, ``data.holdout`` or ``data.num_images``. ``data`` is a
    section that :func:`fastmim.config.validate` accepted (a known source, a positive image count): nothing is
    checked twice here, only what needs the files (they exist, hold images, hold enough of them)."""
    match data.source:
        case "folder":
            return FolderSource(data.path)
        case "ffcv":
            return BetonSource(data.path)
        case "fashion_mnist":
            return FashionMNISTSource(data.path, "train", data.holdout)
        case "demo":
            return DemoSource(data.num_images, img_size)
        case "synthetic":
            return SyntheticSource(data.num_images, img_size)
    assert_never(data.source)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_loader(
    data: DataConfig,
    img_size: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> MIMLoader:
    """The pre-training loader the ``data`` section describes, for micro-batches of ``batch_size`` (train.batch_size).

    ``data`` and ``batch_size`` come from a config that :func:`fastmim.config.validate` accepted, which owns every
    check of their values and combinations; what is left here needs the data itself (:func:`build_source`, and
    :class:`MIMLoader`: enough images for one batch, JPEGs for ``data.decode = "gpu"``). Crops use scale
    ``(data.min_scale, 1.0)`` and ratio ``(3/4, 4/3)`` as in method 5. ``device`` is where ``"gpu"`` augmentation
    runs (default: the current CUDA device, else the CPU).
    """
    source = build_source(data, img_size)
    transform = PretrainTransform(img_size, scale=(data.min_scale, 1.0))
    return MIMLoader(
        source, transform, batch_size, seed, data.num_workers, rank, world_size, data.augment, device, data.decode
    )
