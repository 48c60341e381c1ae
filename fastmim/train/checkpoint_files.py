"""fastmim's files, the one owner of their formats: for each, one writer and one reader that verifies. The run's
checkpoints as a whole (when to save, what to resume from, the fallback past damaged files) are the
:class:`~fastmim.train.checkpointer.Checkpointer`'s, which writes and reads them through this module.

Formats (the ``format`` entry of the dict in the file), each with its writer and its reader::

    fastmim-checkpoint   write_checkpoint (the Checkpointer's state)    load_checkpoint (resume), load_file
    fastmim-weights      write_weights                                  load_file
    fastmim-finetune     write_checkpoint (fastmim.eval.finetune)       load_file

Checkpoints and weights files start with :func:`model_header`: format, version, ``model_name`` and ``model_args``,
the :func:`~fastmim.models.create_model` arguments the model was built with ({"name", "kwargs"}), from which
:class:`ModelFile` rebuilds it. Version 1 files (weights files: no ``version`` entry) stored no arguments: their model
is rebuilt from the tensors' shapes, as the authors' released files are (fastmim.models.released.infer_overrides).

A run directory holds, per saved step::

    checkpoint-0000100.pt        torch.save of the checkpoint dict (below)
    checkpoint-0000100.pt.json   its record: {"format", "size", "sha256", "step", "loss"[, "previous"]}

Writing (:func:`write_checkpoint`): the data goes to a hidden temporary file in the same directory and is fsync'ed;
then the record is written (temporary file, fsync, rename); then the data file is renamed into place and the
directory fsync'ed. A kill -9 (or power loss) at any moment therefore leaves the previous checkpoints untouched plus
at most a stale temporary file or a record whose data file never arrived: both are ignored and later removed by
:func:`clean_partial_saves`. A file rewritten in place (a fine-tune's ``checkpoint-last.pt``) keeps the size and
SHA-256 of the file it replaces in its record as ``previous``, so a kill between the record and the rename leaves a
file that still verifies. A write that fails (a full disk) removes its temporary file and changes nothing else.

Reading (:func:`load_checkpoint`): the file's size and SHA-256 are checked against its record (a truncated or
bit-flipped file is a :class:`CorruptCheckpoint`), then it is read with ``torch.load(weights_only=True)``, which
never executes code, and its format, version and fields are checked. :func:`quarantine` moves a corrupt checkpoint
aside (``*.corrupt``, never deleted). :func:`prune` keeps the newest ``keep_last`` checkpoints and the one with the
lowest recorded training loss.

The checkpoint dict: the header (above), ``model`` (state dict), ``optimizer``, ``scaler``, ``step``, ``data``
({"epoch", "batch"}: the next batch to read), ``rng`` (torch CPU / CUDA generator states), ``config`` (the resolved
config as TOML text), ``skipped_steps`` (optimizer steps skipped for a non-finite loss or gradient so far; optional,
0 when absent) and ``world_size`` (processes; optional, 1 when absent). Under DeepSpeed ZeRO ``optimizer`` is a
pointer to the ``checkpoint-NNNNNNN.zero/`` shard directory with the shards' sizes and SHA-256 (fastmim.train.zero).
A weights file: the header and ``model``. A fine-tuned checkpoint (fastmim.eval.backbone.finetune_state):
``model_name``, ``vit_kwargs`` (timm's), ``classes``, ``model`` (timm names), and in ``checkpoint-last.pt`` what
resumes the fine-tuning (``optimizer``, ``scaler``, ``epoch``, ``step``, ``best_acc1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmim import files
from fastmim.errors import FastmimError, one_line
from fastmim.train.metrics import warn

CHECKPOINT_FORMAT = "fastmim-checkpoint"
WEIGHTS_FORMAT = "fastmim-weights"
FINETUNE_FORMAT = "fastmim-finetune"
RECORD_FORMAT = "fastmim-checkpoint-record"
VERSION = 2  # of checkpoints and weights files: 2 stores model_args (see the module docstring)
FINETUNE_VERSION = 1
MODEL_FORMATS = (CHECKPOINT_FORMAT, WEIGHTS_FORMAT)  # the files that hold a whole fastmim model
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


def write_checkpoint(state: dict[str, Any], path: str | Path, loss: float | None = None, then: str = RESUME) -> Path:
    """Save a checkpoint and its record (size, SHA-256, step, mean training loss since the previous save; the size
    and SHA-256 of the file it replaces, if any, as ``previous``).

    Order: data to a temporary file (fsync) -> record in place (atomic) -> data renamed in place -> directory
    fsync; see the module docstring for why every crash point is safe. A failed write (full disk) raises
    :class:`~fastmim.files.OutputError` and leaves the previous checkpoints as they were; ``then`` says how to go on.
    """
    path = Path(path)
    with files.reported(path, "checkpoint", CHECKPOINTS_INTACT, then):
        tmp, digest = _write_temp(state, path)
        try:
            record = {"format": RECORD_FORMAT, **digest, "step": state.get("step"), "loss": _finite_or_none(loss)}
            if path.exists():  # a file written before records (or copied without one) is hashed once, here
                replaced = read_record(path) or file_digest(path)
                record["previous"] = {"size": replaced["size"], "sha256": replaced["sha256"]}
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
    # the file written, or the one it replaced when the save stopped between the record and the rename
    digests = [record] + ([record["previous"]] if isinstance(record.get("previous"), dict) else [])
    if size not in [d.get("size") for d in digests]:
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or altered ({size} bytes, {record['size']} written)")
    sha256 = file_digest(path)["sha256"]
    if not any(d.get("size") == size and d.get("sha256") == sha256 for d in digests):
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
    _check_format(ckpt, path, (CHECKPOINT_FORMAT,))
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


def model_header(fmt: str, model: nn.Module) -> dict[str, Any]:
    """The entries a checkpoint or weights file (``fmt``) of ``model`` starts with: format, version, model name and
    the create_model arguments ``model`` was built with (fastmim.models.create_model records them)."""
    args = model.model_args
    return {
        "format": fmt,
        "version": VERSION,
        "model_name": args["name"],
        "model_args": {"name": args["name"], "kwargs": dict(args["kwargs"])},
    }


def write_weights(model: nn.Module, path: str | Path) -> None:
    """A fastmim weights file of ``model`` (header and state dict), written atomically, never over a file."""
    atomic_save({**model_header(WEIGHTS_FORMAT, model), "model": model.state_dict()}, path, overwrite=False)


_WHAT = {
    CHECKPOINT_FORMAT: "a pre-training checkpoint (a run directory's checkpoint-*.pt)",
    WEIGHTS_FORMAT: "a fastmim weights file (model only)",
    FINETUNE_FORMAT: "a fine-tuned checkpoint (encoder and classifier only)",
}


def load_file(path: str | Path, accept: tuple[str, ...]) -> dict[str, Any]:
    """A fastmim file of one of the formats ``accept``, verified: against its record when it has one (size,
    SHA-256), loaded with ``torch.load(weights_only=True)`` (fastmim.weights.safe_load), then its format, version
    and fields checked. Every refusal is one sentence naming the fix."""
    from fastmim.weights import safe_load

    path = Path(path)
    if path.is_file() and read_record(path) is not None:
        verify_checkpoint(path)
    obj = safe_load(path)
    _check_format(obj, path, accept)
    return obj


def _check_format(obj: Any, path: Path, accept: tuple[str, ...]) -> None:
    """Refuse ``obj`` (loaded from ``path``) unless it is a valid file of a format in ``accept``."""
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in accept:
        if fmt in _WHAT:
            raise FastmimError(f"'{path}' is {_WHAT[fmt]}; give {' or '.join(_WHAT[a] for a in accept)} instead.")
        raise FastmimError(
            f"'{path}' is not a fastmim checkpoint or weights file; for the authors' released weights use "
            "`fastmim import-checkpoint`."
        )
    latest, noun = (FINETUNE_VERSION, "fine-tuned checkpoint") if fmt == FINETUNE_FORMAT else (VERSION, "checkpoint")
    version = obj.get("version", 1 if fmt == WEIGHTS_FORMAT else None)  # version 1 weights files carry none
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= latest:
        raise FastmimError(
            f"'{path}' has {noun} version {version!r}; this fastmim reads versions 1 to {latest}: read it with the "
            "fastmim release that wrote it."
        )
    fields = _FIELDS[fmt] | (_FINETUNE_RESUME if fmt == FINETUNE_FORMAT and "optimizer" in obj else {})
    for key, typ in fields.items():
        if not isinstance(obj.get(key), typ) or isinstance(obj.get(key), bool):
            raise FastmimError(f"'{path}' lacks a valid '{key}' entry; give a {noun} written by fastmim.")
    if fmt == CHECKPOINT_FORMAT:
        _check_position(obj, path)
    if fmt == FINETUNE_FORMAT:
        _check_finetune(obj, path)
    elif version > 1:
        _check_model_args(obj, path)


def _check_position(ckpt: dict[str, Any], path: Path) -> None:
    data = ckpt["data"]
    numbers = [ckpt["step"], data.get("epoch"), data.get("batch"), ckpt.get("skipped_steps", 0)]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise FastmimError(f"'{path}' has an invalid step or data position; give a checkpoint written by fastmim.")


def _check_model_args(obj: dict[str, Any], path: Path) -> None:
    args = obj.get("model_args")
    kwargs = args.get("kwargs") if isinstance(args, dict) else None
    valid = isinstance(args, dict) and isinstance(args.get("name"), str) and isinstance(kwargs, dict)
    if not valid or not all(map(_plain, kwargs.items())):
        raise FastmimError(f"'{path}' lacks a valid 'model_args' entry; give a file written by fastmim.")


def _plain(item: tuple[Any, Any]) -> bool:
    """A create_model keyword argument as a file stores it: a name and a number, string, bool or None, or a tuple
    or list of those (Swin's per-stage depths and head counts)."""
    scalar = (bool, int, float, str)
    value = item[1]
    if isinstance(value, (tuple, list)):
        return isinstance(item[0], str) and all(isinstance(v, scalar) for v in value)
    return isinstance(item[0], str) and (value is None or isinstance(value, scalar))


def _check_finetune(obj: dict[str, Any], path: Path) -> None:
    classes, kwargs = obj["classes"], obj["vit_kwargs"]
    if not all(isinstance(c, str) for c in classes) or not all(isinstance(v, int) for v in kwargs.values()):
        raise FastmimError(f"'{path}' is not a complete fine-tuned checkpoint; give one written by fastmim.")


_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    CHECKPOINT_FORMAT: {
        "model_name": str,
        "model": dict,
        "optimizer": dict,
        "scaler": dict,
        "step": int,
        "data": dict,
        "rng": dict,
        "config": str,
    },
    WEIGHTS_FORMAT: {},  # model_name and model: ModelFile checks them, naming what is wrong
    FINETUNE_FORMAT: {"model_name": str, "vit_kwargs": dict, "classes": list, "model": dict},
}
# checkpoint-last.pt: what resumes the fine-tuning
_FINETUNE_RESUME = {"optimizer": dict, "scaler": dict, "epoch": int, "step": int, "best_acc1": (int, float)}


