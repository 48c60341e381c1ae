"""DeepSpeed ZeRO checkpoints: the optimizer state as shards beside the fastmim checkpoint file.

Writing (:class:`ZeroShards`, the state strategy the checkpointer is given under ``train.dist = "deepspeed"``):
every rank writes its shards into a hidden directory that rank 0 renames to ``checkpoint-<step>.zero/`` once all are
done; then rank 0 writes ``checkpoint-<step>.pt`` as usual (atomic, verified), holding the full model weights
(gathered under ZeRO-3) and, in place of the optimizer state, a pointer ``{"zero": {"dir", "world_size",
"zero_stage", "files"}}``; ``files`` is the manifest of the shard directory ({"name", "size", "sha256"} per file,
hashed after every rank has written, the ranks sharing the work), so the verified record vouches for the shards too.

Reading: :func:`verify_shards` checks the shards of any checkpoint before anything reads them (on resume, where
``auto`` falls back past a checkpoint whose shards are missing or damaged, and in :func:`consolidate`), and also
checks that they hold only data before DeepSpeed unpickles them (a shard with pickled code is refused by name). A
ZeRO checkpoint resumes under DeepSpeed with the same world size and stage; anything else is refused with the way
out: :func:`consolidate` writes a plain checkpoint (fp32 weights from the shards, the position; AdamW moments
restart) that resumes anywhere.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastmim.config import config_from_toml
from fastmim.errors import FastmimError
from fastmim.files import OutputError
from fastmim.train.build import build_adamw, build_model
from fastmim.train.checkpoint_files import (
    CHECKPOINTS_INTACT,
    RESUME,
    CorruptCheckpoint,
    file_digest,
    load_checkpoint,
    load_data_only,
    write_checkpoint,
)
from fastmim.train.distributed import Dist, ReportedByRank0, import_deepspeed, on_main


def zero_dir(path: Path) -> Path:
    """The ZeRO shard directory beside fastmim checkpoint ``path``: checkpoint-0000100.zero/."""
    return path.with_suffix(".zero")


def zero_pointer(ckpt: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The ZeRO pointer of loaded fastmim checkpoint ``path``, or None for a plain checkpoint. A pointer of another
    shape (fields missing or of the wrong type, a directory or file name that leaves the run directory) is refused:
    everything that reads it relies on it."""
    zero = ckpt["optimizer"].get("zero")
    if zero is None:
        return None
    files = zero.get("files", []) if isinstance(zero, dict) else None
    valid = (
        isinstance(zero, dict)
        and _plain_name(zero.get("dir"))
        and isinstance(zero.get("world_size"), int)
        and zero["world_size"] > 0
        and zero.get("zero_stage") in (1, 2, 3)
        and isinstance(files, list)
        and all(_valid_entry(f) for f in files)
    )
    if not valid:
        raise FastmimError(
            f"checkpoint {path} has a malformed ZeRO shard pointer; give a checkpoint written by fastmim."
        )
    return zero


def _valid_entry(entry: Any) -> bool:
    """One manifest entry: {"name": a relative path inside the shard directory, "size": int, "sha256": str}."""
    return (
        isinstance(entry, dict)
        and _plain_name(entry.get("name"), nested=True)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )


