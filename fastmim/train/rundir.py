"""One run at a time per run directory: the lock file ``<out_dir>/run.lock``; and the run's config files.

A run takes an exclusive ``flock`` on ``run.lock`` before it reads or writes anything else in its directory, and
holds it until its summary is written. The kernel drops the lock when the process ends, however it ends (kill -9
included), so a crashed run never leaves its directory locked; the file itself stays, holding the last holder's
process id, host and start time, and means nothing once unlocked. A second run on the same directory finds the lock
taken and is refused in one line that names the holder. ``flock`` holds between the processes of one machine and,
on Linux, over NFS (the client maps it onto POSIX locks); where a file system cannot lock at all, the run warns and
goes on unlocked.

``config.toml`` holds the run's config; a resume with different settings is recorded beside it
(``config.resumed-<step>.toml``), never over it (:func:`save_config`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import Any

from fastmim import files
from fastmim.errors import FastmimError, one_line
from fastmim.train.checkpoint_files import latest_checkpoint
from fastmim.train.distributed import Dist, on_main
from fastmim.train.metrics import warn

LOCK_NAME = "run.lock"


class RunLock:
    """The run directory's lock, held from :func:`hold_run_dir` until :meth:`release` (or the end of a ``with``
    block); ``RunLock()`` without a file is the lock of a process that needs none (a rank other than 0)."""

    def __init__(self, file: Any = None) -> None:
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the last descriptor of the open file drops the flock
            self.file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold_run_dir(out_dir: Path, key: str = "train.out_dir") -> RunLock:
    """Create ``out_dir`` if needed and lock it for this process; refuses, in one line, a directory another run
    holds, a path that is not a directory, and one that cannot be created or written. ``key``: the config key that
    named the directory (the refusals name it: train.out_dir, finetune.out_dir, linprobe.out_dir)."""
    path = out_dir / LOCK_NAME
    where = one_line(str(out_dir))
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise FastmimError(f"{key} {where} is not a directory; choose a directory for the run.")
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastmimError(f"cannot create {key} {where} ({e.strerror}); choose a writable directory.") from None
    try:
        file = path.open("a+")  # not truncated before the lock is ours: it names the holder
    except OSError as e:
        raise FastmimError(f"cannot write in {key} {where} ({e.strerror}); choose a writable directory.") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = one_line(file.read().strip()) or "details not written yet"
        file.close()
        raise FastmimError(
            f"{key} {where} is in use by another run ({holder}); wait for it to end or stop it, or choose "
            f"another --{key}."
        ) from None
    except OSError as e:
        warn(f"cannot lock {path} ({e.strerror}); make sure no other run uses {out_dir} at the same time.")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with contextlib.suppress(OSError):  # the holder's details only inform a refused run
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        file.flush()
    return RunLock(file)


def lock_run_dir(d: Dist, out_dir: Path) -> RunLock:
    """:func:`hold_run_dir` on rank 0, which alone reads and writes the run directory's files (the other ranks get
    a lock that holds nothing); a refusal there is raised on every rank."""
    held: list[RunLock] = []
    on_main(d, lambda: held.append(hold_run_dir(out_dir)))
    return held[0] if held else RunLock()


def holds_a_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a run's history: a metrics file or a checkpoint."""
    return (out_dir / "metrics.jsonl").exists() or latest_checkpoint(out_dir) is not None


def save_config(out_dir: Path, text: str, resumed_at: int | None) -> Path:
    """Record the run's config (TOML ``text``) and return the file that holds it (the resume command names it).
    A run that starts from scratch (``resumed_at`` None) writes config.toml whatever is there (what an earlier
    attempt that saved no checkpoint left: a fresh run is refused where a run's history exists); a resume at step
    ``resumed_at`` keeps config.toml and writes ``config.resumed-<step>.toml`` (``-2``, ``-3``, ... when taken)
    unless one of them already holds ``text``. A file that cannot be written (a full disk) is an OutputError."""
    if resumed_at is None:
        return _write_config(out_dir / "config.toml", text)
    n = 0
    while True:
        suffix = "" if n < 2 else f"-{n}"
        path = out_dir / ("config.toml" if n == 0 else f"config.resumed-{resumed_at:07d}{suffix}.toml")
        if not path.exists():
            return _write_config(path, text)
        if path.read_text() == text:
            return path
        n += 1


def _write_config(path: Path, text: str) -> Path:
    with files.reported(path, "the run's config", "nothing was trained", "run the command again"):
        return files.write_text(path, text)
