"""What a resumed run takes from its checkpoint and what from the config it is started with.

The checkpoint holds the config it was written with (state["config"]). At resume every setting of
today's schema is compared with it (a setting the checkpoint predates counts as its default); rank 0
prints one line per changed key. A key that may change is applied: the model, optimizer and data
position come from the checkpoint, every hyperparameter from the new config (the engines load the
optimizer's and the schedule's state inside optim.config_hyperparameters, which puts this config's back). A key that cannot
change ends the run in one line before anything is loaded or written.

A setting may change when it only decides what happens from now on; it is fixed when the checkpoint's
state, or the meaning of what the run has logged so far, depends on it. Keys not listed in MAY_CHANGE
are fixed, a new one too, until someone decides it is safe and lists it here.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from . import dist, redaction
from .config import SCHEDULES, Config, ConfigError, _migrate, _valid_keys

# Entries ending in "." cover their whole section; others the key and anything under it.
MAY_CHANGE = (
    "run.name",
    "run.dir",  # the same run, renamed or moved
    "run.doctor",
    "run.stop_at_step",
    "run.callbacks",  # a callback added or removed only watches from now on
    "data.root",  # where the same shards are
    "data.num_workers",
    "data.prefetch_factor",  # loading only (an interrupted epoch ends in its old worker order)
    "data.eval_batch_size",  # evaluation metrics are means over every sample whatever the batch
    "data.trust_descriptor_pipes",  # whether a descriptor may run commands; the samples are the same
    "model.channels_last",  # memory layout of the same weights
    "model.freeze",
    "model.freeze_all_but_head",
    "model.unfreeze_at_step",  # which weights train from now on
    "optim.lr",
    "optim.weight_decay",
    "optim.momentum",
    "optim.nesterov",
    "optim.betas",
    "optim.fused",
    "optim.backbone_lr_ratio",  # except between 1 and another value: see fixed_reason
    "schedule.",  # a pure function of the step, rebuilt from the config
    "train.epochs",
    "train.max_steps",  # the training length; the schedule spans the new one
    "train.clip_grad_norm",
    "train.precision",
    "train.compile",
    "train.peak_flops",
    "train.nonfinite",
    "train.val_every",
    "train.log_every",
    "train.debug_steps",
    "early_stop.",
    "checkpoint.",
    "dist.",
    "log.",
    "wandb.",
    "metrics.",  # what is measured on the validation and test splits (fixed while one decides the best: below)
)

# Keys of a section that may change which cannot, and why (asked before MAY_CHANGE).
FIXED_IN_SECTION = {
    "early_stop.monitor": "the best checkpoint, its value and the patience so far were judged by the checkpoint's "
    "metric; a value of another says nothing against them",
    "early_stop.mode": "the best checkpoint, its value and the patience so far were judged in the checkpoint's "
    "direction",
}
# A scheduler other than dtrain's resumes from its saved state whole (optim.config_hyperparameters): a new optim.* or
# schedule.* value, or a new length, would be silently ignored (or step it past its end).
OWN_SCHEDULER_KEYS = ("optim.", "schedule.", "train.epochs", "train.max_steps")
OWN_SCHEDULER = (
    "schedule.name is not one of dtrain's schedules: its state resumes from the checkpoint as saved "
    "(its LRs, arguments and length), so a new value would be ignored"
)
METRIC_MONITORED = (
    "early_stop.monitor names a metric: the best checkpoint and the patience so far were judged "
    "by the checkpoint's metrics"
)

# Why the others cannot change: the first matching entry ("" matches every key).
FIXED_BECAUSE = (
    ("model.init_from", "a resumed run's weights come from its checkpoint, not from model.init_from"),
    ("model.", "it shapes the parameters the checkpoint holds"),
    ("data.", "it decides the training samples, their order and the steps per epoch"),
    ("train.grad_accum", "it decides the global batch and the steps per epoch"),
    ("run.seed", "it decides the sample order, dropout and augmentation draws"),
    ("augment.", "it decides what the training samples are, like data.*"),
    ("loss.", "validation losses before and after would not compare (best checkpoint, early stopping)"),
    ("optim.", "the checkpoint holds that optimizer's state"),
    ("train.engine", "the checkpoint is in that engine's format"),
    ("deepspeed.", "it decides how the checkpoint's ZeRO state is laid out"),
    ("", "it is not known to be safe to change in the middle of a run"),
)


def _matches(key: str, entry: str) -> bool:
    return key.startswith(entry) if entry.endswith(".") or not entry else key == entry or key.startswith(entry + ".")


def fixed_reason(key: str, old: Any, new: Any) -> Optional[str]:
    """Why `key` cannot change from `old` to `new` when a run resumes; None when it may."""
    if key == "optim.backbone_lr_ratio" and (old == 1) != (new == 1):
        return "between 1 and another value it adds or removes a parameter group of the optimizer state"
    if key in FIXED_IN_SECTION:
        return FIXED_IN_SECTION[key]
    if any(_matches(key, entry) for entry in MAY_CHANGE):
        return None
    return next(reason for entry, reason in FIXED_BECAUSE if _matches(key, entry))


UNSET = "(unset)"


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    fixed: Optional[str]  # why it cannot change; None: it may


def _show(value: Any) -> str:
    text = value if value is UNSET or value is redaction.REDACTED else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(saved: dict, cfg: Config) -> list[Change]:
    """Every setting of `cfg` that differs from the checkpoint's config `saved` (a setting the checkpoint
    predates counts as its default; one the schema no longer has is not compared)."""
    new, defaults, saved = cfg.to_dict(), Config().to_dict(), _migrate(saved)  # older checkpoints: today's keys
    changes: list[Change] = []
    for key in _valid_keys(Config):
        parts = key.split(".")
        changes += _diff(key, _get(saved, parts, _get(defaults, parts, UNSET)), _get(new, parts, UNSET))
    if _get(saved, ["model", "factory"], defaults["model"]["factory"]) == cfg.model.factory:
        spelled_out = _factory_defaults(cfg.model.factory)
        changes = [c for c in changes if not _is_factory_default(c, spelled_out)]
    monitor = cfg.early_stop.monitor
    if monitor != "val/loss" and not monitor.startswith("val/loss/"):  # a metric, not the loss, decides the best
        changes = [
            replace(c, fixed=c.fixed or METRIC_MONITORED) if c.key.startswith("metrics.") else c for c in changes
        ]
    if not {_get(saved, ["schedule", "name"], "cosine"), cfg.schedule.name} <= set(SCHEDULES):
        changes = [
            replace(c, fixed=c.fixed or OWN_SCHEDULER) if c.key.startswith(OWN_SCHEDULER_KEYS) else c for c in changes
        ]
    return changes


def _factory_defaults(factory: str) -> dict:
    """The keyword defaults of dtrain's own model factories (mlp, cnn, gpt; nothing is imported for others)."""
    from .models import BUILTIN, resolve_factory

    if factory not in BUILTIN:
        return {}
    params = inspect.signature(resolve_factory(factory)).parameters
    return {n: json.loads(json.dumps(p.default)) for n, p in params.items() if p.default is not p.empty}


