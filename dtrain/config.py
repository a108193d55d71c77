"""Typed, validated, frozen configuration.

One precedence rule: command-line override > YAML file > defaults below. Each component
is handed only its own section. Every field's docstring is its documentation
(`dtrain config --describe` prints them).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from . import capabilities
from .redaction import redact


class ConfigError(ValueError):
    """A user's config is wrong; the message is one line naming the key."""


class Section(BaseModel):
    # allow_inf_nan=False: every float setting (in lists, tuples and dicts too) is finite. optim.lr=inf trained
    # to NaN weights and reported "completed" (#32.5); no setting has a use for nan or inf.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): betas, like momentum


class RunConfig(Section):
    name: str = Field("digits", pattern=r"^[A-Za-z0-9._-]+$")
    """Run name: the run directory is `<dir>/<name>`; the same name resumes the same run."""
    dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = Field(0, ge=0, le=4_294_966)
    """Seed for initialisation, data order, dropout and augmentation, 0 to 4294966 (each rank's stream is seeded
    with seed x 1000 + rank, which NumPy takes below 2**32)."""
    doctor: bool = True
    """Run a brief `dtrain doctor` on all ranks before training (versions, config, all-reduce, shards, disk)."""
    stop_at_step: Optional[int] = Field(None, ge=1)
    """Checkpoint and exit (resumable) once this global step is reached; the schedule is unchanged."""
    callbacks: list[str] = []
    """Callbacks, each an import string `package.module:Class` called with no arguments: an object with any of
    on_train_start(run), on_step_end(step, loss), on_validation_end(step, metrics), on_checkpoint(path, step,
    best), on_train_end(result), on_exception(error), called on every rank (dtrain.callbacks). One with
    state_dict()/load_state_dict() is resumed exactly. Callbacks handed to dtrain.fit/main take their place."""


