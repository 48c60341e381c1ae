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
from pathlib import Path

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


def fresh_output(path: str | Path, option: str) -> Path:
    """``path`` for a new output, refused in one line when something is already there (fastmim never overwrites)
    or its folder is missing; ``option`` names what chose the path (``--out``, ``destination``)."""
    out = Path(path)
    if out.exists():
        raise FastmimError(f"{one_line(str(out))} already exists; choose another {option} (fastmim never overwrites).")
    if not out.parent.is_dir():
        parent = one_line(str(out.parent))
        raise FastmimError(f"the folder {parent} does not exist; create it or choose another {option}.")
    return out


class _Interrupts:
    """The handler of :func:`interrupt_on_stop_signals`. Python may swallow an exception raised by a signal handler
    (one that lands in an at-fork hook or a finaliser: "Exception ignored in ..."), so after the first stop signal
    a thread repeats it every 0.2 s, while this handler is installed, until the command has reported it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.first: int | None = None
        self.settled = threading.Event()

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
        while not self.settled.wait(0.2):
            if signal.getsignal(self.first) == self.handle:  # not while the training loop handles signals itself
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
        if not isinstance(info.exc_value, Interrupted):
            unraisable(info)

    sys.unraisablehook = quiet
    try:
        yield interrupts.settled.set
    finally:
        interrupts.settled.set()
        sys.unraisablehook = unraisable
        for s, handler in previous.items():
            signal.signal(s, handler)
