"""The shards of each split with their sample counts (`ShardIndex`), and writing shards.

A shard directory written by dtrain (`dtrain shard`, the built-in data sets, `shard --from-folder`):
  train-000000.tar ...  val-000000.tar ...  test-000000.tar ...
  train.json  val.json  test.json     one shard descriptor per split, in the shape of webdataset's wids
                                      (sources.py), with dtrain's extra key: task, num_classes, input_shape,
                                      x_scale, params, stats, classes, sample (the default data.sample)
The built-in data sets' samples are {"__key__", "x.npy" (uint8 array), "y.cls" (label; none for task lm)}.
The counts let every rank know the epoch's length before reading a byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .errors import DataError
from .sources import Descriptor, descriptor, has_scheme, resolve_split, write_descriptor

if TYPE_CHECKING:
    from ..config import DataConfig

SPLITS = ("train", "val", "test")
LEGACY_INDEX = "index.json"  # dtrain's index before descriptors: still read


@dataclass(frozen=True)
class ShardIndex:
    """Per split, its shards in order with the samples to read from each; what is known of the data."""

    splits: dict  # split -> {url: samples read}: the descriptor's counts, fewer after `subset`
    meta: dict = field(default_factory=dict)  # the descriptors' `dtrain` key (empty for foreign shards)
    listed: dict = field(default_factory=dict)  # split -> {url: samples its descriptor lists}
    where: str = ""  # the directory or config keys the index came from, for messages

    def __post_init__(self):
        if not self.listed:
            object.__setattr__(self, "listed", {s: dict(c) for s, c in self.splits.items()})

    task = property(lambda self: self.meta.get("task"))
    num_classes = property(lambda self: self.meta.get("num_classes"))
    input_shape = property(lambda self: tuple(self.meta["input_shape"]) if self.meta.get("input_shape") else None)
    x_scale = property(lambda self: float(self.meta.get("x_scale", 1.0)))
    params = property(lambda self: self.meta.get("params", {}))
    stats = property(lambda self: self.meta.get("stats", {}))
    classes = property(lambda self: self.meta.get("classes"))

    def has(self, split: str) -> bool:
        return bool(self.splits.get(split))

    def shards(self, split: str) -> list[str]:
        if not self.has(split):
            raise DataError(f"data: {self.where} has no '{split}' shards")
        return list(self.splits[split])

    def num_samples(self, split: str) -> int:
        return sum(self.splits[split].values())

    def counts(self, split: str) -> list[int]:
        return list(self.splits[split].values())

    def subset(self, split: str, n: int) -> "ShardIndex":
        """The same index with only the first `n` samples of `split` (in shard order): later shards are
        dropped and the last one kept is counted short; streams read only that many of its samples."""
        total = self.num_samples(split)
        if n > total:
            raise DataError(f"data: train_subset {n} is larger than the {total} '{split}' samples in {self.where}")
        kept: dict[str, int] = {}
        for url, count in self.splits[split].items():
            if n <= 0:
                break
            kept[url] = min(count, n)
            n -= kept[url]
        return dataclasses.replace(self, splits={**self.splits, split: kept})


def write_shards(out: str | Path, splits: dict, meta: dict, shard_size: int, progress: bool = False) -> ShardIndex:
    """Arrays {split: (x, y)} as dtrain's own samples (x.npy + y.cls), a descriptor per split."""
    stats = {split: {"y_mean": float(np.mean(y)) if len(y) else 0.0} for split, (_, y) in splits.items()}
    meta = {
        **{k: meta[k] for k in ("task", "num_classes", "input_shape", "x_scale")},
        "params": meta.get("params", {}),
        "stats": stats,
    }

    def samples(split, x, y):
        for i in range(len(x)):
            sample = {"__key__": f"{split}-{i:07d}", "x.npy": np.ascontiguousarray(x[i])}
            if meta["task"] != "lm":  # a language model's targets are its input shifted: no label
                sample["y.cls"] = int(y[i])
            yield sample

    return write_split_shards(
        out, {s: (samples(s, x, y), len(x)) for s, (x, y) in splits.items()}, meta, shard_size, progress
    )


