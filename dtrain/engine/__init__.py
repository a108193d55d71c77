"""One small interface over how gradients are reduced and the optimizer is stepped.

  module              the bare model (evaluate, save and load it)
  autocast()          mixed-precision context for forward + loss
  no_backward_sync(last)  skip the gradient all-reduce on non-final micro-steps
  backward(loss)      loss.backward(), scaled for accumulation
  step()              clip, optimizer.step, zero_grad, scheduler.step -> grad norm
  trainable_changed() parameters were frozen or unfrozen (DDP re-wraps the model)
  state_dict()/load_state_dict()

`SingleEngine` runs one process; `DDPEngine` wraps the model in DistributedDataParallel.
The trainer never asks which one it has.
"""

from __future__ import annotations

from .single import SingleEngine


def build_engine(model, optimizer, scheduler, train_cfg, dist_info):
    if dist_info.distributed:
        from .ddp import DDPEngine
        return DDPEngine(model, optimizer, scheduler, train_cfg, dist_info)
    return SingleEngine(model, optimizer, scheduler, train_cfg, dist_info)


__all__ = ["build_engine", "SingleEngine"]