def _plain_name(name: Any, nested: bool = False) -> bool:
    """A relative file name (with sub-directories when ``nested``) that stays inside its directory."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        return False
    parts = name.split("/")
    return (nested or len(parts) == 1) and all(part not in ("", ".", "..") for part in parts)


def verify_shards(path: Path, ckpt: dict[str, Any]) -> None:
    """Check the ZeRO shards of checkpoint ``path`` before anything reads them; nothing to check for a plain
    checkpoint.

    First against the manifest its (verified) record holds: every file present, with its size and SHA-256 (a
    pointer without a manifest, written before fastmim recorded one, is checked for the directory only); a bad
    file raises :class:`CorruptCheckpoint` naming it. Then what each file holds: DeepSpeed unpickles shards with
    ``weights_only=False``, which would run any code pickled into one (a manifest and record can be recomputed to
    match a planted file), so every file is first read here with ``weights_only=True`` (tensor data memory-mapped,
    not read), allowing only the plain classes DeepSpeed stores (:func:`_shard_classes`); one that holds anything
    else raises :class:`FastmimError`."""
    zero = zero_pointer(ckpt, path)
    if zero is None:
        return
    shard_dir = Path(path).parent / zero["dir"]
    if not shard_dir.is_dir():
        raise CorruptCheckpoint(f"checkpoint {path} lacks its ZeRO shard directory {shard_dir}")
    for entry in zero.get("files", []):
        file = shard_dir / entry["name"]
        if not file.is_file():
            raise CorruptCheckpoint(f"the ZeRO shard {file} of checkpoint {path} is missing")
        if file.stat().st_size != entry["size"] or file_digest(file)["sha256"] != entry["sha256"]:
            raise CorruptCheckpoint(
                f"the ZeRO shard {file} of checkpoint {path} is truncated or altered (its size or SHA-256 differs "
                "from the one recorded at save)"
            )
    classes = _shard_classes()
    if classes is None:  # without DeepSpeed nothing unpickles the shards (resume and consolidate refuse first)
        return
    for file in sorted(p for p in shard_dir.rglob("*") if p.is_file()):
        load_data_only(file, f"the ZeRO shard {file} of checkpoint {path}", classes, mmap=True)


def _shard_classes() -> list[type] | None:
    """The classes DeepSpeed pickles into ZeRO shards besides tensors and builtins, all plain data (a loss scaler's
    settings, the ZeRO stage enum, a parameter fragment's address); None when DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return None
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def remove_stale_shards(out_dir: Path) -> list[Path]:
    """Shard directories that no checkpoint refers to any more: interrupted saves (hidden ``*.zero.tmp``) and the
    shards of checkpoints removed by rotation."""
    stale = [p for p in out_dir.glob(".checkpoint-*.zero.tmp") if p.is_dir()]
    stale += [p for p in out_dir.glob("checkpoint-*.zero") if p.is_dir() and not p.with_suffix(".pt").exists()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def shards_cannot_continue(path: Path, zero: dict[str, Any], here: str) -> FastmimError:
    """The refusal of ZeRO checkpoint ``path`` by a run described by ``here`` (another world size, stage or
    train.dist), naming both ways out."""
    return FastmimError(
        f"checkpoint {path} holds ZeRO-{zero['zero_stage']} shards of {zero['world_size']} process(es), "
        f"which cannot continue as {here} process(es); resume with train.dist=deepspeed, "
        f"train.zero_stage={zero['zero_stage']} on {zero['world_size']} process(es), or run `fastmim consolidate "
        f"{path} --out FILE.pt` and resume from FILE.pt (weights and position kept, AdamW moments restart)."
    )


class ZeroShards:
    """The state strategy of a DeepSpeed run (see the module docstring): the checkpointer calls it on every rank."""

    def __init__(self, d: Dist) -> None:
        self.d = d

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model state dict; under ZeRO-3 gathered from the partitioned parameters (every rank calls it).

        Only the parameters that are partitioned now are gathered (and partitioned again afterwards): the small
        ones ZeRO-3 keeps whole on every rank ("persistent", e.g. biases and norms) must stay whole. Partitioning
        them too, as gathering every parameter did, made the next forward re-gather the patch-embedding bias
        through DeepSpeed's parameter getter (the encoder reads ``patch_embed.proj``'s parameters without calling
        it), which then registered it as a new external parameter of the encoder: the parameter trace recorded
        before the save no longer matched, and the next backward failed ("tracing error ... parameter fetch
        queue"). In a fresh run the bias was partitioned during the recorded step too, so the trace held it; in a
        resumed one DeepSpeed's checkpoint load had gathered it first, so it did not."""
        if self.d.zero_stage < 3:
            return model.state_dict()
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [p for p in model.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def optimizer_state(self, path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Every rank writes its shards of checkpoint ``path`` into a hidden directory, which rank 0 renames to
        :func:`zero_dir` once all are written (a crash before leaves only the hidden directory, removed on resume).
        Returns the pointer that takes the optimizer state's place in the checkpoint file."""
        staging = path.parent / f".{zero_dir(path).name}.tmp"  # DeepSpeed also drops its recovery scripts here
        on_main(self.d, lambda: shutil.rmtree(staging, ignore_errors=True))
        self._save_shards(path, staging)
        files = self._manifest(staging / "shards")

        def publish() -> None:
            final = zero_dir(path)
            if final.exists():  # the same step saved again after a resume from an earlier checkpoint
                shutil.rmtree(final)
            staging.joinpath("shards").replace(final)
            shutil.rmtree(staging)

        on_main(self.d, publish)
        zero = {"dir": zero_dir(path).name, "world_size": self.d.world, "zero_stage": self.d.zero_stage}
        return {"zero": {**zero, "files": files}}

    def _save_shards(self, path: Path, staging: Path) -> None:
        """DeepSpeed writes every rank's shards into ``staging``. A write that fails on any rank (a full disk:
        torch's zip writer reports it as a RuntimeError, "unexpected pos" or "iostream error", without the errno)
        is agreed over the ranks, its staging directory removed, and one line raised (by rank 0; the others stop
        quietly); the previous checkpoints are untouched."""
        error = None
        try:
            self.d.engine.save_checkpoint(str(staging), tag="shards", save_latest=False)
        except (OSError, RuntimeError) as e:
            if not isinstance(e, OSError) and not any(m in str(e) for m in _WRITE_FAILED):
                raise
            error = OutputError(zero_dir(path), _os_error(e, path.parent), SHARDS, CHECKPOINTS_INTACT, RESUME)
        if error is not None:
            dist.barrier()  # the one DeepSpeed's save ends with, which the failed rank skipped
        failed: list[Any] = [None] * self.d.world
        dist.all_gather_object(failed, str(error) if error is not None else None)
        messages = [m for m in failed if m is not None]
        if messages:
            on_main(self.d, lambda: shutil.rmtree(staging, ignore_errors=True))
            raise FastmimError(messages[0]) if self.d.main else ReportedByRank0(messages[0])

    def _manifest(self, shard_dir: Path) -> list[dict[str, Any]]:
        """{"name", "size", "sha256"} of every file in ``shard_dir`` once all ranks have written theirs: the files
        are hashed in parallel, rank r reading every W-th of them (a shared file system, as the rename in
        :meth:`optimizer_state` already needs), and the lists gathered on every rank."""
        names = sorted(p.relative_to(shard_dir).as_posix() for p in shard_dir.rglob("*") if p.is_file())
        mine = [{"name": n, **file_digest(shard_dir / n)} for n in names[self.d.rank :: self.d.world]]
        parts: list[Any] = [None] * self.d.world
        dist.all_gather_object(parts, mine)
        return sorted((entry for part in parts for entry in part), key=lambda e: e["name"])

    def check_resumable(self, path: Path, ckpt: dict[str, Any]) -> None:
        """Only ZeRO shards of this world size and stage continue here (ZeRO's optimizer partitions cannot be
        filled from a full AdamW state, nor re-partitioned)."""
        zero = zero_pointer(ckpt, path)
        if zero is None:
            raise FastmimError(
                f"checkpoint {path} was written without DeepSpeed; resume it with train.dist=ddp (any number of "
                "processes), or start the DeepSpeed run afresh."
            )
        if zero["world_size"] != self.d.world or zero["zero_stage"] != self.d.zero_stage:
            raise shards_cannot_continue(path, zero, f"ZeRO-{self.d.zero_stage} on {self.d.world}")

    def load(self, path: Path, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The module and optimizer shards of checkpoint ``path`` into the engine (checked by
        :func:`verify_shards` when the checkpoint was chosen)."""
        zero = zero_pointer(ckpt, path)
        shard_dir = path.parent / zero["dir"]
        if not shard_dir.is_dir():
            raise FastmimError(f"checkpoint {path} lacks its ZeRO shards {shard_dir}; restore the directory beside it.")
        loaded, _ = self.d.engine.load_checkpoint(str(path.parent), tag=zero["dir"], load_lr_scheduler_states=False)
        if loaded is None:
            raise FastmimError(
                f"DeepSpeed could not read the ZeRO shards in {shard_dir}; resume from another checkpoint."
            )


# What torch's zip writer (which reports no errno) says when a shard cannot be written.
_WRITE_FAILED = ("unexpected pos", "iostream error", "PytorchStreamWriter failed", "file write failed")
SHARDS = "the ZeRO shards of checkpoint"


def _os_error(error: OSError | RuntimeError, directory: Path) -> OSError:
    """The OSError behind a failed shard write: itself, or for torch's RuntimeError ENOSPC when ``directory``'s file
    system has (almost) no room left, else EIO."""
    if isinstance(error, OSError):
        return error
    stat = os.statvfs(directory)
    code = errno.ENOSPC if stat.f_bavail * stat.f_frsize < 1 << 20 else errno.EIO
    return OSError(code, os.strerror(code))


def consolidate(src: str | Path, out: Path) -> dict[str, Any]:
    """A plain fastmim checkpoint from a ZeRO one: the fp32 weights gathered from the shards (DeepSpeed's
    ``zero_to_fp32``) in the model the run builder makes, the step, data position, config and RNG of ``src``, and
    the run's AdamW freshly built (the moments are partitioned in a layout only DeepSpeed reads; they restart).
    Returns a summary."""
    src = Path(src)
    ckpt = load_checkpoint(src)
    zero = zero_pointer(ckpt, src)
    if zero is None:
        raise FastmimError(f"{src} is already a plain fastmim checkpoint; resume from it directly.")
    shard_dir = src.parent / zero["dir"]
    import_deepspeed(torch.device("cpu"))
    try:
        verify_shards(src, ckpt)
    except CorruptCheckpoint as e:
        raise FastmimError(
            f"{e}; consolidate an intact checkpoint instead (an earlier checkpoint-*.pt of the run), or restore "
            f"{shard_dir} from a backup."
        ) from None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(src.parent), tag=zero["dir"])
    cfg = config_from_toml(ckpt["config"], f"checkpoint {src}")
    cpu = torch.device("cpu")
    model = build_model(cfg, cpu)
    missing = set(model.state_dict()) - set(weights)
    if not missing <= {name for name, _ in model.named_buffers()}:
        raise FastmimError(f"the shards in {shard_dir} lack parameters {sorted(missing)[:3]}; they are damaged.")
    model.load_state_dict({**model.state_dict(), **weights})
    optimizer = build_adamw(cfg, model, cpu, zero["world_size"])
    write_checkpoint({**ckpt, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)
    return {"step": ckpt["step"], "world_size": zero["world_size"], "zero_stage": zero["zero_stage"], "out": out}
