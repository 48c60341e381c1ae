"""A run's save / resume policy, owned by one object: :class:`Checkpointer`.

``load()`` continues the run train.resume names, restoring the model, optimizer, loss scaler, RNG, data position
and skipped-step count into it, or refuses to start a fresh run over another run's history. ``save(step,
last=...)`` writes a checkpoint when the schedule says so (every train.save_every steps, and once at the last step),
then rotates (train.keep_last, keeping the best). The files, their format and its checks are the file layer's
(fastmim.train.checkpoint_files): atomic and verified.

Where the model and optimizer state go is a strategy the checkpointer is given: :class:`FullState` (one process or
DDP: all of it in the checkpoint file) or :class:`fastmim.train.zero.ZeroShards` (DeepSpeed ZeRO: shards beside
it). Every rank calls ``load`` and ``save``; rank 0 alone reads the run directory's listing, moves damaged files
aside and writes, and a refusal there is raised on every rank.

Resuming (README "Interruptions and failures"): "auto" first removes what interrupted saves left behind, then takes
the newest intact checkpoint, its ZeRO shards included, moving damaged ones aside (``*.corrupt``) with a warning; a
directory whose checkpoints are all damaged is an error, since restarting silently would throw the run away. An
explicit path must itself be intact, and one from another directory continues only in a directory that holds no
run yet (so no run's history is ever mixed with another's). A checkpoint of another model, shape or data position
is refused by name; any other setting that makes the rest of the run differ is named in a warning
(fastmim.train.resume_changes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmim.config import config_from_toml, dump_toml
from fastmim.errors import FastmimError
from fastmim.train import distributed as D
from fastmim.train.build import Position, Run
from fastmim.train.checkpoint_files import (
    CHECKPOINT_FORMAT,
    CorruptCheckpoint,
    best_checkpoint,
    checkpoint_path,
    checkpoints,
    clean_partial_saves,
    load_checkpoint,
    model_header,
    prune,
    quarantine,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from fastmim.train.metrics import warn
from fastmim.train.resume_changes import apply_optimizer_settings, warn_if_changed
from fastmim.train.rundir import holds_a_run
from fastmim.train.zero import ZeroShards, remove_stale_shards, shards_cannot_continue, verify_shards, zero_pointer


class FullState:
    """The state strategy of one process or DDP: the whole model and optimizer state in the checkpoint file, which
    rank 0 writes (every DDP rank holds the full state), so it resumes on any number of processes."""

    def __init__(self, d: D.Dist) -> None:
        self.d = d

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def optimizer_state(self, path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def check_resumable(self, path: Path, ckpt: dict[str, Any]) -> None:
        """ZeRO shards continue only under DeepSpeed (fastmim.train.zero)."""
        zero = zero_pointer(ckpt, path)
        if zero is not None:
            raise shards_cannot_continue(path, zero, f"train.dist={self.d.mode} on {self.d.world}")

    def load(self, path: Path, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])


class Checkpointer:
    """The checkpoints of ``run`` in its run directory (see the module docstring)."""

    def __init__(self, run: Run, strategy: FullState | ZeroShards) -> None:
        self.run, self.strategy = run, strategy
        self.out_dir = Path(run.cfg.train.out_dir)
        self.resumed_from: Path | None = None
        self.last: tuple[int, Path | None] = (-1, None)  # step and file of this run's newest checkpoint

    def load(self) -> Path | None:
        """Restore the checkpoint train.resume names into the run (see the module docstring); returns its path,
        or None for a fresh run."""
        found = self._chosen_everywhere()
        if found is None:
            return None
        path, ckpt = found
        self._restore(path, ckpt)
        if self.run.dist.main and path.resolve().parent != self.out_dir.resolve():
            print(
                f"fastmim: continuing {path} (step {self.run.pos.step}) in {self.out_dir}, a new run directory: its "
                f"history starts after step {self.run.pos.step}.",
                flush=True,
            )
        self.resumed_from, self.last = path, (self.run.pos.step, path)
        return path

    def save(self, step: int, last: bool = False) -> Path | None:
        """Write the checkpoint of ``step`` if it is due: every train.save_every steps, or with ``last`` unless
        this step is saved already (also as the checkpoint the run resumed from). Returns the file written, if
        any. Every rank calls this at the same steps (ZeRO: every rank writes its shards)."""
        every = self.run.cfg.train.save_every
        due = self.last[0] != step if last else every > 0 and step % every == 0
        if not due:
            return None
        self.last = (step, self._write(step))
        return self.last[1]

    def best(self) -> Path | None:
        """The kept checkpoint with the lowest recorded training loss."""
        return best_checkpoint(self.out_dir)

    def _write(self, step: int) -> Path:
        """The checkpoint of the run at ``step``, and its record; then the rotation. A failure on rank 0 (a full
        disk) is raised on every rank."""
        run, path = self.run, checkpoint_path(self.out_dir, step)
        optimizer = self.strategy.optimizer_state(path, run.optimizer)  # ZeRO: every rank writes its shards first
        state = {
            **model_header(CHECKPOINT_FORMAT, run.model),
            "model": self.strategy.model_state(run.model),
            "optimizer": optimizer,
            "scaler": run.scaler.state_dict(),
            "step": step,
            "data": {"epoch": run.pos.epoch, "batch": run.pos.batch},
            "rng": rng_state(),
            "config": dump_toml(run.cfg),
            "skipped_steps": run.stats.total_skipped(),
            "world_size": run.dist.world,
        }
        loss = D.mean_loss_since_save(run.dist, run.stats)  # all ranks' batches: picks the best

        def write() -> Path:
            written = write_checkpoint(state, path, loss)
            if prune(self.out_dir, run.cfg.train.keep_last, step):
                remove_stale_shards(self.out_dir)  # those of the checkpoints just removed
            return written

        return D.on_main(run.dist, write)

    def _chosen_everywhere(self) -> tuple[Path, dict[str, Any]] | None:
        """:meth:`_choose` on rank 0 (which alone cleans up and moves damaged files aside), its choice loaded on
        every other rank."""
        found: list = []

        def choose() -> Path | None:
            found.append(self._choose())
            return found[0][0] if found[0] else None

        path = D.on_main(self.run.dist, choose)
        if path is None:
            return None
        return found[0] if found else (path, load_checkpoint(path))

    def _choose(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to continue from, loaded and verified, or None for a fresh run (see the module
        docstring)."""
        resume = self.run.cfg.train.resume
        if resume == "auto":
            if removed := clean_partial_saves(self.out_dir) + remove_stale_shards(self.out_dir):
                warn(f"removed {len(removed)} partial file(s) left in {self.out_dir} by an interrupted save.")
            return self._newest_intact()
        if resume:
            path = Path(resume)
            try:
                ckpt = load_checkpoint(path)
                verify_shards(path, ckpt)
            except CorruptCheckpoint as e:
                raise FastmimError(
                    f"{e}; give another checkpoint, or train.resume=auto to take the newest intact one."
                ) from None
            if path.resolve().parent != self.out_dir.resolve() and holds_a_run(self.out_dir):
                raise FastmimError(
                    f"{self.out_dir} already holds a run, and checkpoint {resume} is from another directory: "
                    "continuing it here would mix two runs' histories; give an empty --train.out_dir to continue it "
                    f"in, or resume {self.out_dir}'s own run with --train.resume=auto."
                )
            return path, ckpt
        if holds_a_run(self.out_dir):
            raise FastmimError(
                f"{self.out_dir} already holds a run; continue it with --train.resume=auto or pick a new "
                "--train.out_dir."
            )
        return None

    def _newest_intact(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and whose shards verify, falling back past damaged ones (moved aside
        with a warning); a foreign or hostile file raises, and so does a directory of damaged checkpoints only."""
        found = checkpoints(self.out_dir)
        for _, path in reversed(found):
            try:
                ckpt = load_checkpoint(path)
                verify_shards(path, ckpt)
                return path, ckpt
            except CorruptCheckpoint as err:
                moved = quarantine(path)
                warn(f"{err}; moved it aside as {moved.name} and falling back to the previous checkpoint.")
        if found:
            raise FastmimError(
                f"no checkpoint in {self.out_dir} is intact (all {len(found)} moved aside as *.corrupt); restore one "
                "from a backup, or start again with a new train.out_dir."
            )
        return None

    def _restore(self, path: Path, ckpt: dict[str, Any]) -> None:
        """Load a verified checkpoint into the run; one of another model, shape or data is refused by name."""
        run = self.run
        saved = config_from_toml(ckpt["config"], f"checkpoint {path}")
        if ckpt["model_name"] != run.cfg.model.name:
            raise FastmimError(
                f"checkpoint {path} is for {ckpt['model_name']}, not {run.cfg.model.name}; set --model.name "
                "accordingly."
            )
        for key, value in vars(saved.model).items():
            if key != "impl" and getattr(run.cfg.model, key) != value:
                raise FastmimError(
                    f"checkpoint {path} was trained with model.{key} = {value!r}; resume with that value."
                )
        data = ckpt["data"]
        if data["batch"] > run.loader.steps_per_epoch:
            raise FastmimError(
                f"checkpoint {path} stopped at batch {data['batch']} of an epoch, but this data has "
                f"{run.loader.steps_per_epoch} batches per epoch; resume with the data and batch size it was trained "
                "with."
            )
        self.strategy.check_resumable(path, ckpt)
        warn_if_changed(run, path, ckpt, saved)  # every setting that makes the rest of the run differ, named
        try:
            self.strategy.load(path, ckpt, run.model, run.optimizer)
            apply_optimizer_settings(run)  # the config's AdamW settings, not the ones the saved state brought back
            run.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = str(e).strip().splitlines()[0][:200]
            raise FastmimError(
                f"checkpoint {path} does not fit this run ({detail}); give a checkpoint of this model."
            ) from None
        run.pos = Position(ckpt["step"], data["epoch"], data["batch"])
        run.stats.skipped_before = ckpt.get("skipped_steps", 0)
