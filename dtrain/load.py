"""A trained model back from its checkpoint: `dtrain.load_model(...)`, and what `dtrain predict` runs.

The model is rebuilt as the run built it: dtrain's built-in factories from the checkpoint's stored config, a
user's factory from the user's own code (handed in as `model=`, or named again in their own overrides), never
from an import string read from the file (dtrain.trust refuses one, unless the user trusts the file). The
data set's facts a factory may ask for (input_shape, num_outputs) come from the run's data, as in `dtrain
eval`. Then the checkpoint's weights (loaded with weights_only) go in, and the model is put in eval mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

from .build import DataFacts, Hooks, _refuse_sealed, build_model_for
from .checkpoint import CheckpointError
from .config import Config
from .data import Streams, build_streams

# What a model's predictions never use, emptied before the stored config is checked and built: the training
# transform (augmentation), the loss, the metrics, the optimizer and schedule (with their kwargs, which only
# an import string takes) and the callbacks. A stored import string there would otherwise have to be named
# again (dtrain.trust) for code that is not run: load_model of a run trained with torch.optim:RAdam was refused.
UNUSED = (
    "data.transform=null",
    "loss.fn=null",
    "metrics.fn=null",
    "optim.name=adamw",
    "optim.kwargs={}",
    "schedule.name=constant",
    "schedule.kwargs={}",
    "run.callbacks=[]",
)


@dataclasses.dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with what rebuilt it."""

    model: nn.Module  # on the CPU, in eval mode
    cfg: Config  # the stored config under the user's --config and overrides, the handed-in hooks recorded
    source: Path  # the checkpoint directory or exported file read
    step: int
    hooks: Hooks
    streams: Streams  # the run's data (rank 0 of 1, no workers): its facts and sample format


