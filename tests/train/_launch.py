"""Multi-process `fastmim` jobs for test_distributed.py, started cheaply.

Importing torch, fastmim and DeepSpeed costs 10-20 s per process on the 2-core test machine. This script imports
them once, runs no torch computation itself, and for each job forks one process per rank with the environment a
launcher sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): each rank is a fresh OS process that calls
``fastmim.cli.main(argv)``, as `torchrun -m fastmim` would. Jobs run one after the other.

    python tests/train/_launch.py JOBS.json   # [{"argv": [...], "world": 2}, ...] -> prints RESULTS [[rc, ...], ...]

Test hooks of a job (this script's only, never fastmim's): ``"poison": {"rank": r, "step": s}`` makes rank r's
model predict NaN at one scale during optimizer step s (1-based), so that step's loss and gradients are non-finite
on that rank alone; ``"flip": GLOB`` flips one byte in the middle of the first file matching GLOB before the job
starts (a damaged checkpoint file); ``"plant": {"src": CKPT, "dst": DIR, "marker": FILE}`` copies ZeRO checkpoint
CKPT (file, shards) into the new run directory DIR with a payload pickled into its model-states shard that would
create FILE, the shard manifest and the checkpoint's record recomputed to match (an attacker's copy);
``"launcher": false`` runs the job as one process without any launcher variable (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), as `fastmim pretrain` typed in a shell.
"""

import glob
import json
import os
import shutil
import socket
import sys
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import deepspeed  # noqa: F401
import matplotlib.pyplot  # noqa: F401
import torch

import fastmim.cli
import fastmim.train.trainer
from fastmim.train.checkpoint_files import file_digest, load_checkpoint, write_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poison(step: int) -> None:
    """From now on in this process, optimizer step ``step`` (1-based) runs with a NaN prediction at the last scale."""
    train_step = fastmim.train.trainer.train_step

    def poisoned(run, batches):
        if run.pos.step + 1 != step:
            return train_step(run, batches)
        hook = run.model.decoders[-1].head.register_forward_hook(lambda module, args, out: out * float("nan"))
        try:
            return train_step(run, batches)
        finally:
            hook.remove()

    fastmim.train.trainer.train_step = poisoned


def flip(pattern: str) -> None:
    path = sorted(glob.glob(pattern))[0]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(src: str, dst: str, marker: str) -> None:
    src_path, dst_path = Path(src), Path(dst)
    dst_path.mkdir()
    shards = dst_path / src_path.with_suffix(".zero").name
    shutil.copytree(src_path.with_suffix(".zero"), shards)
    target = next(shards.glob("*model_states.pt"))
    state = torch.load(target, map_location="cpu", weights_only=False)  # this test's own file
    torch.save({**state, "payload": Payload(marker)}, target)
    ckpt = load_checkpoint(src_path)
    files = [{"name": p.name, **file_digest(p)} for p in sorted(shards.iterdir())]
    ckpt["optimizer"] = {"zero": {**ckpt["optimizer"]["zero"], "files": files}}
    write_checkpoint(ckpt, dst_path / src_path.name)


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_job(argv: list[str], world: int, poisoned: dict | None = None, launcher: bool = True) -> list[int]:
    port, pids = free_port(), []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
            os.environ.update({"MASTER_ADDR": "127.0.0.1", **{k: str(v) for k, v in env.items()}})
            if not launcher:
                for name in LAUNCHER_VARIABLES:
                    os.environ.pop(name, None)
            if poisoned and poisoned["rank"] == rank:
                poison(poisoned["step"])
            try:
                code = fastmim.cli.main(argv)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


if __name__ == "__main__":
    results = []
    for job in json.loads(open(sys.argv[1]).read()):
        if "flip" in job:
            flip(job["flip"])
        if "plant" in job:
            plant(**job["plant"])
        results.append(run_job(job["argv"], job["world"], job.get("poison"), job.get("launcher", True)))
    print("RESULTS " + json.dumps(results), flush=True)
