"""Pre-emption: SIGTERM / SIGINT / SIGUSR1 / SIGHUP finish the current step, save, exit 0 and say how to resume;
the resumed run equals the uninterrupted one bit for bit (losses, weights, optimizer state; data order and masks
included)."""

import re
import shlex
import signal

import pytest

from fastmim.errors import STOP_SIGNALS
from fastmim.train.checkpoint_files import checkpoints, load_checkpoint, read_record
from tests.reliability._harness import STEPS, Proc, assert_same_run, pretrain_args, run, wait_for_rows


def _resume_argv(output: str) -> list[str]:
    """The resume command the stopped run printed, as CLI arguments."""
    match = re.search(r"resume with: fastmim (pretrain .*)", output)
    assert match, output
    return shlex.split(match.group(1))


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_signal_saves_exits_0_and_resume_is_exact(tmp_path, reference, signum):
    out = tmp_path / "run"
    proc = Proc(pretrain_args(out, f"--train.steps={STEPS}"), tmp_path / "log1")
    wait_for_rows(out / "metrics.jsonl", 2, proc)
    proc.signal(signum)
    assert proc.wait() == 0, proc.output()
    output = proc.output()
    stopped = int(re.search(rf"stopped by {signum.name} at step (\d+) of {STEPS}", output).group(1))
    assert 2 <= stopped < STEPS, output
    assert "Traceback" not in output
    # The step in flight was finished, then saved: one verified checkpoint at exactly that step.
    assert [step for step, _ in checkpoints(out)] == [stopped]
    ckpt_path = checkpoints(out)[0][1]
    assert load_checkpoint(ckpt_path)["step"] == stopped and read_record(ckpt_path)["step"] == stopped

    code, resumed = run(_resume_argv(output), tmp_path / "log2")
    assert code == 0, resumed
    assert f"trained to step {STEPS} ({STEPS - stopped} steps this run)" in resumed
    assert_same_run(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "scancel"])
def test_signal_to_the_process_group_with_data_workers(tmp_path, reference, sig):
    """A signal to the whole process group (a terminal's Ctrl-C, SLURM's scancel) also reaches the DataLoader
    workers: they must keep loading so that the step in flight can finish and be saved."""
    out = tmp_path / "run"
    proc = Proc(pretrain_args(out, f"--train.steps={STEPS}", "--data.num_workers=2"), tmp_path / "log1")
    wait_for_rows(out / "metrics.jsonl", 1, proc)
    proc.signal(sig, group=True)
    assert proc.wait() == 0, proc.output()
    assert f"stopped by {sig.name}" in proc.output()
    code, resumed = run(_resume_argv(proc.output()), tmp_path / "log2")
    assert code == 0, resumed
    assert_same_run(out, reference)


def test_a_second_sigterm_inside_a_save_stops_in_one_line(tmp_path, reference):
    """The first SIGTERM asks to stop, the second one stops at once; when it lands inside torch.save, torch turned
    the interruption into a RuntimeError traceback (exit 1). Now: one line, exit 128 + 15, the save abandoned, the
    previous checkpoint intact, and the resumed run exact."""
    out = tmp_path / "run"
    sigterm_twice = ("mid-write", 2, (signal.SIGTERM, signal.SIGTERM))  # inside the second save, of step 4
    argv = pretrain_args(out, f"--train.steps={STEPS}", "--train.save_every=2")
    code, output = run(argv, tmp_path / "log1", crash=sigterm_twice)
    assert code == 128 + signal.SIGTERM, output
    assert "fastmim: interrupted by SIGTERM; what was written before is intact." in output
    assert "Traceback" not in output and [step for step, _ in checkpoints(out)] == [2], output
    code, resumed = run([*argv, "--train.resume=auto"], tmp_path / "log2")
    assert code == 0, resumed
    assert_same_run(out, reference)
