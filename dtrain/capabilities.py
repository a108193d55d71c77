"""What each engine can't honour: plain rules on the config, no torch and no engine imported, so config validation
(config.py) asks `unsupported(cfg)` before anything starts (one line, exit 2) without reaching up into engine/.
Each engine class names its own declaration as its `unsupported` (engine/: the Engine protocol), so the rule
lives next to no other engine's and config.py names none."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

# also raised by the engines' trainable_changed, should a model be unfrozen by another way than the config
FSDP_UNFREEZE = (
    "model.unfreeze_at_step is not supported with train.engine=fsdp (FSDP fixes which parameters train "
    "when it first gathers them); use train.engine=ddp, or unfreeze by starting a new run with "
    "model.init_from"
)
DEEPSPEED_UNFREEZE = (
    "model.unfreeze_at_step is not supported with train.engine=deepspeed (ZeRO fixes the trainable "
    "parameters when it partitions them); use train.engine=ddp"
)


def ddp(cfg: Config) -> list[str]:
    """SingleEngine and DDPEngine run every setting."""
    return []


def fsdp(cfg: Config) -> list[str]:
    reasons = []
    if cfg.train.precision == "fp16":
        reasons.append(
            "train.precision=fp16 is not supported with train.engine=fsdp "
            "(its loss scaling would need a sharded gradient scaler); use bf16"
        )
    if cfg.model.unfreeze_at_step is not None:
        # FSDP2 fixes requires_grad of the parameters it gathers for compute when it first gathers them
        reasons.append(FSDP_UNFREEZE)
    if cfg.model.channels_last is True:
        reasons.append(
            "model.channels_last=true is not supported with train.engine=fsdp "
            "(FSDP shards contiguous parameters only); use model.channels_last=auto"
        )
    return reasons


def deepspeed(cfg: Config) -> list[str]:
    reasons = []
    if cfg.model.unfreeze_at_step is not None:
        reasons.append(DEEPSPEED_UNFREEZE)
    if cfg.deepspeed.offload_param != "none" and cfg.deepspeed.zero_stage != 3:
        reasons.append("deepspeed.offload_param needs deepspeed.zero_stage=3 (only ZeRO-3 partitions parameters)")
    return reasons


UNSUPPORTED = {"ddp": ddp, "deepspeed": deepspeed, "fsdp": fsdp}


def unsupported(cfg: Config) -> list[str]:
    """One line per setting of `cfg` that its train.engine can't honour (empty: it runs)."""
    return UNSUPPORTED[cfg.train.engine](cfg)
