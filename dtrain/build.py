"""From a config, and the objects a user hands in from Python, to the components of a run.

`Hooks` is what a user brings: a model (an nn.Module, or a callable returning one), a loss, metrics, a
forward function, optimizer param groups. Whatever is not handed in comes from the config: an import
string (model.factory, loss.fn, metrics.fn, model.forward) or dtrain's own. Each component gets its own
config section. The hooks are checked on one real batch before anything is written (`probe`), so a loss
that returns no scalar is a one-line error, not a failure at step 1 on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from . import batch as batches
from . import dist
from .checkpoint import Checkpointer
from .config import Config, ConfigError, RunConfig
from .data import ShardStream, build_streams
from .data.augment import build_augment
from .data.feed import TrainFeed
from .engine import Engine, build_engine, model_weights
from .evaluate import Evaluator
from .importing import describe, resolve
from .logging import SampleKeyLog, build_logger
from .losses import Loss, build_loss, check_shapes
from .metrics import build_metrics
from .models import build_model, find_module, has_convolutions
from .models.transfer import Freezer, load_pretrained, lr_scales
from .optim import build_optimizer, build_scheduler
from .signals import StopControl, StopReason
from .steplog import SkippedUpdates, StepLog
from .summary import Stopwatch
from .throughput import Throughput, peak_flops


# The config key each hook handed in from Python is recorded under (so config.yaml says what trained the run)
# and whose place it takes for the whole run: the builders get the object and see the key empty, so a name
# recorded there is never resolved again (`__main__:my_metrics` imports nowhere; `mynet:top2` would be a
# second copy, used as well: #32). param_groups has no key. Callbacks handed in replace the config's list
# whole, recorded as the list of their `module:Class` names.
RECORDED = {
    "model": ("model", "factory"),
    "forward": ("model", "forward"),
    "loss": ("loss", "fn"),
    "metrics": ("metrics", "fn"),
    "sample": ("data", "sample"),
    "transform": ("data", "transform"),
    "collate": ("data", "collate"),
    "callbacks": ("run", "callbacks"),
    "optimizer": ("optim", "name"),
    "scheduler": ("schedule", "name"),
}


@dataclasses.dataclass
class Hooks:
    """What a user hands in from Python (dtrain.main(model=..., ...)); None: the config's choice."""

    model: Any = None  # nn.Module, or a callable returning one (called with model.kwargs, seeded)
    loss: Optional[Callable] = None  # loss(output, batch) -> scalar tensor or {name: scalar tensor}
    metrics: Any = None  # sums callable, {name: torchmetrics.Metric}, or a list of those
    forward: Optional[Callable] = None  # forward(model, batch) -> output
    param_groups: Optional[Callable] = None  # param_groups(model) -> torch param groups (lr, weight_decay)
    sample: Any = None  # sample(raw webdataset sample) -> {field: value}, or {field: "ext;ext"}
    transform: Optional[Callable] = None  # transform(input) -> input, training samples, seeded per sample
    collate: Optional[Callable] = None  # collate(list of sample dicts) -> batch dict
    callbacks: Optional[list] = None  # objects with on_train_start, on_step_end, ... (dtrain.callbacks)
    optimizer: Optional[Callable] = None  # optimizer(param groups) -> torch.optim.Optimizer
    scheduler: Optional[Callable] = None  # scheduler(optimizer) -> LR scheduler, stepped per optimizer step

    def record(self, cfg: Config) -> Config:
        """The config with the names of the handed-in hooks under their keys (`__main__:build_model`: rebuilt
        only by that script); a field mapping (sample) as it is; a hook without a name (metrics as a dict
        or list) as null: what the config named there is not used."""
        return self._put(cfg, _name, lambda callbacks: [describe(cb) for cb in callbacks])

    def replacing(self, cfg: Config) -> Config:
        """The config the builders read: each key a handed-in hook takes the place of, empty."""
        return self._put(cfg, lambda hook: None, lambda callbacks: [])

    def _put(self, cfg: Config, value: Callable[[Any], Any], callbacks: Callable[[list], list]) -> Config:
        sections: dict[str, dict] = {}
        for hook, (section, key) in RECORDED.items():
            given = getattr(self, hook)
            if given is not None:
                sections.setdefault(section, {})[key] = callbacks(given) if hook == "callbacks" else value(given)
        return cfg.model_copy(
            update={name: getattr(cfg, name).model_copy(update=keys) for name, keys in sections.items()}
        )


def _name(hook) -> Any:
    if callable(hook):  # an nn.Module instance is named by its class
        return describe(hook)
    if isinstance(hook, Mapping) and all(isinstance(v, str) for v in hook.values()):
        return dict(hook)  # a field mapping is plain data
    return None


