"""The engine for one process; the DDP engine only changes how the model is wrapped."""

from __future__ import annotations

import contextlib
import math

import torch

from .. import capabilities
from ..optim import config_hyperparameters


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device has fast bf16 (recent GPUs); fp32 on CPU unless asked."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def should_compile(setting, device: torch.device) -> bool:
    return device.type == "cuda" if setting == "auto" else bool(setting)


class SingleEngine:
    unsupported = staticmethod(capabilities.ddp)  # DDPEngine's too

    def __init__(self, model, make_optimizer, make_scheduler, train_cfg, dist_info, channels_last: bool = False):
        self.device, self.channels_last = dist_info.device, channels_last
        self.amp_dtype = pick_dtype(train_cfg.precision, dist_info.device)
        self.compile = should_compile(train_cfg.compile, dist_info.device)
        self.module = self.place(model)
        # what forward is called on: compiled, and wrapped by DDP in DDPEngine; weights stay in self.module
        self.model = self.compiled(self.module)
        self.optimizer = make_optimizer(self.module)
        self.scheduler = make_scheduler(self.optimizer)
        self.grad_accum = train_cfg.grad_accum
        self.clip = train_cfg.clip_grad_norm
        # fp16 needs loss scaling; the scaler also skips steps whose gradients overflowed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.nonfinite = train_cfg.nonfinite

    def place(self, model):
        """The model on the device (channels-last weights where asked): what the optimizer steps."""
        return model.to(self.device, memory_format=torch.channels_last) if self.channels_last else model.to(self.device)

    def compiled(self, model):
        return torch.compile(model) if self.compile else model

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch to the device: asynchronous from pinned memory; channels-last images for channels-last convs."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def no_backward_sync(self, is_last_micro_step: bool):
        return contextlib.nullcontext()

    def trainable_changed(self) -> None:
        """Parameters were frozen or unfrozen (requires_grad changed): nothing to do in one process."""

    def set_grad_accum(self, grad_accum: int) -> None:
        """Micro-batches per step changed (an elastic resume kept the global batch on other ranks)."""
        self.grad_accum = grad_accum

    def backward(self, loss: torch.Tensor) -> None:
        # mean over micro-batches, so accumulation of k micro-batches equals one k-times batch
        self.scaler.scale(loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> tuple[torch.Tensor, torch.Tensor | bool]:
        """Clip, step, zero, advance the schedule. -> (gradient norm before clipping, update skipped).

        `skipped` is a 0-dim device tensor (1.0: skipped) where the skip is decided on the device, so
        the caller can count skips without a host sync per step; a bool where it was decided here.
        Gradients are already all-reduced here, so a NaN/inf that began on any one rank is in every
        rank's norm and every rank makes the same skip decision without another collective."""
        self.scaler.unscale_(self.optimizer)
        # (parameters without a gradient, e.g. frozen ones, are skipped by clip_grad_norm_ itself)
        norm = self.clip_grad_norm(self.clip if self.clip is not None else float("inf"))
        skipped: torch.Tensor | bool = False
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself on overflow
            self.scaler.update()
        elif self.nonfinite == "ignore":
            self.optimizer.step()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # fused AdamW: the kernel skips the update (and its step count) where found_inf is nonzero,
            # the mechanism GradScaler uses; no host sync
            skipped = (~torch.isfinite(norm)).float()
            self.optimizer.found_inf, self.optimizer.grad_scale = skipped, None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not math.isfinite(norm.item()):  # host sync: see train.nonfinite
            skipped = True
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, skipped

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (inf: measure only) -> the total gradient norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def evaluating(self):
        """Context of an evaluation loop (FSDP gathers its parameters here); nothing to do here."""
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    # checkpoint hooks (DeepSpeed and FSDP write their own files; here everything is in state_dict())
    save_to = None  # no files of its own: the Checkpointer writes state.pt (in the background with async_save)

    def load_from(self, directory, state: dict) -> None:
        from .formats import check_engine

        check_engine(directory, state, "ddp")
        self.load_state_dict(state)

    def load_weights(self, directory, state: dict) -> None:
        self.module.load_state_dict(state["model"])

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        with config_hyperparameters(self.optimizer, self.scheduler):  # the checkpoint's state, this config's LR
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
