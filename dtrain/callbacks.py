"""Callbacks: code of the user's own told what the run does, on every rank.

A callback is any object with some of these methods (subclassing `Callback` is optional); each is called on
every rank, where the rule that causes the event lives:

  on_train_start(run)               training begins (after a resume is settled): run.global_rank,
                                    run.world_size, run.run_dir, run.step (where it starts), run.total_steps
  on_step_end(step, loss)           an optimizer step is done: the global step, this rank's loss of it (a 0-d
                                    tensor on the device: `.item()` waits for the device)
  on_validation_end(step, metrics)  validation's metrics, reduced over the ranks: the metrics.jsonl record
                                    ({val/loss: .., val/best_loss: .., ...}, without step and epoch)
  on_checkpoint(path, step, best)   a checkpoint is published (complete, verified, renamed into place); with
                                    checkpoint.async_save, in the save thread when it publishes
  on_train_end(result)              the run's dtrain.FitResult, as dtrain.fit returns it
  on_exception(error)               the run ends in an exception (then re-raised)

Handed in from Python (`dtrain.fit(callbacks=[Printer()])`) or named in the config by import string
(`run.callbacks: [mypkg.cb:Printer]`, each called with no arguments to make the callback). A callback with
`state_dict()`/`load_state_dict(state)` is saved in every checkpoint, each rank its own (rank-N.pt, under
"callbacks" and the callback's `module:Class` name), and resumed with the rest of the run. An exception raised
by a callback is the user's: it ends the run with its traceback, as an exception in a model or loss does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .config import ConfigError
from .importing import describe, resolve

if TYPE_CHECKING:  # a callback module costs no torch import
    import torch

    from .result import FitResult

EVENTS = ("on_train_start", "on_step_end", "on_validation_end", "on_checkpoint", "on_train_end", "on_exception")


class Callback:
    """A callback that does nothing: subclass it and define the events you want."""

    def on_train_start(self, run: RunStart) -> None: ...
    def on_step_end(self, step: int, loss: torch.Tensor) -> None: ...
    def on_validation_end(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, path: Path, step: int, best: bool) -> None: ...
    def on_train_end(self, result: FitResult) -> None: ...
    def on_exception(self, error: BaseException) -> None: ...


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What on_train_start is told: this rank, and where the run starts."""

    global_rank: int
    world_size: int
    run_dir: Path
    step: int
    total_steps: int

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0


class Callbacks:
    """The run's callbacks: each event to each in turn; their states as one stateful part of the run."""

    def __init__(self, callbacks: Sequence[Any] = ()):
        self.callbacks: list = []
        self.names: list[str] = []  # the key of each one's state in a checkpoint: its `module:Class`
        for callback in callbacks:
            self.add(callback)

    def add(self, callback: Any) -> None:
        self.callbacks.append(callback)
        names = [describe(cb) for cb in self.callbacks]  # the same class twice: numbered by its order
        self.names = [n if names.count(n) == 1 else f"{n}#{names[:i].count(n)}" for i, n in enumerate(names)]

    def emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(*args)

    def state_dict(self) -> dict:
        return {name: cb.state_dict() for name, cb in zip(self.names, self.callbacks) if _stateful(cb)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """None (a rank the checkpoint's run did not have, a checkpoint before callbacks): each starts fresh;
        so does a callback the checkpoint holds no state of (one added at resume)."""
        for name, cb in zip(self.names, self.callbacks):
            if _stateful(cb) and state is not None and name in state:
                cb.load_state_dict(state[name])


class Reporter:
    """A report of dtrain's own as a callback: W&B's checkpoint artifacts (wandb.log_checkpoints), on rank 0.
    Unlike a user's callback, its failure is a warning: the checkpoint it reports is written and stays."""

    def __init__(self, report: Callable[[Path, int, bool], None], warn: Callable[[str], None]):
        self.report, self.warn = report, warn

    def on_checkpoint(self, path: Path, step: int, best: bool) -> None:
        try:
            self.report(path, step, best)
        except Exception as e:
            self.warn(f"checkpoint: {path.name} saved, but reporting it failed ({type(e).__name__}: {e})")


def _stateful(callback: Any) -> bool:
    return callable(getattr(callback, "state_dict", None)) and callable(getattr(callback, "load_state_dict", None))


def build_callbacks(names: Sequence[str], handed_in: Optional[Sequence[Any]] = None) -> Callbacks:
    """The callbacks handed in from Python (they replace the config's), else those run.callbacks names, each
    made by calling its import string with no arguments. A callback with none of the events is one line."""
    if handed_in is not None:
        callbacks = list(handed_in)
    else:
        callbacks = []
        for i, name in enumerate(names):
            made = resolve(name, f"run.callbacks[{i}]")()
            callbacks.append(made)
    for cb in callbacks:
        if not any(callable(getattr(cb, event, None)) for event in EVENTS):
            raise ConfigError(
                f"config: run.callbacks: {describe(cb)} has none of the callback methods "
                f"({', '.join(EVENTS)}); define at least one"
            )
    return Callbacks(callbacks)
