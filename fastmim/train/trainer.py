"""The pre-training loop: ``train(cfg) -> summary``.

Building happens in ``build_*`` helpers; ``train()`` itself is the loop. Everything random is derived from
``train.seed``: the data order and augmentation (per sample, see fastmim.data) and the masks (per optimizer step and
micro-batch, below), so a resumed run continues exactly where the checkpoint left it.

Reliability (README "Interruptions and failures"):

- Checkpoints are atomic and verified (fastmim.train.checkpoint); ``train.resume = "auto"`` takes the newest intact
  one, falling back past corrupt ones; ``train.keep_last`` rotates them, keeping the best.
- SIGTERM, SIGINT, SIGUSR1 and SIGHUP finish the current step, save, and return with ``stopped_by`` set (the CLI
  exits 0 and prints the resume command); a second signal stops at once. The data workers are shut down on every
  way out of the loop.
- A step whose loss or gradient is non-finite is skipped: no parameter, moment or step count changes (see
  ``apply_update``); skips are counted per scale and logged; ``train.max_nonfinite`` consecutive ones save and stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastmim.config import Config, config_from_toml, dump_toml
from fastmim.data import MIMLoader, build_loader
from fastmim.data.loader import mix_seed
from fastmim.data.prefetch import DevicePrefetcher
from fastmim.errors import STOP_SIGNALS, FastmimError, Interrupted
from fastmim.models import model_from_config
from fastmim.train import distributed as D
from fastmim.train.attn_choice import choose_attention, describe
from fastmim.train.checkpoint import (
    FORMAT,
    VERSION,
    CorruptCheckpoint,
    best_checkpoint,
    checkpoint_path,
    clean_partial_saves,
    latest_good_checkpoint,
    load_checkpoint,
    prune,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from fastmim.train.metrics import MetricsLog, Progress, StepClock, StepStats, peak_memory_gib, plot_losses, warn
from fastmim.train.optim import build_optimizer, lr_at
from fastmim.train.parallel import apply_compile, compile_wanted, timed_first_call
from fastmim.train.rundir import RunLock, hold_run_dir, holds_a_run

SCALE_NAMES = ["s=4", "s=2", "s=1", "s=1/2"]


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next batch to read (epoch, batch index)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Run:
    cfg: Config
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: MIMLoader
    out_dir: Path
    total_steps: int
    warmup_steps: int
    peak_lr: float
    amp_dtype: torch.dtype | None
    pos: Position = field(default_factory=Position)
    resumed_from: Path | None = None
    skipped_before: int = 0  # steps skipped for non-finite values before this process resumed the run
    config_path: Path | None = None  # the config file that reproduces this run (for the resume command)
    dist: D.Dist = field(default_factory=D.Dist)  # this process's rank and world (fastmim.train.distributed)
    forward: Any = None  # what runs the forward: the model, or its DDP / DeepSpeed wrapper
    compiled_blocks: int = 0  # transformer blocks compiled per train.compile (0: eager)
    compile_s: float | None = None  # seconds of the first (compiling) step, when compiled
    lock: RunLock = field(default_factory=RunLock)  # the run directory's lock (rank 0), held until train() ends


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FastmimError("train.device = 'cuda' but no CUDA device is visible; use --train.device=cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 / fp16, None for fp32; "auto" = bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def mask_noise(seed: int, step: int, micro: int, batch: int, num_patches: int) -> torch.Tensor:
    """The masking noise [B, L] of one micro-batch: a function of (seed, step, micro) only, so resumes repeat it."""
    g = torch.Generator().manual_seed(int(mix_seed(seed, step, micro)) >> 1)  # hashed: no aliasing between steps
    return torch.rand(batch, num_patches, generator=g)


def noise_to_model(noise: torch.Tensor, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The host-made noise where the model wants it: kept on the host for models that mask on the host (Swin's one
    mask per batch), else copied to the device from pinned memory, asynchronously (a copy from pageable memory
    would make the host wait for the device every step)."""
    if getattr(model, "masks_on_host", False) or device.type != "cuda":
        return noise
    return noise.pin_memory().to(device, non_blocking=True)


