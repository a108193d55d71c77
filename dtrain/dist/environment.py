"""Where this worker sits in the job, read from the launcher's environment before any process group exists.

Three launch modes:
  torchrun  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (+ LOCAL_RANK) set by torchrun, srun + torchrun,
            or by hand
  slurm     srun started one task per device: SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS and the
            step's node list; master = first node of the step, port derived from the job id
            (MASTER_ADDR / MASTER_PORT, when exported, win)
  single    nothing set: one process, no process group at all
Half-set or contradictory variables are a LaunchError (one line, exit 2). Pure apart from SLURM's node
lists (`scontrol`): no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

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
