"""DeepSpeed ZeRO (stages 1-3, optional CPU offload) behind the same interface as DDP.

dtrain builds the optimizer and its schedule as for DDP (its own AdamW/SGD and LambdaLR, or any torch optimizer
and scheduler: optim.name, schedule.name) and hands both to `deepspeed.initialize` as client objects (ZeRO
wraps any torch optimizer: zero_allow_untested_optimizer); DeepSpeed then owns what it must own to shard them:

- accumulation: `gradient_accumulation_steps = train.grad_accum`. `engine.backward` divides the loss
  by it (so this class does not, unlike SingleEngine.backward), and the accumulation boundary is set
  explicitly per micro-batch from the trainer's `no_backward_sync(is_last)` with
  `set_gradient_accumulation_boundary` (DeepSpeed's documented way to call `step()` once after all
  micro-batches). We don't rely on DeepSpeed's internal micro-step counter, so a resumed run can't
  drift off the trainer's grouping.
- clipping: `gradient_clipping = train.clip_grad_norm`, done by DeepSpeed on the (partitioned)
  gradients; the norm it measured is what `step()` returns.
- schedule: DeepSpeed calls the client scheduler's `step()` after each applied update, so it is not
  stepped here again.
- checkpoints: `save_checkpoint` writes every rank's ZeRO shards into dtrain's temporary checkpoint
  directory (tag `deepspeed/`), which the Checkpointer then checksums, renames and points at as for DDP.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch

from ..config import ConfigError
from .. import capabilities
from ..optim import config_hyperparameters
from .single import pick_dtype

TAG = "deepspeed"  # the sub-directory of a dtrain checkpoint that holds DeepSpeed's own files


def import_deepspeed(device: torch.device | None = None):
    """`deepspeed`, or a one-line ConfigError that says how to install it."""
    if device is not None and device.type == "cpu":
        # DeepSpeed picks its accelerator when first imported; on a CPU-only machine say so rather than
        # let it probe for CUDA (and it then uses gloo for its collectives).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"train.engine=deepspeed needs DeepSpeed, which is not installed ({e}); "
            "pip install 'dtrain[deepspeed]' or use train.engine=ddp"
        ) from None
    return deepspeed


def build_ds_config(train_cfg, ds_cfg, micro_batch_size: int, device: torch.device) -> dict:
    dtype = pick_dtype(train_cfg.precision, device)
    zero: dict = {"stage": ds_cfg.zero_stage}
    if ds_cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds_cfg.offload_optimizer}
    if ds_cfg.offload_param != "none":
        zero["offload_param"] = {"device": ds_cfg.offload_param}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": train_cfg.clip_grad_norm or 0.0,  # 0: DeepSpeed does not clip
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},  # dynamic loss scaling, DeepSpeed's own
        # dtrain's own AdamW/SGD, also with offload (DeepSpeedCPUAdam would change the numerics)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # dtrain logs
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    unsupported = staticmethod(capabilities.deepspeed)

    def __init__(self, model, make_optimizer, make_scheduler, train_cfg, dist_info, ds_cfg, micro_batch_size: int):
        deepspeed = import_deepspeed(dist_info.device)
        if not torch.distributed.is_initialized():
            # one process: DeepSpeed needs a process group; a world of one in this process, no rendezvous
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        # DeepSpeed reads the launcher's LOCAL_RANK itself; torchrun sets it and dist.setup() sets it under SLURM
        os.environ.setdefault("LOCAL_RANK", str(dist_info.local_rank))
        self.deepspeed = deepspeed
        self.zero_stage, self.world_size = ds_cfg.zero_stage, dist_info.world_size
        self.device = dist_info.device
        self.amp_dtype = pick_dtype(train_cfg.precision, dist_info.device)
        self.nonfinite = train_cfg.nonfinite
        model = model.to(dist_info.device)
        optimizer = make_optimizer(model)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=make_scheduler(optimizer),
            config=build_ds_config(train_cfg, ds_cfg, micro_batch_size, dist_info.device),
        )
        self.module = self.model.module  # the bare model; under ZeRO-3 its forward gathers the shards

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def autocast(self):
        # DeepSpeed casts the weights to bf16/fp16 itself; autocast casts the fp32 inputs to match
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def no_backward_sync(self, is_last_micro_step: bool):
        # Not a no-op: DeepSpeed owns accumulation. Marking the boundary tells ZeRO to keep gradients
        # local on the first micro-batches and reduce-scatter them on the last one, as DDP's no_sync does.
        self.model.set_gradient_accumulation_boundary(is_last_micro_step)
        return contextlib.nullcontext()

    def trainable_changed(self) -> None:
        raise ConfigError(capabilities.DEEPSPEED_UNFREEZE)

    def set_grad_accum(self, grad_accum: int) -> None:
        raise ConfigError(
            "train.engine=deepspeed fixes gradient accumulation when ZeRO is set up; it can't "
            "change on resume (resume with the same number of ranks and batch settings)"
        )

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> tuple[torch.Tensor, bool]:
        """One optimizer step at the boundary: DeepSpeed clips, steps, zeroes and steps the schedule."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        # DeepSpeed skips an update itself only on fp16 overflow; report a non-finite norm as skipped
        # as well, so train.nonfinite=stop still stops (fp32/bf16 updates cannot be undone).
        applied = self.model.was_step_applied() and (self.nonfinite == "ignore" or bool(torch.isfinite(norm)))
        return norm, not applied

    @property
    def lr(self) -> float:
        return self.model.get_lr()[0]

    # ---- checkpoints: DeepSpeed's own files inside dtrain's atomic directory ----------------------
    def state_dict(self) -> dict:
        """What rank 0 puts in state.pt: where the weights are (they are in the ZeRO shards)."""
        return {"deepspeed": {"tag": TAG, "zero_stage": self.zero_stage}}

    def evaluating(self):
        """Context of an evaluation loop: nothing to do (see FSDPEngine.evaluating)."""
        return contextlib.nullcontext()

    def save_to(self, directory: Path, background: bool = False, group=None) -> None:
        """Collective: every rank writes its ZeRO shards under directory/deepspeed/, now (DeepSpeed's save is
        synchronous, on the training group: the Checkpointer calls it in the training thread)."""
        self.model.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load_from(self, directory: Path, state: dict) -> None:
        """Collective: model, optimizer shards and schedule from a verified checkpoint directory."""
        from ..checkpoint_files import CheckpointError
        from .formats import check_engine

        check_engine(directory, state, "deepspeed")
        check_same_world_size(directory, self.world_size)
        with weights_only_loads(directory / TAG), config_hyperparameters(self.optimizer, self.scheduler):
            path, _ = self.model.load_checkpoint(str(directory), tag=state["deepspeed"]["tag"])
        if path is None:
            raise CheckpointError(f"checkpoint: DeepSpeed could not load {directory / TAG}")

    def load_weights(self, directory: Path, state: dict) -> None:
        """The weights only (test() on the best checkpoint), from the consolidated fp32 state dict."""
        weights = consolidated_state_dict(directory, state)
        params = list(self.module.parameters())
        # ZeRO-3: gather the full parameters, load, and re-partition from rank 0 (a no-op for stages 1-2)
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            self.module.load_state_dict(weights)


