"""The engine for one process; the DDP engine only changes how the model is wrapped."""

from __future__ import annotations

import contextlib

import torch


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device has fast bf16 (recent GPUs); fp32 on CPU unless asked."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class SingleEngine:
    def __init__(self, model, optimizer, scheduler, train_cfg, dist_info):
        self.module = model.to(dist_info.device)
        self.model = self.module  # what forward is called on (DDP replaces it with its wrapper)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum = train_cfg.grad_accum
        self.clip = train_cfg.clip_grad_norm
        self.device = dist_info.device
        self.amp_dtype = pick_dtype(train_cfg.precision, dist_info.device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def no_backward_sync(self, is_last_micro_step: bool):
        return contextlib.nullcontext()

    def trainable_changed(self) -> None:
        """Parameters were frozen or unfrozen (requires_grad changed): nothing to do in one process."""

    def backward(self, loss: torch.Tensor) -> None:
        # mean over micro-batches, so accumulation of k micro-batches equals one k-times batch
        (loss / self.grad_accum).backward()

    def step(self) -> torch.Tensor:
        """Returns the gradient norm before clipping (a tensor: reading it would sync the GPU)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
