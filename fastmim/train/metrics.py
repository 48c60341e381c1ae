"""Run metrics: JSON lines in ``<out_dir>/metrics.jsonl``, TensorBoard when installed, a loss-curve PNG, the
progress display, and device-side tallies of skipped (non-finite) steps that are read only at log steps."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastmim import files


def warn(message: str) -> None:
    """A one-line warning on stderr, in the style of the CLI's one-line errors."""
    print(f"fastmim: warning: {message}", file=sys.stderr, flush=True)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """Appends one JSON object per logged step; on resume, rows after the resumed step are dropped first (those
    steps are about to be recomputed, and keeping them would duplicate steps in the log).

    Every row is whole or absent: it is appended with one ``write`` of its full line, and a write that fails (a
    full disk, where the kernel may store part of it) is cut back to the last whole row before the
    :class:`~fastmim.files.OutputError` is raised. The rewrite on resume goes through fastmim.files (the old file
    or the new one, never a mix)."""

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.dropped = 0  # rows dropped on resume
        if resume_step is not None and self.path.exists():
            lines = self.path.read_text(errors="replace").splitlines()
            kept = [line for line in lines if (row := _parse_row(line)) is not None and row["step"] <= resume_step]
            self.dropped = sum((row := _parse_row(line)) is not None and row["step"] > resume_step for line in lines)
            with files.reported(self.path):
                files.write_text(self.path, "".join(line + "\n" for line in kept))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            pass

    def write(self, row: dict[str, Any]) -> None:
        with files.reported(self.path):
            _append_whole(self.path, (json.dumps(row) + "\n").encode())
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, row["step"])
            for k, value in enumerate(row.get("losses", [])):
                self.tb.add_scalar(f"loss_scale{k}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _append_whole(path: Path, line: bytes) -> None:
    """Append ``line`` to ``path``; if any of it cannot be written, the file is cut back to its former end."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:  # a short write (the disk filled up mid-row) is followed by one that raises
                view = view[os.write(fd, view) :]
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def _parse_row(line: str) -> dict[str, Any] | None:
    """One metrics row, or None for a line cut short by a crash mid-write (or otherwise not a row)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file, leaving out lines that are not rows (see ``_parse_row``)."""
    return [row for line in path.read_text(errors="replace").splitlines() if (row := _parse_row(line)) is not None]


class StepStats:
    """Running tallies of a training run, kept on the device so that no step synchronises for them.

    ``update`` (every step, a few tiny device ops) counts skipped steps, the scales whose loss was non-finite and
    the skips whose loss was finite (so a gradient was not), the current and longest streak of consecutive skips,
    and the sum of the losses of the applied steps. ``read`` (at log steps, where the trainer synchronises anyway)
    returns what happened since the previous read; ``take_mean_loss`` (at saves) the mean loss since the previous
    save, which is what a checkpoint's record stores to pick the best one.
    """

    def __init__(self, scale_names: list[str], device: torch.device, skipped_before: int = 0) -> None:
        self.names = [*scale_names, "gradient"]
        # [skipped, non-finite loss at each scale..., skipped with a finite loss]
        self._counts = torch.zeros(len(self.names) + 1, dtype=torch.int64, device=device)
        self._streak = torch.zeros((), dtype=torch.int64, device=device)
        self._longest = torch.zeros((), dtype=torch.int64, device=device)
        self._loss = torch.zeros(2, dtype=torch.float64, device=device)  # [sum, count] over applied steps
        self._read = [0] * (len(self.names) + 1)
        self.skipped_before = skipped_before
        self.nonfinite_totals: dict[str, int] = {}  # over every read so far

    def update(self, loss: torch.Tensor, losses: torch.Tensor, applied: torch.Tensor) -> None:
        skipped = ~applied
        flags = torch.cat([skipped[None], ~torch.isfinite(losses), (skipped & torch.isfinite(loss))[None]])
        self._counts += flags
        self._streak.add_(1).mul_(skipped)  # back to 0 after an applied step
        torch.maximum(self._longest, self._streak, out=self._longest)
        self._loss += torch.stack([torch.where(applied, loss.double(), 0.0), applied.double()])

    def read(self) -> dict[str, Any]:
        """{"skipped": steps skipped since the last read, "nonfinite": {scale or "gradient": count} for those,
        "streak": the longest run of consecutive skips seen since the last read}. Synchronises."""
        counts = self._counts.tolist()
        delta = [now - before for now, before in zip(counts, self._read)]
        self._read = counts
        streak = int(self._longest)
        self._longest.copy_(self._streak)  # a streak still going on carries into the next window
        nonfinite = {name: n for name, n in zip(self.names, delta[1:]) if n}
        for name, n in nonfinite.items():
            self.nonfinite_totals[name] = self.nonfinite_totals.get(name, 0) + n
        return {"skipped": delta[0], "nonfinite": nonfinite, "streak": streak}

    def total_skipped(self) -> int:
        """Skipped steps over the whole run, resumed parts included. Synchronises."""
        return self.skipped_before + int(self._counts[0])

    def take_mean_loss(self, reduce=None) -> float | None:
        """Mean loss of the applied steps since the previous call, None if there were none. Synchronises.
        ``reduce`` (several processes) sums the device tally [loss sum, steps] over the ranks in place first."""
        if reduce is not None:
            reduce(self._loss)
        total, n = self._loss.tolist()
        self._loss.zero_()
        return total / n if n else None


class StepClock:
    """When the run started (``train`` called), its first step ended and its latest step ended: the summary reports
    the start-up (building, data workers, first batch, first step with any compilation) apart from the steady rate
    of the steps after it."""

    def __init__(self, entered: float) -> None:
        self.entered = entered
        self.first_s: float | None = None  # duration of the first step alone
        self.first_done = self.last_done = None

    def step_done(self) -> None:
        self.last_done = time.perf_counter()
        self.first_done = self.first_done or self.last_done

    def summary(self, steps: int, images_per_step: int) -> dict[str, float]:
        if not steps:
            return {"img_per_s": 0.0, "startup_s": time.perf_counter() - self.entered}
        if steps == 1:  # no steady steps: the one step's own rate
            rate = images_per_step / max(self.first_s or 0.0, 1e-9)
        else:
            rate = images_per_step * (steps - 1) / max(self.last_done - self.first_done, 1e-9)
        return {"img_per_s": rate, "startup_s": self.first_done - self.entered}


class Progress:
    """A live bar on a terminal; in logs (CI, SLURM) one plain line per log step instead of carriage-return noise.
    Also measures images per second over each log window."""

    def __init__(self, total: int, start: int, images_per_step: int) -> None:
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", disable=not self.interactive)
        self.total, self.images_per_step = total, images_per_step
        self.window_start, self.window_step = time.perf_counter(), start

    def step(self) -> None:
        self.bar.update(1)

    def rate(self, step: int) -> float:
        """Images per second since the previous call (or the start), and start a new window."""
        now = time.perf_counter()
        rate = self.images_per_step * (step - self.window_step) / max(now - self.window_start, 1e-9)
        self.window_start, self.window_step = now, step
        return rate

    def show(self, row: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
        if not self.interactive:
            print(
                f"step {row['step']}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                f"{row['img_per_s']:.1f} img/s  mem {row['mem_gib']:.2f} GiB",
                flush=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def plot_losses(metrics_path: Path, png_path: Path, scale_names: list[str]) -> Path | None:
    """Total and per-scale loss against step, as a PNG; None when there is nothing to plot (also when no log step
    was reached, so there is no metrics file: a run stopped before its first one)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], label="total", linewidth=2, color="black")
    for k, name in enumerate(scale_names if len(rows[0]["losses"]) > 1 else []):
        ax.plot(steps, [r["losses"][k] for r in rows], label=name, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.write_figure(fig, png_path)
    plt.close(fig)
    return png_path
