"""Data: shards on disk -> per-rank minibatch streams."""

from __future__ import annotations

from pathlib import Path

from .. import dist
from .pipeline import ShardStream
from .shards import DataError, ShardIndex, make_builtin, read_index
from .datasets import BUILTIN


def resolve_shards(cfg, seed: int, create: bool = True) -> ShardIndex:
    """The shard index for `cfg.dataset`; built-in data sets are written on first use (by rank 0)."""
    if cfg.dataset.startswith("folder:"):
        return read_index(cfg.dataset.removeprefix("folder:"))
    if cfg.dataset not in BUILTIN:
        raise DataError(f"data: unknown dataset '{cfg.dataset}'; built-in: {', '.join(BUILTIN)} (or folder:PATH)")
    root = Path(cfg.root) / cfg.dataset
    params = builtin_params(cfg)
    if create and not (root / "index.json").exists():
        # rank 0 writes (atomically, via a temp dir); the others wait for it
        if dist.broadcast_object(None) is None and _is_zero():
            make_builtin(cfg.dataset, root, cfg.shard_size, seed=0, **params)
        dist.barrier()
    index = read_index(root)
    if params and any(index.params.get(k) != v for k, v in params.items()):
        raise DataError(f"data: shards in {root} were made with {index.params}, the config asks for {params}; "
                        f"delete {root} or set data.root elsewhere")
    return index


def builtin_params(cfg) -> dict:
    """The data config keys a built-in data set is generated from (recorded in its index)."""
    if cfg.dataset == "count":
        return {"samples": cfg.count_samples, "max_objects": cfg.count_max_objects}
    if cfg.dataset == "text":
        return {"context": cfg.text_context, "num_bytes": cfg.text_bytes}
    return {}


def _is_zero() -> bool:
    import torch.distributed as td
    return not (td.is_available() and td.is_initialized()) or td.get_rank() == 0


__all__ = ["DataError", "ShardIndex", "ShardStream", "make_builtin", "read_index", "resolve_shards"]
