"""Several processes, one run: torchrun / DeepSpeed-launcher DDP and DeepSpeed ZeRO 1 / 2 / 3, applied from outside
the model (STYLE 1: only fastmim.train knows about distributed execution).

Processes. A launcher (``torchrun``, ``deepspeed``) starts one process per device and sets ``RANK`` / ``WORLD_SIZE``
/ ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_distributed` reads them. Under SLURM, ``srun``
starts the processes itself and :func:`adopt_srun_env` derives them from SLURM's task variables (README's recipe:
SLURM signals every process of a job step, and torchrun dies of the SIGUSR1 it does not handle). One process
without a launcher under ``train.dist`` ddp / deepspeed is a group of one.
``train.dist = "auto"`` is DDP when ``WORLD_SIZE > 1``, one plain process otherwise. Backend: NCCL on CUDA (one
device per process, ``cuda:LOCAL_RANK``), gloo on CPU. Every collective waits at most ``train.dist_timeout``
seconds, so a rank that dies or stalls ends the run instead of hanging the others forever (torchrun's agent also
stops every process of the job as soon as one exits non-zero).

Batch. ``train.batch_size`` is per process: the global batch is batch_size * accum_steps * world_size and the peak
lr is blr * global batch / 256 (MAE / LocalMIM). Rank ``r`` reads the samples at positions r, r + W, r + 2W, ... of
each global batch (fastmim.data.loader) and the masking noise is drawn for the whole global batch, rows
[r::W] going to rank r (``train_step``): W processes with batch b see exactly the images and masks of one
process with batch W * b, so their loss trajectories agree up to float summation order.

DDP: gradients are all-reduced once per optimizer step (``no_sync`` on all but the last micro-batch); every
parameter that requires a gradient gets one each step, so ``find_unused_parameters`` stays off. The skip decision
for a non-finite step is taken on the all-reduced gradients and an all-reduced loss flag, so all ranks agree.

DeepSpeed (``train.dist = "deepspeed"``, ``train.zero_stage`` 1-3, ``train.offload``): :func:`deepspeed_config`
maps fastmim's config onto DeepSpeed's (micro-batch, accumulation, clipping, ZeRO stage, offload); the optimizer is
fastmim's own AdamW (same groups, betas, weight decay) and fastmim still sets its lr every step. Parameters stay
fp32 and bf16 runs under fastmim's autocast, as without DeepSpeed; fp16 is refused (DeepSpeed would convert the
model to fp16 with its own loss scaler). A step with a non-finite gradient norm is skipped by DeepSpeed's ZeRO
optimizer, also in fp32 (stage 1/2: an invalid global norm marks an overflow unless the dtype is DeepSpeed's bf16;
stage 3: always), on every rank since the norm is global; parameters, fp32 partitions, moments and AdamW's step
count are unchanged (tests/train/test_distributed.py compares the shards before and after). fastmim reads that
back through ``was_step_applied``. The checkpoint record's loss (which picks the best checkpoint) is the mean over
every rank's batches (:func:`mean_loss_since_save`).

Checkpoints (fastmim.train.checkpointer): DDP: rank 0 writes the usual single-file checkpoint (the unwrapped
model's state dict; the optimizer state is full on every rank), so it resumes on any number of processes. ZeRO:
the optimizer state goes to shards beside it (fastmim.train.zero).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastmim.config import TrainConfig
from fastmim.errors import FastmimError
from fastmim.train.metrics import Progress


@dataclass
class Dist:
    """This process's place in the run. ``engine`` is the DeepSpeed engine under ``mode == "deepspeed"``."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    zero_stage: int = 0
    engine: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Tear down in the order DeepSpeed needs (engine first, or ZeRO-3 can abort at exit), then the group."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        if self.mode != "none" and dist.is_initialized():
            dist.destroy_process_group()


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "nccl", "gloo")


def lost_peer(error: BaseException) -> str | None:
    """One line for a collective that failed because another process died or stalled (gloo / NCCL errors),
    or None for any other error (which then keeps its traceback: it is this rank's own failure)."""
    text = str(error).strip()
    if not isinstance(error, dist.DistError) and not any(k in text.lower() for k in _PEER_LOST):
        return None
    first = text.splitlines()[0][:160] if text else type(error).__name__
    return (
        f"lost contact with another process ({first}); that process's own error, above in the log (torchrun "
        "names it the root cause), is the one to fix."
    )


