"""Which engine wrote a checkpoint (their files differ), asked by every engine when it loads one: a module
of its own, below the engines, so that none imports the engine package back."""

from __future__ import annotations

from ..checkpoint_files import CheckpointError


def written_by_engine(engine_state: dict) -> str:
    """The engine that wrote a checkpoint's engine state: its files differ (DDP: the model in state.pt)."""
    return next((name for name in ("deepspeed", "fsdp") if name in engine_state), "ddp")


def check_engine(directory, engine_state: dict, engine: str) -> None:
    """CheckpointError unless the checkpoint was written by `engine` (its files are another engine's)."""
    wrote = written_by_engine(engine_state)
    if wrote != engine:
        raise CheckpointError(
            f"checkpoint: {directory} was written by the {wrote} engine; resume it with "
            f"train.engine={wrote} (or `dtrain export` it and use model.init_from)"
        )
