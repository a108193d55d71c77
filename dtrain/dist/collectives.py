"""The few collectives the trainer needs, and one line naming the lost rank when one fails.

Every rank must reach every collective below in the same order; decisions (stop, NaN, preempt) go through
`all_reduce_*`/`broadcast_object`, never through one rank alone. Outside a process group (single mode) each
is the identity. A backend's failure inside `guard(op)` becomes a CollectiveError naming the operation and,
asked on the rendezvous store (`RollCall`, kept by rendezvous.setup), the rank(s) lost.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as torchdist

class CollectiveError(RuntimeError):
    """A collective failed or timed out: a rank stalled, died or lost its connection."""


ROLL_CALL_S = 3.0  # after a failed collective, how long the ranks that saw it wait to hear from each other


@contextlib.contextmanager
def guard(op: str) -> Iterator[None]:
    """Turn a backend's failure inside `op` into one line naming the operation, and the rank(s) lost."""
    try:
        yield
    except CollectiveError:
        raise  # an inner guard's line (its text says "timed out" too: not to be wrapped again)
    except RuntimeError as e:
        text = str(e)
        if not (isinstance(e, torchdist.DistError) or any(w in text for w in ("gloo", "Gloo", "NCCL", "Timed out",
                                                                               "timed out", "Connection closed"))):
            raise
        rank = torchdist.get_rank() if _active() else 0
        first = next((l.strip() for l in text.splitlines() if l.strip()), type(e).__name__)
        lost = _ROLL_CALL.lost(rank, torchdist.get_world_size()) if _active() else None
        cause = f"{lost}; {first[:300]}" if lost else \
            f"{first[:300]} (another rank stalled, died or timed out; see dist.timeout_s)"
        raise CollectiveError(f"dist: {op} failed on rank {rank}: {cause}") from None


class RollCall:
    """Who is lost, asked on the store every rank shares (the one `setup` made), once a collective failed.

    A backend's error names the rank that saw the failure, not the one that caused it. Each rank that saw
    it answers under `dtrain/alive/<attempt>/<rank>` and waits up to ROLL_CALL_S for the others; the ranks
    that did not answer are gone (or stuck). A store that cannot be reached is itself the answer: its host
    is gone (rank 0's process, or node 0's launcher). Bounded, and asked once per process: a second failure
    (another thread's group) gets the same answer."""

    store: Optional[torchdist.Store]
    answer: Optional[str]  # None: not asked yet; "": asked, nothing learned

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keep(None, "", "", 0, "", hosted_here=False)

    def keep(self, store: Optional[torchdist.Store], attempt: str, addr: str, port: int, host: str,
             hosted_here: bool) -> None:
        """The store every rank shares, this set of workers' name on it, where it listens, who hosts it."""
        self.store, self.attempt, self.where = store, attempt, (addr, port)
        self.host, self.hosted_here, self.answer = host, hosted_here, None

    def lost(self, rank: int, world_size: int, wait_s: float = ROLL_CALL_S) -> str | None:
        """'rank 1 is gone or stuck (...)', 'rank 0 (the rendezvous store, HOST:PORT) is gone', or None when
        nothing was learned."""
        if self.store is None or world_size < 2:
            return None
        with self.lock:
            if self.answer is None:
                self.answer = self._ask(rank, world_size, wait_s) or ""
                if self.answer and self.hosted_here and world_size > 2:
                    time.sleep(wait_s)  # the store lives in this process: keep it up for the others still asking
        return self.answer or None

    def _ask(self, rank: int, world_size: int, wait_s: float) -> str | None:
        assert self.store is not None  # lost() asks only once setup() kept a store
        try:  # a plain socket first: a store whose host died is "connection refused" at once, while the
            # store client would log a C++ stack trace before it said so
            socket.create_connection(self.where, timeout=wait_s).close()
        except OSError:
            return f"{self.host} (the rendezvous store, {self.where[0]}:{self.where[1]}) is gone"
        key = f"dtrain/alive/{self.attempt}"
        deadline = time.monotonic() + wait_s
        try:
            self.store.set_timeout(datetime.timedelta(seconds=wait_s))  # no store call outlasts the roll call
            self.store.set(f"{key}/{rank}", "1")
            answered = self.store.add(f"{key}/count", 1)
            while answered < world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                answered = self.store.add(f"{key}/count", 0)
            if answered >= world_size:
                return None  # every rank is here: the failure is not a lost rank
            missing = [r for r in range(world_size) if not self.store.check([f"{key}/{r}"])]
        except Exception:  # the store went away meanwhile, or is too slow: nothing learned
            return None
        if not missing:
            return None
        named = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        return (f"rank{'s' * (len(missing) > 1)} {named} {'are' if len(missing) > 1 else 'is'} gone or stuck "
                f"(no answer within {wait_s:g} s of the failure)")


_ROLL_CALL = RollCall()  # the job's store, kept by setup(): read only after a collective failed


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


def all_reduce_max(t: torch.Tensor, group: Optional[torchdist.ProcessGroup] = None) -> torch.Tensor:
    if _active():
        torchdist.all_reduce(t, op=torchdist.ReduceOp.MAX, group=group)
    return t


def new_cpu_group(timeout_s: float) -> Optional[torchdist.ProcessGroup]:
    """A gloo group for CPU-side coordination from another thread (async checkpoints, stop flags);
    collectives must be created in the same order on every rank. None in single mode."""
    if not _active():
        return None
    with guard("group set-up (every rank's address, through the store)"):
        return torchdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (decisions are made once, then shared). Any: the other ranks often
    hand in a placeholder (None) of another type."""
    if not _active():
        return obj
    box = [obj]
    torchdist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank, in place. DDP broadcasts them at the
    start of each training forward, so after the last one each rank holds its own update; FSDP2 and DeepSpeed
    never sync them. The checkpoint keeps rank 0's: evaluating with them makes the ranks' validation that of
    one model, the one saved (a 2-rank ResNet's val/loss differed from `dtrain eval`'s by 2%)."""
    if _active():
        with torch.no_grad():
            for buffer in module.buffers():
                torchdist.broadcast(buffer, src=0)


def barrier() -> None:
    if _active():
        torchdist.barrier()
