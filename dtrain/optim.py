"""Optimizers and LR schedules, built on torch.optim and torch.optim.lr_scheduler: dtrain's own (AdamW, SGD;
a LambdaLR of `Schedule`), or any other named by an import string (optim.name, schedule.name) or handed
in from Python as a factory; and how their state resumes under this run's config (config_hyperparameters,
set_schedule_length), which the engines' load_state_dict use."""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.optim import lr_scheduler

from .config import OPTIMIZERS, SCHEDULES, ConfigError, OptimConfig, ScheduleConfig
from .importing import describe, resolve


def build_optimizer(
    cfg: OptimConfig,
    model: torch.nn.Module,
    lr_scales: Optional[dict[str, float]] = None,
    param_groups: Optional[Callable] = None,
    factory: Optional[Callable] = None,
) -> torch.optim.Optimizer:
    """Param groups by name prefix (`lr_scales`, e.g. {"head": 1.0, "": 0.1}: the first matching prefix sets
    the group's peak LR as a fraction of cfg.lr), each split into decayed and undecayed parameters; or a
    user's `param_groups(model)` (torch's format: {"params", optional "lr", "weight_decay"}; the defaults
    are optim.lr and optim.weight_decay).

    Frozen parameters (requires_grad=False) are included: they get no gradient, so the optimizer skips them
    and they stay bit-identical, and unfreezing later needs no new optimizer. Weight decay on matrices and
    kernels only: decaying biases and norm gains only hurts.

    The groups go to dtrain's AdamW or SGD, or to `factory(groups)` (handed in from Python), or to
    optim.name's class or factory with optim.kwargs."""
    _refuse_built(
        "optimizer",
        factory,
        "torch.optim.RAdam",
        "the param groups once the engine has placed the parameters (FSDP shards them)",
    )
    _refuse_kwargs("optim", cfg.kwargs, factory)
    if factory is not None and cfg.own_keys_set():  # the config was checked with its own optim.name
        raise ConfigError(
            f"config: optim.{cfg.own_keys_set()[0]} applies to sgd and adamw, not to the optimizer "
            f"handed in from Python ({describe(factory)}); pass it to that optimizer"
        )
    if param_groups is not None:
        if lr_scales:
            raise ConfigError(
                "config: optim.backbone_lr_ratio and param groups handed in from Python are both "
                "set; put the backbone's LR into your param groups"
            )
        return _make(cfg, _user_groups(cfg, model, param_groups), factory)
    lr_scales = lr_scales or {"": 1.0}
    named: dict[str, list] = {prefix: [] for prefix in lr_scales}
    for name, p in model.named_parameters():
        prefix = next(pre for pre in lr_scales if name == pre or name.startswith(pre + ".") or pre == "")
        named[prefix].append(p)
    groups = []
    for prefix, params in named.items():
        lr = cfg.lr * lr_scales[prefix]
        groups += [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr},
        ]
    return _make(cfg, [g for g in groups if g["params"]], factory)


def _user_groups(cfg: OptimConfig, model: torch.nn.Module, param_groups: Callable) -> list[dict]:
    groups = param_groups(model)
    if isinstance(groups, dict) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise ConfigError("config: param_groups: return a list of dicts with 'params' (torch's param groups)")
    groups = [{"lr": cfg.lr, "weight_decay": cfg.weight_decay, **g, "params": list(g["params"])} for g in groups]
    owned = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in owned]
    if missing:  # a parameter in no group would never train, silently
        raise ConfigError(
            f"config: param_groups: {len(missing)} parameters are in no group ({missing[0]}, ...); "
            "put every parameter in one"
        )
    return groups


def _refuse_built(what: str, factory: Any, example: str, called_with: str) -> None:
    """An optimizer or scheduler handed in already built would be over tensors the engine may replace, and a
    resume could not build it again: a factory is called at the right moment."""
    if factory is not None and (
        not callable(factory) or isinstance(factory, (torch.optim.Optimizer, lr_scheduler.LRScheduler))
    ):
        raise ConfigError(
            f"config: {what}: hand in a factory, not a built {type(factory).__name__} (its class, e.g. "
            f"{example}, or a functools.partial of it): dtrain calls it with {called_with}"
        )


def _refuse_kwargs(section: str, kwargs: dict, factory: Any) -> None:
    """A factory handed in from Python brings its own arguments; the config's are for the name it replaces."""
    if factory is not None and kwargs:
        raise ConfigError(
            f"config: {section}.kwargs is for {section}.name, which the {describe(factory)} handed in "
            "from Python replaces; bind its arguments in Python (functools.partial)"
        )


