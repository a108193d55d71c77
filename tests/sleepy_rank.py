"""Fault-injection target: `dtrain ARGS`, except that rank SLEEPY_RANK sleeps for an hour inside
training step SLEEPY_STEP (a rank hung in user code: its peers wait for it in the gradient all-reduce),
and that a world of one rank sleeps SLOW_ALONE_S in each step (a node alone, slow enough for another
to join mid-run)."""

import os
import sys
import time

from dtrain import trainer
from dtrain.cli import main

_step = trainer.Trainer.train_step


def train_step(self, micro_batches):
    if self.info.global_rank == int(os.environ.get("SLEEPY_RANK", -1)) and self.step + 1 == int(
        os.environ.get("SLEEPY_STEP", -1)
    ):
        time.sleep(3600)
    if self.info.world_size == 1:
        time.sleep(float(os.environ.get("SLOW_ALONE_S", 0)))
    return _step(self, micro_batches)


trainer.Trainer.train_step = train_step

if __name__ == "__main__":
    sys.exit(main())
