"""Where this worker sits in the job, and the few collectives the trainer needs.

Three launch modes, detected from the environment:
  torchrun  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (+ LOCAL_RANK) set by torchrun, srun + torchrun,
            or by hand
  slurm     srun started one task per device: SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS and the
            step's node list; master = first node of the step, port derived from the job id
            (MASTER_ADDR / MASTER_PORT, when exported, win)
  single    nothing set: one process, no process group at all
Half-set or contradictory variables are a LaunchError (one line, exit 2), and joining the process group
is bounded by `connect_timeout_s`, so a wrong launch fails in seconds instead of hanging.
Every rank must reach every collective below in the same order; decisions (stop, NaN, preempt)
go through `all_reduce_*`/`broadcast_object`, never through one rank alone.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Callable

import torch
import torch.distributed as torchdist


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a rank stalled, died or lost its connection."""


ROLL_CALL_S = 3.0  # after a failed collective, how long the ranks that saw it wait to hear from each other


@contextlib.contextmanager
def guard(op: str):
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

    def __init__(self):
        self.lock = threading.Lock()
        self.keep(None, "", "", 0, "", hosted_here=False)

    def keep(self, store, attempt: str, addr: str, port: int, host: str, hosted_here: bool) -> None:
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


class LaunchError(RuntimeError):
    """The launcher's environment is missing or contradictory; the message says how to fix it."""


@dataclass(frozen=True)
class Launch:
    """What the launcher's environment says, before any process group exists."""
    mode: str  # "single" | "torchrun" | "slurm"
    global_rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    num_nodes: int | None = 1  # None: the launcher doesn't say (hand-set RANK/WORLD_SIZE)
    local_world_size: int | None = 1
    master_addr: str | None = None
    master_port: int | None = None


SINGLE = Launch("single")


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


# ---- SLURM node lists -------------------------------------------------------------------------
def parse_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list without scontrol:
    'gpu[03-05,07],cpu1' -> gpu03 gpu04 gpu05 gpu07 cpu1; 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2."""
    item_re = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # text with [ranges], up to a comma outside brackets
    if not re.fullmatch(rf"{item_re}(?:,{item_re})*", nodelist.strip()):
        raise LaunchError(f"launcher: cannot parse SLURM node list {nodelist!r}")
    hosts: list[str] = []
    for item in re.findall(item_re, nodelist.strip()):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [text]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
                        raise LaunchError(f"launcher: cannot parse SLURM node list {nodelist!r} (range {part!r})")
                    # zero padding follows the lower bound: node[08-10] -> node08 node09 node10
                    choices += [f"{text}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
            expanded = [e + c for e in expanded for c in choices]
        hosts += expanded
    if not hosts or not all(hosts):
        raise LaunchError(f"launcher: cannot parse SLURM node list {nodelist!r}")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` when it is installed (it knows every syntax SLURM accepts), else our parser."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, stdin=subprocess.DEVNULL)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_nodelist(nodelist)


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03' (where task 0 runs)."""
    return hostnames(nodelist)[0]


def slurm_port(job_id: str) -> int:
    """A deterministic port from the job id, so every task of the job picks the same one."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return []
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


# ---- detection ----------------------------------------------------------------------------------
def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in environ and default is not None:
        return default
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"launcher: {name}={value!r} is not an integer") from None


def _port(value: str, name: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise LaunchError(f"launcher: {name}={value!r} is not a TCP port (1-65535)")
    return int(value)


def detect(environ: Mapping[str, str] = os.environ,
           expand: Callable[[str], list[str]] = hostnames) -> Launch:
    """Read the launcher's variables; raises LaunchError on missing, half-set or contradictory ones.
    Pure apart from `expand` (SLURM node lists), so it can be tested with plain dicts."""
    if any(v in environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _detect_torchrun(environ)
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ:
        return _detect_slurm(environ, expand)
    return SINGLE


def _detect_torchrun(environ: Mapping[str, str]) -> Launch:
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not environ.get(v)]
    if missing:
        present = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if environ.get(v)]
        raise LaunchError(f"launcher: {', '.join(present)} set but {', '.join(missing)} missing; start workers "
                          "with torchrun (or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; "
                          "unset them for a single process)")
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if world < 1:
        raise LaunchError(f"launcher: WORLD_SIZE={world} must be at least 1")
    if not 0 <= rank < world:
        raise LaunchError(f"launcher: RANK={rank} is outside WORLD_SIZE={world} (ranks are 0..{world - 1})")
    # LOCAL_RANK only picks the device (local_rank % visible devices); set by hand, RANK does that job
    local = _int(environ, "LOCAL_RANK", default=rank)
    if local < 0:
        raise LaunchError(f"launcher: LOCAL_RANK={local} must not be negative")
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else None
    if local_world is not None and not local < local_world:
        raise LaunchError(f"launcher: LOCAL_RANK={local} is outside LOCAL_WORLD_SIZE={local_world}")
    nodes = _int(environ, "GROUP_WORLD_SIZE") if "GROUP_WORLD_SIZE" in environ else None
    return Launch("torchrun", rank, local, world, node_rank=_int(environ, "GROUP_RANK", default=0),
                  num_nodes=nodes, local_world_size=local_world, master_addr=environ["MASTER_ADDR"],
                  master_port=_port(environ["MASTER_PORT"], "MASTER_PORT"))


def _detect_slurm(environ: Mapping[str, str], expand: Callable[[str], list[str]]) -> Launch:
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    world = _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS", 1)
    if not in_step:
        # The batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS=N: as "rank 0 of N" it would
        # wait for ranks nobody starts.
        if world > 1:
            raise LaunchError(f"launcher: this is a SLURM batch script with SLURM_NTASKS={world}, not one of its "
                              "tasks; start one task per device with `srun python -m dtrain train ...` "
                              "(or torchrun on each node, see slurm/README.md)")
        return SINGLE
    if world == 1:
        return SINGLE
    nodelist = next((environ[v] for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                     if environ.get(v)), None)
    if nodelist is None or "SLURM_LOCALID" not in environ:
        raise LaunchError("launcher: SLURM_PROCID set but SLURM_LOCALID or the node list missing; "
                          "start tasks with srun")
    rank, local = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_LOCALID")
    if not 0 <= rank < world:
        raise LaunchError(f"launcher: SLURM_PROCID={rank} is outside the step's {world} tasks")
    node = _int(environ, "SLURM_NODEID", 0)
    per_node = _tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "")))
    nodes = _int(environ, "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in environ else "SLURM_NNODES", 1)
    # Task 0 runs on the step's first node (block and cyclic distributions alike): it hosts the store.
    addr = environ.get("MASTER_ADDR") or expand(nodelist)[0]
    port = _port(environ["MASTER_PORT"], "MASTER_PORT") if environ.get("MASTER_PORT") else \
        slurm_port(environ["SLURM_JOB_ID"])
    return Launch("slurm", rank, local, world, node_rank=node, num_nodes=nodes,
                  local_world_size=per_node[node] if node < len(per_node) else max(1, world // nodes),
                  master_addr=addr, master_port=port)


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


def _rendezvous(launch: Launch, timeout_s: float):
    """The TCP store every rank shares, once all `world_size` ranks have checked in; LaunchError
    (not a hang) when the master can't be reached or ranks are missing after `timeout_s`."""
    addr, port, where = launch.master_addr, launch.master_port, f"{launch.master_addr}:{launch.master_port}"
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
                    found[task.name] = (re.search(r"^State:\s+(\S)", status, re.M)[1],
                                        re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])
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
    with guard("group set-up (every rank's address, through the store)"):
        return torchdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (decisions are made once, then shared)."""
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
