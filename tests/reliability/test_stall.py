"""A stalled data worker (SIGSTOP, as a worker stuck in a read of a hung NFS or Lustre mount would be): the run says
which worker and for how long, a stop signal during the stall still saves the last completed step and exits 0, a
stall past data.stall_limit_s ends the run in one line with the resume command, and the workers are gone in every
case. Before, the run printed nothing and never ended; a SIGTERM saved nothing."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

from fastmim.errors import FastmimError
from fastmim.train import train, trainer
from fastmim.train.checkpoint_files import checkpoints, load_checkpoint
from fastmim.train.metrics import read_metrics
from fastmim.train.stall import StallWatch
from tests.reliability._harness import STEPS, Proc, RunResult, assert_same_run, config, pretrain_args, run
from tests.reliability.test_preemption import _resume_argv

WATCHED = ["--data.num_workers=2", "--data.stall_warn_s=1"]


def _workers(pid: int, n: int = 2, timeout: float = 120) -> list[int]:
    """The pids of the n DataLoader workers of process ``pid`` (its children named pt_data_worker), in start order."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        workers = [int(c) for c in children if _comm(int(c)) == "pt_data_worker"]
        if len(workers) == n:
            return sorted(workers)
        time.sleep(0.01)
    raise TimeoutError(f"no {n} data workers under {pid} within {timeout} s")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stalled_run(tmp_path: Path, *extra: str) -> tuple[Proc, int]:
    """A run whose worker 1 is stopped as soon as it exists: it owes batch 1, 3, 5, ... (torch hands tasks out in
    turn, two ahead per worker), so the run stalls within the first STEPS steps, at the latest on batch 5. Returns
    the process once the stall has been reported, and the stopped pid."""
    proc = Proc(pretrain_args(tmp_path / "run", f"--train.steps={STEPS}", *WATCHED, *extra), tmp_path / "log")
    stopped = _workers(proc.pid)[1]
    os.kill(stopped, signal.SIGSTOP)
    deadline = time.monotonic() + 120
    while f"data worker 1 (pid {stopped}) has delivered no data for" not in proc.output():
        assert time.monotonic() < deadline and proc.process.is_alive(), proc.output()
        time.sleep(0.05)
    return proc, stopped


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _state(pid) in ("Z", "X", "")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _last_logged_step(out: Path) -> int:
    return read_metrics(out / "metrics.jsonl")[-1]["step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_during_a_stall_saves_the_last_step_and_exits_0(tmp_path, reference, signum):
    proc, stopped = _stalled_run(tmp_path, "--data.stall_limit_s=0")
    workers = _workers(proc.pid)
    proc.signal(signum)
    assert proc.wait(180) == 0, proc.output()
    output, out = proc.output(), tmp_path / "run"
    step = int(re.search(rf"stopped by {signum.name} at step (\d+) of {STEPS}", output).group(1))
    assert "Traceback" not in output and "no limit is set" in output
    assert step < STEPS and step == _last_logged_step(out)
    assert [s for s, _ in checkpoints(out)] == [step] and load_checkpoint(checkpoints(out)[0][1])["step"] == step
    assert all(_gone(pid) for pid in workers), [(pid, _state(pid)) for pid in workers]
    assert stopped in workers

    code, resumed = run(_resume_argv(output), tmp_path / "log2")
    assert code == 0, resumed
    assert_same_run(out, reference)


def test_a_stall_past_the_limit_saves_and_ends_in_one_line_with_the_resume_command(tmp_path, reference):
    proc, stopped = _stalled_run(tmp_path, "--data.stall_limit_s=3")
    workers = _workers(proc.pid)
    assert proc.wait(180) == 2, proc.output()
    output, out = proc.output(), tmp_path / "run"
    errors = [line for line in output.splitlines() if line.startswith("fastmim: error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    step = _last_logged_step(out)
    resume = f"resume with: fastmim pretrain --config {out / 'config.toml'} --train.resume=auto"
    assert errors[0].startswith(f"fastmim: error: data worker 1 (pid {stopped}) delivered no data for 3 s"), errors
    assert f"saved step {step} as {out / f'checkpoint-{step:07d}.pt'}" in errors[0] and errors[0].endswith(resume)
    assert [s for s, _ in checkpoints(out)] == [step] and step < STEPS
    assert all(_gone(pid) for pid in workers), [(pid, _state(pid)) for pid in workers]

    # No limit for the resumed run: on a loaded machine its fresh workers may take 3 s to deliver their first batch.
    code, resumed = run([*_resume_argv(errors[0]), "--data.stall_limit_s=0"], tmp_path / "log2")
    assert code == 0, resumed
    assert_same_run(out, reference)


def test_a_stall_inside_an_accumulated_step_saves_the_step_before_it(tmp_path, monkeypatch):
    """With train.accum_steps = 2 the stall hits the second micro-batch of step 2: the first one was read (the data
    position moved past it), but step 2 never completes, so step 1 and the position after it are saved, and the
    resumed run repeats the uninterrupted one."""
    accum = ["--train.steps=4", "--train.accum_steps=2", "--data.stall_warn_s=1", "--data.stall_limit_s=2"]
    train(config(tmp_path / "reference", *accum))
    real = trainer.input_stream

    def stalling(run, watch):
        for micro, images in enumerate(real(run, watch)):
            if micro == 3:  # step 2, micro-batch 1: the wait reaches the limit
                watch.waiting(2.5, "data worker 1 (pid 7)")
            yield images

    monkeypatch.setattr(trainer, "input_stream", stalling)
    out = tmp_path / "run"
    with pytest.raises(FastmimError, match=r"data worker 1 \(pid 7\) delivered no data for 2 s .* saved step 1 as "):
        train(config(out, *accum))
    assert load_checkpoint(checkpoints(out)[-1][1])["data"] == {"epoch": 0, "batch": 2}
    monkeypatch.setattr(trainer, "input_stream", real)
    train(config(out, *accum, "--train.resume=auto"))
    assert_same_run(out, RunResult(tmp_path / "reference"))


def test_the_watch_warns_at_each_doubling_and_ends_at_a_stop_or_the_limit(capsys):
    names = [None]
    cfg = config(Path("unused"), "--data.stall_warn_s=2", "--data.stall_limit_s=10").data
    watch = StallWatch(cfg, lambda: names[0])
    for waited in (0.5, 1.9, 2.0, 3.0, 4.2, 7.9):
        watch.waiting(waited, "data worker 0 (pid 9)")
    warned = re.findall(r"has delivered no data for (\d+) s", capsys.readouterr().err)
    assert warned == ["2", "4"]
    watch.delivered(8.0)
    assert "delivered again after 8 s" in capsys.readouterr().err
    watch.waiting(2.0, "w")
    assert "for 2 s" in capsys.readouterr().err  # a new wait warns afresh
    with pytest.raises(Exception, match="delivered no data for 10 s") as limit:
        watch.waiting(10.0, "data worker 0 (pid 9)")
    assert limit.value.signal_name is None
    names[0] = "SIGTERM"
    with pytest.raises(Exception, match="delivered no data for 1 s") as stop:
        watch.waiting(1.0, "data worker 0 (pid 9)")
    assert stop.value.signal_name == "SIGTERM"
    with pytest.raises(FastmimError, match="cannot save without the others"):
        StallWatch(cfg, lambda: "SIGTERM", world=2).waiting(1.0, "w")