def _is_factory_default(change: Change, defaults: dict) -> bool:
    """A model.kwargs entry unset on one side and the factory's own default on the other is the same model:
    `dtrain train` and `dtrain train --config configs/digits.yaml`, which spells the defaults out."""
    name = change.key.removeprefix("model.kwargs.")
    if name == change.key or name not in defaults or (change.old is UNSET) == (change.new is UNSET):
        return False
    given = change.new if change.old is UNSET else change.old
    return json.loads(json.dumps(given)) == defaults[name]


def _get(tree: dict, parts: list[str], default: Any) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _diff(key: str, old: Any, new: Any) -> list[Change]:
    if old == new or redaction.same_secret(old, new):  # a checkpoint holds its secrets sealed (dtrain.redaction)
        return []
    if isinstance(old, dict) and isinstance(new, dict):  # a dict-valued setting (loss.terms): name the entry
        return [
            c
            for k in sorted(old.keys() | new.keys(), key=str)
            for c in _diff(f"{key}.{k}", old.get(k, UNSET), new.get(k, UNSET))
        ]
    if redaction.is_secret(key, old) or redaction.is_secret(key, new):
        # neither value is shown; a credential (by its key's name) shapes nothing the checkpoint holds: a
        # rotated token may change
        fixed = None if any(redaction.secret_key(part) for part in key.split(".")) else fixed_reason(key, old, new)
        return [Change(key, redaction.REDACTED, redaction.REDACTED, fixed)]
    return [Change(key, old, new, fixed_reason(key, old, new))]


