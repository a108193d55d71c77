"""Data: shards (dtrain's own or any webdataset) -> per-rank minibatch streams."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from ..config import ConfigError, DataConfig
from .errors import DataError

if TYPE_CHECKING:
    from .pipeline import ShardStream
    from .shards import ShardIndex

# The package's names from its modules, imported as first asked for (PEP 562): importing any module of the
# package runs this file, and a module that needs no torch (fields: `dtrain launch`'s check of data.sample,
# before any worker starts) must not wait 1.5 s and more for it.
_FROM = {"make_builtin": "builtin", "ShardStream": "pipeline", "ShardIndex": "shards", "read_index": "shards"}


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)


def resolve_shards(cfg: DataConfig, seed: int, create: bool = True) -> ShardIndex:
    """The shard index of `data.train`/`val`/`test` if set, else of `cfg.dataset`; built-in data sets are
    written on first use (by rank 0)."""
    from .datasets import BUILTIN, FOLDERS
    from .shards import index_from_config, read_index

    if cfg.train:
        return index_from_config(cfg)
    if cfg.val or cfg.test:
        raise ConfigError("config: data.val and data.test need data.train (the training shards) as well")
    if cfg.dataset.startswith("folder:"):
        return read_index(cfg.dataset.removeprefix("folder:"), cfg.trust_descriptor_pipes)
    if cfg.dataset not in BUILTIN and cfg.dataset not in FOLDERS:
        raise DataError(
            f"data: unknown dataset '{cfg.dataset}'; built-in: {', '.join([*BUILTIN, *FOLDERS])} (or folder:PATH)"
        )
    root = Path(cfg.root) / cfg.dataset
    params = builtin_params(cfg)
    if create and not (root / "train.json").exists():
        from .. import dist
        from .builtin import make_builtin

        # rank 0 writes (atomically, via a temp dir); the others wait for it
        if dist.broadcast_object(None) is None and _is_zero():
            _make_once(root, lambda: make_builtin(cfg.dataset, root, cfg.shard_size, seed=0, **params))
        dist.barrier()
    index = read_index(root, cfg.trust_descriptor_pipes)
    if params and any(index.params.get(k) != v for k, v in params.items()):
        raise DataError(
            f"data: shards in {root} were made with {index.params}, the config asks for {params}; "
            f"delete {root} or set data.root elsewhere"
        )
    return index


def check_first_sample(cfg: DataConfig) -> None:
    """data.sample held against the members of the first sample the workers decode, before any worker starts
    (`dtrain train` and `dtrain launch`, before torch is imported): their own DataError line for a field that
    no member has, in a second, not after every worker imported torch and built its streams. Only where that
    is cheap and certain: a field mapping, and the local descriptors and shards the workers will read (a
    built-in data set once written); anything else (remote or pipe: shards, a data set not yet written, a
    mistake in the split itself, a shard it cannot read) is left to the workers, who check every sample."""
    from .fields import check_first_sample as check
    from .sources import has_scheme

    if not isinstance(cfg.sample, dict) or (cfg.task == "lm" and len(cfg.sample) != 1):
        return  # a function's fields are seen per sample; task lm's one-field rule is the workers' line
    named = [
        item
        for spec in (cfg.train, cfg.val, cfg.test, cfg.counts)
        for item in ([spec] if isinstance(spec, str) else spec or [])
    ]
    if any(not isinstance(item, str) or has_scheme(item) or "${" in item for item in named):
        return  # read through webdataset (gopen, expand_urls): torch, and maybe the network
    try:
        index = resolve_shards(cfg, seed=0, create=False)
        train = (index.subset("train", cfg.train_subset) if cfg.train_subset else index).shards("train")
    except (ConfigError, DataError, ValueError):  # the workers say these (braceexpand's errors: ValueError)
        return
    # The first sample decoded: the task is read from the first training samples' labels when neither
    # data.task nor the descriptor says it (infer_task), else the model is probed on the first validation
    # batch (build.build_core), unless the model asked for the input's shape first and no descriptor said it
    if not (cfg.task or index.task) or not index.has("val"):
        first = train[0]
    elif index.input_shape:
        first = index.shards("val")[0]
    else:
        return  # train's first sample or val's: which depends on the model's factory
    if not has_scheme(first) and os.path.isfile(first):
        check(cfg.sample, first)


def builtin_params(cfg: DataConfig) -> dict:
    """The data config keys a built-in data set is generated from (recorded in its descriptors)."""
    if cfg.dataset == "count":
        return {"samples": cfg.count_samples, "max_objects": cfg.count_max_objects}
    if cfg.dataset == "text":
        return {"context": cfg.text_context, "num_bytes": cfg.text_bytes}
    return {}


def _make_once(root: Path, make) -> None:
    """`make()` unless another process made `root` meanwhile, under a file lock beside it: processes that share
    no barrier (the replica groups of `dtrain launch --ft`, two runs on one data.root) each wrote the data set,
    and one replaced the directory while the other read it ('missing shard ... listed in train.json')."""
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "train.json").exists():
            make()


def _is_zero() -> bool:
    import torch.distributed as td

    return not (td.is_available() and td.is_initialized()) or td.get_rank() == 0


def _hook(given, spec: Optional[str], key: str):
    """A hook handed in from Python, else the callable the config's import string names."""
    from ..importing import resolve

    return given if given is not None else resolve(spec, key) if spec else None


