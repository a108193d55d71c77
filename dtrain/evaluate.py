"""Evaluation: the loss and metrics of a whole split on all ranks, when to validate, the best value so far of
the monitored validation metric (early_stop.monitor, lower or higher better: early_stop.mode) and when to stop
early.

A split's loss and metric sums are this rank's sums over its samples, all-reduced once and divided by the
global sample count, so the result is the mean over every sample whatever the number of ranks. The early
stop decision is broadcast from rank 0, so every rank stops at the same step.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import batch as batches
from . import dist
from .config import ConfigError
from .logging import progress_bar
from .metrics import Metrics
from .summary import BEST_SO_FAR

if TYPE_CHECKING:
    from .config import EarlyStopConfig


def _batches(stream) -> Optional[int]:
    """This rank's batches in one pass of an evaluation split, for the bar: its share of the samples (dealt
    by sample, rank 0's share the larger by one) in batches. None where the stream doesn't say."""
    try:
        share = math.ceil(stream.index.num_samples(stream.split) / stream.world_size)
        return math.ceil(share / stream.batch_size)
    except (AttributeError, TypeError, KeyError):
        return None


# early_stop.mode=auto: the direction of dtrain's own metrics (the loss and its terms, val/loss/NAME, are min).
# Any other name needs min or max said: a guess from the name would pick the worst checkpoint as "best" unsaid.
AUTO_MODE = {"loss": "min", "ppl": "min", "mae": "min", "mse": "min", "mae_predict_mean": "min", "acc": "max"}


def auto_mode(monitor: str) -> Optional[str]:
    """min or max for early_stop.mode=auto; None where dtrain doesn't know the metric's direction."""
    name = monitor.removeprefix("val/")
    return "min" if name.startswith("loss/") else AUTO_MODE.get(name)


class Evaluator:
    def __init__(
        self,
        engine,
        forward: Callable,
        loss,
        metrics: Metrics,
        task: Optional[str],
        val_every: int,
        early_stop_cfg: EarlyStopConfig,
    ):
        self.engine, self.forward, self.loss, self.metrics, self.task = engine, forward, loss, metrics, task
        self.val_every, self.patience, self.min_delta = val_every, early_stop_cfg.patience, early_stop_cfg.min_delta
        self.monitor = early_stop_cfg.monitor
        self.mode = auto_mode(self.monitor) if early_stop_cfg.mode == "auto" else early_stop_cfg.mode
        # the record of each validation holds the best value so far under this name (val/best_loss by default)
        self.best_key = BEST_SO_FAR + self.monitor.removeprefix("val/")
        self.best_val = -math.inf if self.mode == "max" else math.inf
        self.best_step, self.bad_validations = -1, 0
        self.validated: dict = {}  # the last validation's metrics record, without step and epoch (callbacks)

    # ---- when ---------------------------------------------------------------------------------
    def should_validate(self, step: int, steps_per_epoch: int, last: bool) -> bool:
        """Every val_every steps (0: every epoch), at the end of every epoch, and after the last step."""
        return bool(self.val_every and step % self.val_every == 0) or step % steps_per_epoch == 0 or last

    def validate(self, stream, step: int, epoch: int, log, log_local: bool = False) -> tuple[bool, bool]:
        """Collective. Evaluate the validation split at `step`, keep the best, count the patience, and say so
        (a metrics record and a line; the early stop's too). -> (improved, stop early)."""
        local = (lambda loss: log.info(f"local val/loss at step {step}: {loss:.6f}")) if log_local else None
        with dist.guard("metrics all-reduce (evaluation)"):
            metrics = self.evaluate(stream, "val", local, progress=log.show_progress)
        if self.monitor not in metrics:  # a torchmetrics dict without that key: the start-up check can't see it
            raise ConfigError(
                f"config: early_stop.monitor: {self.monitor!r} is not a validation metric; validation "
                f"logs {', '.join(metrics)}"
            )
        improved, stop_early = self.observe(metrics[self.monitor], step)
        self.validated = {**metrics, self.best_key: self.best_val}
        log.metrics({"step": step, "epoch": epoch, **self.validated})
        log.info(
            f"step {step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + (" (best)" if improved else f" (no improvement for {self.bad_validations})")
        )
        if stop_early:
            log.info(
                f"early stop at step {step}: {self.monitor} has not improved for {self.bad_validations} "
                f"validations (best {self.best_val:.4f} at step {self.best_step})"
            )
            log.metrics({"step": step, "event": "early_stop", "best_step": self.best_step})
        return improved, stop_early

    # ---- what ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(
        self, stream, prefix: str, log_local: Optional[Callable[[float], None]] = None, progress: bool = False
    ) -> dict:
        """Mean loss and metrics over the whole split: per-rank sums, one all-reduce, then divide.
        Collective: every rank calls it (it reads its own share of the split). `log_local` gets this rank's
        own mean loss (for diagnosing one rank's data); `progress`: a bar over this rank's batches."""
        model = self.engine.module
        was_training = model.training
        model.eval()  # dropout off, batch norm uses running statistics: rank 0's, the checkpoint's, on every rank
        dist.broadcast_buffers(model)
        self.metrics.reset(self.engine.device)
        loss_sums: dict[str, torch.Tensor] = {}
        n = 0
        with self.engine.evaluating():  # ranks run uneven numbers of batches: FSDP gathers its weights once
            for batch in progress_bar(
                stream.epoch(0), total=_batches(stream), desc=prefix, unit="batch", enabled=progress
            ):
                batch = batches.to_device(batch, self.engine.to_device)
                with self.engine.autocast():
                    output = self.forward(model, batch)
                losses = self.loss(output, batch)
                size = batches.size(batch)
                for k, v in losses.items():
                    loss_sums[k] = loss_sums.get(k, 0.0) + v.detach().double() * size
                n += size
                self.metrics.update(output, batch)
        names = self.loss.names or list(loss_sums)
        sums = self.metrics.sums()
        # one vector for one all-reduce: loss terms, sample count, metric numerators, explicit denominators
        values = (
            [loss_sums.get(k, 0.0) for k in names]
            + [n]
            + [num for num, _ in sums.values()]
            + [den for _, den in sums.values() if den is not None]
        )
        total = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.engine.device).reshape(()) for v in values]
        )
        if log_local is not None:
            log_local(total[0].item() / max(n, 1))
        dist.all_reduce_sum(total)
        model.train(was_training)
        total = total.tolist()
        count = max(total[len(names)], 1.0)
        out = {f"{prefix}/{k}": total[i] / count for i, k in enumerate(names)}
        dens = iter(total[len(names) + 1 + len(sums) :])
        for (k, (_, den)), num in zip(sums.items(), total[len(names) + 1 :]):
            out[f"{prefix}/{k}"] = num / (max(next(dens), 1e-300) if den is not None else count)
        if self.task == "lm":  # perplexity of the mean token cross-entropy
            out[f"{prefix}/ppl"] = math.exp(min(out[f"{prefix}/loss"], 700.0))
        out.update({f"{prefix}/{k}": v for k, v in self.metrics.compute_torchmetrics().items()})
        return out

    def test(self, stream, step: int, best: Optional[Path], load: Callable, log) -> dict:
        """Collective. The test split's metrics with the weights of the `best` checkpoint (read with `load`),
        or the current ones when there is none; said in a metrics record and a line."""
        if best is not None:
            state, _ = load(best)
            self.engine.load_weights(best, state["engine"])
        with dist.guard("metrics all-reduce (evaluation)"):
            metrics = self.evaluate(stream, "test", progress=log.show_progress)
        weights_step = self.best_step if best is not None else step
        log.metrics({"step": step, **metrics, "test/weights_step": weights_step})
        log.info(
            "test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" (weights of step {weights_step})"
        )
        return metrics

    @torch.inference_mode()
    def confusion_matrix(self, stream, num_classes: int, progress: bool = False) -> torch.Tensor:
        """[true class, predicted class] counts over one pass of `stream` (this process's share)."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        with self.engine.evaluating():
            for batch in progress_bar(
                stream.epoch(0), total=_batches(stream), desc="confusion matrix", unit="batch", enabled=progress
            ):
                batch = batches.to_device(batch, self.engine.to_device)
                pred = batches.logits(self.forward(model, batch)).argmax(-1).cpu()
                y = batches.target(batch).cpu()
                cm += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
        model.train(was_training)
        return cm

    # ---- best and early stopping --------------------------------------------------------------
    def validation_names(self) -> list[str]:
        """What validation logs, as fixed by the probe: the loss and its terms, the metrics' sums, perplexity
        (lm) and the torchmetrics (one returning a dict logs val/NAME/KEY)."""
        names = (
            ["loss", *(self.loss.names or [])]
            + list(self.metrics.names or {})
            + (["ppl"] if self.task == "lm" else [])
            + list(self.metrics.torchmetrics)
        )
        return [f"val/{k}" for k in dict.fromkeys(names)]

    def check_monitor(self, validates: bool, warn: Callable[[str], None]) -> None:
        """Before training, after the probe: early_stop.monitor names what validation logs, with a known direction
        (a one-line ConfigError if not: a misspelled name would otherwise fail at the first validation, hours
        in). `validates`: the data has a validation split; without one nothing is monitored, said in one line."""
        if not validates:
            if self.monitor != "val/loss" or self.patience is not None:
                warn(
                    f"early_stop: the data has no validation split, so {self.monitor} is never measured: no best "
                    "checkpoint, no early stopping (the test uses the last weights)"
                )
            return
        names = self.validation_names()
        dicts = tuple(f"val/{k}/" for k in self.metrics.torchmetrics)  # the keys of a dict one returns
        if self.monitor not in names and not (dicts and self.monitor.startswith(dicts)):
            close = difflib.get_close_matches(self.monitor, names, n=1, cutoff=0.5)
            raise ConfigError(
                f"config: early_stop.monitor: {self.monitor!r} is not a validation metric; validation "
                f"logs {', '.join(names)}" + (f"; did you mean {close[0]}?" if close else "")
            )
        if self.mode is None:
            raise ConfigError(
                f"config: early_stop.mode: auto does not know whether {self.monitor} is better lower "
                "or higher; set early_stop.mode=min or early_stop.mode=max"
            )

    def observe(self, value: float, step: int) -> tuple[bool, bool]:
        """Record a validation's value of the monitored metric. -> (improved, stop early). The value is already
        identical on all ranks; broadcasting rank 0's stop decision makes it certain. NaN never improves."""
        if self.mode == "max":
            improved = value > self.best_val + self.min_delta
        else:
            improved = value < self.best_val - self.min_delta
        if improved:
            self.best_val, self.best_step, self.bad_validations = value, step, 0
        else:
            self.bad_validations += 1
        if self.patience is None:  # no early stopping: nothing to agree on (a broadcast per validation saved)
            return improved, False
        return improved, dist.broadcast_object(self.patience_used_up)

    @property
    def patience_used_up(self) -> bool:
        """True when early_stop.patience validations in a row did not improve (also under a lowered
        patience after a resume)."""
        return self.patience is not None and self.bad_validations >= self.patience

    def state_dict(self) -> dict:
        return {"best_val": self.best_val, "best_step": self.best_step, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        self.bad_validations = state["bad_validations"]
