"""What a training run hands back to Python: `dtrain.fit(...)` returns a FitResult, the same on every rank.

It describes the whole run, restarts included: the metrics come from the run's metrics.jsonl (what was
logged before a resume counts too), the checkpoints from the run's `best` and `latest` pointers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from . import dist
from .signals import EXIT_INTERRUPTED
from .summary import BEST_SO_FAR

if TYPE_CHECKING:
    from torch import nn

    from .trainer import Trainer

_NOT_METRICS = ("step", "epoch", "event")


@dataclasses.dataclass(frozen=True)
class FitResult:
    exit_code: int
    """What `dtrain train` exits with: 0 done (also stopped at run.stop_at_step), 2 stopped for non-finite
    gradients (train.nonfinite=stop) or weights: the last good checkpoint is kept, and the same run again
    diverges again unless a setting changes; 75 interrupted by a signal and resumable (run the same again to
    continue)."""
    stop_reason: str
    """completed, early_stop, stop_at_step, nonfinite, signal:SIGTERM|SIGINT|SIGUSR1, or already_completed
    (a finished, tested run started again: nothing was trained)."""
    step: int
    """Optimizer steps done, restarts included."""
    total_steps: int
    """Optimizer steps the run plans (train.epochs or train.max_steps)."""
    run_dir: Path
    metrics: dict[str, float]
    """The last logged value of every metric: loss, lr, throughput, val/*, and test/* once tested."""
    best_metrics: dict[str, float]
    """The validation metrics (val/*) at best_step: the best value of `monitor`. {} before any validation."""
    best_step: Optional[int]
    best_checkpoint: Optional[Path]
    latest_checkpoint: Optional[Path]
    monitor: str = "val/loss"
    """The validation metric that decided best_step and early stopping (early_stop.monitor)."""

    @property
    def interrupted(self) -> bool:
        """Stopped by a signal; the same call (or command) again resumes it."""
        return self.exit_code == EXIT_INTERRUPTED

    def load_model(self, **kwargs: Any) -> nn.Module:
        """The trained nn.Module of best_checkpoint (latest_checkpoint where the run has no best), on the CPU,
        in eval mode: `dtrain.load_model(checkpoint, **kwargs)`. A script hands in its own factory again,
        `result.load_model(model=build_model)`: a name stored in the checkpoint is never imported from it."""
        from .load import load_model

        checkpoint = self.best_checkpoint or self.latest_checkpoint
        if checkpoint is None:
            from .checkpoint import CheckpointError

            raise CheckpointError(
                f"checkpoint: the run {self.run_dir} has no checkpoint to load (it stopped before its first save)"
            )
        return load_model(checkpoint, **kwargs)


def collect(trainer: Trainer, outcome: dict[str, Any]) -> FitResult:
    """Collective: rank 0 reads the run's records and checkpoint pointers, every rank gets its result.
    `outcome` is what trainer.fit() returned."""
    from .logging import metrics_record
    from .records import read_records

    result = None
    if trainer.info.is_global_zero:
        records = [r for _, r in read_records(trainer.run_dir / "metrics.jsonl", metrics_record)]
        final: dict[str, float] = {}
        for record in records:
            if "event" not in record:
                final.update({k: v for k, v in record.items() if k not in _NOT_METRICS})
        best_step = trainer.evaluator.best_step if trainer.evaluator.best_step >= 0 else None
        best: dict[str, Any] = next((r for r in reversed(records) if r["step"] == best_step and "val/loss" in r), {})
        checkpoints = {name: trainer.checkpointer.pointer(name) for name in ("best", "latest")}
        reason = outcome["stop_reason"]
        result = FitResult(
            exit_code=EXIT_INTERRUPTED if reason.startswith("signal:") else 2 if reason == "nonfinite" else 0,
            stop_reason=reason,
            step=outcome["step"],
            total_steps=trainer.feed.total_steps,
            run_dir=trainer.run_dir.absolute(),
            metrics=final,
            best_metrics={k: v for k, v in best.items() if k.startswith("val/") and not k.startswith(BEST_SO_FAR)},
            best_step=best_step,
            best_checkpoint=checkpoints["best"] and checkpoints["best"].absolute(),
            latest_checkpoint=checkpoints["latest"] and checkpoints["latest"].absolute(),
            monitor=trainer.evaluator.monitor,
        )
    return dist.broadcast_object(result)