def check_config(saved: dict, cfg: Config, run_dir: Path, log: Callable[[str], None]) -> list[Change]:
    """Collective. Compare the checkpoint's config with this one: one line per changed key on rank 0, and
    a ConfigError on every rank (rank 0's verdict) when a key that cannot change did. Call it before the
    checkpoint's state is loaded and before anything is written."""
    changes = dist.broadcast_object(config_changes(saved, cfg))
    for change in changes:
        log(f"resume: {change.key} changed since the checkpoint: {_show(change.old)} -> {_show(change.new)}")
    fixed = [c for c in changes if c.fixed]
    if fixed:
        more = f" (so did {', '.join(c.key for c in fixed[1:])})" if len(fixed) > 1 else ""
        raise ConfigError(
            f"config: {fixed[0].key} cannot change when a run resumes: {fixed[0].fixed}{more}; "
            f"to start afresh use another run.name (with model.init_from={run_dir} to start from "
            "this run's weights)"
        )
    return changes


class ConfigState:
    """The config as a stateful part of the run: saved with every checkpoint, and on resume compared with this
    one first (check_config), before any other part loads."""

    def __init__(self, cfg: Config, run_dir: Path, log: Callable[[str], None]):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log

    def state_dict(self) -> dict:
        return redaction.redact(self.cfg.to_dict(), keyed=True)  # secrets sealed: a resume compares them

    def load_state_dict(self, saved: dict) -> None:
        check_config(saved, self.cfg, self.run_dir, self.log)


def already_tested(
    run_dir: Path, step: int, reason: str, is_global_zero: bool, log: Callable[[str], None], has_test: bool = True
) -> Optional[dict]:
    """Collective. The result of a finished run that was also tested at `step` (its test metrics, from
    metrics.jsonl, read by rank 0), said in one line; None when the test is still to run. A run whose data
    has no test split (`has_test` false) is done once it finished (it was trained again from its last step,
    its summary rewritten with this start's 0.1 s)."""
    from .logging import metrics_record
    from .records import read_records

    tested = None if has_test else {}
    if is_global_zero and has_test:
        records = read_records(Path(run_dir) / "metrics.jsonl", metrics_record)
        tested = next(
            (r for _, r in reversed(records) if r["step"] == step and any(k.startswith("test/") for k in r)), None
        )
    tested = dist.broadcast_object(tested)
    if tested is None:
        return None
    longer = "train.epochs or train.max_steps" + (" or early_stop.patience" if reason == "early_stop" else "")
    done = "was tested" if has_test else "its data has no test split"
    log(
        f"resume: this run already finished at step {step} ({reason}) and {done}; nothing to do (raise "
        f"{longer} to train on, or use another run.name to train afresh)"
    )
    return {
        "step": step,
        "stop_reason": "already_completed",
        **{k: v for k, v in tested.items() if k.startswith("test/") and k != "test/weights_step"},
    }