class DataConfig(Section):
    dataset: str = "digits"
    """Built-in data set (`digits`, `digits_parity`, `count`, `text`) or `folder:PATH` holding shards and their
    descriptors (train.json, val.json, test.json) written by `dtrain shard`. Not used when data.train is set."""
    train: Union[str, list[str], None] = None
    """Training shards of any webdataset: a shard descriptor (`.json` in the shape webdataset's wids uses, e.g.
    written by `dtrain index`), a brace pattern (`shards/train-{000000..000099}.tar`; local paths, `pipe:`
    commands and http(s):// URLs) whose sample counts are in data.counts, or a list of these."""
    val: Union[str, list[str], None] = None
    """Validation shards, given as data.train (null: no validation)."""
    test: Union[str, list[str], None] = None
    """Test shards, given as data.train (null: no final test)."""
    counts: Union[str, list[str], None] = None
    """Shard descriptor(s) holding the sample counts of shards that data.train/val/test name by pattern
    (`dtrain index PATTERN --out FILE` counts them from the tar headers). Without counts dtrain refuses."""
    trust_descriptor_pipes: bool = False
    """Let a shard descriptor's `pipe:` URLs run their shell commands. A descriptor is a data file (it may come
    from anyone), so by default only `pipe:` URLs you wrote yourself (data.train/val/test/counts, the command
    line) run; a descriptor entry with one is refused, naming the descriptor, the entry and this setting."""
    sample: Union[dict[str, str], str, None] = None
    """How a sample's tar members become fields: {field: extensions}, e.g. {x: "jpg;png", y: cls} (the first
    extension present; decoded by webdataset: images to float CHW tensors in [0, 1], cls to int, json, txt,
    npy, pth; a number inside a JSON member by a JSON pointer after `#`: y: "json#/count", "json#/labels/0"),
    or an import string `package.module:function` from the raw sample dict (member extension ->
    bytes, `__key__`, `__url__`) to a dict of fields. The first field is the input. null: the descriptor's
    own mapping (`dtrain shard --from-folder` writes one), else dtrain's x.npy + y.cls. Batches of mapped
    samples are dicts of fields plus `__key__` (the sample keys)."""
    image: Literal["rgb", "l", "rgba"] = "rgb"
    """Channels of images decoded by data.sample: rgb (3), l (grey, 1) or rgba (4), as float CHW in [0, 1]."""
    transform: Optional[str] = None
    """Per-sample transform of training inputs (the first field), an import string `package.module:callable`:
    any callable of one input, e.g. a torchvision.transforms.v2 pipeline defined in your module. It runs in
    the data workers with torch's, Python's and NumPy's global generators seeded from (run.seed, epoch,
    pass, sample key), so a resumed run augments exactly as an uninterrupted one on any number of ranks
    or workers. The `augment:` ops (if any) run after it."""
    collate: Optional[str] = None
    """Batching of mapped samples: an import string `package.module:callable` taking the list of sample dicts
    (fields only) and returning a dict, e.g. padding variable shapes. null: torch's default_collate per field."""
    task: Optional[Literal["classification", "regression", "lm"]] = None
    """What the labels are, for shards whose descriptor doesn't say (null: the descriptor's, else read from the
    first training samples' labels, field y: floating-point values a regression, integers a classification).
    lm: a causal language model on token ids: data.sample maps one field of 1-D integer token ids (e.g.
    {x: tokens.npy}), and each sample's input x is its tokens but the last, its target y its tokens but the
    first (next-token cross-entropy; metrics: token accuracy and perplexity)."""
    num_classes: Optional[int] = Field(None, ge=1)
    """Classes of a classification task, for shards whose descriptor doesn't say. Every label is checked
    against it as it is read (one line naming the sample and shard, not an IndexError mid-training)."""
    in_memory: Union[bool, Literal["auto"]] = "auto"
    """Read and decode each split once and keep it in memory: the same training batches, order and resume as
    from the shards, at the speed of indexing a tensor (evaluation splits: every world_size-th sample to a
    rank, equal shares). `auto`: on for dtrain's own shards (x.npy) that are local
    files of at most data.in_memory_mb in all, unless DataLoader workers would run a transform; for other
    shards set it true yourself (decoded images can take many times their files' size)."""
    in_memory_mb: int = Field(256, ge=1)
    """Largest split (its shard files' total size, MiB) that data.in_memory=auto keeps in memory."""
    root: str = "data"
    """Where built-in data sets' shards live (`<root>/<dataset>`); created on first use."""
    shard_size: int = Field(250, ge=1)
    """Samples per shard when shards are created on first use."""
    batch_size: int = Field(64, ge=1)
    """Micro-batch size per rank. Global batch = batch_size x world_size x train.grad_accum."""
    eval_batch_size: Optional[int] = Field(None, ge=1)
    """Batch size per rank for validation and test (no gradients or saved activations: often a larger one
    fits, and fewer, larger forwards are faster). Metrics are means over every sample whatever it is.
    null: data.batch_size."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0: load in the training process)."""
    prefetch_factor: Optional[int] = Field(None, ge=1)
    """Batches each DataLoader worker loads ahead (null: torch's default, 2; only with num_workers > 0).
    Workers are not persistent: a DataLoader is made per epoch pass, its workers forked with that pass's
    shard order, which is what makes resuming exact; the fork costs once per pass, not per step."""
    shuffle_buffer: int = Field(1000, ge=0)
    """Samples held in the per-worker shuffle buffer (0: no sample shuffle, shards are still permuted)."""
    remainder: Literal["drop", "pad"] = "drop"
    """Epoch length when samples don't divide into global batches: drop the rest, or pad by wrapping around."""
    count_samples: int = Field(6000, ge=30)
    """`count` data set: images generated in all splits."""
    count_max_objects: int = Field(9, ge=1, le=30)
    """`count` data set: at most this many objects per image."""
    text_context: int = Field(256, ge=2)
    """`text` data set: tokens per sample (model input); each window stored holds context + 1 bytes."""
    text_bytes: int = Field(1_000_000, ge=1000)
    """`text` data set: bytes of Python's own stdlib source read (in sorted file order) to make windows."""
    train_subset: Optional[int] = Field(None, ge=1)
    """Train on only the first N training samples (in shard order; built-in splits are already shuffled).
    Validation and test stay whole. null: all of them."""


