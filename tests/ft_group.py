"""One replica group of tests/test_ft_train.py, started by `dtrain launch --ft` (or plain `dtrain train`):
`dtrain train` through dtrain.main, with a small MLP of this script's and a callback that records, after each
committed step, its weights' hash to $FT_OUT/g<REPLICA_GROUP_ID>.jsonl, and each validation's metrics. Told by
its environment (the same for every group of a launch):
- FT_WAIT_ALL=N: before its first step, wait until N groups are up (so that the first quorum has them all);
- FT_KILL_GROUP=G, FT_KILL_IN_STEP=K: group G (its process of rank FT_KILL_RANK, default 0, in a group of
  several) SIGKILLs itself in the forward pass of its K-th training step
  (mid-step, before the step's all-reduce, as a lost machine would: the others' step fails and is replayed),
  once ($FT_OUT/killed); its replacement, once up, waits for the others to hold after step $FT_REJOIN_AFTER
  (it then joins there, however fast it started) and creates $FT_OUT/replacement.up;
- FT_HOLDS=S=NAME,...: after step S create $FT_OUT/holding-S and wait until $FT_OUT/NAME exists (a replacement surely joins, a signal
  surely comes before the end, however slow the machine);
- FT_DELAY: seconds to sleep a step.
Writes the weights after the last step to $FT_OUT/g<ID>-<pid>.pt."""

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
RANK = os.environ.get("RANK", "0")  # in the group
MODEL: list[torch.nn.Module] = []


def build_model(input_shape, num_outputs):
    MODEL.append(
        torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, 32),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(32, num_outputs),
        )
    )
    return MODEL[-1]


def forward(model, batch):
    """dtrain's own forward; in the $FT_KILL_IN_STEP-th training forward (one a step: a group's share is one
    micro-batch at full quorum), SIGKILL."""
    if model.training:
        FORWARDS.append(1)
        if (
            GROUP == os.environ.get("FT_KILL_GROUP")
            and RANK == os.environ.get("FT_KILL_RANK", "0")
            and len(FORWARDS) == int(os.environ.get("FT_KILL_IN_STEP", -1))
            and not (OUT / "killed").exists()
        ):
            (OUT / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return default_forward(model, batch)


FORWARDS: list[int] = []


def weights_hash() -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in MODEL[-1].parameters())).hexdigest()[:16]


class Recorder:
    def __init__(self):
        self.file = (OUT / f"g{GROUP}.jsonl").open("a", buffering=1)

    def write(self, **record) -> None:
        self.file.write(json.dumps({"pid": os.getpid(), "rank": int(RANK), **record}) + "\n")

    def on_train_start(self, run) -> None:
        self.total = run.total_steps
        self.write(start=run.step)
        (OUT / f"g{GROUP}.up").touch()
        if GROUP == os.environ.get("FT_KILL_GROUP") and (OUT / "killed").exists():
            while not (OUT / f"holding-{os.environ.get('FT_REJOIN_AFTER', 0)}").exists():
                time.sleep(0.02)
            # every rank of the replacement group up (its quorum asks for all of them), then say so
            (OUT / f"replacement.up-{RANK}").touch()
            while not all((OUT / f"replacement.up-{r}").exists() for r in range(int(os.environ.get("WORLD_SIZE", 1)))):
                time.sleep(0.02)
            (OUT / "replacement.up").touch()
        while not all((OUT / f"g{g}.up").exists() for g in range(int(os.environ.get("FT_WAIT_ALL", 0)))):
            time.sleep(0.02)

    def on_step_end(self, step, loss) -> None:
        self.write(step=step, weights=weights_hash(), loss=float(loss))
        if step == self.total:  # the last step's weights (the test then loads the best checkpoint's)
            torch.save({k: v.clone() for k, v in MODEL[-1].state_dict().items()}, OUT / f"g{GROUP}-{os.getpid()}.pt")
        holds = dict(hold.split("=") for hold in filter(None, os.environ.get("FT_HOLDS", "").split(",")))
        if str(step) in holds:
            (OUT / f"holding-{step}").touch()
        if str(step) in holds:
            while not (OUT / holds[str(step)]).exists():
                time.sleep(0.02)
            # torchft's Lighthouse forms a quorum of the last one's groups at once ("fast quorum") when they all
            # ask: give the group we waited for the time to ask first, so that it joins at the next step
            time.sleep(0.3)
        time.sleep(float(os.environ.get("FT_DELAY", 0)))

    def on_validation_end(self, step, metrics) -> None:
        self.write(validated=step, metrics=metrics)

    def on_train_end(self, result) -> None:
        self.write(end=result.exit_code, at=result.step)


if __name__ == "__main__":
    dtrain.main(model=build_model, forward=forward, callbacks=[Recorder()])
