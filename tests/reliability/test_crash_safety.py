"""kill -9 at any moment of a save never leaves a run that cannot resume, and the resumed run is exact.

The killed process is real and dies by SIGKILL (sent by itself at an exact point of its second save, or by the
test at random times); what it leaves on disk is whatever the kernel had: partial temporary files, records without
data, checkpoints without records. Resuming with ``train.resume=auto`` must clean up, pick the newest intact
checkpoint and reproduce the uninterrupted run bit for bit.
"""

import random
import signal

import pytest

from fastmim.train.checkpoint_files import checkpoints, read_record
from tests.reliability._harness import STEPS, Proc, assert_same_run, pretrain_args, run, wait_for_rows

# Checkpoints at steps 2, 4, 6, 8; two kept (plus the best): the second save's rotation deletes nothing, so the
# crash points of the rotation are reached at the third save.
SAVING = [f"--train.steps={STEPS}", "--train.save_every=2", "--train.keep_last=2"]
POINTS = [("mid-write", 2), ("before-record", 2), ("before-rename", 2), ("after-rename", 2), ("mid-prune", 1)]


@pytest.mark.parametrize("point,n", POINTS, ids=[p for p, _ in POINTS])
def test_sigkill_inside_a_save_then_resume_is_exact(tmp_path, reference, point, n):
    out = tmp_path / "run"
    code, output = run(pretrain_args(out, *SAVING), tmp_path / "log1", crash=(point, n))
    assert code == -signal.SIGKILL, output
    left = sorted(p.name for p in out.iterdir())
    # Every numbered checkpoint left in place is complete and verified by its record, whatever the crash point.
    for _, path in checkpoints(out):
        record = read_record(path)
        assert record is not None and record["size"] == path.stat().st_size, left
    code, resumed = run(pretrain_args(out, *SAVING, "--train.resume=auto"), tmp_path / "log2")
    assert code == 0, resumed
    assert_same_run(out, reference)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")], left
    if point != "after-rename":
        assert "partial file(s) left" in resumed  # temporary files or an orphan record were found and removed


def test_repeated_sigkills_at_random_moments(tmp_path, reference):
    """Killed three times at random moments (a checkpoint every step, so kills land in saves too), resumed each
    time: the run still ends exactly where the uninterrupted one does."""
    out = tmp_path / "run"
    args = pretrain_args(out, f"--train.steps={STEPS}", "--train.save_every=1", "--train.keep_last=2")
    rng = random.Random(12)
    for attempt in range(3):
        resume = ["--train.resume=auto"] if attempt else []
        proc = Proc([*args, *resume], tmp_path / f"log{attempt}")
        wait_for_rows(out / "metrics.jsonl", 2 * attempt + 1, proc)
        proc.process.join(rng.uniform(0.0, 0.4))
        if proc.process.is_alive():  # not yet reaped, so the pid is still this run's (a zombie at worst)
            proc.signal(signal.SIGKILL)
        assert proc.wait() in (-signal.SIGKILL, 0), proc.output()
    code, output = run([*args, "--train.resume=auto"], tmp_path / "final")
    assert code == 0, output
    assert_same_run(out, reference)
