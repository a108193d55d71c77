"""The state of a run, part by part: what a checkpoint holds and what a resume puts back.

Each stateful part of a run has `state_dict()` and `load_state_dict(state)`, as torch.distributed.checkpoint's
`Stateful`: the config it was written with (checked first, before anything loads), the engine (model,
optimizer, schedule), the trainer's step, the data feed's position, the non-finite counter, the evaluator's
best and patience, the checkpointer's best steps, the logger's W&B run id, the stop control, and this rank's
RNG and open window of logged losses. The trainer registers them once, by name, in the order they are
restored; saving is `{name: part.state_dict()}` and resuming the same loop back, so a part that gains state
edits nothing else.
Rank 0 writes the shared parts (state.pt), every rank its own (rank-N.pt).

A part that keeps files of its own in the checkpoint directory (an engine's ZeRO or DCP shards) is handed
that directory on load: `load_from(directory, state)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from .checkpoint import CheckpointError, written_by

FORMAT = 2  # 1: the trainer's entry held the data position and the skipped updates (read by `upgrade`)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class Parts:
    shared: dict[str, Stateful]  # saved by rank 0 (state.pt), restored in this order
    own: dict[str, Stateful]  # saved by every rank (rank-N.pt), restored in this order

    def state(self) -> tuple[dict, dict]:
        return (
            {"format": FORMAT, **{name: part.state_dict() for name, part in self.shared.items()}},
            {name: part.state_dict() for name, part in self.own.items()},
        )

    @property
    def files(self) -> Optional[Callable]:
        """The writer of the files a part keeps in the checkpoint directory (state.pt holds the rest)."""
        return next((part.save_to for part in self.shared.values() if getattr(part, "save_to", None)), None)

    def load(self, directory: Path, state: dict, own: Optional[dict]) -> None:
        """`own` is None on a rank the checkpoint's run did not have: each own part gets None."""
        state = upgrade(state, written_by(directory))
        for name, part in self.shared.items():
            if hasattr(part, "load_from"):
                part.load_from(directory, state[name])
            else:
                part.load_state_dict(state.get(name, {}))
        for name, part in self.own.items():  # None also for a part the checkpoint predates
            part.load_state_dict(None if own is None else own.get(name))


def upgrade(state: dict, written_by: int) -> dict:
    """A checkpoint's state in today's layout, whichever dtrain wrote it: format 1 kept the data position and
    the skipped updates in the trainer's entry, and the evaluator's and checkpointer's state in it before that;
    before elastic resume it had no data position (rebuilt from its config and the `written_by` ranks)."""
    version = state.get("format", 1)
    if version > FORMAT:
        raise CheckpointError(
            f"checkpoint: written by a newer dtrain (format {version}, this one reads up to "
            f"{FORMAT}); upgrade dtrain to resume it"
        )
    if version == FORMAT:
        return state
    from .data.elastic import DataPosition

    trainer = state["trainer"]
    step, steps_per_epoch = trainer["step"], trainer["steps_per_epoch"]
    position = trainer.get("data") or DataPosition.legacy_state(written_by, state["config"], step, steps_per_epoch)
    config = state["config"]
    return {
        **state,
        "trainer": {"step": step},
        "data": {**position, "step": step, "batch": [config["data"]["batch_size"], config["train"]["grad_accum"]]},
        "nonfinite": {"skipped_updates": trainer["skipped_updates"]},
        "evaluator": state.get("evaluator", trainer),
        "checkpointer": state.get("checkpointer", trainer),
        "logger": state.get("logger", {}),
    }


class RNG:
    """This rank's random number generators (dropout, augmentation draws), resumed exactly. A rank that the
    checkpoint's run did not have starts a fresh stream seeded from (run.seed, rank, step)."""

    def __init__(self, seed: int, rank: int, step_of: Callable[[], int], reseed: Callable[[int], None]):
        self.seed, self.rank, self.step_of, self.reseed = seed, rank, step_of, reseed

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is not None:
            set_rng_state(state)
        else:
            key = f"{self.seed}/rank{self.rank}/resumed-at-{self.step_of()}".encode()
            self.reseed(int.from_bytes(hashlib.sha256(key).digest()[:4], "little"))


def rng_state() -> dict:
    """This rank's RNG states, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
