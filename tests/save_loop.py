"""Fault-injection target: save checkpoints back to back (resuming from the newest complete one)
until killed. Each step's state is a pure function of the step, so the parent can check contents."""

import sys
from pathlib import Path

import torch

from dtrain.checkpoint import Checkpointer
from dtrain.dist import DistInfo


def state_for(step: int) -> dict:
    return {"weights": torch.full((1_000_000,), float(step)), "step": step}


if __name__ == "__main__":
    info = DistInfo("single", 0, 0, 1, torch.device("cpu"), None)
    ckpt = Checkpointer(Path(sys.argv[1]), keep_last=2, dist_info=info, config_hash="test")
    found = ckpt.load_latest(lambda m: print(m, file=sys.stderr, flush=True))
    step = found[1]["step"] if found else 0
    print("ready", step, flush=True)
    while True:
        step += 1
        ckpt.save(step, state_for(step), {"rank": 0})