def sample_format(
    cfg: DataConfig, index: ShardIndex, sample: Union[dict, Callable, None] = None, collate: Optional[Callable] = None
):
    """How samples are decoded and batched: `sample` (a field mapping or a function, from Python), else
    data.sample, else the descriptor's own mapping, else dtrain's x.npy + y.cls."""
    from .samples import DtrainFormat, FieldMap, MappedFormat

    spec = sample if sample is not None else cfg.sample if cfg.sample is not None else index.meta.get("sample")
    collate = _hook(collate, cfg.collate, "data.collate")
    if spec is None:
        if "x_scale" not in index.meta:
            raise ConfigError(
                f"config: data.sample: the shards of {index.where} are not dtrain's own (x.npy + y.cls); "
                "map their members to fields, e.g. data.sample='{x: jpg;png, y: cls}'"
            )
        if collate is not None:
            raise ConfigError("config: data.collate batches mapped samples; set data.sample as well")
        return DtrainFormat(cfg.task or index.task or "classification", index.x_scale)
    if isinstance(spec, dict):
        return MappedFormat(FieldMap(spec, cfg.image), collate)
    if isinstance(spec, str):
        return MappedFormat(_hook(None, spec, "data.sample"), collate, f"data.sample ({spec})")
    from ..importing import describe

    return MappedFormat(spec, collate, describe(spec))


def _in_memory(cfg: DataConfig, index: ShardIndex, split: str, fmt, transform, workers: int) -> bool:
    from .sources import has_scheme

    if cfg.in_memory != "auto":
        return bool(cfg.in_memory)
    if fmt.mapped or (transform is not None and workers > 0):  # decoded images can be large; workers transform
        return False
    urls = index.shards(split)
    return not any(has_scheme(u) for u in urls) and sum(map(os.path.getsize, urls)) <= cfg.in_memory_mb * 2**20


@dataclasses.dataclass
class Streams:
    """A run's data: the split streams of this rank (val, test: None when the data has none) and what is
    known of the data (`task`, `num_classes`, `input_shape`, `y_mean`, `classes`)."""

    train: ShardStream
    val: Optional[ShardStream]
    test: Optional[ShardStream]
    index: ShardIndex
    task: str
    num_classes: Optional[int]
    y_mean: Optional[float]  # the training mean of the target, where known
    classes: Optional[list]
    task_from_labels: bool = False  # neither data.task nor a descriptor said: read from the first labels

    @property
    def notes(self) -> list[str]:
        """What a run says about its data before it starts (rank 0 logs them)."""
        if not self.task_from_labels:
            return []
        kind = "floating-point" if self.task == "regression" else "integers"
        return [
            f"data: task {self.task}: the first training samples' labels (field y) are {kind}; set data.task to choose"
        ]

    @property
    def mapped(self) -> bool:
        """Batches are dicts (`{field: ..., "__key__": keys}`), not dtrain's (x, y, keys) tuples."""
        return self.train.format.mapped

    @functools.cached_property
    def input(self) -> tuple[Optional[tuple], str]:
        """(the input shape, "") or (None, why it is unknown): the descriptor's shape, else that of the first
        training sample's input (its first field, read from its shard). Text, lists and other values without
        a shape are left to the collate hook as they are: their shape is unknown, not an error."""
        import numpy as np
        import torch

        if self.index.input_shape:
            return self.index.input_shape, ""
        name, x = next((k, v) for k, v in self.train.first_sample().items() if k != "__key__")
        if isinstance(x, (torch.Tensor, np.ndarray, np.number)):
            return tuple(x.shape), ""
        if isinstance(x, (int, float)):
            return (), ""
        return None, f"the input field '{name}' is a {type(x).__name__}"

    @property
    def input_shape(self) -> Optional[tuple]:
        return self.input[0]