def _make(cfg: OptimConfig, groups: list[dict], factory: Optional[Callable] = None) -> torch.optim.Optimizer:
    if factory is not None or cfg.name not in OPTIMIZERS:
        make = factory or resolve(cfg.name, "optim.name")
        optimizer = make(groups, **cfg.kwargs)  # the user's code: an error in it keeps its traceback
        if not isinstance(optimizer, torch.optim.Optimizer):
            key = "optimizer" if factory is not None else "optim.name"
            raise ConfigError(
                f"config: {key}: {describe(make)} returned a {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer
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
    if cfg.name not in SCHEDULES:
        raise ConfigError(
            f"config: schedule.name: {cfg.name} is not one of dtrain's schedules, which alone are drawn "
            "before training; its LR is logged as it trains (dtrain plot RUN_DIR)"
        )
    return Schedule(
        cfg.name,
        total_steps,
        cfg.warmup_steps,
        cfg.min_lr_ratio,
        cfg.every,
        cfg.gamma,
        cfg.restart_every,
        cfg.restart_mult,
    )


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int, factory: Optional[Callable] = None
) -> Any:
    """Stepped once per optimizer step; its state is checkpointed. dtrain's own: a LambdaLR of the Schedule
    (its last_epoch is the step). Another: `factory(optimizer, ...)` (handed in from Python) or schedule.name's
    class or factory, with schedule.kwargs and the arguments of `filled`."""
    _refuse_built("scheduler", factory, "torch.optim.lr_scheduler.OneCycleLR", "the optimizer the engine built")
    _refuse_kwargs("schedule", cfg.kwargs, factory)
    if factory is None and cfg.name in SCHEDULES:
        return lr_scheduler.LambdaLR(optimizer, build_schedule(cfg, total_steps))
    if factory is not None and cfg.own_keys_set():  # the config was checked with its own schedule.name
        raise ConfigError(
            f"config: schedule.{cfg.own_keys_set()[0]} applies to dtrain's own schedules, not to the "
            f"scheduler handed in from Python ({describe(factory)}); leave it unset"
        )
    make = factory or resolve(cfg.name, "schedule.name")
    scheduler = make(optimizer, **filled(make, cfg.kwargs, optimizer, total_steps), **cfg.kwargs)
    key, step = "scheduler" if factory is not None else "schedule.name", getattr(scheduler, "step", None)
    if not (callable(step) and hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict")):
        raise ConfigError(
            f"config: {key}: {describe(make)} returned a {type(scheduler).__name__}, not an LR "
            "scheduler (step, state_dict, load_state_dict)"
        )
    if _needs_argument(step):  # ReduceLROnPlateau.step(metrics)
        raise ConfigError(
            f"config: {key}: {type(scheduler).__name__}.step() needs an argument (a metric), and "
            "dtrain steps the scheduler once per optimizer step without one; use a scheduler "
            "stepped by the step count (e.g. torch.optim.lr_scheduler:OneCycleLR, CosineAnnealingLR)"
        )
    return scheduler


# Arguments dtrain fills in when a scheduler's signature names them and schedule.kwargs doesn't set them (nor,
# for the length, OneCycleLR's other way to give it: epochs and steps_per_epoch).
LENGTHS = ("total_steps", "T_max")


def filled(make: Callable, kwargs: dict, optimizer: torch.optim.Optimizer, total_steps: int) -> dict:
    """{total_steps, T_max: the run's optimizer steps; max_lr: each param group's peak LR (so
    optim.backbone_lr_ratio and param groups hold under OneCycleLR)}, those that `make` names."""
    try:
        names = inspect.signature(make).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing filled
        return {}
    given = set(kwargs)
    fills: dict[str, Any] = {}
    if not given & {*LENGTHS, "epochs", "steps_per_epoch"}:
        fills.update({name: total_steps for name in LENGTHS if name in names})
    if "max_lr" in names and "max_lr" not in given:
        fills["max_lr"] = [group["lr"] for group in optimizer.param_groups]
    return fills


def _needs_argument(method: Callable) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def rebuilt_from_config(scheduler: Any) -> bool:
    """dtrain's own schedule: a pure function of the step, rebuilt from the config at resume (the step count
    alone comes from the checkpoint); any other scheduler's state comes from the checkpoint whole."""
    return isinstance(scheduler, lr_scheduler.LambdaLR) and all(isinstance(fn, Schedule) for fn in scheduler.lr_lambdas)


@contextlib.contextmanager
def config_hyperparameters(optimizer, scheduler):
    """Load an optimizer's and its LambdaLR's state from a checkpoint inside this block, and keep the
    hyperparameters of this run's config: torch restores the param groups (lr, initial_lr, weight decay,
    betas...) and the schedule (base_lrs, the Schedule's fields, e.g. total_steps) from the checkpoint,
    which would silently undo a changed optim.lr, schedule.* or train.epochs. The step count and the
    optimizer's moments stay the checkpoint's; the LR is recomputed at that step, as LambdaLR does, so an
    unchanged config resumes bit for bit.

    Any other scheduler (schedule.name an import string) keeps the checkpoint's state whole, and the
    optimizer's param groups too (their LR is that scheduler's, and OneCycleLR cycles the betas): it can't
    be recomputed at a step in general (torch's chainable schedulers are recursions), so the keys that
    would change it are fixed at resume instead (resume.OWN_SCHEDULER)."""
    if not rebuilt_from_config(scheduler):
        yield
        return
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    schedules = [dict(vars(fn)) for fn in scheduler.lr_lambdas]
    yield
    scheduler.base_lrs = base_lrs
    for fn, fields in zip(scheduler.lr_lambdas, schedules, strict=True):
        vars(fn).update(fields)  # as LambdaLR.load_state_dict does (Schedule is a frozen dataclass)
    for group, fresh in zip(optimizer.param_groups, groups, strict=True):
        group.update(fresh)
    _lr_at_this_step(optimizer, scheduler)


def set_schedule_length(optimizer, scheduler, total_steps: int) -> None:
    """Let the schedule span `total_steps`: an elastic resume settles the epoch length (the checkpoint's)
    after the engine built the schedule from this run's own. Any other scheduler has the checkpoint's state,
    its length included, loaded before (the engine is restored before the data position), and the run's
    length cannot change at resume (resume.OWN_SCHEDULER): the checkpoint's epoch length gives the same one."""
    if not rebuilt_from_config(scheduler):
        return
    for fn in scheduler.lr_lambdas:
        vars(fn)["total_steps"] = total_steps  # Schedule is a frozen dataclass
    _lr_at_this_step(optimizer, scheduler)


def _lr_at_this_step(optimizer, scheduler) -> None:
    """Each group's LR at the scheduler's step, computed as LambdaLR computes it."""
    for group, base_lr, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
