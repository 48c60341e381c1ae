"""`fastmim pretrain` in which rank 1 raises at its second step (launched by torchrun in test_distributed.py)."""

import os
import sys

import fastmim.cli
from fastmim.train import trainer

_step = trainer.train_step


def failing_step(run, batches):
    if run.pos.step == 1 and os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return _step(run, batches)


trainer.train_step = failing_step
sys.exit(fastmim.cli.main(sys.argv[1:]))
