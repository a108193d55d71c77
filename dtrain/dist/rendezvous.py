"""Joining the process group: device and backend, a bounded rendezvous, and leaving it cleanly.

Joining is bounded by `connect_timeout_s`, so a wrong launch fails in seconds (LaunchError, one line, exit 2)
instead of hanging; `timeout_s` bounds each collective afterwards.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torchdist

from .collectives import _ROLL_CALL
from .environment import SINGLE, Launch, LaunchError, detect

@dataclass(frozen=True)
class DistInfo:
    mode: str  # "single" | "torchrun" | "slurm"
    global_rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None in single mode
    num_nodes: int | None = 1
    local_world_size: int | None = 1
    master: str | None = None  # "addr:port" of the rendezvous

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def describe(self) -> str:
        """The `launch:` line rank 0 prints once: mode, rank layout, backend, device, rendezvous."""
        text = (f"launch: {self.mode}, world_size={self.world_size}, backend={self.backend or 'none'}, "
                f"device={self.device.type}")
        if self.distributed:
            if self.num_nodes and self.local_world_size:
                text += f", nodes={self.num_nodes}, ranks_per_node={self.local_world_size}"
            text += f", master={self.master}"
        return text


# ---- joining the process group ----------------------------------------------------------------
def setup(backend: str = "auto", timeout_s: float = 600.0, connect_timeout_s: float = 60.0,
          force_single: bool = False) -> DistInfo:
    """Read the launcher's environment, pick device and backend, join the process group.
    `connect_timeout_s` bounds the rendezvous (reaching the master, every rank arriving);
    `timeout_s` bounds each collective afterwards."""
    launch = SINGLE if force_single else detect()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", launch.local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if launch.mode == "single":
        return DistInfo("single", 0, 0, 1, device, None)
    assert launch.master_addr is not None and launch.master_port is not None  # detect() names them for several
    # Normalise to torchrun's variables: webdataset's split_by_node reads RANK/WORLD_SIZE.
    os.environ.update(RANK=str(launch.global_rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(launch.master_port))
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise LaunchError("dist.backend: nccl needs CUDA devices; use gloo on CPU")
    store = _rendezvous(launch, connect_timeout_s)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))  # from here on, collectives' patience
    try:
        attempt = _store_attempt()
        torchdist.init_process_group(backend, store=torchdist.PrefixStore(f"dtrain/attempt_{attempt}", store),
                                     rank=launch.global_rank, world_size=launch.world_size,
                                     timeout=datetime.timedelta(seconds=timeout_s),
                                     device_id=device if backend == "nccl" else None)
        _ROLL_CALL.keep(store, attempt, launch.master_addr,
                        launch.master_port, "node 0's launcher" if _agent_hosts_store() else "rank 0",
                        hosted_here=launch.global_rank == 0 and not _agent_hosts_store())
    except Exception as e:  # a failure to join is a launch problem, not a bug
        raise LaunchError(f"launcher: could not join the process group at {launch.master_addr}:"
                          f"{launch.master_port} ({type(e).__name__}: {_first_line(e)})") from None
    return DistInfo(launch.mode, launch.global_rank, launch.local_rank, launch.world_size, device, backend,
                    num_nodes=launch.num_nodes, local_world_size=launch.local_world_size,
                    master=f"{launch.master_addr}:{launch.master_port}")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _rendezvous(launch: Launch, timeout_s: float) -> torchdist.TCPStore:
    """The TCP store every rank shares, once all `world_size` ranks have checked in; LaunchError
    (not a hang) when the master can't be reached or ranks are missing after `timeout_s`."""
    addr, port, where = launch.master_addr, launch.master_port, f"{launch.master_addr}:{launch.master_port}"
    assert addr is not None and port is not None  # detect() names them for a launch of several processes
    hint = f"(dist.connect_timeout_s={timeout_s:g} sets how long to wait)"
    deadline = time.monotonic() + timeout_s
    hosts_store = launch.global_rank == 0 and not _agent_hosts_store()
    if not hosts_store:
        # Probe with a plain socket first: TCPStore's own retries would also give up at the deadline,
        # but log a C++ stack trace per attempt.
        _wait_reachable(addr, port, deadline, f"launcher: rank {launch.global_rank} cannot reach the master "
                        f"at {where} within {timeout_s:g} s; check MASTER_ADDR/MASTER_PORT and that rank 0 "
                        f"is running {hint}")
    try:
        store = torchdist.TCPStore(addr, port, launch.world_size, is_master=hosts_store, wait_for_workers=False,
                                   multi_tenant=True,
                                   timeout=datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
    except Exception as e:
        raise LaunchError(f"launcher: rank {launch.global_rank} could not {'open' if hosts_store else 'join'} "
                          f"the rendezvous at {where} ({_first_line(e)})") from None
    key = f"dtrain/joined/{_store_attempt()}"
    # Poll rather than store.wait(): same bound, without a C++ warning when it runs out. The store's
    # host announces its timeout, then lingers a moment, so the others stop with this message too
    # instead of a broken connection.
    joined, gave_up, pause = 0, f"{key}/gave_up", 0.01
    try:
        joined = store.add(key, 1)
        while joined < launch.world_size and time.monotonic() < deadline and not store.check([gave_up]):
            time.sleep(pause)
            pause = min(2 * pause, 0.25)
            joined = store.add(key, 0)
        if joined < launch.world_size and hosts_store:
            store.set(gave_up, "1")
            time.sleep(0.5)
    except Exception:  # the store's host gave up first
        pass
    if joined < launch.world_size:
        got = f"only {joined} of" if joined else "not all"
        raise LaunchError(f"launcher: {got} {launch.world_size} ranks joined at {where} within {timeout_s:g} s; "
                          f"start every rank (WORLD_SIZE={launch.world_size}) {hint}")
    return store


def _agent_hosts_store() -> bool:
    """torchrun's agent on node 0 hosts the store its workers share, else rank 0 does (srun, by hand, and
    `dtrain launch`, which asks torch's agent for a store of the workers' own at each re-formation)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _store_attempt() -> str:
    """This set of workers' name on the store they share, under which their keys go (the arrivals, the
    process group's, the roll call). A store rank 0 opened is new with them. torchrun's agent store outlives
    its restarts, and still holds the killed attempt's keys: groups made with new_group() (ours: checkpoint
    and stop-flag coordination) would read the dead workers' addresses ("connectFullMesh ... Connection
    refused"); there, torchrun's restart count (which is each agent's own count: a node that joins later
    starts at 0, and a join is not counted, which is why `dtrain launch` does not use that store)."""
    if not _agent_hosts_store():
        return "0"
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _wait_reachable(addr: str, port: int, deadline: float, message: str) -> None:
    last = None
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:  # refused, unreachable, name not (yet) resolvable: retry until the deadline
            last = e
        if time.monotonic() >= deadline:
            raise LaunchError(f"{message} (last: {last.strerror or last})")
        time.sleep(0.2)


def teardown(clean: bool = True) -> None:
    """Leave the process group after a clean finish, first letting gloo's worker threads go idle.

    A gloo worker thread frees each collective's tensors after the collective has completed, and
    that takes the GIL. If it is still at it when Python shuts down, the interpreter ends the thread
    inside a C++ destructor and the rank aborts after training successfully ("terminate called
    without an active exception", exit -6, roughly 1 run in 20 on a loaded machine). A barrier alone
    doesn't close that window (another worker thread can run it), so we also wait, without the GIL,
    until the workers are idle. After a failure (`clean=False`) nothing: a dead peer would make the
    barrier wait out another full timeout, and the other ranks must see this rank leave."""
    if torchdist.is_available() and torchdist.is_initialized() and clean:
        try:
            torchdist.barrier()
            _wait_for_idle_threads("pt_gloo_runloop")
        finally:
            torchdist.destroy_process_group()


def _wait_for_idle_threads(name: str, timeout_s: float = 2.0) -> None:
    """Sleep (GIL released) until this process's threads called `name` are all blocked and stay
    blocked: state S with an unchanged context-switch count over 10 ms (an idle gloo worker waits
    on a condition variable; one waiting for the GIL wakes every 5 ms). Linux /proc; elsewhere a pause."""
    def snapshot():
        found = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                if (task / "comm").read_text().strip() == name:
                    status = (task / "status").read_text()
                    # no match (None[1]): a TypeError, the thread half gone
                    found[task.name] = (
                        re.search(r"^State:\s+(\S)", status, re.M)[1],  # type: ignore[index]
                        re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
            except (OSError, TypeError):  # the thread exited meanwhile
                continue
        return found

    if not Path("/proc/self/task").is_dir():
        time.sleep(0.1)
        return
    deadline = time.monotonic() + timeout_s
    before = snapshot()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = snapshot()
        if now == before and all(state == "S" for state, _ in now.values()):
            return
        before = now