def resolve_mode(setting: str, world: int) -> str:
    """train.dist with "auto" resolved: DDP when the launcher started several processes, else a plain process."""
    if setting == "auto":
        return "ddp" if world > 1 else "none"
    if setting == "none" and world > 1:
        raise FastmimError(
            f"train.dist = 'none' but the launcher started {world} processes (WORLD_SIZE); use train.dist=auto, "
            "ddp or deepspeed, or launch one process."
        )
    return setting


# What srun sets in each task of a job step (not in the batch script itself), as the torchrun variables they stand for.
_SLURM_TASK = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_STEP_NUM_TASKS"}


def launched_by_srun() -> bool:
    """True in a task that srun started directly (no torchrun in between: torchrun sets WORLD_SIZE itself)."""
    return "WORLD_SIZE" not in os.environ and all(v in os.environ for v in _SLURM_TASK.values())


def adopt_srun_env() -> None:
    """In a task srun started directly (README's SLURM recipe: one task per device, so that SLURM's signals reach
    each rank once and no launcher sits in between; torchrun dies of a SIGUSR1 it does not handle), set RANK /
    LOCAL_RANK / WORLD_SIZE (and LOCAL_WORLD_SIZE) from SLURM's task variables; MASTER_ADDR / MASTER_PORT come from
    the batch script, which exports them."""
    if launched_by_srun():
        os.environ.update({ours: os.environ[theirs] for ours, theirs in _SLURM_TASK.items()})
        per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")
        if per_node.split("(")[0].isdigit() and "," not in per_node:  # "8" or "8(x4)": the same on every node
            os.environ.setdefault("LOCAL_WORLD_SIZE", per_node.split("(")[0])
        if int(os.environ["WORLD_SIZE"]) > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            raise FastmimError(
                "srun started this process as one of several tasks but MASTER_ADDR / MASTER_PORT are not set; "
                'export them before srun: export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | '
                "head -n 1) MASTER_PORT=29500."
            )


def init_distributed(t: TrainConfig, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group the launcher set up (see the module docstring); returns this process's Dist and its
    device (``cuda:LOCAL_RANK`` on CUDA). A single process with train.dist ddp / deepspeed forms a group of one."""
    adopt_srun_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = resolve_mode(t.dist, world)
    if mode == "none":
        return Dist(), device
    if world == 1:  # no launcher: a group of one needs what a launcher sets (DeepSpeed's engine asserts LOCAL_RANK)
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    timeout = timedelta(seconds=t.dist_timeout)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
    if mode == "deepspeed":
        deepspeed = import_deepspeed(device)
        if device.type == "cpu":
            # DeepSpeed's shared-memory all-reduce serves CPU inference only, and compiles a C++ extension at first
            # use (minutes on 2 cores); training all-reduces through torch.distributed.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # DeepSpeed calls torch.distributed's deprecated collective names every step: keep the log readable.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
        deepspeed.init_distributed(dist_backend=dist.get_backend(), timeout=timeout, verbose=False)
    return Dist(mode, rank, world, local, t.zero_stage if mode == "deepspeed" else 0), device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(device: torch.device):
    """DeepSpeed, told which accelerator to use before its first import (it probes for CUDA otherwise)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise FastmimError(
            "train.dist = 'deepspeed' needs DeepSpeed: `DS_BUILD_OPS=0 pip install \"fastmim[deepspeed]\"`."
        ) from None
    return deepspeed


def on_main(d: Dist, fn):
    """Run ``fn`` on rank 0 only and hand its result (picklable, small) to every rank; a FastmimError raised there
    is raised on every rank with the same message, so a refusal is one clear error, not a hang."""
    if d.world == 1:
        return fn()
    box: list[Any] = [None]
    if d.main:
        try:
            box[0] = ("ok", fn())
        except FastmimError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise FastmimError(value) if d.main else ReportedByRank0(value)
    return value


class ReportedByRank0(FastmimError):
    """An error that rank 0 raised and reports; the other ranks stop with it quietly (one message per run)."""

    reported_by_rank0 = True


def apply_distributed(d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, t: TrainConfig) -> tuple[Any, Any]:
    """Wrap for data parallelism; returns (the callable that runs the forward, the optimizer whose groups'
    lr the trainer sets). Unwrapped model and optimizer for a single process."""
    if d.mode == "none":
        return model, optimizer
    if d.mode == "ddp":
        device_ids = [d.local_rank] if next(model.parameters()).is_cuda else None
        # Every trainable parameter gets a gradient every step: no unused-parameter search (an extra graph walk).
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        return ddp, optimizer
    deepspeed = import_deepspeed(next(model.parameters()).device)
    config = deepspeed_config(t, d.world)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    d.engine = engine
    return engine, ds_optimizer


def deepspeed_config(t: TrainConfig, world: int) -> dict[str, Any]:
    """fastmim's train section as a DeepSpeed config. Not mapped: the lr schedule (fastmim sets the lr of every
    group each step) and precision (fp32 parameters; bf16 comes from fastmim's autocast)."""
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.accum_steps,
        "train_batch_size": t.batch_size * t.accum_steps * world,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the same update as without DeepSpeed
        "zero_force_ds_cpu_optimizer": False,  # also with offload (DeepSpeedCPUAdam would need a compiled op)
        "steps_per_print": 1 << 62,  # fastmim logs; DeepSpeed stays quiet
    }


