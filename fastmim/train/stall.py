"""A data worker that delivers nothing: reported, and ended (README "Interruptions and failures").

A worker stuck in a read (a hung NFS or Lustre mount, a stopped process) used to hang a run silently, deaf to stop
signals, which the trainer reads between steps. Now the loader waits for a batch in short slices
(fastmim.data.loader) and tells a :class:`StallWatch` after each one. The watch warns once the wait reaches
data.stall_warn_s (again at each doubling of it), and ends the wait with :class:`DataStall` when a stop signal has
arrived (the trainer then saves the last completed step and stops, exit status 0, as for any stop signal) or when
the wait reaches data.stall_limit_s (the trainer saves the last completed step and fails in one line with the
resume command). With several processes one rank cannot save alone (the others wait for it inside a collective),
so there the wait ends in one line without a save; the run resumes from its last periodic checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastmim.config import DataConfig
from fastmim.errors import FastmimError
from fastmim.train.metrics import warn


class DataStall(Exception):
    """The wait for a batch ended without one: ``signal_name`` names the stop signal that ended it, or is None when
    data.stall_limit_s did."""

    def __init__(self, who: str, waited_s: float, limit_s: float, signal_name: str | None) -> None:
        super().__init__(f"{who} delivered no data for {waited_s:.0f} s")
        self.who, self.waited_s, self.limit_s, self.signal_name = who, waited_s, limit_s, signal_name

    def error(self, step: int, saved: Path | None, config: Path | None) -> FastmimError:
        """The one-line failure of a one-process run that reached the limit and saved ``step`` as ``saved``."""
        return FastmimError(
            f"{self} (data.stall_limit_s = {self.limit_s:g}): its read is stuck (a hung file system, a stopped "
            f"process); saved step {step} as {saved}; once the data can be read again, resume with: fastmim pretrain "
            f"--config {config} --train.resume=auto"
        )


class StallWatch:
    """What a rank does while it waits for a batch (see the module docstring).

    Args:
        data: the run's data section (stall_warn_s, stall_limit_s).
        stop: the name of the stop signal received so far, or None.
        world: processes in the run; with more than one, a stall past the limit or a stop ends this rank at once.
    """

    def __init__(self, data: DataConfig, stop: Callable[[], str | None], world: int = 1) -> None:
        self.warn_s, self.limit_s, self.stop, self.world = data.stall_warn_s, data.stall_limit_s, stop, world
        self._next_warning = self.warn_s
        self._warned = False

    def waiting(self, waited_s: float, who: str) -> None:
        """Called by the loader after each slice of a wait that has lasted ``waited_s`` so far; ``who`` names the
        worker whose batch is due ("data worker 1 (pid 4242)")."""
        signal_name = self.stop()
        limit = 0 < self.limit_s <= waited_s
        if signal_name is not None or limit:
            stall = DataStall(who, waited_s, self.limit_s, signal_name)
            if self.world > 1:
                why = f"stopped by {signal_name}" if signal_name else f"data.stall_limit_s = {self.limit_s:g}"
                raise FastmimError(
                    f"{stall} ({why}); this process cannot save without the others, which wait for it: resume from "
                    "the last saved checkpoint with --train.resume=auto once the data can be read again."
                )
            raise stall
        if waited_s >= self._next_warning:
            ends = f"the run ends at data.stall_limit_s = {self.limit_s:g} s" if self.limit_s else "no limit is set"
            warn(
                f"{who} has delivered no data for {waited_s:.0f} s: its read may be stuck (a hung file system, a "
                f"stopped process); still waiting ({ends}; a stop signal saves the last completed step and stops)."
            )
            self._warned = True
            while self._next_warning <= waited_s:
                self._next_warning *= 2

    def delivered(self, waited_s: float) -> None:
        """Called by the loader when a batch came after at least one slice of waiting."""
        if self._warned:
            warn(f"the data workers delivered again after {waited_s:.0f} s.")
        self._next_warning, self._warned = self.warn_s, False
