import json

import torch

from fastmim.train.metrics import MetricsLog, StepStats, read_metrics

NAMES = ["s=4", "s=2", "s=1", "s=1/2"]


def test_a_row_cut_short_by_a_crash_is_ignored_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # killed mid-write
    assert read_metrics(path) == rows
    MetricsLog(tmp_path, resume_step=2).close()
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2])  # kept lines byte for byte


def _step(stats, loss, losses, applied):
    stats.update(torch.tensor(loss), torch.tensor(losses), torch.tensor(applied))


def test_step_stats_count_skips_per_scale_and_streaks_across_reads():
    nan, stats = float("nan"), StepStats(NAMES, torch.device("cpu"), skipped_before=5)
    _step(stats, 2.0, [0.5] * 4, True)
    _step(stats, nan, [0.5, 0.5, 0.5, nan], False)
    _step(stats, 1.0, [0.25] * 4, False)  # finite loss, skipped: a gradient was not finite
    assert stats.read() == {"skipped": 2, "nonfinite": {"s=1/2": 1, "gradient": 1}, "streak": 2}
    _step(stats, nan, [nan] * 4, False)  # the streak goes on across the read
    assert stats.read() == {"skipped": 1, "nonfinite": dict.fromkeys(NAMES, 1), "streak": 3}
    _step(stats, 4.0, [1.0] * 4, True)
    assert stats.read() == {"skipped": 0, "nonfinite": {}, "streak": 3}  # the run of 3 skips ended in this window
    assert stats.read()["streak"] == 0
    assert stats.total_skipped() == 8 and stats.nonfinite_totals == {
        "s=1/2": 2,
        "gradient": 1,
        "s=4": 1,
        "s=2": 1,
        "s=1": 1,
    }
    assert stats.take_mean_loss() == 3.0 and stats.take_mean_loss() is None  # applied steps only, then reset
