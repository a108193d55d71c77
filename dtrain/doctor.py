"""`dtrain doctor`: catch a broken cluster before a long job wastes hours.

Every rank runs each check locally, catching its own failures; the results are gathered once with
all_gather_object, rank 0 prints a table, and every rank returns the same verdict. Checks:
  versions        dtrain and torch versions are the same on every rank
  config          every rank resolved the same config (the first differing key is named)
  all-reduce      a collective completes across all ranks; its bus bandwidth
  shards          every rank can read the shards it will read (epoch 0's train share, val, test)
  checkpoint dir  every rank can write there, and it has room for two checkpoints
  devices         on GPUs, each rank has a device of its own
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as torchdist

from . import dist
from .redaction import REDACTED, is_secret
from .version import __version__

if TYPE_CHECKING:
    from .config import Config, DataConfig


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _gather(obj) -> list:
    if not (torchdist.is_available() and torchdist.is_initialized()):
        return [obj]
    out = [None] * torchdist.get_world_size()
    torchdist.all_gather_object(out, obj)
    return out


def _local(fn):
    """Run one local check: (True, detail) or (False, what went wrong) — never raises."""
    try:
        return True, fn()
    except Exception as e:  # a check reports, it doesn't crash the other ranks' collectives
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _read_shards(data_cfg: DataConfig, seed: int, info, brief: bool, hooks=None) -> str:
    """Decode the shards this rank reads (epoch 0's train share, its val and test share): every sample,
    or in brief mode each shard's first. `hooks`: the data hooks a script handed in (build.Hooks), used as
    they are: the config names them `__main__:...`, which no import rebuilds."""
    from .data import build_streams

    given = {k: getattr(hooks, k) for k in ("sample", "transform", "collate")} if hooks is not None else {}
    data = build_streams(data_cfg, seed=seed, rank=info.global_rank, world_size=info.world_size, create=False, **given)
    n = 0
    for stream in filter(None, (data.train, data.val, data.test)):
        n += stream.check_readable(stream.shard_order(0)[info.global_rank :: info.world_size], first_only=brief)
    return f"{n} {'shards' if brief else 'samples'}"


def _probe_checkpoint_dir(root: Path, need_bytes: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".doctor-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise OSError(f"{free / 2**20:.0f} MiB free, two checkpoints need ~{need_bytes / 2**20:.0f} MiB")
    return f"{free / 2**30:.1f} GiB free"


def _bandwidth(info, size_mb: float, reps: int) -> str:
    t = torch.ones(int(size_mb * 2**20 / 4), device=info.device)
    dist.all_reduce_sum(t)  # warm-up (connections, buffers)
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce_sum(t)
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / reps
    n = info.world_size
    busbw = t.numel() * 4 / seconds * (2 * (n - 1) / n if n > 1 else 1)  # as nccl-tests reports it
    return f"{size_mb:g} MiB in {seconds * 1e3:.1f} ms, bus bandwidth {busbw / 1e9:.2f} GB/s"


def run(cfg: Config, info, run_dir: Path, brief: bool = False, model_bytes: int = 0, hooks=None) -> list[Check]:
    """Collective: every rank calls it and gets the same list. `hooks`: what a script handed in (build.Hooks)."""
    me = {
        "host": socket.gethostname(),
        "versions": (__version__, torch.__version__),
        "config": cfg.to_dict(),
        "device": (torch.cuda.get_device_properties(info.device).uuid.hex if info.device.type == "cuda" else None),
        "shards": _local(lambda: _read_shards(cfg.data, cfg.run.seed, info, brief, hooks)),
        # a checkpoint holds the weights and, for Adam, two moments: ~3x the model, twice over
        "ckpt": _local(lambda: _probe_checkpoint_dir(run_dir / "checkpoints", 2 * 3 * model_bytes)),
    }
    ranks = _gather(me)
    checks = []

    versions = {r["versions"] for r in ranks}
    checks.append(
        Check(
            "versions",
            len(versions) == 1,
            "dtrain {}, torch {}".format(*ranks[0]["versions"])
            if len(versions) == 1
            else "differ: "
            + ", ".join(f"rank {i}: dtrain {r['versions'][0]} torch {r['versions'][1]}" for i, r in enumerate(ranks)),
        )
    )

    base = _flatten(ranks[0]["config"])
    diffs = []
    for i, r in enumerate(ranks[1:], 1):
        other = _flatten(r["config"])
        key = next((k for k in sorted(set(base) | set(other)) if base.get(k) != other.get(k)), None)
        if key is not None:  # a secret's values are not shown (the rank logs are files)
            shown = [REDACTED if is_secret(key, v) else repr(v) for v in (other.get(key), base.get(key))]
            diffs.append(f"rank {i} has {key}={shown[0]}, rank 0 has {shown[1]}")
    checks.append(
        Check("config", not diffs, f"hash {cfg.hash()} on all {len(ranks)} ranks" if not diffs else "; ".join(diffs))
    )

    ok, detail = _local(lambda: _bandwidth(info, 1 if brief else 32, 3 if brief else 10))
    checks.append(Check("all-reduce", ok, detail))

    bad = [f"rank {i} ({r['host']}): {r['shards'][1]}" for i, r in enumerate(ranks) if not r["shards"][0]]
    checks.append(
        Check(
            "shards",
            not bad,
            "; ".join(bad) if bad else f"every rank read its shards ({', '.join(r['shards'][1] for r in ranks)})",
        )
    )

    bad = [f"rank {i} ({r['host']}): {r['ckpt'][1]}" for i, r in enumerate(ranks) if not r["ckpt"][0]]
    checks.append(
        Check(
            "checkpoint dir",
            not bad,
            "; ".join(bad) if bad else f"{run_dir / 'checkpoints'} writable by all ranks, {ranks[0]['ckpt'][1]}",
        )
    )

    if info.device.type == "cuda":
        seen = {}
        for i, r in enumerate(ranks):
            seen.setdefault((r["host"], r["device"]), []).append(i)
        shared = [ranks_ for ranks_ in seen.values() if len(ranks_) > 1]
        checks.append(
            Check(
                "devices",
                not shared,
                "one GPU per rank" if not shared else "; ".join(f"ranks {r} share one GPU" for r in shared),
            )
        )
    return checks


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in checks)