class ModelConfig(Section):
    factory: str = "mlp"
    """The model: an import string `package.module:callable` returning an nn.Module (e.g.
    `torchvision.models:resnet18`, `timm:create_model`, `transformers:GPT2LMHeadModel`, or a function in your
    own package on PYTHONPATH), or one of dtrain's own: `mlp`, `cnn`, `gpt` (short for `dtrain.models:mlp`, ...).
    It is called with model.kwargs, plus the data set's `input_shape` and `num_outputs` (classes, or the
    vocabulary) where its signature names them and kwargs don't set them. Seeded with run.seed, so every
    rank builds the same weights."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of model.factory, e.g. {hidden: [256, 256], dropout: 0.1} for mlp or
    {num_classes: 2} for torchvision. A value that is a mapping with a `_target_` import string is built
    first (Hydra's convention), e.g. {config: {_target_: transformers:GPT2Config, n_layer: 2}}.
    dtrain's own: mlp (hidden, activation, dropout, init, norm), cnn (channels, activation, dropout, init,
    norm), gpt (n_layer, n_head, n_embd, block_size, vocab_size, bias, dropout); `dtrain config --describe`
    lists them."""
    head: str = "head"
    """Dotted name of the output layer that transfer learning replaces or keeps trainable (model.init_from,
    model.freeze_all_but_head, optim.backbone_lr_ratio): `head` for dtrain's models, `fc` for torchvision's
    ResNets, `classifier` for Hugging Face image classifiers, `lm_head` for its language models."""
    forward: Optional[str] = None
    """Import string of `forward(model, batch) -> output`, how a batch is fed to the model. null: `model(x)`
    for a tuple batch (x, y, keys) or a dict batch with an `x`; `model(**batch)` (keys not starting with `__`)
    for other dict batches, e.g. {input_ids, labels} for a Hugging Face model."""
    channels_last: Union[bool, Literal["auto"]] = "auto"
    """Keep conv weights and input images in channels-last memory layout (faster convolutions on tensor
    cores). `auto`: on for models with 2-d convolutions with CUDA, off elsewhere and with train.engine=fsdp."""
    init_from: Optional[str] = None
    """Start from another run's weights: a checkpoint directory (checkpoints/step-N, best, latest), a run
    directory (its best, else latest) or a file written by `dtrain export`. Verified and loaded with weights_only.
    A head (model.head) whose shape differs (a new task) keeps its fresh initialisation; every other weight must fit."""
    freeze: list[str] = []
    """Parameter-name prefixes to freeze (e.g. [body] or [body.0]); they are left bit-identical."""
    freeze_all_but_head: bool = False
    """Freeze every parameter outside model.head."""
    unfreeze_at_step: Optional[int] = Field(None, ge=1)
    """Unfreeze the frozen parameters after this many optimizer steps (null: stay frozen)."""


class LossConfig(Section):
    fn: Optional[str] = None
    """Your loss: an import string of `loss(output, batch, **loss.kwargs)` returning a scalar tensor or a
    dict of named scalar terms (each logged as loss/<name>; the total is its `loss` entry, else their sum).
    `output` is what the model returned (a tensor, a dict, a Hugging Face ModelOutput); `batch` is the
    batch as the data set yields it (a tuple (x, y, keys) or a dict). null: the built-in loss below."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of loss.fn."""
    name: Literal["auto", "mse", "mae", "huber", "cross_entropy"] = "auto"
    """Built-in loss; `auto` is cross_entropy for classification, mse for regression. Ignored when `terms` is set.
    It takes the model's output (its `logits` when the output is a dict) and the batch's target (y)."""
    terms: dict[Literal["mse", "mae", "huber", "cross_entropy"], Annotated[float, Field(ge=0)]] = {}
    """Weighted sum of named losses, weights >= 0, e.g. {mse: 1.0, mae: 0.5}; each term is also logged on its own
    (loss/<name>, val/loss/<name>). Empty: the single loss `name`."""
    huber_delta: float = Field(1.0, gt=0)
    """Huber: quadratic below this absolute error, linear above."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy: mix this much of the uniform distribution into the targets."""


class MetricsConfig(Section):
    """Evaluation metrics (validation and test), averaged over every sample of the split on all ranks."""

    builtin: bool = True
    """The data set's own metrics: accuracy (classification, per token for language models, plus
    perplexity), mae/mse and the predict-the-mean baseline (regression)."""
    fn: Optional[str] = None
    """Your metrics: an import string of `metrics(output, batch, **metrics.kwargs)` returning a dict of
    per-batch sums, {name: sum} (divided by the number of samples) or {name: (numerator, denominator)}
    (each summed, then divided); dtrain adds them over batches and ranks exactly."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of metrics.fn."""
    torchmetrics: dict[str, dict[str, Any]] = {}
    """torchmetrics objects by name, each a mapping with its `_target_` class and arguments, e.g.
    {f1: {_target_: torchmetrics.classification:MulticlassF1Score, num_classes: 10}}; updated with (logits,
    target) and synchronised across ranks by torchmetrics itself."""


# dtrain's own optimizers and schedules; any other optim.name or schedule.name is an import string
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "exponential", "cosine", "cosine_restarts")


def _builtin_or_import_string(key: str, value: str, builtins: tuple, example: str) -> str:
    if value not in builtins and not re.fullmatch(r"[\w.]+[:.][\w.]+", value):
        raise PydanticCustomError(
            "name",
            f"{key}: {value!r} is not {', '.join(builtins)} or an "
            f"import string ('package.module:Class', e.g. {example})",
        )
    return value


