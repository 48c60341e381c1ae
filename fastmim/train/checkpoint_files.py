"""Checkpoint files that survive crashes: atomic verified writes, safe loads, rotation, quarantine. The run's
checkpoints as a whole (when to save, what to resume from, the fallback past damaged files) are the
:class:`~fastmim.train.checkpointer.Checkpointer`'s, which writes and reads them through this module.

A run directory holds, per saved step::

    checkpoint-0000100.pt        torch.save of the checkpoint dict (below)
    checkpoint-0000100.pt.json   its record: {"format", "size", "sha256", "step", "loss"}

Writing (:func:`write_checkpoint`): the data goes to a hidden temporary file in the same directory and is fsync'ed;
then the record is written (temporary file, fsync, rename); then the data file is renamed into place and the
directory fsync'ed. A kill -9 (or power loss) at any moment therefore leaves the previous checkpoints untouched plus
at most a stale temporary file or a record whose data file never arrived: both are ignored and later removed by
:func:`clean_partial_saves`. A write that fails (a full disk) removes its temporary file and changes nothing else.

Reading (:func:`load_checkpoint`): the file's size and SHA-256 are checked against its record (a truncated or
bit-flipped file is a :class:`CorruptCheckpoint`), then it is read with ``torch.load(weights_only=True)``, which
never executes code, and its format, version and fields are checked. :func:`quarantine` moves a corrupt checkpoint
aside (``*.corrupt``, never deleted). :func:`prune` keeps the newest ``keep_last`` checkpoints and the one with the
lowest recorded training loss.

The checkpoint dict: ``format`` ("fastmim-checkpoint"), ``version``, ``model_name``, ``model`` (state dict),
``optimizer``, ``scaler``, ``step``, ``data`` ({"epoch", "batch"}: the next batch to read), ``rng`` (torch CPU /
CUDA generator states), ``config`` (the resolved config as TOML text), ``skipped_steps`` (optimizer steps skipped
for a non-finite loss or gradient so far; optional, 0 when absent) and ``world_size`` (processes; optional, 1 when
absent). Under DeepSpeed ZeRO ``optimizer`` is a pointer to the ``checkpoint-NNNNNNN.zero/`` shard directory with
the shards' sizes and SHA-256 (fastmim.train.zero).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from fastmim import files
from fastmim.errors import FastmimError
from fastmim.train.metrics import warn

FORMAT = "fastmim-checkpoint"
RECORD_FORMAT = "fastmim-checkpoint-record"
VERSION = 1
_NAME = re.compile(r"checkpoint-(\d+)\.pt")
# The hidden temporary files (fastmim.files) of a run directory's outputs: checkpoints and their records, the
# configs, the metrics rewrite on resume, the loss plot.
_OUTPUTS = r"checkpoint-\d+\.pt(\.json)?|config(\.resumed-\d+(-\d+)?)?\.toml|metrics\.jsonl|loss\.png"
_PARTIAL = re.compile(rf"\.({_OUTPUTS})\..+\.tmp")
_CHUNK = 1 << 20
# What a failed save says (fastmim.files.OutputError): nothing saved before is touched; how to go on.
CHECKPOINTS_INTACT = "the previous checkpoints are intact"
RESUME = "continue with --train.resume=auto"


class CorruptCheckpoint(FastmimError):
    """A checkpoint file that is truncated, altered or unreadable (as opposed to a foreign or hostile one)."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:07d}.pt"


def record_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


