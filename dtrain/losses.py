"""Losses: `loss(output, batch)` -> {"loss": the total to backpropagate, "loss/<term>": each named term}.

dtrain's own (MSE, MAE, Huber, cross-entropy with label smoothing, a weighted sum of them) take the model
output's logits and the batch's target; a user's (loss.fn, or handed in from Python) takes the output and
the batch as they are and returns a scalar or a dict of named terms. The trainer sees one interface.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .batch import logits, target
from .config import ConfigError, LossConfig
from .importing import describe, resolve


def _squeeze(pred: torch.Tensor) -> torch.Tensor:
    return pred.squeeze(-1) if pred.dim() > 1 and pred.shape[-1] == 1 else pred


TERMS = {
    "mse": lambda pred, y, cfg: F.mse_loss(_squeeze(pred), y),
    "mae": lambda pred, y, cfg: F.l1_loss(_squeeze(pred), y),
    "huber": lambda pred, y, cfg: F.huber_loss(_squeeze(pred), y, delta=cfg.huber_delta),
    # logits [B, C] for classification, [B, T, V] for language modelling (mean over all tokens)
    "cross_entropy": lambda pred, y, cfg: F.cross_entropy(
        pred.flatten(0, -2), y.flatten(), label_smoothing=cfg.label_smoothing
    ),
}
CLASSIFICATION_TERMS = {"cross_entropy"}


def check_shapes(output, batch, task: Optional[str], num_outputs: Optional[int]) -> None:
    """A one-line ConfigError where dtrain's built-in losses and metrics can't score the model's output
    against the batch's target (checked on the probe's batch, before training). torch broadcasts an MSE of
    [B, 10] against [B] with a warning only: a wrong loss, exit 0. A cross-entropy over fewer class scores
    than the data has classes fails at the first label out of range, some step later."""
    pred, y = logits(output), target(batch)
    out, per = tuple(pred.shape[1:]), tuple(y.shape[1:])
    fix = "(a model factory's `num_outputs` parameter is given it, unless model.kwargs sets one), or set loss.fn"
    if task == "regression" and _squeeze(pred).shape != y.shape:
        raise ConfigError(
            f"config: loss: the model's output has shape {out} per sample, the target y {per} "
            f"({math.prod(per)} value{'s' * (math.prod(per) != 1)}), which the built-in loss would "
            f"broadcast: build the model with {math.prod(per)} output{'s' * (math.prod(per) != 1)} "
            f"for this regression {fix}"
        )
    if task in ("classification", "lm"):
        if pred.dim() != y.dim() + 1 or pred.shape[:-1] != y.shape:
            raise ConfigError(
                f"config: loss: the model's output has shape {out} per sample, the target y {per}: "
                f"cross-entropy takes a score per class ({per + ('classes',)}) for labels of shape "
                f"{per}: make the model's output that shape, or set loss.fn"
            )
        if num_outputs and pred.shape[-1] < num_outputs:
            raise ConfigError(
                f"config: loss: the model gives {pred.shape[-1]} class scores per "
                f"{'token' if task == 'lm' else 'sample'}, the data has {num_outputs} classes "
                f"(data.num_classes): build the model with {num_outputs} outputs {fix}"
            )


class Loss:
    """dtrain's losses on the output's logits and the batch's target. Each value is a batch mean."""

    def __init__(self, weights: dict[str, float], cfg: LossConfig):
        self.weights, self.cfg = weights, cfg
        self.names = ["loss"] + ([f"loss/{t}" for t in weights] if len(weights) > 1 else [])

    def __call__(self, output, batch) -> dict[str, torch.Tensor]:
        return self.of(logits(output), target(batch))

    def of(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {t: TERMS[t](pred.float(), y, self.cfg) for t in self.weights}
        if len(terms) == 1:  # one term (weight 1 unless set): no 0 + w * term, two autograd ops a step
            ((t, w),) = self.weights.items()
            return {"loss": terms[t] if w == 1 else w * terms[t]}
        total = sum(w * terms[t] for t, w in self.weights.items())
        return {"loss": total, **{f"loss/{t}": v for t, v in terms.items()}}


class UserLoss:
    """A user's `loss(output, batch)`: a scalar tensor, or a dict of named scalar terms. What is
    backpropagated is the dict's "loss" entry, else the sum of its terms; each term is logged as loss/<name>.
    The names are fixed by the first call (the probe before training), so every rank reduces the same vector."""

    def __init__(self, fn: Callable, source: str):
        self.fn, self.source = fn, source
        self.names: Optional[list[str]] = None

    def __call__(self, output, batch) -> dict[str, torch.Tensor]:
        out = self.fn(output, batch)
        if isinstance(out, torch.Tensor):
            losses = {"loss": self._scalar(out, "")}
        elif isinstance(out, Mapping) and out:
            terms = {str(k): self._scalar(v, f" as '{k}'") for k, v in out.items()}
            total = terms.pop("loss") if "loss" in terms else sum(terms.values())
            losses = {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}
        else:
            raise ConfigError(
                f"config: loss.fn: {self.source} returned {_what(out)}, not a scalar tensor or a dict of them"
            )
        if self.names is None:
            self.names = list(losses)
        elif list(losses) != self.names:
            raise ConfigError(
                f"config: loss.fn: {self.source} returned the terms {list(losses)} after "
                f"{self.names}; return the same terms every time"
            )
        return losses

    def _scalar(self, value, where: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            raise ConfigError(
                f"config: loss.fn: {self.source} returned {_what(value)}{where}, not a scalar "
                "floating-point tensor (reduce it, e.g. with .mean())"
            )
        return value.reshape(())


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def build_loss(cfg: LossConfig, task: Optional[str], given: Optional[Callable] = None):
    """`given` (handed in from Python), else loss.fn (an import string), else dtrain's own for the task."""
    if given is not None or cfg.fn:
        if cfg.terms or cfg.name != "auto":
            raise ConfigError(
                "config: loss.fn (or a loss handed in from Python) and loss.name/loss.terms are both set; use one"
            )
        fn = given if given is not None else resolve(cfg.fn, "loss.fn")
        source = describe(given) if given is not None else cfg.fn
        return UserLoss(functools.partial(fn, **cfg.kwargs) if cfg.kwargs else fn, source)
    if cfg.kwargs:
        raise ConfigError(
            "config: loss.kwargs needs loss.fn (the built-in losses take loss.huber_delta and loss.label_smoothing)"
        )
    if task not in ("classification", "regression", "lm"):
        raise ConfigError(f"config: loss: dtrain has no built-in loss for this data set (task {task}); set loss.fn")
    if cfg.terms:
        if cfg.name != "auto":
            raise ConfigError(
                f"config: loss.name ({cfg.name}) and loss.terms are both set; put every loss into loss.terms"
            )
        if not any(w > 0 for w in cfg.terms.values()) or any(w < 0 for w in cfg.terms.values()):
            raise ConfigError("config: loss.terms: weights must be >= 0 and at least one > 0")
        weights = dict(cfg.terms)
    else:
        name = cfg.name if cfg.name != "auto" else ("mse" if task == "regression" else "cross_entropy")
        weights = {name: 1.0}
    for name in weights:
        key = "loss.terms" if cfg.terms else "loss.name"
        if task == "regression" and name in CLASSIFICATION_TERMS:
            raise ConfigError(f"config: {key}: {name} needs a classification data set")
        if task in ("classification", "lm") and name not in CLASSIFICATION_TERMS:
            raise ConfigError(f"config: {key}: {name} needs a regression data set")
    return Loss(weights, cfg)
