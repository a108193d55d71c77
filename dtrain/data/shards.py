"""Writing shards (webdataset's ShardWriter) and the index that lists them.

Layout of a shard directory:
  train-000000.tar ...  val-000000.tar ...  test-000000.tar ...
  index.json            {"task", "num_classes", "input_shape", "x_scale", "params",
                         "splits": {split: {shard file name: sample count}}}
Each sample is {"__key__", "x.npy" (uint8 array), "y.cls" (int label or count; none for task "lm")}.
The index lets every rank know the epoch's length before reading a byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from .datasets import BUILTIN

INDEX = "index.json"


class DataError(RuntimeError):
    """Shards are missing, unreadable or don't fit the run; the message names the file."""


@dataclass(frozen=True)
class ShardIndex:
    root: Path
    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    x_scale: float
    splits: dict  # split -> {file name: count}
    params: dict
    stats: dict  # split -> {"y_mean": ...}

    def shards(self, split: str) -> list[str]:
        if split not in self.splits or not self.splits[split]:
            raise DataError(f"data: {self.root} has no '{split}' shards")
        return [str(self.root / name) for name in self.splits[split]]

    def num_samples(self, split: str) -> int:
        return sum(self.splits[split].values())

    def counts(self, split: str) -> list[int]:
        return list(self.splits[split].values())

    def subset(self, split: str, n: int) -> "ShardIndex":
        """The same index with only the first `n` samples of `split` (in shard order): later shards are
        dropped and the last one kept is counted short; streams read only that many of its samples."""
        total = self.num_samples(split)
        if n > total:
            raise DataError(f"data: train_subset {n} is larger than the {total} '{split}' samples in {self.root}")
        kept: dict[str, int] = {}
        for name, count in self.splits[split].items():
            if n <= 0:
                break
            kept[name] = min(count, n)
            n -= kept[name]
        return dataclasses.replace(self, splits={**self.splits, split: kept})


def write_shards(out: str | Path, splits: dict, meta: dict, shard_size: int) -> ShardIndex:
    """Write every split as tar shards into a temp dir, then rename it into place: a half-written
    directory never looks complete (several ranks or a killed process can't leave one behind)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        index = {k: meta[k] for k in ("task", "num_classes", "input_shape", "x_scale")}
        index["params"] = meta.get("params", {})
        index["splits"] = {}
        index["stats"] = {split: {"y_mean": float(np.mean(y)) if len(y) else 0.0} for split, (_, y) in splits.items()}
        for split, (x, y) in splits.items():
            counts: dict[str, int] = {}
            # as many shards as shard_size asks for, filled evenly, so ranks get similar amounts
            per_shard = math.ceil(len(x) / max(1, math.ceil(len(x) / shard_size)))
            # mtime=0: byte-identical shards from the same data, and plain ustar headers (a float
            # mtime makes tarfile add a PAX header to every member, half the cost of reading them back)
            with wds.ShardWriter(str(tmp / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0,
                                 mtime=0) as sink:
                for i in range(len(x)):
                    sample = {"__key__": f"{split}-{i:07d}", "x.npy": np.ascontiguousarray(x[i])}
                    if meta["task"] != "lm":  # a language model's targets are its input shifted: no label
                        sample["y.cls"] = int(y[i])
                    sink.write(sample)
                    name = Path(sink.fname).name
                    counts[name] = counts.get(name, 0) + 1
            index["splits"][split] = counts
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_index(out)


def read_index(root: str | Path) -> ShardIndex:
    root = Path(root)
    path = root / INDEX
    if not root.is_dir():
        raise DataError(f"data: shard directory {root} does not exist")
    if not path.is_file():
        raise DataError(f"data: {path} is missing; write shards with `dtrain shard --out {root}`")
    try:
        d = json.loads(path.read_text())
        index = ShardIndex(root, d["task"], int(d["num_classes"]), tuple(d["input_shape"]),
                           float(d["x_scale"]), d["splits"], d.get("params", {}), d.get("stats", {}))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"data: {path} is unreadable ({type(e).__name__}: {e})") from None
    for split, shards in index.splits.items():
        for name in shards:
            if not (root / name).is_file():
                raise DataError(f"data: missing shard {root / name} (listed in {path})")
    return index


def make_builtin(name: str, out: str | Path, shard_size: int, seed: int = 0, **params) -> ShardIndex:
    if name not in BUILTIN:
        raise DataError(f"data: unknown dataset '{name}'; built-in: {', '.join(BUILTIN)} (or folder:PATH)")
    splits, meta = BUILTIN[name](seed=seed, **params)
    return write_shards(out, splits, meta, shard_size)
