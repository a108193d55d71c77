"""One small interface over how gradients are reduced and the optimizer is stepped.

  module              the bare model (evaluate, save and load it)
  to_device(x)        a batch to the device (non-blocking; channels-last images when asked)
  autocast()          mixed-precision context for forward + loss
  no_backward_sync(last)  skip the gradient all-reduce on non-final micro-steps
  backward(loss)      loss.backward(), scaled for accumulation
  step()              clip, optimizer.step, zero_grad, scheduler.step -> grad norm
  trainable_changed() parameters were frozen or unfrozen (DDP re-wraps the model)
  set_grad_accum(n)   micro-batches per step changed (elastic resume on another number of ranks)
  evaluating()        context for an evaluation loop, whose ranks run uneven numbers of batches (FSDP
                      gathers the parameters once instead of in every forward)
  state_dict()        what rank 0 puts in state.pt (DDP: everything; DeepSpeed, FSDP: what their files lack)
  save_to(dir, background, group), load_from(dir, state), load_weights(dir, state)
                      checkpoint hooks: files the engine writes itself into the checkpoint directory
                      (DeepSpeed's ZeRO shards, FSDP's DCP shards; none for DDP: save_to is None), full
                      resume, and weights only (test). With `background`, save_to may return a future for
                      writes it goes on with (DCP's async_save), coordinated on the gloo `group`.
                      DDP's state is replicated and FSDP's resharded by DCP: both resume on any number
                      of ranks; ZeRO's only on the same number

`SingleEngine` runs one process; `DDPEngine` wraps the model in DistributedDataParallel;
`DeepSpeedEngine` (train.engine=deepspeed) hands model, optimizer and schedule to DeepSpeed ZeRO;
`FSDPEngine` (train.engine=fsdp) shards them with FSDP2's fully_shard. The trainer never asks which one it has.
Each satisfies `Engine` below and declares, as `unsupported(cfg)`, the settings it can't honour
(dtrain/capabilities.py, which config validation asks without importing torch or an engine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable
    from pathlib import Path

    import torch

    from ..config import DeepSpeedConfig, FSDPConfig, TrainConfig

# Nothing here imports torch: each engine is loaded when it is first asked for.


@runtime_checkable
class Engine(Protocol):
    """The contract the trainer, evaluator and checkpointer rely on (see the module docstring for each part).
    `unsupported(cfg)` is the engine's own list of settings it can't honour, one line each, asked by config
    validation (dtrain/capabilities.py, without importing the engine) before anything starts."""

    unsupported: ClassVar[Callable[[Any], list[str]]]
    module: torch.nn.Module
    model: Any  # what forward is called on (compiled, DDP- or DeepSpeed-wrapped)
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    save_to: Any  # None (no files of its own) or a method (directory, background, group) -> future | None

    @property
    def lr(self) -> float: ...
    def to_device(self, x: torch.Tensor) -> torch.Tensor: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def no_backward_sync(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> tuple[torch.Tensor, Any]: ...
    def trainable_changed(self) -> None: ...
    def set_grad_accum(self, grad_accum: int) -> None: ...
    def evaluating(self) -> contextlib.AbstractContextManager: ...
    def state_dict(self) -> dict: ...
    def load_from(self, directory: Path, state: dict) -> None: ...
    def load_weights(self, directory: Path, state: dict) -> None: ...


def build_engine(
    model,
    make_optimizer,
    make_scheduler,
    train_cfg: TrainConfig,
    dist_info,
    ds_cfg: DeepSpeedConfig | None = None,
    micro_batch_size: int = 1,
    channels_last: bool = False,
    fsdp_cfg: FSDPConfig | None = None,
    log=print,
) -> Engine:
    """`make_optimizer(module)` and `make_scheduler(optimizer)` are called by the engine once the model is
    where its parameters will live (an engine that shards parameters must build the optimizer over the
    shards, not over the full tensors). `log` (rank 0's) says once how FSDP sharded the model."""
    if train_cfg.engine == "fsdp":
        from .fsdp import FSDPEngine

        return FSDPEngine(model, make_optimizer, make_scheduler, train_cfg, dist_info, fsdp_cfg, channels_last, log)
    if train_cfg.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, make_optimizer, make_scheduler, train_cfg, dist_info, ds_cfg, micro_batch_size)
    if dist_info.distributed:
        from .ddp import DDPEngine

        return DDPEngine(model, make_optimizer, make_scheduler, train_cfg, dist_info, channels_last)
    from .single import SingleEngine

    return SingleEngine(model, make_optimizer, make_scheduler, train_cfg, dist_info, channels_last)


def model_weights(directory, engine_state: dict) -> dict:
    """A plain state dict of the model from a checkpoint's engine state, whichever engine wrote it (in
    this process alone: no process group needed)."""
    from .formats import written_by_engine

    wrote = written_by_engine(engine_state)
    if wrote == "fsdp":
        from .fsdp import consolidated_state_dict

        return consolidated_state_dict(directory, engine_state)
    if wrote == "deepspeed":
        from .deepspeed import consolidated_state_dict

        return consolidated_state_dict(directory, engine_state)
    return engine_state["model"]


def __getattr__(name: str):
    # the engines import torch: loaded when first asked for, so that importing this package stays light
    if name in ("check_engine", "written_by_engine"):
        from . import formats

        return getattr(formats, name)
    if name == "SingleEngine":
        from .single import SingleEngine

        return SingleEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "build_engine", "check_engine", "model_weights", "written_by_engine", "SingleEngine"]