class OptimConfig(Section):
    name: str = "adamw"
    """`sgd` or `adamw` (dtrain's own, set up by the keys below), or an import string of a torch optimizer
    class or factory, e.g. `torch.optim:RAdam` or one in your own package, called with the param groups (each
    with its lr and weight_decay: optim.lr, optim.weight_decay, optim.backbone_lr_ratio and param groups
    handed in from Python apply to it) and optim.kwargs; momentum, nesterov, betas and fused are AdamW's and
    SGD's only (set with another optimizer, they are refused: give its own arguments in optim.kwargs)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (after warmup)."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (AdamW) or L2 (SGD), applied to weight matrices and kernels only."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    nesterov: bool = False
    """SGD: Nesterov momentum."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    backbone_lr_ratio: float = Field(1.0, gt=0)
    """Peak LR of every parameter outside `head` as a fraction of `lr` (e.g. 0.1 when fine-tuning)."""
    fused: Union[Literal["auto"], bool] = "auto"
    """AdamW: torch's fused kernel (`auto`: wherever torch has one for the parameters' device, GPU and CPU).
    It also skips a non-finite update on the device, so train.nonfinite=skip needs no host sync per step."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of optim.name when it is not sgd or adamw, e.g. {betas: [0.9, 0.99], eps: 1.0e-6}
    (not lr or weight_decay: they are optim.lr and optim.weight_decay)."""

    def check(self) -> None:
        """Config-level (its messages name the keys): dtrain's own optimizer, or one named with its kwargs."""
        _builtin_or_import_string("optim.name", self.name, OPTIMIZERS, "torch.optim:RAdam")
        if self.kwargs and self.name in OPTIMIZERS:
            raise PydanticCustomError(
                "kwargs",
                f"optim.kwargs applies to an optimizer named by an import string, "
                f"not to {self.name}; e.g. optim.name=torch.optim:AdamW",
            )
        named = sorted({"lr", "weight_decay"} & set(self.kwargs))
        if named:
            raise PydanticCustomError(
                "kwargs",
                f"optim.kwargs.{named[0]}: set optim.{named[0]} instead (each param "
                "group gets it, scaled by optim.backbone_lr_ratio)",
            )
        own = self.own_keys_set() if self.name not in OPTIMIZERS else []
        if own:
            raise PydanticCustomError(
                "own",
                f"optim.{own[0]} applies to sgd and adamw, not to {self.name}; put "
                f"that optimizer's arguments in optim.kwargs (e.g. {{{own[0]}: ...}})",
            )

    def own_keys_set(self) -> list[str]:
        """The keys of dtrain's own optimizers set to other than their defaults (another optimizer ignores them)."""
        defaults = OptimConfig()
        return [
            key for key in ("momentum", "nesterov", "betas", "fused") if getattr(self, key) != getattr(defaults, key)
        ]


class ScheduleConfig(Section):
    name: str = "cosine"
    """LR schedule after warmup (t = steps since warmup ended): `constant`; `step`: lr * gamma^floor(t/every);
    `exponential`: lr * gamma^(t/every), the same decay but smooth; `cosine`: one half cycle from lr down to
    min_lr_ratio * lr at the last step; `cosine_restarts`: cosine cycles of restart_every steps (each
    restart_mult times longer than the last), jumping back to lr at every restart. Or an import string of a
    torch LR scheduler class or factory, e.g. `torch.optim.lr_scheduler:OneCycleLR` or one in your own
    package, called with the optimizer and schedule.kwargs, and stepped once per optimizer step (its
    step sizes and lengths count optimizer steps, not epochs). Where its signature names them and
    schedule.kwargs doesn't set them, dtrain passes `total_steps` and `T_max` (the run's optimizer steps,
    unless kwargs set OneCycleLR's epochs or steps_per_epoch) and `max_lr` (each param group's peak LR).
    A scheduler whose step() needs a metric (ReduceLROnPlateau) is refused. Its state, arguments and
    length included, resumes from the checkpoint as it was saved: at resume schedule.*, optim.* and the
    training length cannot change."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from lr/warmup_steps to lr over this many optimizer steps, before any schedule."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine and cosine_restarts: lowest LR as a fraction of the peak."""
    every: int = Field(100, ge=1)
    """Step and exponential: the decay interval in optimizer steps."""
    gamma: float = Field(0.5, gt=0, le=1)
    """Step and exponential: LR factor per interval of `every` steps."""
    restart_every: int = Field(100, ge=1)
    """Cosine_restarts: length of the first cycle in optimizer steps."""
    restart_mult: int = Field(1, ge=1)
    """Cosine_restarts: each cycle is this many times longer than the one before (1: periodic)."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of schedule.name when it is not one of dtrain's own, e.g. {pct_start: 0.1} for
    OneCycleLR."""

    def check(self) -> None:
        """Config-level (its messages name the keys): dtrain's own schedule and its keys, or one named with
        its kwargs."""
        _builtin_or_import_string("schedule.name", self.name, SCHEDULES, "torch.optim.lr_scheduler:OneCycleLR")
        if self.name in SCHEDULES:
            if self.kwargs:
                raise PydanticCustomError(
                    "kwargs",
                    "schedule.kwargs applies to a scheduler named by an import "
                    f"string, not to {self.name}; set its keys schedule.warmup_steps, "
                    "...",
                )
            return
        own = self.own_keys_set()
        if own:
            raise PydanticCustomError(
                "own",
                f"schedule.{own[0]} applies to dtrain's own schedules, not to "
                f"{self.name}; put that scheduler's arguments in schedule.kwargs",
            )

    def own_keys_set(self) -> list[str]:
        """The keys of dtrain's own schedules set to other than their defaults (another scheduler ignores them)."""
        defaults = ScheduleConfig()
        return [
            key
            for key in ScheduleConfig.model_fields
            if key not in ("name", "kwargs") and getattr(self, key) != getattr(defaults, key)
        ]


