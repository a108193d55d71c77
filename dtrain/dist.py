"""Where this worker sits in the job, and the few collectives the trainer needs.

Three launch modes, detected from the environment:
  torchrun  RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by torchrun (also srun + torchrun)
  slurm     srun started one task per device: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODELIST
  single    nothing set: one process, no process group at all
Every rank must reach every collective below in the same order; decisions (stop, NaN, preempt)
go through `all_reduce_*`/`broadcast_object`, never through one rank alone.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as torchdist


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a rank stalled, died or lost its connection."""


@contextlib.contextmanager
def guard(op: str):
    """Turn a backend's failure inside `op` into one line naming the operation that got stuck."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not (isinstance(e, torchdist.DistError) or any(w in text for w in ("gloo", "Gloo", "NCCL", "Timed out",
                                                                               "timed out", "Connection closed"))):
            raise
        rank = torchdist.get_rank() if _active() else 0
        first = next((l.strip() for l in text.splitlines() if l.strip()), type(e).__name__)
        raise CollectiveError(f"dist: {op} failed on rank {rank}: {first[:300]} "
                              "(another rank stalled, died or timed out; see dist.timeout_s)") from None


class LaunchError(RuntimeError):
    """The launcher's environment is missing or contradictory; the message says how to fix it."""


@dataclass(frozen=True)
class DistInfo:
    mode: str  # "single" | "torchrun" | "slurm"
    global_rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None in single mode

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def describe(self) -> str:
        return (f"launch: {self.mode}, world_size={self.world_size}, backend={self.backend or 'none'}, "
                f"device={self.device.type}, master={os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}")


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"launcher: {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"launcher: cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id: str) -> int:
    """A deterministic port from the job id, so every task of the job picks the same one."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def detect(environ=os.environ) -> tuple[str, int, int, int]:
    """-> (mode, global_rank, local_rank, world_size); raises LaunchError on half-set variables."""
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    present = [v for v in torchrun_vars if v in environ]
    if present:
        missing = [v for v in torchrun_vars if v not in environ]
        if missing:
            raise LaunchError(f"launcher: {', '.join(present)} set but {', '.join(missing)} missing; "
                              "start workers with torchrun (or unset these for a single process)")
        rank, world, local = (_int_env(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        mode = "torchrun"
    elif "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        for v in ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_ID"):
            if v not in environ:
                raise LaunchError(f"launcher: SLURM_PROCID set but {v} missing; start tasks with srun")
        rank, world, local = (_int_env(v) for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        mode = "slurm"
    else:
        return "single", 0, 0, 1
    if not (0 <= rank < world) or local < 0:
        raise LaunchError(f"launcher: rank {rank} is outside world size {world}")
    return mode, rank, local, world


def setup(backend: str = "auto", timeout_s: float = 600.0, force_single: bool = False) -> DistInfo:
    """Read the launcher's environment, pick device and backend, join the process group."""
    mode, rank, local, world = ("single", 0, 0, 1) if force_single else detect()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if mode == "single":
        return DistInfo("single", 0, 0, 1, device, None)
    if mode == "slurm":
        # Normalise to torchrun's variables: init_process_group(env://) and webdataset's
        # split_by_node both read RANK/WORLD_SIZE.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        os.environ.setdefault("MASTER_ADDR", first_host(os.environ["SLURM_NODELIST"]))
        os.environ.setdefault("MASTER_PORT", str(slurm_port(os.environ["SLURM_JOB_ID"])))
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise LaunchError("dist.backend: nccl needs CUDA devices; use gloo on CPU")
    try:
        torchdist.init_process_group(backend, store=_store(rank, world, timeout_s), rank=rank, world_size=world,
                                     timeout=datetime.timedelta(seconds=timeout_s),
                                     device_id=device if backend == "nccl" else None)
    except Exception as e:  # a rendezvous failure is a launch problem, not a bug
        raise LaunchError(f"launcher: could not join the process group at "
                          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return DistInfo(mode, rank, local, world, device, backend)


def _store(rank: int, world: int, timeout_s: float) -> torchdist.Store:
    """The rendezvous key-value store, its keys prefixed by torchrun's restart attempt.

    After `torchrun --max-restarts` restarts the workers, the agent's store still holds the keys of the
    killed attempt, and groups made with new_group() (ours: checkpoint and stop-flag coordination) read
    the dead workers' addresses and fail with "connectFullMesh ... Connection refused". A prefix per
    attempt keeps every attempt's keys apart."""
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torchdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                               is_master=not agent_hosts_store and rank == 0,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return torchdist.PrefixStore(f"dtrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(clean: bool = True) -> None:
    """Leave the process group. After a failure (`clean=False`) skip the barrier: a dead peer would
    make it wait out another full timeout."""
    if torchdist.is_available() and torchdist.is_initialized() and clean:
        # Without this barrier a rank that finishes first tears down gloo's connections while a
        # peer still uses them, and the peer aborts ("terminate called without an active exception").
        try:
            torchdist.barrier()
        finally:
            torchdist.destroy_process_group()


def _active() -> bool:
    return torchdist.is_available() and torchdist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity in single mode)."""
    if _active():
        torchdist.all_reduce(t, op=torchdist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _active():
        torchdist.all_reduce(t, op=torchdist.ReduceOp.SUM)
        t /= torchdist.get_world_size()
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    if _active():
        torchdist.all_reduce(t, op=torchdist.ReduceOp.MAX, group=group)
    return t


def new_cpu_group(timeout_s: float):
    """A gloo group for CPU-side coordination from another thread (async checkpoints, stop flags);
    collectives must be created in the same order on every rank. None in single mode."""
    if not _active():
        return None
    return torchdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (decisions are made once, then shared)."""
    if not _active():
        return obj
    box = [obj]
    torchdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _active():
        torchdist.barrier()
