"""Fault-injection target: `dtrain ARGS`, except that rank SLEEPY_RANK sleeps for an hour inside
training step SLEEPY_STEP (a rank hung in user code: its peers wait for it in the gradient all-reduce)."""

import os
import sys
import time

from dtrain import trainer
from dtrain.cli import main

_step = trainer.Trainer.train_step


def train_step(self, micro_batches):
    if self.info.global_rank == int(os.environ["SLEEPY_RANK"]) and self.step + 1 == int(os.environ["SLEEPY_STEP"]):
        time.sleep(3600)
    return _step(self, micro_batches)


trainer.Trainer.train_step = train_step

if __name__ == "__main__":
    sys.exit(main())
