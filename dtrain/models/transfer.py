"""Transfer learning: start from another run's weights, replace the head, freeze and later unfreeze layers.

Freezing is `requires_grad=False`: a frozen parameter gets no gradient, the optimizer skips it (so it
stays bit-identical, weight decay included) and backward doesn't even compute it. Which parameters are
frozen is a pure function of the step, so a resumed run re-applies it from the step alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..checkpoint_files import CheckpointError, pointed, safe_load, verify
from ..config import ConfigError, ModelConfig


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's best checkpoint (else its latest). A pointer
    (best, latest) leads only to a step directory of its own run (checkpoint.pointed), so the path used,
    and printed, is in the run named."""
    path = Path(path)
    ckpts = path / "checkpoints"
    if ckpts.is_dir():
        for name in ("best", "latest"):
            target = pointed(ckpts, name)
            if target is not None and target.exists():
                return target.resolve()
            if target is None and (ckpts / name).is_dir():  # a copy of the step directory, not a link
                return (ckpts / name).resolve()
        raise CheckpointError(f"checkpoint: run directory {path} has no complete checkpoint (no best or latest)")
    if path.name in ("best", "latest") and path.is_symlink():  # a run's pointer, given itself
        path = pointed(path.parent, path.name)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} does not exist; give a run directory or checkpoints/step-N")
    return path


def load_pretrained(
    model: nn.Module,
    source: str | Path,
    log: Callable[[str], None] = print,
    head: str = "head",
    read_weights: Optional[Callable[[Path, dict], dict]] = None,
) -> list[str]:
    """Copy a checkpoint's weights into `model`. The head (model.head) of another shape is left as
    initialised (a new task); any other mismatch is the user's error. Returns the names that were not loaded.
    A checkpoint directory's weights are in its engine's format: `read_weights(directory, engine_state)`
    (dtrain.engine.model_weights) reads them, given by the caller so that models/ never imports an engine."""
    if Path(source).is_file():  # written by `dtrain export` (e.g. from ZeRO shards): {"model", "config", "step"}
        path = Path(source)
        weights = safe_load(path)["model"]
    else:
        path = resolve_checkpoint(source)
        verify(path)  # complete and untampered, or CheckpointError
        if read_weights is None:
            raise TypeError("load_pretrained: a checkpoint directory needs read_weights (dtrain.engine.model_weights)")
        weights = read_weights(path, safe_load(path / "state.pt")["engine"])  # weights_only: never runs code
    own = model.state_dict()
    skipped = []
    for name, tensor in own.items():
        if name not in weights:
            raise ConfigError(
                f"config: model.init_from: {path} has no '{name}'; build the same model "
                f"(model.factory and model.kwargs) as the run it came from"
            )
        if weights[name].shape != tensor.shape:
            if _under(name, head):
                skipped.append(name)
                continue
            raise ConfigError(
                f"config: model.init_from: '{name}' is {tuple(weights[name].shape)} in {path}, "
                f"{tuple(tensor.shape)} here; the body must match the run it came from"
            )
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ConfigError(
            f"config: model.init_from: {path} has weights this model lacks ({unexpected[0]}, ...); "
            f"build the same model as the run it came from"
        )
    model.load_state_dict({k: v for k, v in weights.items() if k not in skipped}, strict=False)
    log(f"initialised from {path}" + (f"; new head ({', '.join(skipped)} re-initialised)" if skipped else ""))
    return skipped


class Freezer:
    """Which parameters are frozen at a given step."""

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        self.model = model
        prefixes, head = list(cfg.freeze), cfg.head
        names = [n for n, _ in model.named_parameters()]
        for prefix in prefixes:
            if not any(_under(n, prefix) for n in names):
                tops = sorted({n.split(".")[0] for n in names})
                raise ConfigError(
                    f"config: model.freeze: no parameter is named '{prefix}' or '{prefix}.*'; "
                    f"top-level names: {', '.join(tops)}"
                )
        self.frozen = {
            n for n in names if any(_under(n, p) for p in prefixes) or (cfg.freeze_all_but_head and not _under(n, head))
        }
        if cfg.unfreeze_at_step is not None and not self.frozen:
            raise ConfigError(
                "config: model.unfreeze_at_step needs something frozen: set model.freeze or model.freeze_all_but_head"
            )
        if self.frozen and len(self.frozen) == len(names):
            raise ConfigError("config: model.freeze leaves no parameter to train; keep at least the head trainable")
        self.unfreeze_at = cfg.unfreeze_at_step
        self.is_frozen: Optional[bool] = None

    def should_freeze(self, step: int) -> bool:
        return bool(self.frozen) and (self.unfreeze_at is None or step < self.unfreeze_at)

    def apply(self, step: int) -> bool:
        """Set requires_grad for `step`; True when that changed which parameters train."""
        frozen = self.should_freeze(step)
        if frozen == self.is_frozen:
            return False
        for name, p in self.model.named_parameters():
            p.requires_grad_(not (frozen and name in self.frozen))
        changed = self.is_frozen is not None
        self.is_frozen = frozen
        return changed


def lr_scales(head: str, backbone_lr_ratio: float) -> dict[str, float]:
    """Param-group LR factors: the head at the full LR, everything else (the backbone) at the ratio."""
    return {head: 1.0, "": backbone_lr_ratio}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def frozen_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


__all__ = ["Freezer", "load_pretrained", "lr_scales", "resolve_checkpoint", "frozen_names"]