def accumulating(d: Dist, forward, last_micro: bool):
    """DDP: skip the gradient all-reduce on every micro-batch but the last (forward and backward inside)."""
    if d.mode == "ddp" and not last_micro:
        return forward.no_sync()
    return contextlib.nullcontext()


def deepspeed_backward(d: Dist, loss: torch.Tensor) -> None:
    """One micro-batch under DeepSpeed: backward (it divides by accum_steps itself), then ``step``, which updates
    only at the accumulation boundary (DeepSpeed counts micro-batches)."""
    d.engine.backward(loss)
    d.engine.step()


def all_finite(d: Dist, finite: torch.Tensor) -> torch.Tensor:
    """The loss-is-finite flag agreed over ranks (a device-side all-reduce, no host sync), so every rank takes the
    same skip decision."""
    if d.world == 1:
        return finite
    flag = finite.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def global_mean(d: Dist, *values: torch.Tensor) -> list[torch.Tensor]:
    """Means over ranks of equal-weight per-rank values (log steps only: the logged loss is the global batch's)."""
    if d.world == 1:
        return list(values)
    flat = torch.cat([v.detach().float().reshape(-1) for v in values])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= d.world
    sizes = [v.numel() for v in values]
    return [x.reshape(v.shape) for x, v in zip(flat.split(sizes), values)]


def mean_loss_since_save(d: Dist, stats) -> float | None:
    """The mean loss of the applied steps since the previous save over every rank's batches (what a checkpoint's
    record stores to pick the best one): one all-reduce of two numbers, at saves, on every rank."""
    return stats.take_mean_loss(dist.all_reduce if d.world > 1 else None)


def agree_stop(d: Dist, name: str | None, log_step: bool) -> str | None:
    """The stop request, agreed over ranks so that all save the same step: one process stops after any step;
    several compare their flags at log steps only (an all-reduce of one number), the rank that got no signal
    reporting the others'."""
    if d.world == 1:
        return name
    if not log_step:
        return None
    flag = torch.tensor([0 if name is None else 1], device=_comm_device(d))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (name or "a signal to another rank") if int(flag) else None


def _comm_device(d: Dist) -> torch.device:
    return torch.device("cuda", d.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


class RankProgress(Progress):
    """Progress of a rank other than 0: measures nothing, shows nothing (rank 0 speaks for the run)."""

    def __init__(self, total: int, start: int, images_per_step: int) -> None:
        from tqdm import tqdm

        super().__init__(total, start, images_per_step)
        self.bar.close()
        self.interactive, self.bar = False, tqdm(total=total, disable=True)

    def show(self, row: dict[str, Any]) -> None:
        pass


class NullLog:
    """The metrics log of a rank other than 0."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.jsonl"

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
