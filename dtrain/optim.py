"""Optimizers and LR schedules, built on torch.optim and torch.optim.lr_scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.optim import lr_scheduler

from .config import ConfigError, OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, lr_scales: Optional[dict[str, float]] = None,
                    param_groups: Optional[Callable] = None) -> torch.optim.Optimizer:
    """Param groups by name prefix (`lr_scales`, e.g. {"head": 1.0, "": 0.1}: the first matching prefix sets
    the group's peak LR as a fraction of cfg.lr), each split into decayed and undecayed parameters; or a
    user's `param_groups(model)` (torch's format: {"params", optional "lr", "weight_decay"}; the defaults
    are optim.lr and optim.weight_decay).

    Frozen parameters (requires_grad=False) are included: they get no gradient, so the optimizer skips them
    and they stay bit-identical, and unfreezing later needs no new optimizer. Weight decay on matrices and
    kernels only: decaying biases and norm gains only hurts."""
    if param_groups is not None:
        if lr_scales:
            raise ConfigError("config: optim.backbone_lr_ratio and param groups handed in from Python are both "
                              "set; put the backbone's LR into your param groups")
        return _make(cfg, _user_groups(cfg, model, param_groups))
    lr_scales = lr_scales or {"": 1.0}
    named: dict[str, list] = {prefix: [] for prefix in lr_scales}
    for name, p in model.named_parameters():
        prefix = next(pre for pre in lr_scales if name == pre or name.startswith(pre + ".") or pre == "")
        named[prefix].append(p)
    groups = []
    for prefix, params in named.items():
        lr = cfg.lr * lr_scales[prefix]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
    return _make(cfg, [g for g in groups if g["params"]])


def _user_groups(cfg: OptimConfig, model: torch.nn.Module, param_groups: Callable) -> list[dict]:
    groups = param_groups(model)
    if isinstance(groups, dict) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise ConfigError("config: param_groups: return a list of dicts with 'params' (torch's param groups)")
    groups = [{"lr": cfg.lr, "weight_decay": cfg.weight_decay, **g, "params": list(g["params"])} for g in groups]
    owned = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in owned]
    if missing:  # a parameter in no group would never train, silently
        raise ConfigError(f"config: param_groups: {len(missing)} parameters are in no group ({missing[0]}, ...); "
                          "put every parameter in one")
    return groups


def _make(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    params = [p for g in groups for p in g["params"]]
    fused = _fused_kernel_fits(params) if cfg.fused == "auto" else cfg.fused
    fused = fused or None  # None: torch's default kernel (foreach on GPU, a loop over tensors on CPU)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def _fused_kernel_fits(params: list) -> bool:
    """optim.fused=auto: torch's fused AdamW where it has the kernel for every parameter: floating point on
    GPU or CPU. On CPU too, where torch's default is a Python loop over the tensors: a training step of the
    digits MLP (batch 64, forward, backward, clipping, AdamW; one thread) measured 1.08 ms fused vs 1.33 ms."""
    return bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


@dataclass(frozen=True)
class Schedule:
    """LR multiplier after `step` optimizer steps: linear warmup to 1, then one of

      constant          1
      step              gamma ** floor(t / every)
      exponential       gamma ** (t / every)
      cosine            min + (1 - min) * (1 + cos(pi * t / T)) / 2          T = total_steps - warmup
      cosine_restarts   the same within each cycle: t, T = position in and length of the current cycle,
                        cycles of restart_every * restart_mult**i steps

    with t = step - warmup_steps. A pure function of the step (not a recursion like CosineAnnealingLR's),
    so it is exact after resume, applies to every param group relative to its own peak, and can be
    plotted before training.
    """
    name: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    every: int = 100
    gamma: float = 0.5
    restart_every: int = 100
    restart_mult: int = 1

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup_steps, max(self.total_steps - 1, 0))
        if step < warmup:
            return (step + 1) / warmup
        t = step - warmup
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.gamma ** (t // self.every)
        if self.name == "exponential":
            return self.gamma ** (t / self.every)
        if self.name == "cosine":
            length = max(self.total_steps - warmup, 1)
            return self._cosine(min(t, length) / length)
        if self.name == "cosine_restarts":
            start, length = self.cycle(t)
            return self._cosine((t - start) / length)
        raise ValueError(f"unknown schedule {self.name!r}")

    def cycle(self, t: int) -> tuple[int, int]:
        """(first step, length) of the warm-restart cycle holding post-warmup step t."""
        if self.restart_mult == 1:  # periodic
            return t - t % self.restart_every, self.restart_every
        start, length = 0, self.restart_every
        while t >= start + length:  # cycles grow geometrically: about log(t) iterations
            start, length = start + length, length * self.restart_mult
        return start, length

    def _cosine(self, progress: float) -> float:
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(cfg: ScheduleConfig, total_steps: int) -> Schedule:
    return Schedule(cfg.name, total_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.every, cfg.gamma,
                    cfg.restart_every, cfg.restart_mult)


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state (last_epoch) is checkpointed."""
    return lr_scheduler.LambdaLR(optimizer, build_schedule(cfg, total_steps))
