"""User-facing errors and interruptions.

A :class:`FastmimError` is an error the user caused and can fix (a bad config key, a missing data directory, an
unreadable image, a foreign checkpoint). The CLI prints its message as one line, without a traceback, and exits
with status 2. Messages are one sentence that says what is wrong and names the fix.

A stop signal (:data:`STOP_SIGNALS`) outside the training loop, which turns them into a save-and-stop request,
raises :class:`Interrupted`; the CLI reports it in one line too.
"""

import signal

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
