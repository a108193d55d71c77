"""`dtrain launch --ft`: replica groups under torchft (issue #36, docs/fault-tolerance.md). A replica group is
--ft-group-size processes (default: one per worker on one node, one per node on several), DDP ranks of each
other; --nproc-per-node / size groups on this node, each process the command `dtrain launch` would run
(`python -m dtrain ARGS`, or the script), told by its environment which group and rank it is and where the
Lighthouse is. A group that dies (any of its processes: the others are stopped with it) is restarted alone
(--max-restarts counts the restarts of all groups) and heals from a live peer; the others train on at the
smaller world size meanwhile.

The Lighthouse (torchft's quorum server) is started here on 127.0.0.1 and a free port, or on several nodes by
the node given --ft-host-lighthouse at --ft-lighthouse's port, the others only connecting; it is stopped at the
end. Each group's output goes to logs/group-<REPLICA_GROUP_ID>.log (group 0's to the terminal too), its one-line
error to an error file of torch's layout (dtrain.worker.report_error writes it), as the normal launcher's
workers' do. REPLICA_GROUP_ID is 0, 1, ... on one node, <host>-0, <host>-1, ... on several (the lowest free
on this host: two launchers on one host take <host>-0 and <host>-1). On several nodes the groups are reached
at the node's hostname, over the interface that reaches the Lighthouse (`reachable`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .launcher import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    FORWARDED,
    _command,
    _exit_text,
    _nnodes,
    _resolve,
    _visible_gpus,
    error_line,
    last_logged_step,
    say,
    traceback_of,
)
from .launcher import add_parser as add_launch_parser
from .launcher import run as launch
from .worker import LOG_FILE_ENV

FT_TIMEOUT_S, FT_MIN_REPLICAS = 10.0, 1
# How soon the Lighthouse drops a group that stopped heartbeating: the survivors' stall after a group dies (a
# group heartbeats every 100 ms from torchft's own thread, not from the Python loop, so a busy step is no gap)
HEARTBEAT_TIMEOUT_MS, QUORUM_TICK_MS = 1000, 50
POLL_S = 0.1
# what torchrun or torch's agent set for their workers: a group is a world of its own (RANK 0 of 1), and a
# parent's TORCHFT_MANAGER_PORT would give every group the same port
INHERITED = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCHFT_MANAGER_PORT",
    "DTRAIN_LAUNCH_LOGS",
    "DTRAIN_LAUNCH_LOG",
}
OPTIONS = {
    "ft_lighthouse": "--ft-lighthouse",
    "ft_host_lighthouse": "--ft-host-lighthouse",
    "ft_timeout": "--ft-timeout",
    "ft_min_replicas": "--ft-min-replicas",
    "ft_group_size": "--ft-group-size",
}


def add_parser(sub) -> None:
    """`dtrain launch` (launcher.add_parser) with the --ft options, which this module runs (defaults None:
    given without --ft, they are refused, not ignored)."""
    add_launch_parser(sub)
    la = sub.choices["launch"]
    la.add_argument(
        "--ft",
        action="store_true",
        help="fault tolerant (torchft, pip install 'dtrain[ft]'): one replica group per worker, a lost "
        "group restarted alone (within --max-restarts) while the others train on",
    )
    la.add_argument(
        "--ft-lighthouse",
        default=None,
        metavar="HOST:PORT",
        help="--ft: the torchft Lighthouse to use (several nodes: the same on every node); default: "
        "one started here on 127.0.0.1 and a free port",
    )
    la.add_argument(
        "--ft-host-lighthouse",
        action="store_true",
        default=None,
        help="--ft on several nodes: this node starts the Lighthouse, at --ft-lighthouse's port",
    )
    la.add_argument(
        "--ft-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"--ft: a lost group is left behind within S s (collective timeout; default {FT_TIMEOUT_S:g})",
    )
    la.add_argument(
        "--ft-min-replicas",
        type=int,
        default=None,
        metavar="M",
        help=f"--ft: the fewest replica groups that may train a step (default {FT_MIN_REPLICAS})",
    )
    la.add_argument(
        "--ft-group-size",
        type=int,
        default=None,
        metavar="K",
        help="--ft: processes per replica group, DDP inside it; a divisor of --nproc-per-node (default: 1 "
        "on one node, --nproc-per-node on several: one group per node)",
    )
    la.set_defaults(func=run)


def run(args) -> int:
    """`dtrain launch ...`: with --ft here, else the normal launcher."""
    if not asked(args):
        return launch(args)
    nproc = args.nproc_per_node if args.nproc_per_node is not None else (_visible_gpus() or 1)
    return run_ft(args, nproc)


def asked(args) -> bool:
    return bool(getattr(args, "ft", False)) or any(getattr(args, k, None) is not None for k in OPTIONS)


def options(args) -> list[str]:
    """The --ft options of this launch, as given (for the command that resumes it)."""
    out = ["--ft"]
    if args.ft_lighthouse:
        out += ["--ft-lighthouse", args.ft_lighthouse]
    if args.ft_host_lighthouse:
        out += ["--ft-host-lighthouse"]
    if args.ft_timeout is not None:
        out += ["--ft-timeout", f"{args.ft_timeout:g}"]
    if args.ft_min_replicas is not None:
        out += ["--ft-min-replicas", str(args.ft_min_replicas)]
    if args.ft_group_size is not None:
        out += ["--ft-group-size", str(args.ft_group_size)]
    return out


def resume_command(args, nproc: int) -> list[str]:
    """This launch as a command line, its --ft options included (what the summary gives as the one that
    goes on)."""
    command = _command(args, nproc)
    for flag in ("--rdzv-endpoint", "--rdzv-id"):  # --nnodes N's rendezvous, which --ft has none of
        if flag in command:
            del command[command.index(flag) : command.index(flag) + 2]
    return [*command[:2], *options(args), *command[2:]]


def _check(args, nproc: int) -> tuple[int, float, int, int]:
    """-> (nodes, timeout, min_replicas, group size), or a one-line ConfigError for what --ft cannot do."""
    from .config import ConfigError

    if not args.ft:
        given = [flag for key, flag in OPTIONS.items() if getattr(args, key) is not None]
        raise ConfigError(f"launch: {', '.join(given)} is an option of --ft; add --ft or leave it out")
    if not args.target:
        raise ConfigError(
            "launch: give a dtrain command or a script, e.g. `dtrain launch --ft --nproc-per-node 3 "
            "train --config configs/digits.yaml`"
        )
    if nproc < 1 or args.max_restarts < 0:
        raise ConfigError("launch: --nproc-per-node must be >= 1 and --max-restarts >= 0")
    lo, hi = _nnodes(args.nnodes)
    timeout = FT_TIMEOUT_S if args.ft_timeout is None else args.ft_timeout
    min_replicas = FT_MIN_REPLICAS if args.ft_min_replicas is None else args.ft_min_replicas
    if lo != hi:
        raise ConfigError(
            f"launch: --ft takes --nnodes N, not {args.nnodes}: replica groups come and go under "
            f"the Lighthouse's quorum without an elastic rendezvous"
        )
    if args.rdzv_endpoint or args.rdzv_conf:
        raise ConfigError(
            "launch: --ft needs no rendezvous (--rdzv-endpoint, --rdzv-conf): replica groups meet at "
            "the Lighthouse; give every node --ft-lighthouse HOST:PORT instead (--ft-host-lighthouse on "
            "the one that starts it)"
        )
    if hi > 1 and not args.ft_lighthouse:
        raise ConfigError(
            f"launch: --ft with --nnodes {hi} needs --ft-lighthouse HOST:PORT, the same on every "
            f"node, and --ft-host-lighthouse on the one node that starts it"
        )
    if args.ft_host_lighthouse and not args.ft_lighthouse:
        raise ConfigError(
            "launch: --ft-host-lighthouse needs --ft-lighthouse HOST:PORT (the address the other "
            "nodes use; this node listens on its port)"
        )
    if args.ft_lighthouse and not _host_port(args.ft_lighthouse):
        raise ConfigError(f"launch: --ft-lighthouse {args.ft_lighthouse!r} is not HOST:PORT")
    size = args.ft_group_size if args.ft_group_size is not None else (1 if hi == 1 else nproc)
    if size < 1 or nproc % size:
        raise ConfigError(
            f"launch: --ft-group-size {size} must divide --nproc-per-node {nproc} (the processes of a "
            f"replica group are on one node)"
        )
    groups = nproc // size * hi
    if timeout <= 0 or not 1 <= min_replicas <= groups:
        raise ConfigError(
            f"launch: --ft-timeout must be > 0 and --ft-min-replicas between 1 and the replica groups "
            f"started ({groups})"
        )
    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("launch: --ft needs torchft, which is not installed; pip install 'dtrain[ft]'")
    return hi, timeout, min_replicas, size


def _host_port(text: str) -> tuple[str, int] | None:
    host, _, port = text.removeprefix("http://").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def run_ft(args, nproc: int) -> int:
    """`dtrain launch --ft ...` -> the launch's exit code."""
    nodes, timeout, min_replicas, size = _check(args, nproc)
    here = nproc // size  # replica groups on this node
    entry, run_dir, note = _resolve(args.target, args.parser)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = Stop()
    # The groups take no run lock (they share the directory): the launch is the one job that holds it, as a
    # plain run's rank 0 does, so that a second launch or a `dtrain train` of this run is refused meanwhile. On
    # several nodes, the node that starts the Lighthouse (the others' launchers are the same job)
    lock = held(run_dir) if not args.ft_lighthouse or args.ft_host_lighthouse else contextlib.nullcontext()
    claimed = contextlib.ExitStack()  # the group ids this launch holds (claim_ids), released at its end
    with lock, claimed, stop.handling(), tempfile.TemporaryDirectory(prefix="dtrain-ft-") as errors:
        lighthouse = Lighthouse(args, timeout, min_replicas, logs)
        try:
            address = lighthouse.start(stop)
            if address is None or stop.signum:
                say(
                    f"launch: {stop.name} received before any replica group started: nothing to save; run the "
                    f"same command again to start"
                )
                return EXIT_INTERRUPTED
            each = "one process" if size == 1 else f"{size} processes"
            say(
                f"launch: --ft, {here} replica group(s) of {each}{' on this node' if nodes > 1 else ''}, "
                f"nodes={nodes}, max_restarts={args.max_restarts}, lighthouse {address} ({lighthouse.whose}): "
                f"{shlex.join(args.target)}; logs {logs}/group-{'N' if nodes == 1 else socket.gethostname() + '-N'}"
                f".log{note}"
            )
            os.environ["DTRAIN_LAUNCH_COMMAND"] = shlex.join(resume_command(args, nproc))
            env = {
                "DTRAIN_FT": "1",
                "TORCHFT_LIGHTHOUSE": address,
                "DTRAIN_FT_GROUPS": str(here * nodes),
                "DTRAIN_FT_TIMEOUT_S": f"{timeout:g}",
                "DTRAIN_FT_MIN_REPLICAS": str(min_replicas),
            }
            ids = [str(i) for i in range(here)]
            if nodes > 1:
                from .dist.network import reachable  # not at the top: dtrain.dist imports torch (fast CLI)

                env.update(reachable(_host_port(address)[0]))
                ids = claim_ids(logs, socket.gethostname(), here, claimed)
            groups = Groups(
                ids,
                size,
                [sys.executable, *entry],
                env,
                logs,
                Path(errors),
                run_dir,
                args.max_restarts,
                args.stop_timeout,
                stop,
            )
            return groups.run()
        finally:
            lighthouse.stop()