class TrainConfig(Section):
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    """`ddp`: DistributedDataParallel (one process: plain PyTorch); `deepspeed`: DeepSpeed ZeRO, set up by the
    `deepspeed:` section (needs `pip install 'dtrain[deepspeed]'`); `fsdp`: PyTorch FSDP2 (`fully_shard`), set
    up by the `fsdp:` section, whose sharded checkpoints resume on any number of ranks."""
    epochs: int = Field(20, ge=1)
    """Passes over the training split."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Cap on optimizer steps (the schedule spans min(epochs x steps_per_epoch, max_steps))."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; gradients are all-reduced only on the last one."""
    clip_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 autocast on GPUs that support it, fp32 elsewhere; fp16 adds a gradient scaler."""
    compile: Union[bool, Literal["auto"]] = "auto"
    """torch.compile the model (the first steps are slow while it compiles). `auto`: on with CUDA, off on CPU,
    where compiling costs more time than short runs win back."""
    peak_flops: Optional[float] = Field(None, gt=0)
    """Peak FLOP/s of one device at the training precision, for MFU. null: looked up for known GPUs (H100,
    H200, A100 at bf16); unknown devices and CPUs log no MFU."""
    nonfinite: Literal["skip", "stop", "ignore"] = "skip"
    """A NaN/inf gradient on any rank (all-reduced, so every rank sees it): skip that update, or stop
    keeping the last good checkpoint. With fused AdamW (optim.fused) `skip` happens on the device and is
    reported at the next log line; otherwise, and for `stop`, the gradient norm is read on the host each step.
    Whatever the setting, non-finite weights (checked before each save and at the end), or a finished run's
    last two or more updates skipped, stop the run as diverged (`nonfinite`, exit 2, nothing after saved)."""
    val_every: int = Field(0, ge=0)
    """Validate every N optimizer steps (0: at the end of every epoch)."""
    log_every: int = Field(50, ge=1)
    """Log averaged training metrics every N optimizer steps (each record all-reduces the loss: on 2 CPU
    ranks every 10 steps cost ~3% of the digits example's speed; 50 is Lightning's default too)."""
    debug_steps: int = Field(5, ge=1)
    """Optimizer steps run by `dtrain train --debug`."""


class DeepSpeedConfig(Section):
    """Used with train.engine=deepspeed. Accumulation, clipping, micro-batch size and precision come from
    train.grad_accum, train.clip_grad_norm, data.batch_size and train.precision (bf16/fp16)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters (0: plain data parallel)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state (and its step) in CPU memory (ZeRO 1-3)."""
    offload_param: Literal["none", "cpu"] = "none"
    """Keep parameters in CPU memory between uses (ZeRO-3 only)."""


class FSDPConfig(Section):
    """Used with train.engine=fsdp: parameters, gradients and optimizer state sharded over the ranks with
    FSDP2's `fully_shard`, checkpoints written by torch.distributed.checkpoint (each rank its shards). Accumulation,
    clipping and the NaN policy come from train.grad_accum, train.clip_grad_norm and train.nonfinite."""

    blocks: list[str] = []
    """Module lists (nn.ModuleList or nn.Sequential) whose children are sharded one by one, each gathered only
    while it runs: [body.h] for model.name=gpt, [transformer.h] for Hugging Face GPT-2, [layer1, layer2, layer3,
    layer4] for a torchvision ResNet. The root module shards the rest. Empty: the largest nn.ModuleList; a
    model without one is sharded as one unit at the root (which saves no memory while it runs)."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again in backward (less memory,
    one more all-gather per block); false keeps them until backward. The root is always kept."""
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype of the gathered parameters that forward and backward compute with (and are all-gathered in); the
    sharded parameters and the optimizer state stay fp32. `auto`: bf16 when train.precision resolves to bf16
    (GPUs that have it), fp32 otherwise."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype gradients are reduce-scattered (summed over ranks) in; fp32 keeps bf16 gradients' sums exact."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory; the optimizer steps on the CPU."""
    activation_checkpointing: bool = False
    """Keep only each block's input in forward and recompute its activations in backward (less memory, about
    a third more compute); needs blocks."""


