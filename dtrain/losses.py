"""Losses and evaluation metrics by task."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ConfigError


def _squeeze(pred: torch.Tensor) -> torch.Tensor:
    return pred.squeeze(-1) if pred.dim() > 1 and pred.shape[-1] == 1 else pred


TERMS = {
    "mse": lambda pred, y, cfg: F.mse_loss(_squeeze(pred), y),
    "mae": lambda pred, y, cfg: F.l1_loss(_squeeze(pred), y),
    "huber": lambda pred, y, cfg: F.huber_loss(_squeeze(pred), y, delta=cfg.huber_delta),
    "cross_entropy": lambda pred, y, cfg: F.cross_entropy(pred, y, label_smoothing=cfg.label_smoothing),
}
CLASSIFICATION_TERMS = {"cross_entropy"}


class Loss:
    """`loss(pred, y)` -> {"loss": weighted total, "loss/<term>": each term when there are several}.
    Each value is a batch mean; the trainer backpropagates "loss" and logs them all."""

    def __init__(self, weights: dict[str, float], cfg):
        self.weights, self.cfg = weights, cfg
        self.names = ["loss"] + ([f"loss/{t}" for t in weights] if len(weights) > 1 else [])

    def __call__(self, pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {t: TERMS[t](pred, y, self.cfg) for t in self.weights}
        total = sum(w * terms[t] for t, w in self.weights.items())
        if len(terms) == 1:
            return {"loss": total}
        return {"loss": total, **{f"loss/{t}": v for t, v in terms.items()}}


def build_loss(cfg, task: str) -> Loss:
    if cfg.terms:
        if cfg.name != "auto":
            raise ConfigError(f"config: loss.name ({cfg.name}) and loss.terms are both set; "
                              "put every loss into loss.terms")
        if not any(w > 0 for w in cfg.terms.values()) or any(w < 0 for w in cfg.terms.values()):
            raise ConfigError("config: loss.terms: weights must be >= 0 and at least one > 0")
        weights = dict(cfg.terms)
    else:
        name = cfg.name if cfg.name != "auto" else ("cross_entropy" if task == "classification" else "mse")
        weights = {name: 1.0}
    for name in weights:
        key = "loss.terms" if cfg.terms else "loss.name"
        if task == "regression" and name in CLASSIFICATION_TERMS:
            raise ConfigError(f"config: {key}: {name} needs a classification data set")
        if task == "classification" and name not in CLASSIFICATION_TERMS:
            raise ConfigError(f"config: {key}: {name} needs a regression data set")
    return Loss(weights, cfg)


METRICS = {"classification": ["acc"], "regression": ["mae", "mse", "mae_predict_mean"]}


def metric_sums(pred: torch.Tensor, y: torch.Tensor, task: str, y_mean: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-batch sums (not means), so they can be added over batches and ranks exactly.
    Regression also scores the baseline that always predicts the training mean."""
    if task == "classification":
        return {"acc": (pred.argmax(-1) == y).sum().float()}
    err = _squeeze(pred).float() - y
    return {"mae": err.abs().sum(), "mse": (err * err).sum(), "mae_predict_mean": (y - y_mean).abs().sum()}


@torch.inference_mode()
def confusion_matrix(model: torch.nn.Module, batches, num_classes: int, device: torch.device) -> torch.Tensor:
    """[true class, predicted class] counts over `batches` (a ShardStream), model in eval mode."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y, _ in batches.epoch(0):
        pred = model(x.to(device)).argmax(-1).cpu()
        cm += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    model.train(was_training)
    return cm