def check_same_world_size(directory: Path, world_size: int) -> None:
    """ZeRO shards optimizer state (and gradients, parameters) by rank: a checkpoint resumes only on the
    ranks that wrote it. Re-partitioning them is DeepSpeed's universal-checkpoint conversion, which dtrain
    does not run; say what to do instead of letting DeepSpeed fail or load a wrong partition."""
    from ..checkpoint_files import CheckpointError, written_by

    saved = written_by(directory)
    if saved != world_size:
        raise CheckpointError(
            f"checkpoint: {directory} holds ZeRO shards of {saved} ranks and this run has "
            f"{world_size}; train.engine=deepspeed resumes only on the same number: start it "
            f"with {saved} ranks, or `dtrain export --checkpoint {directory} --out model.pt` and "
            "fine-tune from it in a new run (model.init_from=model.pt)"
        )


def consolidated_state_dict(directory: Path, state: dict) -> dict:
    """A plain fp32 state dict from a dtrain DeepSpeed checkpoint (DeepSpeed's zero_to_fp32)."""
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(None), weights_only_loads(directory / TAG):  # it prints progress lines
        weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=state["deepspeed"]["tag"])
    return {k: v.contiguous() for k, v in weights.items()}


@contextlib.contextmanager
def weights_only_loads(what: Path):
    """Every torch.load inside, DeepSpeed's own included (they pass weights_only=False), as
    weights_only=True: torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at each call. The few plain data
    classes DeepSpeed pickles into its optimizer files are allowlisted; anything else is refused."""
    from ..checkpoint_files import refusal

    old = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            yield
    except pickle.UnpicklingError as e:
        raise refusal(what, e) from None
    except (RuntimeError, EOFError, OSError) as e:  # e.g. not a torch file at all
        from ..checkpoint_files import CheckpointError

        first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
        raise CheckpointError(f"checkpoint: DeepSpeed could not load {what} ({first[:200]})") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = old


_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _deepspeed_data_classes() -> list:
    """Data-only classes in DeepSpeed's checkpoint files (loss scaler state, ZeRO stage enum, fragment
    addresses), by name: DeepSpeed versions move them, and a missing one only means it isn't needed."""
    import importlib

    found = []
    for name in (
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ):
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return found