def rebuild(
    checkpoint: Union[str, Path],
    hooks: Optional[Hooks] = None,
    config: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    defaults: Optional[dict] = None,
    trusted: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> Loaded:
    """The model of `checkpoint` (a checkpoints/step-N directory, a run directory: its best, else latest, or
    a file from `dtrain export`) with its weights; `config` (YAML files) and `overrides` (key=value) over its
    stored config, as `dtrain eval` takes them; `defaults`: a script's own (dtrain.main(config=...)), which
    count as named by the user; `trusted`: --trust-checkpoint-code."""
    hooks = hooks or Hooks()
    path, state = read_checkpoint(str(checkpoint))
    cfg = stored_config(state["config"], path, config, [*UNUSED, *overrides], defaults, hooks, trusted)
    # the weights come from the checkpoint: the run's pretrained source is not read again (it may be gone)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": None})})
    if hooks.model is None and cfg.model.factory.startswith("__main__:"):
        raise CheckpointError(
            f"checkpoint: {path}'s model was built by a script's own {cfg.model.factory}; hand "
            f"it in: load_model(..., model={cfg.model.factory.removeprefix('__main__:')}), or run "
            "that script's predict command"
        )
    built = hooks.replacing(cfg)  # the hooks handed in, never the names recorded for them
    _refuse_sealed(built)
    streams = build_streams(
        built.data,
        seed=cfg.run.seed,
        rank=0,
        world_size=1,
        num_workers=0,
        sample=hooks.sample,
        collate=hooks.collate,
        create=False,
    )
    outputs = 1 if streams.task == "regression" else streams.num_classes or None  # as build.build_data
    facts = DataFacts(streams.task, lambda: streams.input, outputs, streams.y_mean)
    model = build_model_for(cfg, facts, hooks, log)
    try:
        model.load_state_dict(state["engine"]["model"])
    except RuntimeError as e:  # torch lists every missing and unexpected key: its first line says enough
        raise CheckpointError(
            f"checkpoint: {path}'s weights do not fit the model built for it "
            f"({str(e).strip().splitlines()[-1].strip()[:200]}); build it with the factory and "
            "model.kwargs that trained it"
        ) from None
    model.eval()
    return Loaded(model, cfg, path, int(state["trainer"]["step"]), hooks, streams)


def read_checkpoint(path_arg: str) -> tuple[Path, dict]:
    """(path, state with engine.model filled in) from a checkpoint directory, a run directory (its best, else
    latest), or a file written by `dtrain export` (a plain state dict: no DeepSpeed, no process group needed)."""
    from .checkpoint import safe_load, verify
    from .engine import model_weights
    from .models.transfer import resolve_checkpoint

    if Path(path_arg).is_file():
        exported = safe_load(Path(path_arg))
        if not (
            isinstance(exported, dict)
            and isinstance(exported.get("model"), dict)
            and isinstance(exported.get("config"), dict)
            and isinstance(exported.get("step"), int)
        ):
            if _is_safetensors(path_arg):  # it was said to be no export of dtrain's, which it is
                raise CheckpointError(
                    f"checkpoint: {path_arg} is a safetensors file: weights alone, no config to "
                    "rebuild the model from; give a file of `dtrain export --format pt`, a run "
                    "directory or checkpoints/step-N (or load it into your model with "
                    "safetensors.torch.load_model)"
                )
            raise CheckpointError(
                f"checkpoint: {path_arg} is not a file written by `dtrain export` (a dict of "
                "model, config and step); give one, a run directory or checkpoints/step-N"
            )
        return Path(path_arg), {
            "config": exported["config"],
            "trainer": {"step": exported["step"]},
            "engine": {"model": exported["model"]},
        }
    path = resolve_checkpoint(path_arg)  # a run directory: its best, else latest
    verify(path)
    state = safe_load(path / "state.pt")
    state["engine"] = {"model": model_weights(path, state["engine"])}  # DeepSpeed, FSDP: consolidated shards
    return path, state


def _is_safetensors(path: str) -> bool:
    """A file safetensors reads (`dtrain export --format safetensors`), where safetensors is installed."""
    try:
        from safetensors import safe_open

        with safe_open(path, "pt"):
            return True
    except Exception:  # not installed, or another file
        return False


def stored_config(
    stored: dict,
    source: Path,
    config: Optional[Sequence[str]],
    overrides: Sequence[str],
    defaults: Optional[dict],
    hooks: Optional[Hooks],
    trusted: bool,
) -> Config:
    """The config that rebuilds a run from a checkpoint or an exported file: the one it stored, under the
    user's --config files and key=value overrides (the same precedence as train's). A stored setting that
    would run code is used only where the user names it too (or trusts the file): dtrain.trust. `defaults`:
    a script's own config (dtrain.main(config=...)); `hooks`: what it hands in."""
    from pydantic import ValidationError

    from .config import load_config
    from .trust import check_stored

    try:
        if not isinstance(stored, dict):
            raise CheckpointError(f"checkpoint: {source} holds no config (a {type(stored).__name__})")
        stored = Config.from_saved(stored).to_dict()
    except ValidationError as e:
        raise CheckpointError(
            f"checkpoint: {source} holds a config this dtrain can't read "
            f"({'.'.join(map(str, e.errors()[0]['loc']))}: {e.errors()[0]['msg']})"
        ) from None
    cfg = load_config(config, list(overrides), stored)
    user = load_config(config, list(overrides), defaults)  # what the user's own words name
    if hooks is not None:  # a script's own callables: what it hands in is what runs
        cfg, user = hooks.record(cfg), hooks.record(user)
    check_stored(cfg, user, source, trusted)
    return cfg


def load_model(
    checkpoint: Union[str, Path],
    *,
    model: Any = None,
    sample: Any = None,
    collate: Any = None,
    overrides: Sequence[str] = (),
    trust_checkpoint_code: bool = False,
) -> nn.Module:
    """The trained nn.Module of `checkpoint` (a checkpoints/step-N directory, a run directory: its best, else
    its latest, or a file from `dtrain export`), on the CPU, in eval mode.

    model       your factory (or module) that trained it, as handed to dtrain.main(model=...): a model a
                script built is rebuilt only from that script's code, never from a name stored in the file
    sample, collate
                the script's own data.sample / data.collate hooks, where it handed them in (the run's data
                says the input shape and class count a factory asks for)
    overrides   key=value settings over the checkpoint's stored config, e.g. ["data.root=/data"]; naming an
                import string here (model.factory=mypkg.nets:resnet) lets it run
    trust_checkpoint_code
                run the code the checkpoint's stored config names (import strings) even where you do not
                name it: only for files you trust

    Raises dtrain's one-line errors: CheckpointError (unreadable or incomplete checkpoint, a stored import
    string you don't name, weights that don't fit the model), ConfigError, DataError (the run's data).
    """
    hooks = Hooks(model=model, sample=sample, collate=collate)
    return rebuild(checkpoint, hooks, overrides=overrides, trusted=trust_checkpoint_code).model
