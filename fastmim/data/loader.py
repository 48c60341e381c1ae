"""Deterministic, resumable pre-training loader.

Order: each epoch is a permutation of the dataset drawn from a generator seeded by ``(seed, epoch)``; it is the
same on every rank. The permutation is truncated to a multiple of ``batch_size * world_size`` (drop_last), and rank
``r`` takes ``perm[r::world_size]``, so ranks see disjoint samples that together cover the kept part of the epoch.

Augmentation: the sampler yields keys ``(index, sample_seed)`` with ``sample_seed = hash(seed, epoch, index)``; the
dataset seeds a fresh ``torch.Generator`` from it for that sample's transform. Nothing reads global RNG, so batch
``k`` of epoch ``e`` is bit-identical whether iteration starts at batch 0 or at ``k`` (exact resume), and whatever
``num_workers`` is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastmim.data.sources import ImageSource, build_source
from fastmim.data.transforms import PretrainTransform
from fastmim.errors import FastmimError

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
# torch.multiprocessing re-raises a worker's exception in the main process with this header in the message.
_WORKER_ERROR_HEADER = "Caught FastmimError in DataLoader worker process"
_ERROR_PREFIX = "fastmim.errors.FastmimError: "


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
    """Map-style dataset over a source, indexed by ``(index, sample_seed)`` keys; returns ``([3, S, S], label)``."""

    def __init__(self, source: ImageSource, transform: PretrainTransform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        image, label = self.source.load(index)
        return self.transform(image, torch.Generator().manual_seed(sample_seed)), label


def _original_message(worker_message: str) -> str:
    """The one-line message of a FastmimError raised in a worker, from the header + remote traceback text that
    torch re-raises in the main process (its last line is ``fastmim.errors.FastmimError: <message>``)."""
    last = next((line for line in reversed(worker_message.splitlines()) if line.strip()), worker_message)
    return last.strip().removeprefix(_ERROR_PREFIX)


class MIMLoader:
    """Batches of augmented images for one rank, deterministic in ``(seed, epoch, batch)``.

    Attributes:
        num_samples: images in the dataset.
        steps_per_epoch: full batches this rank yields per epoch, ``num_samples // (batch_size * world_size)``.
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
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.dataset = _AugmentedSource(source, transform)
        self.num_samples = len(source)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise FastmimError(
                f"dataset has {self.num_samples} images, fewer than one batch of {batch_size} x {world_size}; "
                "lower train.batch_size or add images."
            )

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start_batch .. steps_per_epoch - 1`` of ``epoch``.

        Yields:
            ``(images, labels)``: float32 ``[B, 3, H, W]`` normalised with ImageNet mean / std, int64 ``[B]``.
        """
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside [0, steps_per_epoch={self.steps_per_epoch}]")
        keys = epoch_keys(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world_size)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_KeySampler(keys[start_batch * self.batch_size :]),
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=False,
            persistent_workers=False,
            # The DataLoader draws its worker base seed from this generator; without one it would draw from the
            # global RNG and shift the trainer's random stream by one draw per iterate() call.
            generator=torch.Generator().manual_seed(int(mix_seed(self.seed, epoch))),
        )
        try:
            yield from loader
        except FastmimError as err:
            if not str(err).startswith(_WORKER_ERROR_HEADER):
                raise
            raise FastmimError(_original_message(str(err))) from None


def build_loader(cfg: Any, img_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> MIMLoader:
    """Build the pre-training loader from the ``data`` config section.

    Reads ``cfg.source``, ``cfg.path``, ``cfg.num_images``, ``cfg.num_workers`` and ``cfg.min_scale``; crops use
    scale ``(cfg.min_scale, 1.0)`` and ratio ``(3/4, 4/3)`` as in SPEC section 5.
    """
    if batch_size < 1:
        raise FastmimError(f"train.batch_size is {batch_size}; set it to a positive integer.")
    if cfg.num_workers < 0:
        raise FastmimError(f"data.num_workers is {cfg.num_workers}; set it to 0 (main process) or more.")
    if not 0.0 < cfg.min_scale <= 1.0:
        raise FastmimError(f"data.min_scale is {cfg.min_scale}; set it in (0, 1], e.g. 0.2.")
    source = build_source(cfg, img_size)
    transform = PretrainTransform(img_size, scale=(cfg.min_scale, 1.0))
    return MIMLoader(source, transform, batch_size, seed, cfg.num_workers, rank, world_size)