class EarlyStopConfig(Section):
    monitor: str = "val/loss"
    """The validation metric that decides the best checkpoint (checkpoints/best, checkpoint.keep_best, the W&B
    alias `best`, the summary's best) and early stopping, named as metrics.jsonl logs it: val/loss, a loss term
    (val/loss/NAME), val/acc, val/mae, val/ppl, a metrics.fn or torchmetrics name (val/NAME). Checked at
    start-up against what validation logs; it cannot change when a run resumes."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (min) or higher (max) values of early_stop.monitor are better. `auto`: max for acc, min for
    the loss and its terms, ppl, mae and mse; other metrics need min or max set."""
    patience: Optional[int] = Field(None, ge=1)
    """Stop after this many validations without improvement (null: never stop early)."""
    min_delta: float = Field(0.0, ge=0)
    """An improvement must better early_stop.monitor by more than this (lower it under min, raise it under max)."""


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)
    """Save every N optimizer steps (0: only at the end and on a new best)."""
    keep_last: int = Field(2, ge=1)
    """Keep this many most recent checkpoints."""
    keep_best: int = Field(1, ge=0)
    """Also keep this many checkpoints with the best early_stop.monitor (the validation loss by default)."""
    async_save: bool = False
    """Write checkpoints in a background thread while training goes on (at most one in flight). The loop
    pauses only to copy the state into CPU memory (pinned buffers kept between saves, from a GPU; rank 0 holds
    the model and optimizer copy, the other ranks only their RNG states). train.engine=fsdp: every rank's
    shards are copied to CPU memory and written by torch.distributed.checkpoint's async_save.
    train.engine=deepspeed: its ZeRO shards are written before the loop goes on (DeepSpeed's save uses the
    training group), the rest in the background."""
    save_best: bool = True
    """Save a checkpoint when early_stop.monitor (the validation loss by default) improves; `best` names it."""
    elastic: Literal["exact", "approximate"] = "exact"
    """Resuming on a different number of ranks keeps the checkpoint's global batch (per-rank batch, then
    grad_accum, rechosen). `exact`: stop with an error when it can't be split evenly over the new ranks;
    `approximate`: use the nearest per-rank batch (LR unchanged, steps per epoch kept). Not for train.engine=deepspeed."""


class DistConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; `auto` is nccl with CUDA, gloo otherwise."""
    timeout_s: float = Field(600.0, gt=0)
    """Collective timeout: a stalled rank ends the job after this long instead of hanging."""
    connect_timeout_s: float = Field(60.0, gt=0)
    """Rendezvous timeout: a rank that can't reach the master, or waits for ranks that never come, stops after this long."""


class LogConfig(Section):
    progress: bool = True
    """Progress bars on rank 0 (training, validation and test batches), on a terminal only: a log file gets
    the lines alone."""
    all_ranks: bool = False
    """Let every rank print its log lines (prefixed with its rank), not just rank 0."""
    sample_keys: bool = False
    """Every rank writes the keys of the samples of each step to `sample_keys/rank-00000.txt` (rank 1:
    `rank-00001.txt`, ...), a line per optimizer step, `STEP key key ...` (audits the data order)."""
    loggers: list[Literal["jsonl", "tensorboard", "csv", "wandb"]] = ["jsonl"]
    """Where rank 0 writes the metric records (train loss, lr, throughput, MFU, val/*, test/*), e.g. [jsonl,
    tensorboard, csv]: `jsonl` is metrics.jsonl, always written (dtrain plot and resume read it); `tensorboard`
    <run dir>/tensorboard/ (scalars and the config as text; `pip install dtrain[tensorboard]`); `csv`
    metrics.csv (a column per key); `wandb` a W&B run set up by the wandb section (as wandb.enabled=true).
    A resumed run appends to the same logs, each step once."""


class FlipAugment(Section):
    p: float = Field(0.0, ge=0, le=1)
    """Probability of flipping a training sample."""


class BrightnessAugment(Section):
    p: float = Field(0.0, ge=0, le=1)
    """Probability of shifting a training sample's brightness."""
    max_delta: float = Field(0.2, ge=0, le=1)
    """Add a uniform offset in [-max_delta, max_delta] (pixel values are scaled to [0, 1])."""


class ContrastAugment(Section):
    p: float = Field(0.0, ge=0, le=1)
    """Probability of changing a training sample's contrast."""
    max_factor: float = Field(0.3, ge=0, lt=1)
    """Scale deviations from the image mean by a uniform factor in [1 - max_factor, 1 + max_factor]."""


class NoiseAugment(Section):
    p: float = Field(0.0, ge=0, le=1)
    """Probability of adding Gaussian noise to a training sample."""
    std: float = Field(0.05, ge=0)
    """Standard deviation of the noise (pixel values are scaled to [0, 1])."""


