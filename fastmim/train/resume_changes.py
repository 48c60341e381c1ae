"""What a resumed run does differently from the run it continues, said before it trains (README "Interruptions and
failures", Resume).

A checkpoint's config is compared with the resumed run's. Model keys must match (the checkpointer refuses
otherwise). Of the rest, every key that changes what the remaining steps compute is named in one warning with its
consequence; keys that only change where and how the run executes, logs or saves (:data:`NEUTRAL`) are not. The
global batch and the learning-rate schedule are compared as resolved, so a change that resolves to the same thing
(2 processes x 32 resumed as 1 x 64; train.epochs while train.steps is set) continues exactly and says nothing.

AdamW's weight decay and betas come back from the checkpoint with its state (torch's ``load_state_dict`` keeps the
saved hyperparameters), which would silently ignore the resumed run's values: :func:`apply_optimizer_settings`
sets them from the config again, so the config in the run directory is what trains.
"""

from __future__ import annotations

from pathlib import Path

from fastmim.config import Config
from fastmim.train.build import Run
from fastmim.train.metrics import warn
from fastmim.train.optim import lr_at

# Keys that do not change what a resumed run computes: where it runs (device, launcher, ZeRO; checked by the state
# strategies), how it reads (workers) and what it logs, saves and waits for.
NEUTRAL = {
    "data": {"num_workers", "stall_warn_s", "stall_limit_s"},
    "train": {
        "device",
        "compile",
        "out_dir",
        "log_every",
        "save_every",
        "keep_last",
        "resume",
        "max_nonfinite",
        "dist",
        "zero_stage",
        "offload",
        "dist_timeout",
    },
}
# Compared through what they resolve to (the global batch, the schedule), not one by one.
_BATCH = {"batch_size", "accum_steps"}
_SCHEDULE = {"steps", "epochs", "warmup_epochs", "warmup_steps", "blr", "lr", "min_lr"}
_EFFECTS = {
    "data.source": "other images",
    "data.path": "other images",
    "data.num_images": "another data set",
    "data.min_scale": "other crops",
    "data.augment": "crops finished elsewhere: pixels differ in rounding",
    "data.decode": "JPEGs decoded elsewhere: pixels may differ",
    "train.seed": "another data order, augmentation and masks from here on",
    "train.weight_decay": "AdamW updates differ",
    "train.beta1": "AdamW updates differ",
    "train.beta2": "AdamW updates differ",
    "train.clip_grad": "gradients clipped differently",
    "train.precision": "other rounding",
}


def warn_if_changed(run: Run, path: Path, ckpt: dict, saved: Config) -> list[str]:
    """Warn once, naming every change between ``saved`` (the checkpoint's config) and the run's that alters what the
    rest of the run computes; returns the changes (empty: the run continues exactly)."""
    world = ckpt.get("world_size", 1)
    changes = [*_batch_changes(run, saved, world), *_schedule_change(run, saved, world, ckpt["step"])]
    changes += _key_changes(run.cfg, saved)
    if changes:
        warn(
            f"checkpoint {path} continues with other settings: {'; '.join(changes)}; the rest of the run differs "
            "from an uninterrupted one (resume with the checkpoint's values to continue exactly)."
        )
    return changes


def apply_optimizer_settings(run: Run) -> None:
    """AdamW's betas and the decayed group's weight decay (group 0, fastmim.train.optim.param_groups) from the
    config, after a checkpoint's optimizer state brought back its own."""
    t = run.cfg.train
    for group in run.optimizer.param_groups:
        group["betas"] = (t.beta1, t.beta2)
    run.optimizer.param_groups[0]["weight_decay"] = t.weight_decay


def _batch_changes(run: Run, saved: Config, saved_world: int) -> list[str]:
    """The data position is a batch index per process: it names the same images only when batch_size x processes
    is unchanged; the global batch (x accum_steps) sets the images per step and the peak lr."""
    was, now, changes = saved.train, run.cfg.train, []
    micro_was, micro_now = was.batch_size * saved_world, now.batch_size * run.dist.world
    if micro_was != micro_now:
        changes.append(
            f"{micro_was} -> {micro_now} images per micro-step over all processes (train.batch_size x processes): "
            "the rest of the epoch reads other images"
        )
    if was.accum_steps != now.accum_steps:
        changes.append(f"train.accum_steps {was.accum_steps} -> {now.accum_steps} micro-batches per step")
    global_was, global_now = micro_was * was.accum_steps, micro_now * now.accum_steps
    if global_was != global_now:
        changes.append(f"global batch {global_was} -> {global_now} images per step")
    return changes


def _schedule_change(run: Run, saved: Config, saved_world: int, step: int) -> list[str]:
    """The learning-rate schedule as resolved (length, warm-up, peak, floor), named with the keys that moved it and
    the lr of the next step under both. The saved run's epoch length is taken on this run's data."""
    was, now = saved.train, run.cfg.train
    per_epoch = run.loader.num_samples // (was.batch_size * saved_world)
    before = (*was.schedule(per_epoch), was.peak_lr(saved_world), was.min_lr)
    after = (run.total_steps, run.warmup_steps, run.peak_lr, now.min_lr)
    if before == after:
        return []
    keys = [
        f"train.{k} {getattr(was, k)!r} -> {getattr(now, k)!r}"
        for k in sorted(_SCHEDULE)
        if getattr(was, k) != getattr(now, k)
    ]
    names = ", ".join(keys) if keys else "the global batch"
    return [
        f"the lr schedule ({names}): {before[0]} steps, warm-up {before[1]}, peak {before[2]:.3g} -> {after[0]} "
        f"steps, warm-up {after[1]}, peak {after[2]:.3g}; step {step + 1} runs at lr {lr_at(step, *before):.3g} -> "
        f"{lr_at(step, *after):.3g}"
    ]


def _key_changes(cfg: Config, saved: Config) -> list[str]:
    """Every other data and train key that differs, with its consequence."""
    changes = []
    for section in ("data", "train"):
        was, now = getattr(saved, section), getattr(cfg, section)
        for key, value in vars(now).items():
            if key in NEUTRAL[section] or (section == "train" and key in _BATCH | _SCHEDULE):
                continue
            unused = (key == "num_images" and cfg.data.source not in ("demo", "synthetic")) or (
                key == "path" and cfg.data.source not in ("folder", "ffcv")
            )
            if getattr(was, key) != value and not unused:
                effect = _EFFECTS.get(f"{section}.{key}", "it changes what is computed")
                changes.append(f"{section}.{key} {getattr(was, key)!r} -> {value!r} ({effect})")
    return changes
