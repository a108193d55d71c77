"""Evaluation metrics: what is measured on the validation and test splits, averaged over all their samples.

Two kinds, both taking (output, batch):
- sums: a callable returning per-batch sums, {name: sum} (divided by the number of samples in the end) or
  {name: (numerator, denominator)} (each summed, then divided). Sums add over batches and ranks exactly,
  so dtrain reduces them in the same all-reduce as the loss. dtrain's own metrics are of this kind.
- torchmetrics objects (`torchmetrics.Metric`), updated with (logits, target) and synchronised across
  ranks by torchmetrics' own compute().
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Callable, Optional

import torch

from .batch import logits, target
from .config import ConfigError, MetricsConfig
from .importing import describe, resolve

# lm: acc is next-token accuracy; the evaluator adds perplexity, exp(loss), after averaging the loss
BUILTIN = {"classification": ["acc"], "regression": ["mae", "mse", "mae_predict_mean"], "lm": ["acc"]}


def builtin_sums(task: str, y_mean: Optional[float] = None) -> Callable:
    """dtrain's metrics of a task as a sums callable. Regression also scores the baseline that always
    predicts the training mean, where it is known (`y_mean`; None: not scored)."""

    def sums(output, batch) -> dict[str, torch.Tensor]:
        pred, y = logits(output), target(batch)
        if task == "classification":
            return {"acc": (pred.argmax(-1) == y).sum().float()}
        if task == "lm":  # per-sample token accuracy, summed: every sample has the same number of tokens
            return {"acc": (pred.argmax(-1) == y).float().mean(-1).sum()}
        err = (pred.squeeze(-1) if pred.dim() > 1 and pred.shape[-1] == 1 else pred).float() - y
        baseline = {"mae_predict_mean": (y - y_mean).abs().sum()} if y_mean is not None else {}
        return {"mae": err.abs().sum(), "mse": (err * err).sum(), **baseline}

    return sums


class Metrics:
    """One evaluation's metrics: `reset()`, `update(output, batch)` per batch, then `sums()` (this rank's,
    to be all-reduced by the caller) and `compute_torchmetrics()` (collective)."""

    def __init__(self, sums_fns: list[tuple[str, Callable]], torchmetrics: Optional[dict] = None):
        self.sums_fns = sums_fns  # (source, fn) pairs
        self.torchmetrics = dict(torchmetrics or {})
        self._sums: dict[str, list] = {}
        # {name: has a denominator}, fixed by the first update (the probe before training): every rank reduces
        # the same vector, even one whose share of a split is empty
        self.names: Optional[dict[str, bool]] = None

    @property
    def builtin(self) -> bool:
        """dtrain's own metrics are among them (they score the output's logits against the batch's y)."""
        return any(source == "dtrain" for source, _ in self.sums_fns)

    def reset(self, device: torch.device) -> None:
        self._sums = {}
        for m in self.torchmetrics.values():
            m.to(device)
            m.reset()

    def update(self, output, batch) -> None:
        first = self.names is None
        if first:
            self.names = {}
        for source, fn in self.sums_fns:
            out = fn(output, batch)
            if not isinstance(out, Mapping):
                raise ConfigError(
                    f"config: metrics.fn: {source} returned a {type(out).__name__}, not a dict of "
                    "name -> per-batch sum (or (numerator, denominator))"
                )
            for name, value in out.items():
                num, den = value if isinstance(value, (tuple, list)) else (value, None)
                if (
                    not isinstance(num, torch.Tensor)
                    or num.numel() != 1
                    or (den is not None and (not isinstance(den, torch.Tensor) or den.numel() != 1))
                ):
                    raise ConfigError(
                        f"config: metrics.fn: {source} returned {name!r}: {_what(value)}; return a "
                        "scalar tensor (a per-batch sum) or a pair of them"
                    )
                if first:
                    self.names[name] = den is not None
                elif self.names.get(name) != (den is not None):
                    raise ConfigError(
                        f"config: metrics.fn: {source} returned {name!r} now, not before (or now with, "
                        "now without a denominator); return the same metrics every time"
                    )
                kept = self._sums.setdefault(name, [0.0, None if den is None else 0.0])
                kept[0] = kept[0] + num.detach().double().reshape(())
                if den is not None:
                    kept[1] = (kept[1] or 0.0) + den.detach().double().reshape(())
        if self.torchmetrics:
            pred, y = logits(output), target(batch)
            if pred.dim() == y.dim() + 1 and pred.dim() > 2:  # [B, T, V] -> torchmetrics' [B, V, T]
                pred = pred.movedim(-1, 1)
            for m in self.torchmetrics.values():
                m.update(pred, y)

    def sums(self) -> dict[str, tuple]:
        """{name: (numerator, denominator or None: divide by the sample count)}, this rank's: zeros for a
        rank that read nothing."""
        return {
            k: tuple(self._sums.get(k, (0.0, 0.0 if has_den else None))) for k, has_den in (self.names or {}).items()
        }

    def compute_torchmetrics(self) -> dict[str, float]:
        """Collective (torchmetrics all-gathers its states when torch.distributed is initialised)."""
        out = {}
        for name, m in self.torchmetrics.items():
            value = m.compute()
            if isinstance(value, Mapping):
                out.update({f"{name}/{k}": float(v) for k, v in value.items()})
            else:
                out[name] = float(value)
        return out


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def build_metrics(cfg: MetricsConfig, task: Optional[str], y_mean: Optional[float], given=None) -> Metrics:
    """metrics.builtin (the task's own), metrics.fn and metrics.torchmetrics from config, plus `given` from
    Python: a sums callable, a mapping of names to torchmetrics objects, or a list of those (in a run, what
    is handed in takes metrics.fn's place: build.Hooks.replacing; metrics.kwargs go to its callables)."""
    from .models import build_targets

    given = list(given) if isinstance(given, (list, tuple)) else [given] if given is not None else []
    sums_fns, tms = [], {}
    if cfg.builtin and task in BUILTIN:
        sums_fns.append(("dtrain", builtin_sums(task, y_mean)))
    if cfg.fn:
        fn = resolve(cfg.fn, "metrics.fn")
        sums_fns.append((cfg.fn, functools.partial(fn, **cfg.kwargs) if cfg.kwargs else fn))
    elif cfg.kwargs and not any(callable(item) and not isinstance(item, Mapping) for item in given):
        raise ConfigError("config: metrics.kwargs needs metrics.fn (or a metrics function handed in from Python)")
    for name, spec in cfg.torchmetrics.items():
        if "_target_" not in spec:
            raise ConfigError(
                f"config: metrics.torchmetrics.{name}: needs a _target_ (e.g. "
                "torchmetrics.classification:MulticlassAccuracy) and its arguments"
            )
        tms[name] = build_targets(spec, f"metrics.torchmetrics.{name}")
    for item in given:
        if isinstance(item, Mapping):
            tms.update(item)
        elif callable(item):
            sums_fns.append((describe(item), functools.partial(item, **cfg.kwargs) if cfg.kwargs else item))
        else:
            raise ConfigError(
                f"config: metrics: a {type(item).__name__} handed in from Python; give a sums "
                "callable or a dict of torchmetrics objects"
            )
    for name, m in tms.items():
        if not (hasattr(m, "update") and hasattr(m, "compute") and hasattr(m, "reset")):
            raise ConfigError(f"config: metrics: '{name}' is a {type(m).__name__}, not a torchmetrics Metric")
    return Metrics(sums_fns, tms)