class CropAugment(Section):
    p: float = Field(0.0, ge=0, le=1)
    """Probability of a random crop: zero-pad by max_shift pixels, cut a window of the original size."""
    max_shift: int = Field(1, ge=1)
    """Largest shift in pixels along each axis."""


class AugmentConfig(Section):
    """On-the-fly augmentation of training samples only (validation and test never). Each sample's random
    draws are a pure function of (run.seed, epoch, pass, sample key), so a resumed run sees the same ones."""

    hflip: FlipAugment = FlipAugment()
    """Horizontal flip."""
    vflip: FlipAugment = FlipAugment()
    """Vertical flip."""
    brightness: BrightnessAugment = BrightnessAugment()
    """Additive brightness change."""
    contrast: ContrastAugment = ContrastAugment()
    """Contrast change around the image mean."""
    noise: NoiseAugment = NoiseAugment()
    """Additive Gaussian noise."""
    crop: CropAugment = CropAugment()
    """Random crop with zero padding (a random shift)."""


class WandbConfig(Section):
    enabled: bool = False
    """Log metrics and the resolved config to Weights & Biases from rank 0 (needs `pip install dtrain[wandb]`);
    the same as `wandb` in log.loggers (either turns it on)."""
    project: str = "dtrain"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); null: your default."""
    mode: Literal["offline", "online"] = "offline"
    """`offline` writes the run under <run dir>/wandb/ (upload later with `wandb sync`); `online` streams it."""
    name: Optional[str] = None
    """Display name of the W&B run (null: run.name)."""
    group: Optional[str] = None
    """W&B group, e.g. to gather the runs of a sweep."""
    tags: list[str] = []
    """W&B tags."""
    log_checkpoints: Literal[False, "best", "all"] = False
    """Log checkpoints as W&B artifacts (`checkpoint-<run id>`, type model) once published and checksummed,
    from the save thread: `best`: each new best (alias `best`); `all`: every save (alias `latest`, and `best`
    when it is one). false: none. A full copy per version unless checkpoint_references."""
    checkpoint_references: Union[bool, str] = False
    """Log checkpoint artifacts as references, nothing copied or uploaded. true: `file://` URIs of the step
    directory's files (paths and checksums), for a shared file system every reader can reach; the files stay
    where keep_last leaves them. An `s3://bucket/prefix` the checkpoint directory is mirrored to: the URI
    `<prefix>/step-N`, unchecksummed (nothing is read from the bucket; needs boto3; syncing is yours)."""

    @field_validator("checkpoint_references", mode="before")
    @classmethod
    def _reference_scheme(cls, value: Any) -> Union[bool, str]:
        if isinstance(value, bool):
            return value
        if not (isinstance(value, str) and re.fullmatch(r"s3://[^/\s]+(/\S*)?", value)):
            raise PydanticCustomError(
                "reference",
                "must be true, false or an s3:// prefix (s3://bucket/path) the checkpoint directory is mirrored to",
            )
        return value.rstrip("/")


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    metrics: MetricsConfig = MetricsConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    fsdp: FSDPConfig = FSDPConfig()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    dist: DistConfig = DistConfig()
    log: LogConfig = LogConfig()
    augment: AugmentConfig = AugmentConfig()
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="after")
    def _engine_can_run_it(self) -> "Config":
        """Settings the engine can't honour, refused before anything starts (one line, exit 2). The engine
        declares them (dtrain/capabilities.py: rules on the config, no torch), so no engine is named here."""
        self.optim.check()
        self.schedule.check()
        reasons = capabilities.unsupported(self)
        if reasons:
            raise PydanticCustomError("engine", reasons[0])
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_saved(cls, data: dict) -> "Config":
        """A resolved config as a checkpoint or an exported file stored it (older ones included)."""
        return cls.model_validate(_migrate(data))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short hash of the resolved config (ranks compare it; checkpoints and W&B artifacts record it). Its
        secrets count as "<redacted>": an unsalted fast hash of a known config would give a short one away."""
        blob = json.dumps(redact(self.to_dict()), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# dtrain 0.1's model keys, now arguments of dtrain's own model factories (model.kwargs)
LEGACY_MODEL_KEYS = {"hidden", "channels", "activation", "dropout", "init", "norm", "gpt"}


def _migrate(data: dict) -> dict:
    """A config written before model.factory existed (model.name: mlp, model.hidden: ...) in today's keys."""
    model = dict(data.get("model", {}))
    if "name" not in model:
        return data
    name = model.pop("name")
    kwargs = {k: model.pop(k) for k in list(model) if k in LEGACY_MODEL_KEYS}
    kwargs.update(kwargs.pop("gpt", None) or {})
    if name == "gpt":  # gpt never took these
        for k in ("hidden", "channels", "activation", "init", "norm"):
            kwargs.pop(k, None)
    else:
        kwargs.pop("channels" if name == "mlp" else "hidden", None)
    return {**data, "model": {**model, "factory": name, "kwargs": kwargs}}


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) of every setting, sections flattened."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    return [key for key, _ in _leaf_fields(model, prefix)]


