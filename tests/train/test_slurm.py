"""README's SLURM recipe, run as written (its batch script, taken from the README), with SLURM's pre-emption signal.

SLURM's ``--signal=USR1@120`` goes to every process of the job step. The recipe used to start one ``torchrun`` per
node there: torchrun has no handler for SIGUSR1 (torch 2.14 handles SIGTERM, SIGINT, SIGHUP and SIGQUIT unless told
otherwise), so it died at once (status 138), orphaning its processes, and the step's status was a failure. The
recipe now lets srun start one fastmim process per device, which reads SLURM's task variables: each rank gets the
signal once, saves and exits 0. ``srun`` and ``scontrol`` are stand-ins (tests/train/_srun.py, one node, two tasks,
CPU); the signal is sent to every process of the step (both ranks and their data workers), as SLURM does.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmim.errors import FastmimError
from fastmim.train.checkpoint_files import checkpoints, load_checkpoint
from fastmim.train.distributed import adopt_srun_env, launched_by_srun
from fastmim.train.metrics import read_metrics

HERE = Path(__file__).parent
README = (HERE.parents[1] / "README.md").read_text()
# What makes vit_large_800 on ImageNet a CPU test: appended to the documented command by the stand-in srun.
SMALL = [
    "--model.name=localmim_vit_tiny_patch16",
    "--model.img_size=32",
    "--model.decoder_dim=16",
    "--data.source=demo",
    "--data.num_images=16",
    "--data.num_workers=1",
    "--train.batch_size=2",
    "--train.precision=fp32",
    "--train.device=cpu",
    "--train.log_every=1",
    "--train.dist_timeout=120",
]


def recipe() -> str:
    """The batch script of README's SLURM recipe."""
    start = README.index("#!/bin/bash\n#SBATCH")
    return README[start : README.index("```", start)]


def _job(script: Path, tmp_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``bash pretrain.sh`` as the batch host would run it, on 2 tasks, writing into ``tmp_path / "run"``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "_srun.py"}" "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")  # `scontrol show hostnames LIST`: the head node
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))},
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        "SRUN_TEST_TASKS": "2",
        "SRUN_TEST_APPEND": " ".join([*SMALL, f"--train.out_dir={tmp_path / 'run'}", *extra]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(["bash", str(script)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _step_processes(root: int) -> list[int]:
    """Every process below ``root`` (the stand-in srun): the tasks and their data workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def test_recipe_usr1_every_rank_saves_and_the_job_exits_0(tmp_path):
    script = tmp_path / "pretrain.sh"
    script.write_text(recipe())
    assert "srun python -m fastmim pretrain" in script.read_text() and "--signal=USR1@" in script.read_text()
    out, log = tmp_path / "run", tmp_path / "job1.log"
    job = _job(script, tmp_path, log, "--train.steps=1000")
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        srun = [p for p in _step_processes(job.pid) if "_srun.py" in Path(f"/proc/{p}/cmdline").read_text()]
        step = _step_processes(srun[0])
        assert len(step) >= 4  # 2 ranks, each with a data worker
        for pid in step:  # SLURM's --signal: every process of the job step
            os.kill(pid, signal.SIGUSR1)
        assert job.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        if job.poll() is None:
            for pid in _step_processes(job.pid):
                os.kill(pid, signal.SIGKILL)
            job.kill()
    output = log.read_text()
    stopped = int(re.search(r"stopped by SIGUSR1 at step (\d+) of 1000", output).group(1))
    assert output.count("resolved config:") == 1 and "Traceback" not in output  # rank 0 alone reports
    assert f"resume with: srun python -m fastmim pretrain --config {out / 'config.toml'} --train.resume=auto" in output
    assert [s for s, _ in checkpoints(out)] == [stopped]
    assert load_checkpoint(checkpoints(out)[0][1])["world_size"] == 2
    # Submitted again, the same script continues the run (train.resume=auto) to its end.
    again = _job(script, tmp_path, tmp_path / "job2.log", f"--train.steps={stopped + 2}")
    assert again.wait(timeout=300) == 0, (tmp_path / "job2.log").read_text()[-4000:]
    assert f"trained to step {stopped + 2} (2 steps this run)" in (tmp_path / "job2.log").read_text()


def test_srun_task_variables_become_the_launcher_variables(monkeypatch):
    # adopt_srun_env writes os.environ itself: a copy keeps what it sets out of later tests in this process
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    task = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16"}
    for name, value in {**task, "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}.items():
        monkeypatch.setenv(name, value)
    assert launched_by_srun()
    with pytest.raises(FastmimError, match="MASTER_ADDR / MASTER_PORT are not set; export them before srun"):
        adopt_srun_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    adopt_srun_env()
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")] == ["9", "1", "16", "8"]
    assert not launched_by_srun()  # adopted once; torchrun's own variables (WORLD_SIZE set) are never replaced