@dataclass
class ModelFile:
    """The model of a fastmim checkpoint or weights file: its registered ``name``, ``state`` (state dict) and
    ``kwargs``, the create_model arguments it was built with; for a version 1 file, which stored none, those its
    tensors' shapes imply (``inferred``) and, from a checkpoint's config, its mask ratio."""

    name: str
    state: dict[str, torch.Tensor]
    kwargs: dict[str, Any]
    inferred: bool = False

    @classmethod
    def read(cls, path: str | Path) -> ModelFile:
        """The model of the checkpoint or weights file ``path`` (:func:`load_file`)."""
        return cls.of(load_file(path, MODEL_FORMATS), path)

    @classmethod
    def of(cls, obj: dict[str, Any], path: str | Path) -> ModelFile:
        """The model of ``obj``, a checkpoint or weights file :func:`load_file` read from ``path``; refuses, in one
        line, a model name that is missing or not registered, a ``model`` that is not a dict of tensors and
        non-finite weights."""
        from fastmim.models import list_models

        name, state = obj.get("model_name"), obj.get("model")
        if not isinstance(name, str) or name not in list_models():
            shown = one_line(repr(name))[:80]
            raise FastmimError(
                f"'{path}' names no registered model (model_name {shown}); give a file written by fastmim."
            )
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FastmimError(f"'{path}' holds no model weights (tensors by name); give a file written by fastmim.")
        broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise FastmimError(
                f"'{path}' holds non-finite weights (NaN or inf in {len(broken)} tensor(s), e.g. "
                f"{one_line(broken[0])}); give a checkpoint saved before the training diverged."
            )
        if obj.get("version", 1) > 1:
            args = obj["model_args"]
            if args["name"] != name:  # model_name is the one messages name (a resume compares it with the run's)
                raise FastmimError(
                    f"'{path}' names two models ({name} as model_name, {one_line(args['name'])[:80]} in model_args); "
                    "give a file written by fastmim."
                )
            return cls(name, state, dict(args["kwargs"]))
        return cls(name, state, _version_1_kwargs(obj, path, name, state), inferred=True)

    def build(self, meta: bool = False) -> nn.Module:
        """The model the file holds, not loaded (on the meta device with ``meta``: shapes only). Tensors that do
        not fit it are refused in one line naming the first that does not fit. Version 1 files: also when their
        shapes imply sizes the model cannot be built at (a decoder 1 wide): they are then compared with the model at
        the inferred image size, or else at its defaults."""
        from fastmim.models import create_model
        from fastmim.models.released import check_fits

        tries = [self.kwargs]
        if self.inferred:
            tries += [{k: v for k, v in self.kwargs.items() if k == "img_size"}, {}]
        for i, kwargs in enumerate(tries):
            try:
                with torch.device("meta") if meta or i else contextlib.nullcontext():
                    model = create_model(self.name, **kwargs)
                break
            except (FastmimError, ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:
                if not self.inferred:
                    raise FastmimError(
                        f"{self.name} cannot be built with the arguments its file stores ({one_line(str(e))}); give "
                        "a file written by fastmim."
                    ) from None
        check_fits(model.state_dict(), self.state, self.name)
        if i:  # they fit a model built without what their shapes implied: those shapes contradict each other
            raise FastmimError(
                f"the weights do not fit {self.name} (their tensor shapes imply sizes it cannot be built at); pick "
                "the model the checkpoint was made for."
            )
        return model


def _version_1_kwargs(obj: dict[str, Any], path: str | Path, name: str, state: dict[str, Any]) -> dict[str, Any]:
    """The create_model arguments of a version 1 file, which stored none: read off its tensors' shapes as for the
    authors' released files, and its config's mask ratio (a checkpoint's)."""
    from fastmim.config import config_from_toml
    from fastmim.models.released import infer_overrides

    try:
        kwargs = infer_overrides(state, name)
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError):
        kwargs = {}  # a tensor it reads is missing or mis-shaped: ModelFile.build names it
    if isinstance(obj.get("config"), str):
        kwargs["mask_ratio"] = config_from_toml(obj["config"], f"checkpoint {path}").model.mask_ratio
    return kwargs


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