def _check_keys(data: Any, model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with the closest valid one as a suggestion (pydantic alone can't)."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"config: {where} must be a mapping of keys, got {type(data).__name__}")
    for key, value in data.items():
        full = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            if model is ModelConfig and key in LEGACY_MODEL_KEYS | {"name"}:
                raise ConfigError(
                    f"config: '{full}' is now "
                    + (
                        "model.factory (mlp, cnn, gpt or an import string)"
                        if key == "name"
                        else f"an argument of dtrain's model factories: model.kwargs.{key}"
                    )
                )
            close = difflib.get_close_matches(full, _valid_keys(Config), n=1, cutoff=0.6)
            hint = (
                f"; did you mean '{close[0]}'?"
                if close
                else f"; valid keys under '{prefix.rstrip('.') or 'top level'}': {', '.join(model.model_fields)}"
            )
            raise ConfigError(f"config: unknown key '{full}'{hint}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value, ann, f"{full}.")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (numbers, lists, null, true)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config: override '{text}' must look like key.sub=value")
    try:
        value = load_yaml(raw, f"override '{key.strip()}'") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_yaml(path: Path) -> dict:
    """One config file's settings, keys checked."""
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "a config file is YAML saved as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: {path}{where} is not valid YAML: {problem}") from None
    _check_keys(loaded, Config)
    return loaded


MAX_YAML_DEPTH = 100  # configs nest a few levels; PyYAML's composer, pydantic and json recurse once per level
MAX_YAML_VALUES = 1_000_000  # values once aliases are expanded; a config file with as many would be megabytes


def load_yaml(text: str, what: str) -> Any:
    """`text` as YAML with safe_load (tags that construct Python objects are refused), after one pass over its
    events that refuses in one line nesting deeper than MAX_YAML_DEPTH (PyYAML recursed into a RecursionError
    at 50,000 levels; libyaml stops at 1,000 with a YAMLError) and more than MAX_YAML_VALUES values once
    aliases are expanded: PyYAML shares an alias's value, but validation, the config's hash and config.yaml
    copy it out in full, and nine levels of nine aliases each are 387 million values (it ran for minutes)."""
    total = 0  # values so far
    opened: list[tuple[Optional[str], int]] = []  # (anchor, total before it) per open collection
    sizes: dict[Optional[str], int] = {}  # values per anchor
    # libyaml's parser where PyYAML has it: the pure-Python one took 1.8 s to reach level 100 of 50,000 '['
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)  # an undefined alias: safe_load says so below
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            sizes[event.anchor] = 1  # (the anchor None is never looked up)
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            opened.append((event.anchor, total - 1))
            if len(opened) > MAX_YAML_DEPTH:
                raise ConfigError(
                    f"config: {what} nests deeper than {MAX_YAML_DEPTH} levels (line "
                    f"{event.start_mark.line + 1}); a config is sections of settings a few levels deep"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = opened.pop()
            sizes[anchor] = total - before
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                f"config: {what} holds more than {MAX_YAML_VALUES:,} values once its aliases are "
                f"expanded (line {event.start_mark.line + 1}); write the settings out instead of "
                "nesting aliases"
            )
    return yaml.safe_load(text)


def load_config(
    path: Union[str, Path, Sequence[Union[str, Path]], None] = None,
    overrides: Sequence[str] = (),
    defaults: Optional[dict] = None,
) -> Config:
    """Defaults, a script's own `defaults` (dotted keys, from dtrain.main(config=...)), then the YAML file(s)
    in order (`--config a.yaml --config b.yaml`: b's settings over a's, section by section, as Hydra and
    LightningCLI compose them), then `key=value` overrides; validated and frozen."""
    data: dict = {}
    for key, value in (defaults or {}).items():
        _set_dotted(data, key, value)
    _check_keys(data, Config)
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for one in paths:
        data = _merge(data, _read_yaml(Path(one)))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    _check_keys(data, Config)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a combination of settings (Config._engine_can_run_it): the message names them
            raise ConfigError(f"config: {err['msg']}") from None
        key = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        raise ConfigError(f"config: {key}: {err['msg']}{shown}") from None


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section (a dict-valued setting such as model.kwargs is replaced whole:
    a file's kwargs are the factory's arguments, not additions to a script's)."""
    out = dict(base)
    for key, value in top.items():
        section = Config.model_fields.get(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and section is not None:
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per key: `key = default  # docstring`."""
    return [
        f"{key} = {field.default!r}  # {' '.join((field.description or '').split())}"
        for key, field in _leaf_fields(model, prefix)
    ]
