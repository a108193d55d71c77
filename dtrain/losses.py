"""Losses and evaluation metrics by task."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ConfigError


def _squeeze(pred: torch.Tensor) -> torch.Tensor:
    return pred.squeeze(-1) if pred.dim() > 1 and pred.shape[-1] == 1 else pred


LOSSES = {
    "mse": lambda pred, y: F.mse_loss(_squeeze(pred), y),
    "mae": lambda pred, y: F.l1_loss(_squeeze(pred), y),
    "cross_entropy": lambda pred, y: F.cross_entropy(pred, y),
}


def build_loss(cfg, task: str):
    name = cfg.name if cfg.name != "auto" else ("cross_entropy" if task == "classification" else "mse")
    if task == "regression" and name == "cross_entropy":
        raise ConfigError("config: loss.name: cross_entropy needs a classification data set")
    if task == "classification" and name != "cross_entropy":
        raise ConfigError(f"config: loss.name: {name} needs a regression data set")
    return LOSSES[name]


METRICS = {"classification": ["acc"], "regression": ["mae", "mse", "mae_predict_mean"]}


def metric_sums(pred: torch.Tensor, y: torch.Tensor, task: str, y_mean: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-batch sums (not means), so they can be added over batches and ranks exactly.
    Regression also scores the baseline that always predicts the training mean."""
    if task == "classification":
        return {"acc": (pred.argmax(-1) == y).sum().float()}
    err = _squeeze(pred).float() - y
    return {"mae": err.abs().sum(), "mse": (err * err).sum(), "mae_predict_mean": (y - y_mean).abs().sum()}
