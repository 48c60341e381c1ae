"""The pre-training loop: ``train(cfg) -> summary``.

Building happens in fastmim.train.build (the same builder serves `bench step` and `fastmim profile`, which run
:func:`train_step` itself), the checkpoints are the checkpointer's (fastmim.train.checkpointer); ``train()`` is the
loop. Everything random is derived from ``train.seed``: the data order and augmentation (per sample, see
fastmim.data) and the masks (per optimizer step and micro-batch, below), so a resumed run continues exactly where
the checkpoint left it.

Reliability (README "Interruptions and failures"):

- Checkpoints are atomic and verified; ``train.resume = "auto"`` takes the newest intact one, falling back past
  damaged ones; ``train.keep_last`` rotates them, keeping the best; one run at a time holds the run directory
  (fastmim.train.rundir).
- SIGTERM, SIGINT, SIGUSR1 and SIGHUP finish the current step, save, and return with ``stopped_by`` set (the CLI
  exits 0 and prints the resume command); a second signal stops at once. The data workers are shut down on every
  way out of the loop.
- A data worker that delivers nothing is reported after data.stall_warn_s; a stop signal during the wait, or
  data.stall_limit_s, abandons the step that waits and saves the last completed one (fastmim.train.stall).
- A step whose loss or gradient is non-finite is skipped: no parameter, moment or step count changes (see
  ``apply_update``); skips are counted per scale and logged; ``train.max_nonfinite`` consecutive ones save and stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fastmim.config import Config, dump_toml
from fastmim.data.loader import mix_seed
from fastmim.data.prefetch import DevicePrefetcher
from fastmim.errors import STOP_SIGNALS, FastmimError, Interrupted
from fastmim.files import OutputError
from fastmim.train import distributed as D
from fastmim.train.build import Run, build_run, resolve_device, scale_names
from fastmim.train.checkpoint_files import CHECKPOINTS_INTACT, RESUME
from fastmim.train.checkpointer import Checkpointer, FullState
from fastmim.train.metrics import MetricsLog, Progress, StepClock, peak_memory_gib, plot_losses, warn
from fastmim.train.optim import lr_at
from fastmim.train.parallel import timed_first_call
from fastmim.train.rundir import lock_run_dir, save_config
from fastmim.train.stall import DataStall, StallWatch
from fastmim.train.zero import ZeroShards

# The stages of a training step, in order, as train_step names them to its ``stage`` hook.
STAGES = ("data", "forward", "backward", "optimizer")


def train(cfg: Config, stop_at: int = 0) -> dict[str, Any]:
    """Pre-train per cfg; returns a summary (steps, img/s, final loss, paths, and why it stopped early, if it did).
    The run directory is this run's alone (fastmim.train.rundir) until the summary is written. ``stop_at > 0``
    stops (and saves) after that optimizer step with the whole run's schedule, so that a run can go in segments
    (each resumed with train.resume = "auto"; `fastmim bench convergence`)."""
    entered, t = time.perf_counter(), cfg.train
    dist, device = D.init_distributed(t, resolve_device(t.device))
    with lock_run_dir(dist, Path(t.out_dir)):
        run = build_run(cfg, dist, device)
        checkpointer = Checkpointer(run, ZeroShards(dist) if dist.engine is not None else FullState(dist))
        resumed_from = checkpointer.load()  # train.resume: continue a run, or refuse to start one over another
        resumed_at = run.pos.step if resumed_from else None
        config_path = D.on_main(dist, lambda: save_config(Path(t.out_dir), dump_toml(cfg), resumed_at))
        log, progress, clock = _metrics_log(run), _progress(run), StepClock(entered)
        stop = StopSignals()
        batches = input_stream(run, StallWatch(cfg.data, lambda: stop.name, run.dist.world))
        first_step, row, streak, stopping, stalled = run.pos.step, None, 0, None, None
        failed = None  # an output that could not be written (a full disk): every rank stops, saves and reports
        with stop, contextlib.closing(log), progress, run.dist, contextlib.closing(batches):
            end = min(run.total_steps, stop_at) if stop_at > 0 else run.total_steps
            while run.pos.step < end and stopping is None and streak < t.max_nonfinite:
                first, at = run.pos.step == first_step, dataclasses.replace(run.pos)
                try:
                    loss, losses, applied = _first_step(run, batches, clock) if first else train_step(run, batches)
                except DataStall as err:  # no batch came: the step that waited is abandoned, the last one saved
                    run.pos, stalled, stopping = at, err, err.signal_name
                    break
                run.stats.update(loss, losses, applied)
                progress.step()
                log_step = run.pos.step % t.log_every == 0 or run.pos.step == end
                if log_step:  # the logged loss is the global batch's (an all-reduce with several processes)
                    try:
                        row, streak = _log_step(run, log, progress, *D.global_mean(run.dist, loss, losses))
                    except OutputError as e:
                        failed = e
                stopping = D.agree_stop(run.dist, stop.name or (failed and "a failed write"), log_step)
                checkpointer.save(run.pos.step)  # when train.save_every says so
                clock.step_done()
            if stopping is not None and run.dist.main and failed is None:
                print(f"fastmim: {stopping} received: saving step {run.pos.step} and stopping.", flush=True)
            _save_last(checkpointer, run.pos.step, failed)
        if streak >= t.max_nonfinite:
            raise _nonfinite_error(run, streak, checkpointer.last[1])
        if stalled is not None and stopping is None:
            raise stalled.error(run.pos.step, checkpointer.last[1], config_path)
        stopped_by = stopping if run.pos.step < run.total_steps else None
        paths = {"checkpoint": checkpointer.last[1], "best_checkpoint": checkpointer.best(), "config": config_path}
        return _summary(run, log, paths, row, stopped_by, run.pos.step - first_step, clock)


def _save_last(checkpointer: Checkpointer, step: int, failed: OutputError | None) -> None:
    """The run's final save; after an output that could not be written (``failed``) it is attempted all the same
    (a metrics row may not fit where a checkpoint still does), and the error then says what became of it."""
    try:
        checkpointer.save(step, last=True)
    except FastmimError:  # the checkpoint did not fit either (with several processes it comes as a FastmimError)
        if failed is None:
            raise
        raise FastmimError(failed.restate(CHECKPOINTS_INTACT, RESUME, f", nor the checkpoint of step {step}")) from None
    if failed is not None:
        raise FastmimError(failed.restate(f"saved step {step} in {checkpointer.last[1]}", RESUME))


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


def input_stream(run: Run, watch: StallWatch | None = None):
    """Endless stream of normalised images on the device from the saved position, read one step ahead on CUDA
    (fastmim.data.prefetch); advances run.pos.epoch / batch as batches are taken. Closing it (the trainer does, on
    every way out of the loop) shuts the data workers down. ``watch`` is told about late batches
    (fastmim.train.stall)."""
    stream = DevicePrefetcher(run.loader, run.device, run.pos.epoch, run.pos.batch, watch)
    try:
        for images, run.pos.epoch, run.pos.batch in stream:
            yield images
    finally:
        stream.close()


def _no_stage(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def train_step(run: Run, batches, stage=_no_stage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step (accum_steps micro-batches); advances run.pos.step, also when the step is skipped.

    Returns device tensors, without synchronising (except as ``apply_update`` explains): the loss, the per-scale
    losses [K], and a bool that is True when the update was applied (False: the loss or a gradient was non-finite
    and the step was skipped). ``stage(name)`` is a context around each stage of :data:`STAGES` (per micro-batch
    for the first three): nothing in training; `bench step` times the stages with it, `fastmim profile` names them.
    """
    t, dist = run.cfg.train, run.dist
    lr = lr_at(run.pos.step, run.total_steps, run.warmup_steps, run.peak_lr, t.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = losses_sum = None
    for micro in range(t.accum_steps):
        with stage("data"):
            images = next(batches)
        with D.accumulating(dist, run.forward, micro == t.accum_steps - 1):
            with stage("forward"):
                # Noise for the global batch, this rank's rows: W ranks x batch b mask as one process x batch W * b.
                noise = mask_noise(t.seed, run.pos.step, micro, images.shape[0] * dist.world, run.model.num_patches)
                noise = noise_to_model(noise[dist.rank :: dist.world], run.model, run.device)
                with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                    out = run.forward(images, noise)
            with stage("backward"):
                if dist.engine is not None:
                    D.deepspeed_backward(dist, out.loss)
                else:
                    run.scaler.scale(out.loss / t.accum_steps).backward()
        detached = torch.stack([x.detach().float() for x in out.losses])
        loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
        losses_sum = detached if losses_sum is None else losses_sum + detached
    loss = loss_sum / t.accum_steps
    with stage("optimizer"):
        if dist.engine is not None:  # DeepSpeed's ZeRO optimizer skipped the step itself if a gradient was non-finite
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

    name: str | None = None  # the first stop signal received

    def __enter__(self) -> StopSignals:
        self.name = None
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


def _log_step(run: Run, log: MetricsLog, progress: Progress, loss, losses) -> tuple[dict, int]:
    """Write one metrics row and show it; returns the row and the longest streak of skipped steps since the last
    log step. The host-device sync of a log step happens here."""
    window = run.stats.read()
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


def _metrics_log(run: Run) -> MetricsLog | D.NullLog:
    """Rank 0's metrics log. On resume (also "auto" that found no checkpoint yet) the rows past the restart step,
    which this run logs again, are dropped first; it says so."""
    out_dir = Path(run.cfg.train.out_dir)
    if not run.dist.main:
        return D.NullLog(out_dir)
    log = MetricsLog(out_dir, run.pos.step if run.cfg.train.resume else None)
    if log.dropped:
        print(
            f"fastmim: resuming at step {run.pos.step}: dropped {log.dropped} row(s) past it from {log.path}; this "
            "run logs those steps again.",
            flush=True,
        )
    return log


def _progress(run: Run) -> Progress:
    """Rank 0's progress display; the other ranks' shows nothing."""
    return (Progress if run.dist.main else D.RankProgress)(run.total_steps, run.pos.step, _images_per_step(run))


def _nonfinite_error(run: Run, streak: int, saved: Path | None) -> FastmimError:
    where = ", ".join(f"{name} x{n}" for name, n in run.stats.nonfinite_totals.items())
    return FastmimError(
        f"stopped at step {run.pos.step}: {streak} consecutive steps had a non-finite loss or gradient "
        f"({where}; all skipped, none trained on); saved {saved}: lower train.blr or use "
        "train.precision=fp32, then continue with --train.resume=auto."
    )


def _summary(run, log, paths: dict, row, stopped_by, steps_done: int, clock: StepClock) -> dict[str, Any]:
    out_dir = Path(run.cfg.train.out_dir)
    plot = plot_losses(log.path, out_dir / "loss.png", scale_names(run.model)) if run.dist.main else None
    return {
        "model": run.cfg.model.name,
        "steps": run.pos.step,
        "total_steps": run.total_steps,
        "steps_this_run": steps_done,
        **clock.summary(steps_done, _images_per_step(run)),  # img_per_s: steady, after startup_s
        "final_loss": row["loss"] if row else None,
        "skipped_steps": run.stats.total_skipped(),
        "skipped_images": run.loader.skipped,
        "compile_s": run.compile_s,
        "stopped_by": stopped_by,
        "device": str(run.device),
        "processes": run.dist.world,
        "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", run.dist.world)),  # torchrun sets it
        **{name: str(path) if path else None for name, path in paths.items()},
        "metrics": str(log.path),
        "plot": str(plot) if plot else None,
        "out_dir": str(out_dir),
    }


def _images_per_step(run: Run) -> int:
    """Images per optimizer step, over all processes."""
    return run.cfg.train.batch_size * run.cfg.train.accum_steps * run.dist.world
