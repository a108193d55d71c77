"""A built-in data set written as shards: the arrays of datasets.py (shards.py writes them), or a generated
image folder sharded as `dtrain shard --from-folder` shards a user's (folder.py). Above both, so neither
imports the other back."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .datasets import BUILTIN, FOLDERS
from .errors import DataError
from .folder import shard_folder
from .shards import ShardIndex, write_shards


def make_builtin(
    name: str, out: str | Path, shard_size: int, seed: int = 0, progress: bool = False, **params
) -> ShardIndex:
    """`progress`: bars on a terminal (`dtrain shard`)."""
    if name in FOLDERS:  # an image folder, sharded as `dtrain shard --from-folder` shards a user's
        with tempfile.TemporaryDirectory() as tmp:
            return shard_folder(
                FOLDERS[name](Path(tmp), seed=seed, **params), out, shard_size, seed=seed, progress=progress
            )
    if name not in BUILTIN:
        raise DataError(f"data: unknown dataset '{name}'; built-in: {', '.join([*BUILTIN, *FOLDERS])} (or folder:PATH)")
    splits, meta = BUILTIN[name](seed=seed, **params)
    return write_shards(out, splits, meta, shard_size, progress)