@dataclasses.dataclass
class DataFacts:
    """What the data set tells the model and the built-in loss: its task, input shape and outputs. The input
    shape may be given as a function -> (shape, or None and why it is unknown), which reads a sample: it is
    called only when something asks (a factory whose signature names input_shape, a language model's MFU),
    so text and other inputs without a shape train without one."""

    task: Optional[str]
    shape: Union[tuple, None, Callable[[], tuple]]
    num_outputs: Optional[int]
    y_mean: Optional[float] = 0.0  # None: the data does not say (Streams.y_mean); its baseline is not scored

    @functools.cached_property
    def _input(self) -> tuple:
        return self.shape() if callable(self.shape) else (self.shape, "")

    @property
    def input_shape(self) -> Optional[tuple]:
        return self._input[0]

    def for_factory(self) -> "FactoryFacts":
        return FactoryFacts(self)


class FactoryFacts(Mapping):
    """The facts a model factory may ask for by parameter name (models.FACTS), each worked out when asked;
    `why(name)`: why one is unknown (None)."""

    def __init__(self, facts: DataFacts):
        self.facts = facts

    def __getitem__(self, name: str):
        if name == "input_shape":
            return self.facts.input_shape
        if name == "num_outputs":
            return self.facts.num_outputs
        raise KeyError(name)

    def __iter__(self):
        return iter(("input_shape", "num_outputs"))

    def __len__(self) -> int:
        return 2

    def why(self, name: str) -> str:
        return self.facts._input[1] if name == "input_shape" else ""


def build_model_for(cfg: Config, facts: DataFacts, hooks: Hooks, log: Callable[[str], None]) -> nn.Module:
    """The model with its pretrained weights (model.init_from), on the CPU."""
    cfg = hooks.replacing(cfg)
    model = build_model(cfg.model, facts.for_factory(), cfg.run.seed, hooks.model, log)
    if (
        cfg.model.init_from
        or cfg.model.freeze_all_but_head
        or cfg.optim.backbone_lr_ratio != 1
        or cfg.model.head != "head"
    ):  # needed, or named on purpose: it must name a module (one line if not)
        find_module(model, cfg.model.head)
    if cfg.model.init_from:  # every rank loads it (DDP would broadcast rank 0's weights anyway)
        load_pretrained(model, cfg.model.init_from, log, head=cfg.model.head, read_weights=model_weights)
    return model


@dataclasses.dataclass
class Data:
    facts: DataFacts
    feed: TrainFeed
    val: Optional[ShardStream]  # None: the data has no such split
    test: Optional[ShardStream]


def build_data(
    cfg: Config,
    info: dist.DistInfo,
    hooks: Optional[Hooks] = None,
    debug: bool = False,
    log: Callable[[str], None] = print,
) -> Data:
    """This rank's training feed (transformed, augmented) and its val and test streams (never augmented)."""
    hooks = hooks or Hooks()
    cfg = hooks.replacing(cfg)
    streams = build_streams(
        cfg.data,
        seed=cfg.run.seed,
        rank=info.global_rank,
        world_size=info.world_size,
        grad_accum=cfg.train.grad_accum,
        num_workers=0 if debug else cfg.data.num_workers,
        pin_memory=info.device.type == "cuda",
        augment=build_augment(cfg.augment, cfg.run.seed),
        sample=hooks.sample,
        transform=hooks.transform,
        collate=hooks.collate,
    )
    for note in streams.notes:
        log(note)
    # a regression predicts one number; classes unknown (foreign shards, no data.num_classes): None
    outputs = 1 if streams.task == "regression" else streams.num_classes or None
    facts = DataFacts(streams.task, lambda: streams.input, outputs, streams.y_mean)
    feed = TrainFeed(streams.train, info.global_rank, info.world_size, cfg.train, debug, cfg.checkpoint.elastic, log)
    return Data(facts, feed, streams.val, streams.test)


@dataclasses.dataclass
class Core:
    """What evaluating a model needs (all `dtrain eval` builds; the trainer adds the rest)."""

    data: Data
    engine: Engine
    evaluator: Evaluator
    freezer: Freezer
    flops: Optional[float]
    tokens: Optional[int]  # per sample, for tokens_per_s (tokens_per_sample); None: the inputs are not tokens