def build_streams(
    cfg: DataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    grad_accum: int = 1,
    num_workers: Optional[int] = None,
    pin_memory: bool = False,
    augment: Optional[Callable] = None,
    sample: Union[dict, Callable, None] = None,
    transform: Optional[Callable] = None,
    collate: Optional[Callable] = None,
    create: bool = True,
) -> Streams:
    """This rank's streams of every split from the data config. `augment`: dtrain's own augmentation
    (augment.build_augment); `sample`, `transform`, `collate`: a user's hooks handed in from Python, in
    place of data.sample, data.transform, data.collate."""
    from .augment import SeededTransform, chain
    from .pipeline import ShardStream
    from .samples import ClassLabels

    index = resolve_shards(cfg, seed, create)
    fmt = sample_format(cfg, index, sample, collate)
    train_index = index.subset("train", cfg.train_subset) if cfg.train_subset else index
    inferred = (
        None
        if cfg.task or index.task
        else infer_task(ShardStream(train_index, "train", batch_size=1, rank=0, world_size=1, sample_format=fmt))
    )
    task = cfg.task or index.task or inferred or "classification"
    num_classes = cfg.num_classes or index.num_classes
    if task == "lm" and fmt.mapped:  # one field of token ids: y is x shifted by one
        fmt = fmt.predicting_next()
    if task == "classification":  # every label checked as it is decoded, in every split
        fmt = fmt.checking(ClassLabels(num_classes, floats=getattr(fmt, "collate", None) is None))
    user = _hook(transform, cfg.transform, "data.transform")
    train_transform = chain(SeededTransform(user, seed) if user is not None else None, augment)
    workers = cfg.num_workers if num_workers is None else num_workers
    common = dict(
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=cfg.prefetch_factor,
        sample_format=fmt,
    )
    train = ShardStream(
        train_index,
        "train",
        train=True,
        seed=seed,
        grad_accum=grad_accum,
        shuffle_buffer=cfg.shuffle_buffer,
        remainder=cfg.remainder,
        transform=train_transform,
        in_memory=_in_memory(cfg, train_index, "train", fmt, train_transform, workers),
        **common,
    )
    evaluation = {**common, "batch_size": cfg.eval_batch_size or cfg.batch_size}
    evals = {
        split: ShardStream(
            index, split, seed=seed, in_memory=_in_memory(cfg, index, split, fmt, None, workers), **evaluation
        )
        if index.has(split)
        else None
        for split in ("val", "test")
    }
    # the training mean of the target: known from the descriptor of shards dtrain wrote, else unknown (None:
    # no mae_predict_mean), rather than worked out from a pass over every label before the first step
    return Streams(
        train,
        evals["val"],
        evals["test"],
        index,
        task=task,
        num_classes=num_classes,
        y_mean=index.stats.get("train", {}).get("y_mean"),
        classes=index.classes,
        task_from_labels=inferred is not None,
    )


INFER_FROM = 8  # training samples whose labels say the task when neither data.task nor a descriptor does


def infer_task(train: ShardStream) -> Optional[str]:
    """The task of shards that don't say (dtrain didn't write them) and data.task left out, from the first
    training samples' targets (field y) as batched: floating-point values are a regression, integers a
    classification. None without a y field: dtrain's built-in loss and metrics don't apply (a user's loss
    and metrics score the run)."""
    from .samples import task_of_labels

    batch = train.first_batch(INFER_FROM)
    y = batch.get("y") if isinstance(batch, dict) else batch[1]
    if y is None:
        return None
    task = task_of_labels(y)
    if task is None:
        raise DataError(
            f"data: cannot tell the task from the labels of {train.urls[0]} (field y is a "
            f"{type(y).__name__}): set data.task=classification or data.task=regression"
        )
    return task


__all__ = [
    "DataError",
    "ShardIndex",
    "ShardStream",
    "Streams",
    "build_streams",
    "make_builtin",
    "read_index",
    "resolve_shards",
    "sample_format",
]
