"""Callbacks named in a config by import string (tests/test_callbacks.py)."""

import json
import os
from pathlib import Path


class FailAtStep3OnRank1:
    """A bug in the user's callback: raises at the end of step 3 on rank 1 only (the others go on)."""

    def on_train_start(self, run):
        self.rank = run.global_rank

    def on_step_end(self, step, loss):
        if step == 3 and self.rank == 1:
            raise ValueError("a bug in callbacks_user.FailAtStep3OnRank1")


class StepCounter:
    """Counts the steps this rank trained, resumed with the run; writes its count at the end (one file a rank)."""

    def __init__(self):
        self.steps = 0

    def on_train_start(self, run):
        self.out = Path(run.run_dir) / f"steps-{run.global_rank}.json"

    def on_step_end(self, step, loss):
        self.steps += 1

    def on_train_end(self, result):
        self.out.write_text(json.dumps({"steps": self.steps, "result_step": result.step, "pid": os.getpid()}))

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]
