"""One replica group of tests/test_ft_train.py: `dtrain train` through dtrain.main (the launcher's environment
contract set by the test), with a small MLP of this script's and a callback that records, after each committed
step, its weights' hash to $FT_OUT/g<REPLICA_GROUP_ID>.jsonl, and each validation's metrics. It SIGKILLs this
process in the forward pass of its $FT_KILL_IN_STEP-th training step (mid-step, before the step's all-reduce, as
a lost machine would: the others' step fails and is replayed), waits at step $FT_HOLD_AT until
$FT_OUT/$FT_HOLD_FOR exists (so that a replacement surely joins before the others finish, however slow the
machine), and sleeps $FT_DELAY seconds a step (so that a fault lands mid-run). Writes the weights after the
last step to $FT_OUT/g<ID>-<pid>.pt."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch

import dtrain
from dtrain.batch import default_forward

OUT = Path(os.environ["FT_OUT"])
GROUP = os.environ["REPLICA_GROUP_ID"]
MODEL: list[torch.nn.Module] = []


def build_model(input_shape, num_outputs):
    MODEL.append(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                     torch.nn.Dropout(0.1), torch.nn.Linear(32, num_outputs)))
    return MODEL[-1]


def forward(model, batch):
    """dtrain's own forward; in the $FT_KILL_IN_STEP-th training forward (one a step: a group's share is one
    micro-batch at full quorum), SIGKILL."""
    if model.training:
        FORWARDS.append(1)
        if len(FORWARDS) == int(os.environ.get("FT_KILL_IN_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)
    return default_forward(model, batch)


FORWARDS: list[int] = []


def weights_hash() -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in MODEL[-1].parameters())).hexdigest()[:16]


class Recorder:
    def __init__(self):
        self.file = (OUT / f"g{GROUP}.jsonl").open("a", buffering=1)

    def write(self, **record) -> None:
        self.file.write(json.dumps({"pid": os.getpid(), **record}) + "\n")

    def on_train_start(self, run) -> None:
        self.total = run.total_steps
        self.write(start=run.step)
        (OUT / f"g{GROUP}.up").touch()

    def on_step_end(self, step, loss) -> None:
        self.write(step=step, weights=weights_hash(), loss=float(loss))
        if step == self.total:  # the last step's weights (the test then loads the best checkpoint's)
            torch.save({k: v.clone() for k, v in MODEL[-1].state_dict().items()}, OUT / f"g{GROUP}-{os.getpid()}.pt")
        while step == int(os.environ.get("FT_HOLD_AT", -1)) and not (OUT / os.environ["FT_HOLD_FOR"]).exists():
            time.sleep(0.02)
        time.sleep(float(os.environ.get("FT_DELAY", 0)))

    def on_validation_end(self, step, metrics) -> None:
        self.write(validated=step, metrics=metrics)

    def on_train_end(self, result) -> None:
        self.write(end=result.exit_code, at=result.step)


if __name__ == "__main__":
    dtrain.main(model=build_model, forward=forward, callbacks=[Recorder()])
