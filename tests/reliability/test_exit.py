"""Every run ends: `fastmim pretrain` with data workers, as a user starts it (`python -m fastmim`, so Python's own
exit handlers run, unlike the harness's forked runs), exits by itself after finishing, after a SIGTERM to its
process group (saving first) and after a user error, and leaves no process behind. Each run has a hard time limit:
a hang fails the test instead of the test suite."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmim.train.checkpoint_files import checkpoints

# The tiny recipe's ViT at 32 px with 16-wide decoders: a step takes milliseconds; two data workers.
ARGS = [
    "--model.img_size=32",
    "--model.decoder_dim=16",
    "--data.num_images=8",
    "--train.batch_size=2",
    "--train.warmup_steps=0",
    "--data.num_workers=2",
]
LIMIT_S = 120  # start-up (importing torch) takes 5-20 s on a loaded 2-core machine; a run a few seconds more


class Command:
    """`python -m fastmim ARGS` in a new session (its own process group, like a batch job)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastmim", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = LIMIT_S) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"fastmim did not exit within {timeout} s:\n{self.output()[-3000:]}")
        assert _group_gone(self.proc.pid), f"processes of the run outlived it:\n{self.output()[-3000:]}"
        return code


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """Whether no process of group ``pgid`` is left (orphaned data workers would be)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return False


def test_a_run_with_workers_exits_when_done(tmp_path):
    out = tmp_path / "run"
    cmd = Command(
        ["pretrain", *ARGS, "--train.steps=2", "--train.log_every=1", f"--train.out_dir={out}"], tmp_path / "log"
    )
    assert cmd.wait() == 0, cmd.output()
    assert "done: " in cmd.output() and [step for step, _ in checkpoints(out)] == [2]


def test_sigterm_to_the_group_before_the_first_log_step_saves_and_exits_0(tmp_path):
    """scancel signals the whole process group, data workers included; no log step is reached before the signal
    (log_every 1000), so there is no metrics file and no loss to plot."""
    out = tmp_path / "run"
    argv = [
        "pretrain",
        *ARGS,
        "--train.steps=1000",
        "--train.save_every=2",
        "--train.log_every=1000",
        f"--train.out_dir={out}",
    ]
    cmd = Command(argv, tmp_path / "log")
    deadline = time.monotonic() + LIMIT_S
    while not checkpoints(out) and cmd.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(cmd.proc.pid, signal.SIGTERM)
    assert cmd.wait() == 0, cmd.output()
    output = cmd.output()
    assert "stopped by SIGTERM at step" in output and "Traceback" not in output, output
    assert not (out / "metrics.jsonl").exists()
    stopped = int(output.split("stopped by SIGTERM at step ")[1].split()[0])
    assert checkpoints(out)[-1][0] == stopped >= 2


def test_a_user_error_with_workers_exits_2(tmp_path):
    """Every image unreadable: the workers raise, the run ends with one line and status 2."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        (images / f"{i}.png").write_bytes(b"not a png")
    argv = [
        "pretrain",
        *ARGS,
        "--data.source=folder",
        f"--data.path={images}",
        "--train.steps=2",
        f"--train.out_dir={tmp_path / 'run'}",
    ]
    cmd = Command(argv, tmp_path / "log")
    assert cmd.wait() == 2, cmd.output()
    errors = [line for line in cmd.output().splitlines() if line.startswith("fastmim: error:")]
    assert len(errors) == 1 and "unreadable" in errors[0] and "Traceback" not in cmd.output(), cmd.output()


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (Linux: SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_during_start_up_is_one_line(tmp_path, signum):
    """Ctrl-C during the seconds torch takes to import ended in a KeyboardInterrupt traceback; SIGTERM killed the
    process without a word. Signalled as soon as the command handles signals, while it imports torch: one line."""
    cmd = Command(["pretrain", *ARGS, "--train.steps=2", f"--train.out_dir={tmp_path / 'run'}"], tmp_path / "log")
    deadline = time.monotonic() + LIMIT_S
    while not _catches(cmd.proc.pid, signal.SIGTERM) and cmd.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(cmd.proc.pid, signum)
    assert cmd.wait() == 128 + signum, cmd.output()
    assert cmd.output().strip() == f"fastmim: interrupted by {signum.name}; what was written before is intact."
