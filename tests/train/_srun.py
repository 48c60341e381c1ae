"""A stand-in for SLURM's ``srun`` inside a batch job on one node, for tests/train/test_slurm.py.

    srun CMD ARGS...   # SRUN_TEST_TASKS=2 SRUN_TEST_APPEND="--train.steps=3 ..."

Starts SRUN_TEST_TASKS copies of CMD, one per task, each with the variables srun sets in a task of a job step
(SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_ID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NUM_NODES,
SLURM_STEP_TASKS_PER_NODE), and exits with the highest task status, as srun does (128 + N for a task a signal N
ended). Test-only changes to what it runs: SRUN_TEST_APPEND's arguments are appended (what makes the documented
command small enough for a CPU), and MASTER_PORT is a free port (the recipe's fixed 29500 may be taken on a shared
test machine). It does not forward signals: SLURM's ``--signal`` goes to the processes of the job step, never to
srun, and the test sends them as SLURM does.
"""

import os
import shlex
import socket
import subprocess
import sys

if __name__ == "__main__":
    tasks = int(os.environ["SRUN_TEST_TASKS"])
    command = [*sys.argv[1:], *shlex.split(os.environ.get("SRUN_TEST_APPEND", ""))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    step = {
        "SLURM_NODEID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_TASKS_PER_NODE": str(tasks),
        "MASTER_PORT": str(port),
    }
    procs = [
        subprocess.Popen(command, env={**os.environ, **step, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
        for i in range(tasks)
    ]
    codes = [p.wait() for p in procs]
    sys.exit(max(code if code >= 0 else 128 - code for code in codes))