def build_core(
    cfg: Config,
    info: dist.DistInfo,
    hooks: Optional[Hooks] = None,
    debug: bool = False,
    log: Callable[[str], None] = print,
) -> Core:
    """Data, the model (probed on a real batch), its engine, loss, metrics and the evaluator."""
    hooks = hooks or Hooks()
    cfg = hooks.replacing(cfg)  # the hooks handed in, never the names recorded for them
    _refuse_sealed(cfg)
    data = build_data(cfg, info, hooks, debug, log)
    facts, device = data.facts, info.device
    model = build_model_for(cfg, facts, hooks, log)
    freezer = Freezer(model, cfg.model)
    freezer.apply(0)  # before the engine: DDP only reduces parameters that require grad when wrapped
    forward = hooks.forward or (
        resolve(cfg.model.forward, "model.forward") if cfg.model.forward else batches.default_forward
    )
    loss = build_loss(cfg.loss, facts.task, hooks.loss)
    metrics = build_metrics(cfg.metrics, facts.task, facts.y_mean, hooks.metrics)
    model.to(device)
    first = (data.val or data.feed.stream).first_batch(2)
    flops = probe(model, first, forward, loss, metrics, device, facts, log)
    scales = lr_scales(cfg.model.head, cfg.optim.backbone_lr_ratio) if cfg.optim.backbone_lr_ratio != 1 else None
    channels_last = (
        cfg.model.channels_last
        if cfg.model.channels_last != "auto"
        else device.type == "cuda" and has_convolutions(model)
    )
    # DDP and DeepSpeed talk to every rank while they wrap the model (they broadcast the weights): a rank
    # lost during start-up ends the others here, in one line naming it, not in gloo's traceback. A barrier
    # on each side, because a barrier fails at once on a lost peer (its connection closes), while a new
    # group waits dist.timeout_s for the lost rank's address in the store: DeepSpeed makes groups first,
    # and FSDP2 shards locally without a word to the others, so ours (build_components) would be next.
    with dist.guard(f"{cfg.train.engine} set-up (the first collective with every rank)"):
        dist.barrier()
        engine = build_engine(
            model,
            lambda module: build_optimizer(cfg.optim, module, scales, hooks.param_groups, hooks.optimizer),
            lambda optimizer: build_scheduler(cfg.schedule, optimizer, data.feed.total_steps, hooks.scheduler),
            cfg.train,
            info,
            cfg.deepspeed,
            cfg.data.batch_size,
            channels_last=channels_last,
            fsdp_cfg=cfg.fsdp,
            log=log,
        )
        dist.barrier()
    evaluator = Evaluator(engine, forward, loss, metrics, facts.task, cfg.train.val_every, cfg.early_stop)
    return Core(data, engine, evaluator, freezer, flops, tokens_per_sample(first, facts))


def _refuse_sealed(cfg: Config) -> None:
    """A secret is never stored (config.yaml and checkpoints hold it sealed, `<redacted:scrypt:...>`): a config
    that still holds one came from such a file (`--config runs/x/config.yaml`, or `dtrain eval` of a checkpoint
    without the secret given again), and the model or data would get the sealed string in its place."""
    from .redaction import sealed_paths

    config = cfg.to_dict()
    # what builds the model, its data, loss and metrics: a sealed wandb.entity hurts no evaluation
    sealed = [
        path
        for section in ("model", "data", "loss", "metrics", "optim", "schedule")
        for path in sealed_paths(config[section], f"{section}.")
    ]
    if sealed:
        raise ConfigError(
            f"config: {sealed[0]} holds a sealed secret from a run's config.yaml or checkpoint "
            f"(secrets are never stored); give its value yourself: {sealed[0]}=..."
        )


@dataclasses.dataclass
class Components:
    """A training run: the core, and what training adds to it."""

    run_dir: Path
    core: Core
    make_checkpointer: Callable[..., Checkpointer]  # make_checkpointer(parts=the run's stateful parts)
    stop: StopControl
    log: Any
    step_log: StepLog
    skipped: SkippedUpdates
    meter: Throughput
    clock: Stopwatch
    key_log: Optional[SampleKeyLog]


def run_dir_of(run: RunConfig, debug: bool = False) -> Path:
    return Path(run.dir) / (run.name + ("-debug" if debug else ""))


