"""PyTorch DistributedDataParallel: gradients all-reduced (averaged) during backward."""

from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel

from .single import SingleEngine


class DDPEngine(SingleEngine):
    def __init__(self, model, make_optimizer, make_scheduler, train_cfg, dist_info, channels_last: bool = False):
        super().__init__(model, make_optimizer, make_scheduler, train_cfg, dist_info, channels_last)
        self.device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers here, so all replicas start identical.
        # compile the DDP wrapper (not the bare module), so DDP's bucketed all-reduce overlaps the compiled backward
        self.model = self.compiled(DistributedDataParallel(self.module, device_ids=self.device_ids))

    def trainable_changed(self) -> None:
        # DDP fixes the set of parameters it all-reduces (those requiring grad) when it wraps the model,
        # so a freeze or unfreeze needs a new wrapper. Every rank does this at the same step.
        self.model = self.compiled(DistributedDataParallel(self.module, device_ids=self.device_ids))

    def no_backward_sync(self, is_last_micro_step: bool):
        # DDP's own mechanism: gradients accumulate locally and are all-reduced once, on the last
        # micro-step (never flip DDP's private require_backward_grad_sync flag by hand).
        return contextlib.nullcontext() if is_last_micro_step else self.model.no_sync()