def scale_names(model: torch.nn.Module) -> list[str]:
    """Names of the model's per-scale losses, in ``out.losses`` order (SPEC's s = 4, 2, 1, 1/2 for LocalMIM)."""
    cells = model.target.cell_sizes
    return SCALE_NAMES if len(cells) == 4 else [f"{c}px" for c in cells]


def build_run(cfg: Config) -> Run:
    """The run of ``cfg``, ready to train: its run directory locked by rank 0 (fastmim.train.rundir; released
    when the build fails, else by ``train``), its checkpoint restored when it resumes, its config saved."""
    dist, device = D.init_distributed(cfg.train, resolve_device(cfg.train.device))
    held: list[RunLock] = []
    D.on_main(dist, lambda: held.append(hold_run_dir(Path(cfg.train.out_dir))))
    lock = held[0] if held else RunLock()
    try:
        run = _build(cfg, Path(cfg.train.out_dir), dist, device)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def _build(cfg: Config, out_dir: Path, dist: D.Dist, device: torch.device) -> Run:
    t = cfg.train
    resume = _resume_target_everywhere(cfg, out_dir, dist)
    torch.manual_seed(t.seed)
    model = model_from_config(cfg.model).to(device)
    _choose_attention(cfg, model, device, dist.main)
    compiled = apply_compile(model) if compile_wanted(t.compile, device) else 0  # before any wrapper: same keys
    loader = build_loader(cfg.data, cfg.model.img_size or 224, t.batch_size, t.seed, dist.rank, dist.world)
    micro_per_epoch = loader.steps_per_epoch
    steps_per_epoch = max(1, micro_per_epoch // t.accum_steps)
    total = t.steps if t.steps > 0 else t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps >= 0 else round(t.warmup_epochs * steps_per_epoch)
    peak = t.lr if t.lr > 0 else t.blr * t.batch_size * t.accum_steps * dist.world / 256  # global batch
    # fused AdamW on CUDA: one kernel per update, and its found_inf path skips non-finite steps without a host sync
    fused = device.type == "cuda" and t.offload == "none"
    optimizer = build_optimizer(model, peak, t.weight_decay, (t.beta1, t.beta2), fused=fused)
    dtype = amp_dtype(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    forward, optimizer = D.apply_distributed(dist, model, optimizer, t)
    run = Run(cfg, device, model, optimizer, scaler, loader, out_dir, total, warmup, peak, dtype, dist=dist)
    run.forward = forward
    run.compiled_blocks = compiled
    if resume is not None:
        _restore(run, *resume)
        if dist.main and resume[0].resolve().parent != out_dir.resolve():
            print(
                f"fastmim: continuing {resume[0]} (step {run.pos.step}) in {out_dir}, a new run directory: its "
                f"history starts after step {run.pos.step}.",
                flush=True,
            )
    run.config_path = _save_config(run) if dist.main else None
    return run


def _choose_attention(cfg: Config, model: torch.nn.Module, device: torch.device, report: bool) -> None:
    """model.attn = "auto": measure the backends at the model's attention shapes (CUDA) and keep the fastest."""
    if cfg.model.attn != "auto":
        return
    dtype = amp_dtype(cfg.train.precision, device)
    rows = choose_attention(model, cfg.train.batch_size, cfg.model.img_size or 224, dtype, device)
    if report and device.type == "cuda":
        print(f"fastmim: model.attn=auto measured {describe(rows)}", flush=True)


def _resume_target_everywhere(cfg: Config, out_dir: Path, dist: D.Dist) -> tuple[Path, dict[str, Any]] | None:
    """:func:`_resume_target` on rank 0 (which alone cleans up and moves corrupt files aside), its choice loaded on
    every other rank; a refusal there is raised on every rank."""
    found: list = []

    def choose() -> Path | None:
        if cfg.train.resume == "auto" and out_dir.is_dir():
            D.remove_stale_shards(out_dir)
        found.append(_resume_target(cfg, out_dir))
        return found[0][0] if found[0] else None

    path = D.on_main(dist, choose)
    if path is None:
        return None
    return found[0] if found else (path, load_checkpoint(path))


def _resume_target(cfg: Config, out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from, loaded and verified; refuses to start a fresh run on top of an existing one.

    "auto" first removes what interrupted saves left behind, then takes the newest intact checkpoint (falling back
    past corrupt ones, with a warning); an explicit path must itself be intact, and one from another directory
    continues only in a directory that holds no run yet (so no run's history is ever mixed with another's).
    """
    resume = cfg.train.resume
    if resume == "auto":
        if removed := clean_partial_saves(out_dir):
            warn(f"removed {len(removed)} partial file(s) left in {out_dir} by an interrupted save.")
        return latest_good_checkpoint(out_dir, verify=D.verify_shards)
    if resume:
        try:
            ckpt = load_checkpoint(resume)
            D.verify_shards(Path(resume), ckpt)
        except CorruptCheckpoint as e:
            raise FastmimError(
                f"{e}; give another checkpoint, or train.resume=auto to take the newest intact one."
            ) from None
        if Path(resume).resolve().parent != out_dir.resolve() and holds_a_run(out_dir):
            raise FastmimError(
                f"{out_dir} already holds a run, and checkpoint {resume} is from another directory: continuing it "
                "here would mix two runs' histories; give an empty --train.out_dir to continue it in, or resume "
                f"{out_dir}'s own run with --train.resume=auto."
            )
        return Path(resume), ckpt
    if holds_a_run(out_dir):
        raise FastmimError(
            f"{out_dir} already holds a run; continue it with --train.resume=auto or pick a new --train.out_dir."
        )
    return None


def _restore(run: Run, path: Path, ckpt: dict[str, Any]) -> None:
    """Load a verified checkpoint into the run; a checkpoint of another model or shape is refused by name."""
    saved = config_from_toml(ckpt["config"], f"checkpoint {path}")
    if ckpt["model_name"] != run.cfg.model.name:
        raise FastmimError(
            f"checkpoint {path} is for {ckpt['model_name']}, not {run.cfg.model.name}; set --model.name accordingly."
        )
    for key, value in vars(saved.model).items():
        if key != "impl" and getattr(run.cfg.model, key) != value:
            raise FastmimError(f"checkpoint {path} was trained with model.{key} = {value!r}; resume with that value.")
    data = ckpt["data"]
    if data["batch"] > run.loader.steps_per_epoch:
        raise FastmimError(
            f"checkpoint {path} stopped at batch {data['batch']} of an epoch, but this data has "
            f"{run.loader.steps_per_epoch} batches per epoch; resume with the data and batch size it was trained with."
        )
    D.check_resumable(run.dist, path, ckpt)
    D.warn_if_global_batch_changed(run.dist, path, ckpt, saved.train, run.cfg.train)
    try:
        if not D.load_shards(run.dist, path, ckpt):  # ZeRO: the module and optimizer come from the shards
            run.model.load_state_dict(ckpt["model"])
            run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = str(e).strip().splitlines()[0][:200]
        raise FastmimError(
            f"checkpoint {path} does not fit this run ({detail}); give a checkpoint of this model."
        ) from None
    run.pos = Position(ckpt["step"], data["epoch"], data["batch"])
    run.resumed_from = path
    run.skipped_before = ckpt.get("skipped_steps", 0)


def _save_config(run: Run) -> Path:
    """config.toml holds the run's config; a resume with different settings is recorded beside it, never over it.
    A run that starts from scratch writes config.toml whatever is there (what an earlier attempt that saved no
    checkpoint left: a fresh run is refused where a run's history exists). Returns the file that holds this
    process's config (the resume command names it)."""
    text, n = dump_toml(run.cfg), 0
    if run.resumed_from is None:
        atomic_save_text(text, run.out_dir / "config.toml")
        return run.out_dir / "config.toml"
    while True:
        suffix = "" if n < 2 else f"-{n}"
        path = run.out_dir / ("config.toml" if n == 0 else f"config.resumed-{run.pos.step:07d}{suffix}.toml")
        if not path.exists():
            atomic_save_text(text, path)
            return path
        if path.read_text() == text:
            return path
        n += 1


def atomic_save_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_checkpoint(run: Run, stats: StepStats | None = None) -> Path:
    """Write the run's checkpoint for the current step (and its record), then rotate per train.keep_last.
    Every rank calls this; rank 0 writes (under ZeRO every rank first writes its shards, see
    fastmim.train.distributed) and a failure there is raised on every rank."""
    path = checkpoint_path(run.out_dir, run.pos.step)
    zero = D.save_shards(run.dist, path)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model_name": run.cfg.model.name,
        "model": D.model_state(run.dist, run.model),
        "optimizer": zero or run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.pos.step,
        "data": {"epoch": run.pos.epoch, "batch": run.pos.batch},
        "rng": rng_state(),
        "config": dump_toml(run.cfg),
        "skipped_steps": stats.total_skipped() if stats else run.skipped_before,
        "world_size": run.dist.world,
    }
    loss = D.mean_loss_since_save(run.dist, stats) if stats else None  # all ranks' batches: picks the best

    def write() -> Path:
        written = write_checkpoint(state, path, loss)
        if prune(run.out_dir, run.cfg.train.keep_last, run.pos.step) and zero:
            D.remove_stale_shards(run.out_dir)
        return written

    return D.on_main(run.dist, write)


def _batches(run: Run):
    """Endless stream of normalised images on the device from the saved position, read one step ahead on CUDA
    (fastmim.data.prefetch); advances run.pos.epoch / batch as batches are taken. Closing it (the trainer does, on
    every way out of the loop) shuts the data workers down."""
    stream = DevicePrefetcher(run.loader, run.device, run.pos.epoch, run.pos.batch)
    try:
        for images, run.pos.epoch, run.pos.batch in stream:
            yield images
    finally:
        stream.close()


def train_step(run: Run, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step (accum_steps micro-batches); advances run.pos.step, also when the step is skipped.

    Returns device tensors, without synchronising (except as ``apply_update`` explains): the loss, the per-scale
    losses [K], and a bool that is True when the update was applied (False: the loss or a gradient was non-finite
    and the step was skipped)."""
    t, model, dist = run.cfg.train, run.model, run.dist
    forward = run.forward or model  # the DDP / DeepSpeed wrapper when there is one
    lr = lr_at(run.pos.step, run.total_steps, run.warmup_steps, run.peak_lr, t.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = losses_sum = None
    for micro in range(t.accum_steps):
        images = next(batches)
        # Noise for the global batch, this rank's rows: W ranks x batch b mask as one process x batch W * b.
        noise = mask_noise(t.seed, run.pos.step, micro, images.shape[0] * dist.world, model.num_patches)
        noise = noise_to_model(noise[dist.rank :: dist.world], model, run.device)
        autocast = torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)
        with D.accumulating(dist, forward, micro == t.accum_steps - 1):
            with autocast:
                out = forward(images, noise)
            if dist.engine is not None:
                D.deepspeed_backward(dist, out.loss)
            else:
                run.scaler.scale(out.loss / t.accum_steps).backward()
        detached = torch.stack([x.detach().float() for x in out.losses])
        loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
        losses_sum = detached if losses_sum is None else losses_sum + detached
    loss = loss_sum / t.accum_steps
    if dist.engine is not None:  # DeepSpeed's ZeRO optimizer skipped the step itself if the gradient was non-finite
        applied = torch.tensor(dist.engine.was_step_applied(), device=run.device)
    else:
        applied = apply_update(run, D.all_finite(dist, torch.isfinite(loss)))
    run.pos.step += 1
    return loss, losses_sum / t.accum_steps, applied


def apply_update(run: Run, loss_finite: torch.Tensor) -> torch.Tensor:
    """Unscale (fp16), clip (train.clip_grad) and apply the accumulated gradients unless the loss or any gradient is
    non-finite; returns the device bool "applied". Gradients are cleared either way.

    A skipped step leaves the parameters, the AdamW moments and its step count exactly as they were. The check
    costs one read of the gradients (their global norm, which clipping needs anyway). Skipping without a
    host-device sync needs an optimizer that takes the decision on the device: fused AdamW does (the ``found_inf``
    protocol torch's GradScaler uses with it), so it gets the flag as a tensor. The for-each / for-loop AdamW cannot
    skip on the device (masking its update afterwards would leave the moments and step count advanced), so for it
    the flag is read on the host every step: free on CPU, one sync per step on CUDA (``fused=True`` in
    ``build_optimizer`` removes it).
    """
    t, opt = run.cfg.train, run.optimizer
    run.scaler.unscale_(opt)  # fp16: divides by the loss scale and records overflows; otherwise a no-op
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if t.clip_grad > 0:
        torch.nn.utils.clip_grads_with_norm_(params, t.clip_grad, norm)
    applied = loss_finite & torch.isfinite(norm)
    if opt.defaults.get("fused"):
        opt.grad_scale, opt.found_inf = None, (~applied).float()
        opt.step()
        del opt.grad_scale, opt.found_inf
    elif applied.item():  # Host-device sync (see the docstring): non-fused AdamW cannot skip on the device.
        opt.step()
    run.scaler.update()  # fp16: lowers the loss scale after an overflow
    opt.zero_grad(set_to_none=True)
    return applied


class StopSignals:
    """Turns the stop signals (SIGTERM, SIGINT, SIGUSR1, SIGHUP) into a request to stop after the current step: the
    handler only records the signal's name in ``name``, which the loop reads between steps (no syscall, no device
    sync). A second signal raises Interrupted (a KeyboardInterrupt) at once, also inside a save; the last checkpoint
    stays valid since saves are atomic.
    DataLoader workers forked while this is active ignore the signals (their parent shuts them down). Outside the
    main thread (where Python cannot install handlers) it does nothing."""

    def __enter__(self) -> StopSignals:
        self.name: str | None = None
        self._pid, self._previous = os.getpid(), {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if self.name is not None:
            raise Interrupted(signal.Signals(signum).name)
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _log_step(run: Run, log: MetricsLog, stats: StepStats, progress: Progress, loss, losses) -> tuple[dict, int]:
    """Write one metrics row and show it; returns the row and the longest streak of skipped steps since the last
    log step. The host-device sync of a log step happens here."""
    window = stats.read()
    row = {
        "step": run.pos.step,
        "epoch": run.pos.epoch,
        "loss": loss.item(),
        "losses": losses.tolist(),
        "lr": run.optimizer.param_groups[0]["lr"],
        "img_per_s": progress.rate(run.pos.step),
        "mem_gib": peak_memory_gib(run.device),
        "skipped": window["skipped"],
    }
    if window["skipped"]:
        row["nonfinite"] = window["nonfinite"]
        where = ", ".join(f"{name} x{n}" for name, n in window["nonfinite"].items())
        if run.dist.main:  # rank 0 speaks for the run
            warn(f"step {run.pos.step}: skipped {window['skipped']} step(s) since the last log (non-finite: {where}).")
    log.write(row)
    progress.show(row)
    return row, window["streak"]


def train(cfg: Config) -> dict[str, Any]:
    """Pre-train per cfg; returns a summary (steps, img/s, final loss, paths, and why it stopped early, if it did).
    The run directory is this run's alone (fastmim.train.rundir) until the summary is written."""
    entered = time.perf_counter()
    run = build_run(cfg)
    with run.lock:
        return _train(run, entered)


def _train(run: Run, entered: float) -> dict[str, Any]:
    """The loop of :func:`train`; ``entered`` is when ``train`` was called (the start-up is timed from there)."""
    t = run.cfg.train
    log = _metrics_log(run)
    stats = StepStats(scale_names(run.model), run.device, run.skipped_before)
    progress = (Progress if run.dist.main else D.RankProgress)(
        run.total_steps, run.pos.step, t.batch_size * t.accum_steps * run.dist.world
    )
    batches, first_step, clock = _batches(run), run.pos.step, StepClock(entered)
    saved = (run.pos.step, run.resumed_from) if run.resumed_from else (-1, None)
    row, streak, stopping = None, 0, None
    with StopSignals() as stop, contextlib.closing(log), progress, run.dist, contextlib.closing(batches):
        while run.pos.step < run.total_steps and stopping is None and streak < t.max_nonfinite:
            first = run.pos.step == first_step
            loss, losses, applied = _first_step(run, batches, clock) if first else train_step(run, batches)
            stats.update(loss, losses, applied)
            progress.step()
            log_step = run.pos.step % t.log_every == 0 or run.pos.step == run.total_steps
            if log_step:  # the logged loss is the global batch's (an all-reduce with several processes)
                row, streak = _log_step(run, log, stats, progress, *D.global_mean(run.dist, loss, losses))
            stopping = D.agree_stop(run.dist, stop.name, log_step)  # every rank stops (and saves) the same step
            if t.save_every and run.pos.step % t.save_every == 0:
                saved = (run.pos.step, save_checkpoint(run, stats))
            clock.step_done()
        if stopping is not None and run.dist.main:
            print(f"fastmim: {stopping} received: saving step {run.pos.step} and stopping.", flush=True)
        if saved[0] != run.pos.step:
            saved = (run.pos.step, save_checkpoint(run, stats))
    if streak >= t.max_nonfinite:
        where = ", ".join(f"{name} x{n}" for name, n in stats.nonfinite_totals.items())
        raise FastmimError(
            f"stopped at step {run.pos.step}: {streak} consecutive steps had a non-finite loss or gradient "
            f"({where}; all skipped, none trained on); saved {saved[1]}: lower train.blr or use "
            "train.precision=fp32, then continue with --train.resume=auto."
        )
    stopped_by = stopping if run.pos.step < run.total_steps else None
    return _summary(run, log, stats, saved[1], row, stopped_by, run.pos.step - first_step, clock)


def _metrics_log(run: Run) -> MetricsLog | D.NullLog:
    """Rank 0's metrics log. On resume (also "auto" that found no checkpoint yet) the rows past the restart step,
    which this run logs again, are dropped first; it says so."""
    if not run.dist.main:
        return D.NullLog(run.out_dir)
    log = MetricsLog(run.out_dir, run.pos.step if run.cfg.train.resume else None)
    if log.dropped:
        print(
            f"fastmim: resuming at step {run.pos.step}: dropped {log.dropped} row(s) past it from {log.path}; this "
            "run logs those steps again.",
            flush=True,
        )
    return log


def _first_step(run: Run, batches, clock: StepClock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first step of this process: timed, synchronised on CUDA (a one-off, so the steady rate starts after it).
    With compiled blocks it compiles them (lazily, at their first call), which is reported."""
    if run.dist.main and run.compiled_blocks:
        print(
            f"fastmim: compiling {run.compiled_blocks} transformer blocks (train.compile=off skips it) ...", flush=True
        )
    out, clock.first_s = timed_first_call(train_step, run, batches)
    if run.compiled_blocks:
        run.compile_s = clock.first_s
        if run.dist.main:
            print(f"fastmim: first step with compilation took {run.compile_s:.1f} s", flush=True)
    return out


def _summary(run, log, stats, ckpt, row, stopped_by, steps_done: int, clock: StepClock) -> dict[str, Any]:
    plot = plot_losses(log.path, run.out_dir / "loss.png", scale_names(run.model)) if run.dist.main else None
    best = best_checkpoint(run.out_dir)
    return {
        "model": run.cfg.model.name,
        "steps": run.pos.step,
        "total_steps": run.total_steps,
        "steps_this_run": steps_done,
        **clock.summary(steps_done, _images_per_step(run)),  # img_per_s: steady, after startup_s
        "final_loss": row["loss"] if row else None,
        "skipped_steps": stats.total_skipped(),
        "skipped_images": run.loader.skipped,
        "compile_s": run.compile_s,
        "stopped_by": stopped_by,
        "device": str(run.device),
        "processes": run.dist.world,
        "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", run.dist.world)),  # torchrun sets it
        "checkpoint": str(ckpt),
        "best_checkpoint": str(best) if best else None,
        "config": str(run.config_path),
        "metrics": str(log.path),
        "plot": str(plot) if plot else None,
        "out_dir": str(run.out_dir),
    }


def _images_per_step(run: Run) -> int:
    """Images per optimizer step, over all processes."""
    return run.cfg.train.batch_size * run.cfg.train.accum_steps * run.dist.world