def write_split_shards(
    out: str | Path, splits: dict[str, tuple[Iterable[dict], int]], meta: dict, shard_size: int, progress: bool = False
) -> ShardIndex:
    """Write every split ({split: (samples, how many)}) as tar shards and a descriptor into a temp dir,
    then rename it into place: a half-written directory never looks complete (several ranks or a killed
    process can't leave one behind). `progress`: a bar per split on a terminal (`dtrain shard`)."""
    import webdataset as wds  # here, not at the top: it imports torch, which reading descriptors needs not

    from ..logging import progress_bar

    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, (samples, n) in splits.items():
            counts: dict[str, int] = {}
            # as many shards as shard_size asks for, filled evenly, so ranks get similar amounts
            per_shard = math.ceil(n / max(1, math.ceil(n / shard_size))) if n else 1
            # mtime=0: byte-identical shards from the same data, and plain ustar headers (a float
            # mtime makes tarfile add a PAX header to every member, half the cost of reading them back)
            with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0) as sink:
                for sample in progress_bar(samples, total=n, desc=split, unit="sample", enabled=progress):
                    sink.write(sample)
                    name = Path(sink.fname).name
                    counts[name] = counts.get(name, 0) + 1
            if counts:
                shards = [(str(tmp / name), c) for name, c in counts.items()]
                write_descriptor(descriptor(shards, tmp / f"{split}.json", meta, name=split), tmp / f"{split}.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_index(out)


def _check_replaceable(out: Path) -> None:
    """New shards replace `out` whole: only where it is absent or a directory of shards and descriptors
    as dtrain writes them. Anything else there is the user's (`--out ~`, `--from-folder photos --out
    photos`): a DataError, before a shard is written."""
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise DataError(f"data: {out} exists and is not a directory; write the shards to a new directory")
    names = sorted(p.name for p in out.iterdir())
    other = next((n for n in names if not _WRITTEN.fullmatch(n)), None) or _not_from_shard(out, names)
    if other is not None:
        raise DataError(
            f"data: {out} holds {other}, which dtrain did not write there, and the new shards would "
            "replace the whole directory; write them to a new directory, or empty it first"
        )


_WRITTEN = re.compile(
    r"(train|val|test)(-\d{6}\.tar|\.json)|" + re.escape(LEGACY_INDEX)
)  # what write_split_shards makes


def _not_from_shard(out: Path, names: list[str]) -> str | None:
    """A file of `out` named as dtrain names its shards that `dtrain shard` did not write: a descriptor without
    its `dtrain` section (`dtrain index` writes none), or a shard no such descriptor lists (a user's own
    train-000000.tar, the names dtrain's docs give theirs)."""
    if LEGACY_INDEX in names:
        return None
    listed = set()
    for name in (f"{split}.json" for split in SPLITS if f"{split}.json" in names):
        try:
            d = json.loads((out / name).read_text())
        except (OSError, ValueError):
            return name
        if not isinstance(d, dict) or "dtrain" not in d:
            return name
        listed |= {e.get("url") for e in d.get("shardlist", []) if isinstance(e, dict)}
    return next((n for n in names if n.endswith(".tar") and n not in listed), None)


def read_index(root: str | Path, trust_pipes: bool = False) -> ShardIndex:
    """The splits of a shard directory: its `train.json`, `val.json`, `test.json` (those present).
    `trust_pipes`: data.trust_descriptor_pipes (their `pipe:` shards may run)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data: shard directory {root} does not exist")
    present = [s for s in SPLITS if (root / f"{s}.json").is_file()]
    if not present:
        if (root / LEGACY_INDEX).is_file():
            return _read_legacy(root)
        raise DataError(
            f"data: {root} has no shard descriptors (train.json, val.json, test.json); write shards "
            f"with `dtrain shard --out {root}`, or count yours with `dtrain index SHARDS --out {root}/train.json`"
        )
    splits, meta = {}, {}
    for split in present:
        d = Descriptor.read(str(root / f"{split}.json"), trust_pipes)
        splits[split] = dict(zip(d.urls, d.counts))
        meta = meta or d.meta
        missing = next((u for u in d.urls if not has_scheme(u) and not os.path.isfile(u)), None)
        if missing:
            raise DataError(f"data: missing shard {missing} (listed in {d.source})")
    return ShardIndex(splits, meta, where=str(root))


def _read_legacy(root: Path) -> ShardIndex:
    path = root / LEGACY_INDEX
    try:
        d = json.loads(path.read_text())
        meta = {k: d[k] for k in ("task", "num_classes", "input_shape", "x_scale")}
        meta.update(params=d.get("params", {}), stats=d.get("stats", {}))
        splits = {
            s: {str((root / name).absolute()): int(n) for name, n in shards.items()}
            for s, shards in d["splits"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"data: {path} is unreadable ({type(e).__name__}: {e})") from None
    for shards in splits.values():
        missing = next((u for u in shards if not os.path.isfile(u)), None)
        if missing:
            raise DataError(f"data: missing shard {missing} (listed in {path})")
    return ShardIndex(splits, meta, where=str(root))


def index_from_config(cfg: DataConfig) -> ShardIndex:
    """The index of `data.train` / `data.val` / `data.test` (shards dtrain did not write)."""
    splits, meta = {}, None
    for split in SPLITS:
        spec = getattr(cfg, split)
        if spec:
            urls, counts, m = resolve_split(spec, f"data.{split}", cfg.counts, cfg.trust_descriptor_pipes)
            splits[split] = dict(zip(urls, counts))
            meta = m if meta is None else meta
    return ShardIndex(splits, meta or {}, where="data.train")