def build_components(
    cfg: Config, info: dist.DistInfo, hooks: Optional[Hooks] = None, debug: bool = False, callbacks=None
) -> Components:
    run_dir = run_dir_of(cfg.run, debug)
    device = info.device
    log = build_logger(cfg.log, info, run_dir, cfg.wandb, cfg.to_dict())
    core = build_core(cfg, info, hooks, debug, log.info)
    data, engine = core.data, core.engine
    core.evaluator.check_monitor(data.val is not None, log.warning)  # after the probe named what validation logs
    meter = Throughput(
        data.feed.samples_per_step,
        core.tokens,
        core.flops,
        peak_flops(device, cfg.train.peak_flops),
        info.world_size,
        device,
    )
    clock = Stopwatch()  # this start's wall time by part (the end-of-run summary)
    # Coordination that must not share the training group: created in this order on every rank.
    save_group, stop_group = dist.new_cpu_group(cfg.dist.timeout_s), dist.new_cpu_group(cfg.dist.timeout_s)
    stop = StopControl(stop_group, stuck_after_s=cfg.dist.timeout_s, stop_at_step=cfg.run.stop_at_step)
    ck = cfg.checkpoint
    # the trainer adds the run's stateful parts, which include itself: make_checkpointer(parts)
    make_checkpointer = functools.partial(
        Checkpointer,
        run_dir / "checkpoints",
        ck.keep_last,
        info,
        cfg.hash(),
        keep_best=ck.keep_best,
        async_save=ck.async_save,
        group=save_group,
        every=ck.every,
        save_best=ck.save_best,
        enabled=not debug,
        callbacks=callbacks,
        halted=lambda: stop.reason == StopReason.NONFINITE,
        clock=clock.part,
    )
    skipped = SkippedUpdates(cfg.train.nonfinite, device, stop, log.warning, lambda: data.feed.step)
    # show_tokens: the meter's records have tokens_per_s only where it counts tokens (core.tokens)
    step_log = StepLog(
        log, meter, core.evaluator.loss.names, cfg.train.log_every, True, lambda: engine.lr, skipped, device
    )
    key_log = SampleKeyLog(run_dir, info.global_rank) if cfg.log.sample_keys else None
    # Each rank its own dropout/augmentation stream; resumed exactly from the checkpoint.
    seed_all(cfg.run.seed * 1000 + info.global_rank)
    return Components(run_dir, core, make_checkpointer, stop, log, step_log, skipped, meter, clock, key_log)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)


def tokens_per_sample(batch, facts: DataFacts) -> Optional[int]:
    """The tokens of a sample, for tokens_per_s: the length T of the batch's token ids (batch.token_ids: an
    integer [B, T] input, `x` or `input_ids`, whatever the task) where the data set says every sample has
    it (its per-sample input shape is (T,)). None, and no tokens_per_s, for other inputs (images, features:
    a token is not a sample) and for sequences of varying length, whose padded batches would count padding."""
    ids = batches.token_ids(batch)
    if ids is None:
        return None
    length = ids[1].shape[1]
    shape = facts.input_shape
    return length if shape is not None and tuple(shape) == (length,) else None


def probe(
    model: nn.Module,
    batch,
    forward: Callable,
    loss,
    metrics,
    device: torch.device,
    facts: DataFacts,
    log: Callable[[str], None],
) -> Optional[float]:
    """One forward of a real batch (2 samples) before training, in eval mode without gradients and without
    touching any RNG: checks that the loss and metrics hooks return what they must, that token ids fit the
    model's embedding and that the output fits the target of dtrain's own loss and metrics (one-line errors
    before anything is written, not tracebacks or a broadcast loss at step 1), fixes the loss terms' names, and counts the model's training FLOPs per sample for
    MFU: the model's own count where it has one (`flops_per_token`, as nanoGPT's), else 3x the forward
    FLOPs torch's FlopCounterMode counts. -> FLOPs per sample, or None (said once) where they can't be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = batches.to_device(batch, lambda t: t.to(device))
    batches.check_token_ids(model, batch)
    was_training = model.training
    model.eval()  # no batch-norm statistics update from the probe
    flops, why, counted = None, None, False
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            try:
                with FlopCounterMode(display=False) as counter:
                    output = forward(model, batch)
                flops = 3.0 * counter.get_total_flops() / max(batches.size(batch), 1)
                counted = True
            except ConfigError:
                raise
            except Exception as e:  # the counter can't follow every op: count nothing, run the model plainly
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            if not counted:  # outside the except: an error here is the model's own, its traceback shown once
                output = _forward_with_hint(forward, model, batch)
            if isinstance(loss, Loss) or metrics.builtin:  # dtrain scores the output against the batch's y
                check_shapes(output, batch, facts.task, facts.num_outputs)
            loss(output, batch)
            metrics.reset(device)
            metrics.update(output, batch)
            metrics.reset(device)
    finally:
        model.train(was_training)
    if facts.task == "lm" and hasattr(model, "flops_per_token") and facts.input_shape:
        flops = model.flops_per_token(facts.input_shape[-1]) * facts.input_shape[-1]
    if not flops:
        log(f"mfu: the model's FLOPs could not be counted{f' ({why})' if why else ''}; no MFU is logged")
        return None
    return flops


def _forward_with_hint(forward: Callable, model: nn.Module, batch):
    """forward(model, batch); torch's error for a data/model mismatch (dtype, device, shape) gets a note
    naming the batch field and the fix, printed under the user's traceback."""
    try:
        return forward(model, batch)
    except Exception as e:
        hint = batches.mismatch_hint(model, batch, e)
        if hint:
            e.add_note(hint)
        raise
