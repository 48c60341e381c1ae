"""Multi-process `fastmim` jobs for test_distributed.py, started cheaply.

Importing torch, fastmim and DeepSpeed costs 10-20 s per process on the 2-core test machine. This script imports
them once, runs no torch computation itself, and for each job forks one process per rank with the environment a
launcher sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): each rank is a fresh OS process that calls
``fastmim.cli.main(argv)``, as `torchrun -m fastmim` would. Jobs run one after the other.

    python tests/train/_launch.py JOBS.json   # [{"argv": [...], "world": 2}, ...] -> prints RESULTS [[rc, ...], ...]
"""

import json
import os
import socket
import sys
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import deepspeed  # noqa: F401
import matplotlib.pyplot  # noqa: F401

import fastmim.cli
import fastmim.train.trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(argv: list[str], world: int) -> list[int]:
    port, pids = free_port(), []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
            os.environ.update({"MASTER_ADDR": "127.0.0.1", **{k: str(v) for k, v in env.items()}})
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
    jobs = json.loads(open(sys.argv[1]).read())
    print("RESULTS " + json.dumps([run_job(job["argv"], job["world"]) for job in jobs]), flush=True)
