"""Optimizers and LR schedules, built on torch.optim and torch.optim.lr_scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on matrices and kernels only: decaying biases and norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    fused = True if params and all(p.is_cuda for p in params) else None  # fused kernel on GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """LR multiplier after `step` optimizer steps: linear warmup to 1, then constant or cosine.

    A pure function of the step (not a recursion like CosineAnnealingLR's), so it is exact after
    resume, applies to every param group relative to its own peak, and can be plotted before training.
    """
    name: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup_steps, max(self.total_steps - 1, 0))
        if step < warmup:
            return (step + 1) / warmup
        if self.name == "constant":
            return 1.0
        progress = min(step - warmup, self.total_steps - warmup) / max(self.total_steps - warmup, 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int) -> lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state (last_epoch) is checkpointed."""
    return lr_scheduler.LambdaLR(optimizer, Schedule(cfg.name, total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
