"""User-facing errors and interruptions.

A :class:`FastmimError` is an error the user caused and can fix (a bad config key, a missing data directory, an
unreadable image, a foreign checkpoint). The CLI prints its message as one line, without a traceback, and exits
with status 2. Messages are one sentence that says what is wrong and names the fix.

A stop signal (:data:`STOP_SIGNALS`) outside the training loop, which turns them into a save-and-stop request,
raises :class:`Interrupted`; the CLI reports it in one line too.
"""

import contextlib
import os
import signal
import sys
import threading
import time

# The signals that ask fastmim to stop: Ctrl-C (SIGINT), schedulers (SIGTERM: scancel, Kubernetes; SIGUSR1: SLURM's
# --signal), and a closed terminal or SSH session (SIGHUP, which SLURM also sends on some set-ups).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


class FastmimError(Exception):
    """An error caused by user input; its message names the fix."""


class Interrupted(KeyboardInterrupt):
    """A stop signal that arrived where there is nothing to finish or save (start-up, a conversion), or a second
    one during training; ``signal_name`` names it."""

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (a file name may hold a newline), so that a
    message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Interrupts:
    """The handler of :func:`interrupt_on_stop_signals`. Python may swallow an exception raised by a signal handler
    (one that lands in an at-fork hook or a finaliser: "Exception ignored in ..."; FFCV's writer start hits the
    first), so a swallowed :class:`Interrupted` is raised again: the signal is sent once more. Nothing is repeated
    while the exception propagates: a repeat would break the clean-up it runs through (``except`` and ``finally``
    blocks that stop worker processes and remove temporary files), leaving workers that multiprocessing's exit
    handler then waits for forever. ``REPEAT_AFTER_S`` after the first signal, an unreported one is repeated
    anyway, in case something swallowed it without a trace."""

    REPEAT_AFTER_S = 5.0

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.first: int | None = None
        self.settled = threading.Event()  # reported by the command (or the block ended): no more repeats
        self.swallowed = threading.Event()  # Python reported a swallowed Interrupted (sys.unraisablehook)

    def handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a forked worker: the signal's default action, as without fastmim
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.settled.is_set():
            return
        if self.first is None:
            self.first = signum
            threading.Thread(target=self._repeat, daemon=True).start()
        raise Interrupted(signal.Signals(self.first).name)

    def _repeat(self) -> None:
        deadline = time.monotonic() + self.REPEAT_AFTER_S
        while not self.settled.wait(0.05):
            if self.swallowed.is_set() or time.monotonic() > deadline:
                self.swallowed.clear()
                deadline = time.monotonic() + self.REPEAT_AFTER_S
                if signal.getsignal(self.first) == self.handle:  # not while the training loop handles signals
                    os.kill(self.pid, self.first)


@contextlib.contextmanager
def interrupt_on_stop_signals():
    """Within this block (in the main thread) a stop signal raises :class:`Interrupted`; yields a callable that
    says it has been reported (no more repeats). Processes forked meanwhile (data or conversion workers) keep
    each signal's default action."""
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield interrupts.settled.set
        return
    previous = {s: signal.signal(s, interrupts.handle) for s in STOP_SIGNALS}
    unraisable = sys.unraisablehook

    def quiet(info) -> None:  # a swallowed Interrupted is repeated: no "Exception ignored" noise for it
        if isinstance(info.exc_value, Interrupted):
            interrupts.swallowed.set()
        else:
            unraisable(info)

    sys.unraisablehook = quiet
    try:
        yield interrupts.settled.set
    finally:
        interrupts.settled.set()
        sys.unraisablehook = unraisable
        for s, handler in previous.items():
            signal.signal(s, handler)