@contextlib.contextmanager
def held(run_dir: Path):
    """dtrain's run lock (runlock.RunLock: refused in one line while another job holds it) for the launch."""
    from .runlock import RunLock, check_layout

    lock = RunLock(run_dir)
    lock.acquire(say)
    try:
        check_layout(run_dir)
        yield
    finally:
        lock.release()


class Stop:
    """The signals the launcher forwards: noted here (the loop forwards them), never a restart's cause."""

    def __init__(self):
        self.signum: int | None = None
        self.count = 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _note(self, signum, frame) -> None:
        self.signum, self.count = self.signum or signum, self.count + 1

    @contextlib.contextmanager
    def handling(self):
        names = FORWARDED.split(",")
        before = {n: signal.signal(getattr(signal, n), self._note) for n in names}
        try:
            yield self
        finally:
            for n, handler in before.items():
                signal.signal(getattr(signal, n), handler)


def _gpu_ids(env: dict) -> list[str]:
    """The GPUs this launch may use, as CUDA_VISIBLE_DEVICES names them (none on a CPU machine)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    if not Path("/proc/driver/nvidia").exists():  # no NVIDIA driver: no need to import torch to know
        return []
    return [str(i) for i in range(_visible_gpus())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def claim_ids(logs: Path, host: str, count: int, held: contextlib.ExitStack) -> list[str]:
    """`count` group ids <host>-<i> for this launch on several nodes, the lowest i that no other launch holds:
    two launchers on one host (a test, or a big node split in two) named both their groups <host>-0, and
    their groups wrote the same log and sample-key files in a shared run directory. An id is held by a lock
    (flock, released when the launcher ends, however) on its log, logs/group-<id>.log, kept open in `held`;
    a host's name is its own, so the lock needs no file system shared between hosts."""
    import fcntl

    ids, i = [], 0
    while len(ids) < count:
        log = held.enter_context(open(logs / f"group-{host}-{i}.log", "a"))
        try:
            fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ids.append(f"{host}-{i}")
        except OSError:  # another launcher's
            log.close()
        i += 1
    return ids


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _dies_with_launcher():
    """A preexec_fn: SIGTERM to the child when this launcher dies, even by SIGKILL (PR_SET_PDEATHSIG, as
    dtrain.worker.die_with_launcher, but from before exec: a group's imports take seconds). None off Linux."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_it():
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before it took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_it


class Lighthouse:
    """torchft's Lighthouse: started here (127.0.0.1 and a free port, or --ft-host-lighthouse: all interfaces
    at --ft-lighthouse's port) and stopped at the end, or the one --ft-lighthouse names, waited for."""

    START_S = 30.0  # for it to listen (a python script that runs torchft's Rust server: a second or two)

    def __init__(self, args, timeout: float, min_replicas: int, logs: Path):
        self.given, self.host_it = args.ft_lighthouse, bool(args.ft_host_lighthouse)
        self.wait_s, self.logs = args.rdzv_timeout, logs
        self.flags = [
            "--min_replicas",
            str(min_replicas),
            "--quorum_tick_ms",
            str(QUORUM_TICK_MS),
            # a group alive but slower to its next quorum (saving, validating) is waited for this long
            "--join_timeout_ms",
            str(int(timeout * 1000)),
            "--heartbeat_timeout_ms",
            str(min(HEARTBEAT_TIMEOUT_MS, int(timeout * 1000))),
        ]
        self.proc: subprocess.Popen | None = None
        self.whose = "started here, log " + str(logs / "lighthouse.log") if self.host_it or not self.given else "given"

    def start(self, stop: Stop) -> str | None:
        """-> the address the groups use (http://HOST:PORT); None when a signal came first."""
        from .config import ConfigError

        if self.given and not self.host_it:
            host, port = _host_port(self.given)
            deadline, said = time.monotonic() + self.wait_s, False
            while not _answers(host, port):
                if stop.signum:
                    return None
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"launch: no Lighthouse answered at {self.given} within {self.wait_s} s "
                        f"(--rdzv-timeout): start the node given --ft-host-lighthouse, or "
                        f"`torchft_lighthouse {' '.join(self.flags)} --bind 0.0.0.0:{port}`"
                    )
                if not said:
                    say(f"launch: waiting for the Lighthouse at {self.given} to answer")
                    said = True
                time.sleep(0.5)
            return f"http://{self.given.removeprefix('http://')}"
        binary = Path(sys.executable).parent / "torchft_lighthouse"
        binary = str(binary) if binary.exists() else shutil.which("torchft_lighthouse")
        if binary is None:
            raise ConfigError(
                "launch: --ft needs torchft's torchft_lighthouse command (none beside python or on "
                "PATH); pip install 'dtrain[ft]'"
            )
        for _ in range(3):  # a free port can be taken by another process before the Lighthouse binds it
            host, port = ("0.0.0.0", _host_port(self.given)[1]) if self.host_it else ("127.0.0.1", _free_port())
            with open(self.logs / "lighthouse.log", "a") as log:
                self.proc = subprocess.Popen(
                    [binary, *self.flags, "--bind", f"{host}:{port}"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    preexec_fn=_dies_with_launcher(),
                )
            deadline = time.monotonic() + self.START_S
            while self.proc.poll() is None and not _answers("127.0.0.1", port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None and _answers("127.0.0.1", port):
                return f"http://{self.given.removeprefix('http://')}" if self.host_it else f"http://{host}:{port}"
            self.stop()
            if self.host_it:
                break
        last = (self.logs / "lighthouse.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise ConfigError(
            f"launch: torchft_lighthouse did not start ({last[0] if last else 'no output'}); "
            f"log {self.logs}/lighthouse.log"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Group:
    """One replica group: its processes (ranks 0..size-1), this attempt's error files, how it ended."""

    def __init__(self, index: int, replica_id: str):
        self.index, self.replica_id = index, replica_id
        self.procs: list[subprocess.Popen] = []
        self.attempt = 0
        self.error_files: list[Path] = []
        self.code: int | None = None  # how its last attempt ended; None while it runs
        self.culprit = 0  # the rank whose end ended it

    def ended(self) -> bool:
        """Whether this attempt is over: every process ended, or one failed (a crash, a user error, a signal
        that kills): its peers are then stopped (SIGKILL: they would wait in the group's collectives until
        its timeout; the group heals from a live peer, and a checkpoint being written is never published
        half-written). Its code is the first failure's, else 75 if a process saved and stopped, else 0."""
        codes = [p.poll() for p in self.procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0, EXIT_INTERRUPTED)]
        if failed:
            self.culprit = failed[0]
            for p in self.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait()
        elif any(c is None for c in codes):
            return False
        else:
            self.culprit = next((r for r, c in enumerate(codes) if c == EXIT_INTERRUPTED), 0)
        self.code = codes[self.culprit]
        return True

    def failure(self) -> SimpleNamespace:
        """Its end as torch's agent reads a worker's (launcher.error_line and traceback_of read it)."""
        message, error_file = "", "<N/A>"
        with contextlib.suppress(OSError, ValueError, IndexError):
            message = json.loads(self.error_files[self.culprit].read_text())["message"]
            error_file = str(self.error_files[self.culprit])
        return SimpleNamespace(exitcode=self.code, message=message, error_file=error_file)


class Groups:
    """Starts the replica groups and watches them: restarts a lost one alone, stops all on a user error or a
    signal, and gives the launch's exit code."""

    def __init__(
        self,
        ids: list[str],
        size: int,
        command: list[str],
        env: dict,
        logs: Path,
        errors: Path,
        run_dir: Path,
        max_restarts: int,
        stop_timeout: float,
        stop: Stop,
    ):
        self.groups = [Group(i, r) for i, r in enumerate(ids)]
        self.size = size
        self.command, self.logs, self.errors, self.run_dir = command, logs, errors, run_dir
        self.max_restarts, self.stop_timeout, self.stop = max_restarts, stop_timeout, stop
        self.restarts = 0
        self.env = {k: v for k, v in os.environ.items() if k not in INHERITED and not k.startswith("TORCHELASTIC_")}
        self.env.update(env)
        if len(ids) * size > 1:
            self.env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers per node
        self.gpus = _gpu_ids(self.env)
        self.user_error: Group | None = None
        self.failed: list[Group] = []  # groups lost for good (no restarts left), in the order they died

    def log(self, g: Group) -> Path:
        """group-<REPLICA_GROUP_ID>.log: unique across nodes too (a shared run directory)."""
        return self.logs / f"group-{g.replica_id}.log"

    def start(self, g: Group) -> None:
        g.attempt += 1
        g.code, g.culprit = None, 0
        g.error_files = [self.errors / f"group-{g.index}-{g.attempt}-{r}.json" for r in range(self.size)]
        port = str(_free_port())  # the group's store and process group: a new one at each start
        with open(self.log(g), "a") as f:  # appended across restarts and runs: where each attempt begins
            f.write(
                f"---- dtrain launch --ft: {time.strftime('%Y-%m-%d %H:%M:%S')}, group {g.replica_id}, "
                f"attempt {g.attempt} ----\n"
            )
        g.procs = [self._start_rank(g, r, port) for r in range(self.size)]

    def _start_rank(self, g: Group, rank: int, port: str) -> subprocess.Popen:
        env = dict(
            self.env,
            REPLICA_GROUP_ID=g.replica_id,
            RANK=str(rank),
            WORLD_SIZE=str(self.size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(self.size),
            MASTER_ADDR=self.env.get("MASTER_ADDR", "127.0.0.1"),  # reachable()'s on several nodes
            MASTER_PORT=port,
            TORCHELASTIC_ERROR_FILE=str(g.error_files[rank]),  # where dtrain's one-line error goes
            # the worker's own notes (its error line, its launch line) to its log only: the launcher
            # speaks for the job on the terminal, as for the normal launcher's ranks
            **{LOG_FILE_ENV: str(self.log(g).resolve())},
        )
        if self.gpus:  # the group's own GPUs (LOCAL_RANK picks one of them)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[g.index * self.size : (g.index + 1) * self.size])
        with open(self.log(g), "a") as log:
            outputs, tees = (log, log), []
            if g.index == 0 and rank == 0:  # its output on the terminal too, through tee (a session of its
                # own: our signals are not its, it ends when the group's pipe closes)
                tees = [
                    subprocess.Popen(
                        ["tee", "-a", str(self.log(g))], stdin=subprocess.PIPE, stdout=fd, start_new_session=True
                    )
                    for fd in (1, 2)
                ]  # the launcher's own
                outputs = tuple(t.stdin for t in tees)
            # a session of its own: a ^C at the terminal reaches the launcher only, which forwards it
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=outputs[0],
                stderr=outputs[1],
                start_new_session=True,
                preexec_fn=_dies_with_launcher(),
            )
            for t in tees:
                t.stdin.close()
        return proc

    def live(self) -> list[Group]:
        return [g for g in self.groups if g.procs and g.code is None]

    def run(self) -> int:
        for g in self.groups:
            self.start(g)
        deadline, forwarded = None, 0
        while self.live():
            if self.stop.count > forwarded:  # every signal the launcher got, to every group at once
                forwarded = self.stop.count
                self._signal_all(self._forwarded(self.stop.signum))
                deadline = deadline or time.monotonic() + self.stop_timeout
            if deadline is not None and time.monotonic() > deadline:
                self._signal_all(signal.SIGKILL)
            time.sleep(POLL_S)
            for g in self.live():
                if g.ended():
                    if self._ended(g) and deadline is None:
                        deadline = time.monotonic() + self.stop_timeout
                        self._signal_all(signal.SIGTERM)  # a user error: the others save and stop
        return self._result()

    @staticmethod
    def _forwarded(signum: int) -> int:
        """SIGINT and SIGUSR1 (SLURM's warning) as they are, the others as SIGTERM: dtrain's workers save on
        SIGTERM, SIGINT and SIGUSR1 (a second SIGINT aborts), and SIGHUP or SIGQUIT would kill them unsaved."""
        return signum if signum in (signal.SIGINT, signal.SIGUSR1) else signal.SIGTERM

    def _signal_all(self, signum: int) -> None:
        for g in self.live():
            for p in g.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signum)

    def _ended(self, g: Group) -> bool:
        """Group `g` ended with g.code: restart it if it died and restarts are left. -> whether the others
        must stop (a user error)."""
        if g.code == EXIT_USER_ERROR and not self.stop.signum:
            self.user_error = self.user_error or g
            return True
        # done, saved after a signal (the launcher's, or its own: then the quorum's vote stops them all), ended
        # by a signal that asks to stop, or while all are stopping: never restarted
        if g.code in (0, EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT) or self.stop.signum or self.user_error:
            return False
        step = last_logged_step(self.run_dir)
        how = self._how(g)
        at = f" at step ~{step}" if step is not None else " before its first logged step"
        if self.restarts < self.max_restarts:
            self.restarts += 1
            say(
                f"ft: group {g.replica_id} died ({how}){at}; restarting it ({self.restarts} of {self.max_restarts} "
                f"restarts); the others train on"
            )
            self.start(g)
        else:
            self.failed.append(g)
            others = " the others train on without it" if self.live() else ""
            say(
                f"ft: group {g.replica_id} died ({how}){at}; no restarts left (--max-restarts {self.max_restarts});"
                f"{others or ' no group left'}"
            )
        return False

    def _echo_end(self, g: Group) -> None:
        """The end of the run as the writing group said it (the lowest id left writes the last step: its fault
        lines and summary), from its log to the terminal, where group 0's would have been."""
        with contextlib.suppress(OSError):
            lines = self.log(g).read_text(errors="replace").split("---- dtrain launch --ft:")[-1].splitlines()
            faults = [line for line in lines if line.startswith("ft: ") and " lost at step " in line]
            start = max((i for i, line in enumerate(lines) if line == "summary"), default=len(lines))
            for line in [*faults, *lines[start:]]:
                print(line, file=sys.stderr)

    def _how(self, g: Group) -> str:
        if g.code is not None and g.code < 0:
            return _exit_text(g.code).removeprefix("killed by ")
        return f"{error_line(g.failure())}; log {self.log(g)}"

    def _result(self) -> int:
        host = socket.gethostname()
        if self.user_error is not None:
            g = self.user_error
            say(f"dtrain: error: {error_line(g.failure())} (group {g.replica_id} on {host}, log {self.log(g)})")
            return EXIT_USER_ERROR
        ended = [g for g in self.groups if g not in self.failed]  # the last attempt of each group still in
        if self.stop.signum:
            bad = [g for g in ended if g.code not in (0, EXIT_INTERRUPTED, -self._forwarded(self.stop.signum))]
            if bad:
                say(
                    f"dtrain: error: launch: {self.stop.name} received; group {bad[0].replica_id} did not stop cleanly "
                    f"({_exit_text(bad[0].code)}); the newest complete checkpoint is intact: run the same command "
                    f"again (log {self.log(bad[0])})"
                )
                return EXIT_FAILED
            say(
                f"launch: {self.stop.name} received: the replica groups saved and stopped; run the same command "
                f"again to resume"
            )
            return EXIT_INTERRUPTED
        if any(g.code == EXIT_INTERRUPTED for g in ended):
            say(
                f"launch: the replica groups stopped (interrupted, resumable); run the same command again "
                f"(logs {self.logs}/group-N.log)"
            )
            return EXIT_INTERRUPTED
        if ended and all(g.code == 0 for g in ended):
            if self.groups[0] in self.failed:  # its output was the terminal's: the end is another group's
                self._echo_end(min(ended, key=lambda g: g.replica_id))
            if self.failed:
                say(
                    f"launch: done by {len(ended)} of {len(self.groups)} replica groups; lost for good: "
                    f"{', '.join(f'group {g.replica_id} ({self._how(g)})' for g in self.failed)}"
                )
            return 0
        g = self.failed[0] if self.failed else next(g for g in ended if g.code != 0)
        stack = traceback_of(g.failure())
        if stack and g.index != 0:  # group 0's is on the terminal already
            print(stack.rstrip(), file=sys.stderr)
        after = f" after {self.restarts} restart(s)" if self.restarts else ""
        say(
            f"dtrain: error: launch: replica group failed{after}: {error_line(g.failure())} (group {g.replica_id} on "
            f"{host}, log {self.log(g)})"
        )
        return EXIT_FAILED
