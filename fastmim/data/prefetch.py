"""Device batches one step ahead: the trainer's input stream.

On CUDA, while step k runs, batch k + 1 is already being copied (uint8, from pinned memory) and finished (normalised,
or resized + flipped + normalised for ``data.augment = "gpu"``) on a side stream, so the copy and the input kernels
overlap the step's compute instead of preceding it. The step's stream waits for the side stream only when it takes
the batch (an event wait on the device, not a host synchronisation). On the CPU there is nothing to overlap: batches
are finished when they are taken.

Positions: each batch comes with the ``(epoch, next_batch)`` position *after* it, so a checkpoint records exactly
what was consumed (the batch read ahead is not counted and is read again after a resume).
"""

from __future__ import annotations

import torch

from fastmim.data.loader import MIMLoader, Watch


class DevicePrefetcher:
    """Endless ``(images, epoch, next_batch)`` from ``(epoch, batch)`` on: float32 normalised images on ``device``.

    Args:
        loader: the run's loader (its epochs follow each other without end).
        device: where the batches are consumed.
        epoch, batch: the position to start from (a checkpoint's ``data`` entry).
        watch: told about late batches; may end a wait by raising (:meth:`MIMLoader.stream`).
    """

    def __init__(
        self, loader: MIMLoader, device: torch.device, epoch: int = 0, batch: int = 0, watch: Watch | None = None
    ) -> None:
        self.loader, self.device = loader, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._raw = loader.stream(epoch, batch, watch=watch)
        self._ahead = self._prepare() if self.stream is not None else None

    def close(self) -> None:
        """Stop reading: the loader's worker processes are shut down now (this object and its generator form a
        reference cycle, which the garbage collector might reach only after the process has hung at exit)."""
        self._raw.close()

    def _prepare(self) -> tuple[torch.Tensor, int, int]:
        epoch, batch, raw = next(self._raw)
        if self.stream is None:
            return self.loader.finish(raw, self.device)[0], epoch, batch
        with torch.cuda.stream(self.stream):
            return self.loader.finish(raw, self.device)[0], epoch, batch

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, int, int]:
        if self.stream is None:
            return self._prepare()
        images, epoch, batch = self._ahead
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)  # device-side: this step's kernels start after the batch is ready
        images.record_stream(current)  # its memory is not reused by the side stream while this step reads it
        self._ahead = self._prepare()  # queue the next batch's copy and finishing now: they overlap this step
        return images, epoch, batch