class _HashingWriter:
    """The file object torch.save writes to: forwards each write to ``f`` and hashes it on the way (torch's zip
    writer writes sequentially, so the hash is the file's). torch replaces an exception raised by a buffer's
    write with a generic RuntimeError, so the original one is kept in ``error``: an OSError (ENOSPC...), or the
    KeyboardInterrupt of a second stop signal, whose handler runs here since this is the Python code a save runs."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
            self.sha256.update(data)
            self.size += memoryview(data).nbytes
            return n
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_temp(obj: Any, path: Path) -> tuple[Path, dict[str, Any]]:
    """torch.save ``obj`` into a hidden temporary file next to ``path``, fsync'ed (fastmim.files); returns it and
    {size, sha256}. On failure the temporary file is removed and the write's own exception (ENOSPC, EFBIG, EIO...,
    or an interruption) is raised."""
    tmp = files.temporary_beside(path)
    writer = None
    try:
        with tmp.open("wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
        files.sync(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if writer is not None and writer.error is not None and e is not writer.error:
            raise writer.error from None
        raise
    return tmp, {"size": writer.size, "sha256": writer.sha256.hexdigest()}


def atomic_save(obj: Any, path: str | Path, overwrite: bool = True) -> dict[str, Any]:
    """torch.save ``obj`` to ``path`` the way of fastmim.files (temporary file, fsync, rename or, without
    ``overwrite``, a link that never replaces a file): a crash mid-save leaves either the old file or the new one,
    never a partial one. Returns {size, sha256} of the file written; a failed write is an OutputError."""
    path = Path(path)
    with files.reported(path):
        tmp, digest = _write_temp(obj, path)
        try:
            files.publish(tmp, path, overwrite)
        finally:
            tmp.unlink(missing_ok=True)
    return digest


def write_checkpoint(state: dict[str, Any], path: str | Path, loss: float | None = None) -> Path:
    """Save a checkpoint and its record (size, SHA-256, step, mean training loss since the previous save).

    Order: data to a temporary file (fsync) -> record in place (atomic) -> data renamed in place -> directory
    fsync; see the module docstring for why every crash point is safe. A failed write (full disk) raises
    :class:`~fastmim.files.OutputError` and leaves the previous checkpoints as they were.
    """
    path = Path(path)
    with files.reported(path, "checkpoint", CHECKPOINTS_INTACT, RESUME):
        tmp, digest = _write_temp(state, path)
        try:
            record = {"format": RECORD_FORMAT, **digest, "step": state.get("step"), "loss": _finite_or_none(loss)}
            files.write_text(record_path(path), json.dumps(record) + "\n")
            files.publish(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record of checkpoint ``path``, or None when it has none or it is unreadable."""
    try:
        record = json.loads(record_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if not isinstance(record.get("size"), int) or not isinstance(record.get("sha256"), str):
        return None
    return record


def verify_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Check ``path`` against its record: size first (cheap, catches truncation), then SHA-256 (catches altered
    bytes). Returns the record, or None (with a warning) for a file without one (copied without its ``.json``, or
    written by another tool): such a file can only be checked by loading it. Raises :class:`CorruptCheckpoint`."""
    path = Path(path)
    record = read_record(path)
    if record is None:
        warn(f"{path} has no valid record ({record_path(path).name}); its integrity cannot be verified.")
        return None
    size = path.stat().st_size
    if size != record["size"]:
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or altered ({size} bytes, {record['size']} written)")
    if file_digest(path)["sha256"] != record["sha256"]:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt (its SHA-256 differs from the one recorded at save)")
    return record


def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file, read in 1 MiB chunks."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify, then load a fastmim checkpoint with ``weights_only=True`` (never unpickles code), and check its
    format, version and fields. Raises :class:`CorruptCheckpoint` for damaged files, :class:`FastmimError` for
    foreign, hostile or newer ones."""
    path = Path(path)
    if not path.is_file():
        raise FastmimError(f"checkpoint '{path}' does not exist; give an existing file or train.resume=auto.")
    verify_checkpoint(path)
    ckpt = load_data_only(path, f"'{path}'")
    _check_format(ckpt, path)
    return ckpt


def load_data_only(path: Path, name: str, allowed: list | tuple = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers, numbers and strings, plus the ``allowed``
    classes, never code. A file that holds any other pickled object raises :class:`FastmimError`; an unreadable
    one :class:`CorruptCheckpoint`. ``name`` says what the file is in those messages; ``mmap`` leaves tensor data
    on disk (enough to check what a file holds without reading it)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise FastmimError(
                f"{name} holds pickled Python objects, not just tensors; fastmim never executes code from a "
                "checkpoint: give a checkpoint written by fastmim."
            ) from None
        raise CorruptCheckpoint(f"{name} is not a readable checkpoint (UnpicklingError)") from None
    except Exception as e:
        raise CorruptCheckpoint(f"{name} is not a readable checkpoint ({type(e).__name__})") from None


def _check_format(ckpt: Any, path: Path) -> None:
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == "fastmim-weights":
        raise FastmimError(
            f"'{path}' is a fastmim weights file (model only), not a training checkpoint; resume from a "
            "checkpoint-*.pt of a run directory."
        )
    if fmt != FORMAT:
        raise FastmimError(
            f"'{path}' is not a fastmim checkpoint; for the authors' released weights use `fastmim import-checkpoint`."
        )
    if ckpt.get("version") != VERSION:
        raise FastmimError(
            f"'{path}' has checkpoint version {ckpt.get('version')!r}; this fastmim reads version {VERSION}: "
            "resume it with the fastmim release that wrote it."
        )
    expected = {
        "model_name": str,
        "model": dict,
        "optimizer": dict,
        "scaler": dict,
        "step": int,
        "data": dict,
        "rng": dict,
        "config": str,
    }
    for key, typ in expected.items():
        if not isinstance(ckpt.get(key), typ) or isinstance(ckpt.get(key), bool):
            raise FastmimError(f"'{path}' lacks a valid '{key}' entry; give a checkpoint written by fastmim.")
    data = ckpt["data"]
    numbers = [ckpt["step"], data.get("epoch"), data.get("batch"), ckpt.get("skipped_steps", 0)]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise FastmimError(f"'{path}' has an invalid step or data position; give a checkpoint written by fastmim.")


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in out_dir.glob("checkpoint-*.pt") if (m := _NAME.fullmatch(p.name)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``out_dir`` (not verified), or None."""
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def quarantine(path: Path) -> Path:
    """Move checkpoint ``path``, its record and its ZeRO shard directory (``.zero``, fastmim.train.zero) aside under
    one new suffix, out of the way of later saves and resumes but kept for inspection: ``.corrupt``, else
    ``.corrupt1``, ``.corrupt2``, ... Returns the checkpoint's new path."""
    shards = path.with_suffix(".zero")
    suffix, n = ".corrupt", 1

    def taken(suffix: str) -> bool:
        target = path.with_name(path.name + suffix)
        return target.exists() or record_path(target).exists() or shards.with_name(shards.name + suffix).exists()

    while taken(suffix):
        suffix, n = f".corrupt{n}", n + 1
    target = path.with_name(path.name + suffix)
    if record_path(path).exists():
        os.replace(record_path(path), record_path(target))
    if shards.is_dir():
        os.replace(shards, shards.with_name(shards.name + suffix))
    os.replace(path, target)
    return target


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint whose record holds the lowest training loss (the newest among equals), or None."""
    scored = []
    for step, path in checkpoints(out_dir):
        loss = (read_record(path) or {}).get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            scored.append((loss, -step, path))
    return min(scored)[2] if scored else None


def prune(out_dir: str | Path, keep_last: int, current_step: int) -> list[Path]:
    """Delete numbered checkpoints (and their records) older than ``current_step`` beyond the newest ``keep_last``,
    always keeping the best one (:func:`best_checkpoint`); ``keep_last`` 0 keeps everything. Checkpoints past
    ``current_step`` (a run resumed from an earlier one) are left alone. Returns the deleted paths."""
    if keep_last <= 0:
        return []
    older = [path for step, path in checkpoints(out_dir) if step < current_step]
    best = best_checkpoint(out_dir)
    doomed = [p for p in older[: max(0, len(older) - (keep_last - 1))] if p != best]
    for path in doomed:  # data before record: a kill in between leaves an orphan record, which is ignored
        path.unlink(missing_ok=True)
        record_path(path).unlink(missing_ok=True)
    return doomed


def clean_partial_saves(out_dir: str | Path) -> list[Path]:
    """Remove what interrupted writes leave behind: hidden temporary files of the run directory's outputs and
    checkpoint records without a data file."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [p for p in out_dir.iterdir() if _PARTIAL.fullmatch(p.name)]
    stale += [p for p in out_dir.glob("*.pt.json") if _NAME.fullmatch(p.stem) and not p.with_suffix("").exists()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
