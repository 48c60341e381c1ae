"""Outputs that are whole or absent: every file fastmim writes goes through here.

One way to write (:func:`output`, and :func:`write_bytes` / :func:`write_text` on top of it): the data goes to a
hidden temporary file beside the target (``.<name>.<random>.tmp``, in the same directory so that the rename below
cannot cross file systems); the file is fsync'ed (its data reaches the disk before its name does: without it a
power cut after the rename can leave an empty or partial file under the final name on ext4 / XFS); it is renamed
onto the target; the directory is fsync'ed (the rename itself survives a power cut). A process killed at any
moment (kill -9) or a power cut therefore leaves the old file (or none) plus at most a hidden temporary file, never
a partial one; a write that fails (a full disk) removes its temporary file and raises.

A *fresh* output (``overwrite=False``: what a command creates with ``--out`` or a destination argument) is checked
first by :func:`fresh_output` and published with a hard link instead of a rename, which fails if something took
the name meanwhile: fastmim never overwrites a user's file. A directory (a folder of images) is written the same
way: filled under a hidden temporary name, every file and the directory fsync'ed, then renamed.

:class:`OutputError` is the one-line error (README "Interruptions and failures") of an output that could not be
written: the path, the system's reason and the fix (free disk space, make it writable, fix the file system).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastmim.errors import FastmimError, one_line

# errno values that more free space fixes (EFBIG: a file-size limit, or a file system's largest file).
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputError(FastmimError):
    """An output that could not be written: ``path``, the system's ``reason`` and the ``fix``. The message is
    ``could not write <what> <path> (<reason>)[; <outcome>]: <fix>[ and <then>].``; :meth:`restate` says it again
    with what happened after the failure (a final save) and what to do next."""

    def __init__(self, path: str | Path, error: OSError, what: str = "", outcome: str = "", then: str = "") -> None:
        self.path, self.error, self.what = Path(path), error, what
        self.reason = os.strerror(error.errno) if error.errno else (str(error) or type(error).__name__)
        if error.errno in _FULL:
            self.fix = "free disk space"
        elif error.errno in _DENIED:
            self.fix = f"make {one_line(str(self.path.parent))} writable"
        else:
            self.fix = "fix the file system"
        super().__init__(self.restate(outcome, then))

    def restate(self, outcome: str = "", then: str = "", also: str = "") -> str:
        """The message with ``outcome`` (what is intact, what was saved) and ``then`` (what to do after the fix);
        ``also``: another output that failed after this one (", nor ...")."""
        what = f"{self.what} " if self.what else ""
        text = f"could not write {what}{one_line(str(self.path))} ({self.reason}){also}"
        return text + (f"; {outcome}" if outcome else "") + f": {self.fix}" + (f" and {then}" if then else "") + "."


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


def temporary_beside(path: str | Path, directory: bool = False) -> Path:
    """A new, empty, hidden file (or directory) beside ``path``: ``.<name>.<random>.tmp``."""
    path = Path(path)
    prefix, parent = f".{path.name}.", path.parent
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
    os.close(fd)
    return Path(tmp)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sync(path: Path) -> None:
    """fsync ``path``: a file's data, or a directory's entries (and, for a directory written as one output, every
    file in it first)."""
    if path.is_dir():
        for entry in sorted(path.rglob("*")):
            if entry.is_file() and not entry.is_symlink():
                _fsync(entry, os.O_RDONLY)
    _fsync(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it survive a power cut."""
    _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)


def publish(tmp: Path, path: Path, overwrite: bool = True) -> None:
    """Give the synced temporary ``tmp`` its final name ``path``, then fsync the directory. ``overwrite``: rename
    over whatever is there; otherwise a file is hard-linked (fails if ``path`` appeared meanwhile) and a directory
    renamed (fails onto anything but an empty directory), and the error says the destination was left untouched."""
    try:
        if overwrite:
            os.replace(tmp, path)
        elif tmp.is_dir():
            if path.exists():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            os.rename(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if path.exists():
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
                os.rename(tmp, path)
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        raise FastmimError(
            f"{one_line(str(path))} appeared while it was being written; it was left untouched: choose another name."
        ) from None
    fsync_dir(path.parent)


@contextlib.contextmanager
def output(path: str | Path, overwrite: bool = True, directory: bool = False) -> Iterator[Path]:
    """Write the output ``path`` durably and atomically (see the module docstring): yields the hidden temporary
    path to write (a file, or with ``directory`` a folder to fill); on a clean exit it is fsync'ed and published
    (:func:`publish`); on any exception (a full disk, an interruption) it is removed and the exception raised."""
    path = Path(path)
    tmp = temporary_beside(path, directory)
    try:
        yield tmp
        sync(tmp)
        publish(tmp, path, overwrite)
    finally:
        remove(tmp)  # gone already after a publish by rename; the leftover name after a hard link


def write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` through :func:`output`; returns the path."""
    with output(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as the PNG ``path`` through :func:`output`; a failure is one :class:`OutputError`."""
    with reported(path), output(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`output`; returns the path."""
    return write_bytes(path, text.encode(), overwrite)


@contextlib.contextmanager
def reported(path: str | Path, what: str = "", outcome: str = "", then: str = "") -> Iterator[None]:
    """Turn an OSError raised inside the block (writing ``path``) into the one-line :class:`OutputError`."""
    try:
        yield
    except OSError as e:
        raise OutputError(path, e, what, outcome, then) from None
