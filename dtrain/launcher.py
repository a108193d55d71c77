"""`dtrain launch`: start N workers per node on torch's elastic agent (the agent behind torchrun), with
one line per event on the terminal and the workers' exit code as the launcher's.

The launcher side: the agent (rendezvous, restarts, signal forwarding, error files) is torch's
`LocalElasticAgent`, built from a `LaunchConfig` as `torch.distributed.launcher.api.launch_agent` builds
it; dtrain's subclass only decides which failures are retried (not a user error, exit 2, nor an
interruption, exit 75) and says one line per restart. The worker side is dtrain/worker.py
(`python -m dtrain.worker LOG_DIR LAUNCHER_PID TARGET ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

EXIT_USER_ERROR, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 75
# SIGUSR1 too (SLURM's preemption warning): torch's agent forwards the signals it handles to every worker
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# How long a node waits for the rendezvous of several nodes: stated on the terminal, as the workers'
# dist.connect_timeout_s is; torch's own 600 s read as a hang. A node started by hand may need longer.
RDZV_TIMEOUT_S = 300
WAIT_SAID_AFTER_S, WAIT_SAID_EVERY_S = 3.0, 30.0  # "waiting for ..." lines while the nodes meet
STOP_TIMEOUT_S = 120
# The torch releases `dtrain launch` is tested on (CI: 2.13.0), as pip spells them: its agent overrides
# private methods of torch's LocalElasticAgent and reads private attributes, which another release may lack
TORCH_TESTED = ">=2.13,<2.14"
AGENT_METHODS = (
    "_monitor_workers",
    "_restart_workers",
    "_rendezvous",
    "_shutdown",
    "_stop_workers",
    "_initialize_workers",
)
AGENT_ATTRIBUTES = ("_pcontext", "_remaining_restarts", "_shutdown_timeout")  # set in the agent's __init__


def add_parser(sub) -> None:
    la = sub.add_parser(
        "launch",
        help="start workers on this node (torch's elastic agent, as torchrun): one "
        "line per event, per-rank logs, restarts, the workers' exit code",
        usage="dtrain launch [options] COMMAND|SCRIPT.py [args]",
    )
    la.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="workers on this node (default: one per visible GPU, else 1)",
    )
    la.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="nodes (default 1)")
    la.add_argument(
        "--rdzv-endpoint",
        default="",
        metavar="HOST:PORT",
        help="several nodes: the c10d rendezvous every node's launcher joins",
    )
    la.add_argument("--rdzv-id", default="dtrain", help="several nodes: the same id on every node (default dtrain)")
    la.add_argument(
        "--rdzv-conf",
        default="",
        metavar="K=V,...",
        help="c10d rendezvous settings, as torchrun's: is_host=1 on the node that hosts the store, "
        "join_timeout=S (as --rdzv-timeout), last_call_timeout=S, ...",
    )
    la.add_argument(
        "--rdzv-timeout",
        type=int,
        default=RDZV_TIMEOUT_S,
        metavar="S",
        help=f"several nodes: how long this node waits for the rendezvous store to answer, and "
        f"then for the other nodes to join (each), before it ends saying why (default "
        f"{RDZV_TIMEOUT_S})",
    )
    la.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="restart all workers from the newest complete checkpoint after a crashed, killed or "
        "lost worker, at most K times (a user error, exit 2, is never retried)",
    )
    la.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        metavar="S",
        help="after SIGTERM/SIGINT/SIGUSR1: how long the workers may take to save before SIGKILL (default 120)",
    )
    la.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        metavar="COMMAND|SCRIPT.py [args]",
        help="a dtrain command (train, doctor, ...) or a script that calls dtrain.main",
    )
    la.set_defaults(func=run)


# ---- the launcher ---------------------------------------------------------------------------------
def run(args) -> int:
    from .config import ConfigError

    if not args.target:
        raise ConfigError(
            "launch: give a dtrain command or a script, e.g. `dtrain launch --nproc-per-node 2 "
            "train --config configs/digits.yaml`"
        )
    # first, before torch is imported (the GPU count, the agent): a bad config is its line in well under 2 s
    entry, run_dir, note = _resolve(args.target, args.parser)  # dtrain's parser (cli.parse_args)
    nproc = args.nproc_per_node if args.nproc_per_node is not None else (_visible_gpus() or 1)
    if nproc < 1 or args.max_restarts < 0 or args.rdzv_timeout <= 0:
        raise ConfigError("launch: --nproc-per-node must be >= 1, --max-restarts >= 0 and --rdzv-timeout > 0")
    min_nodes, max_nodes = _nnodes(args.nnodes)
    if max_nodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"launch: --nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    rdzv_configs = _rdzv_configs(args.rdzv_conf, args.rdzv_timeout)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    say(
        f"launch: {nproc} worker(s) per node, nodes={args.nnodes}, max_restarts={args.max_restarts}: "
        f"{shlex.join(args.target)}; logs {logs}/rank-N.log{note}"
    )
    os.environ["DTRAIN_LAUNCH_COMMAND"] = shlex.join(_command(args, nproc))  # what the summary says resumes it
    return _run_agent(args, nproc, min_nodes, max_nodes, rdzv_configs, entry, run_dir, logs)


def _rdzv_configs(conf: str, timeout_s: int) -> dict:
    """--rdzv-conf K=V,... as torch's rendezvous settings, with one bound for both waits, the join_timeout it
    gives, else --rdzv-timeout: for the nodes to join, and, on a node that does not host the store, for
    the store to answer (torch's read_timeout, else a fixed 60 s and a traceback, however long the nodes
    were told to wait for each other)."""
    from .config import ConfigError

    configs = {}
    for item in filter(None, conf.split(",")):
        key, _, value = item.partition("=")
        configs[key.strip()] = value.strip()
    wait_s = str(configs.setdefault("join_timeout", timeout_s))
    if not wait_s.isdigit() or int(wait_s) < 1:
        raise ConfigError(f"launch: --rdzv-conf join_timeout={wait_s} is not a whole number of seconds >= 1")
    configs.setdefault("read_timeout", wait_s)
    return configs


def _command(args, nproc: int) -> list[str]:
    """This launch as a command line (the workers' end-of-run summary gives it as the one that goes on)."""
    options = ["--nproc-per-node", str(nproc)]
    if args.nnodes != "1":
        options += ["--nnodes", args.nnodes, "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    if args.rdzv_conf:  # is_host=1: without it the node that hosts the store would not host it again
        options += ["--rdzv-conf", args.rdzv_conf]
    if args.rdzv_timeout != RDZV_TIMEOUT_S:
        options += ["--rdzv-timeout", str(args.rdzv_timeout)]
    if args.max_restarts:
        options += ["--max-restarts", str(args.max_restarts)]
    if args.stop_timeout != STOP_TIMEOUT_S:
        options += ["--stop-timeout", f"{args.stop_timeout:g}"]
    return ["dtrain", "launch", *options, *args.target]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _nnodes(text: str) -> tuple[int, int]:
    from .config import ConfigError

    lo, _, hi = text.partition(":")
    if not lo.isdigit() or (hi and not hi.isdigit()) or int(lo) < 1 or int(hi or lo) < int(lo):
        raise ConfigError(f"launch: --nnodes {text!r} is not N or MIN:MAX (positive, MIN <= MAX)")
    return int(lo), int(hi or lo)


def _resolve(target: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], Path, str]:
    """(the worker's arguments after `python -m dtrain.worker LOG_DIR PID`, the run directory, a note on it).
    dtrain commands resolve the run directory as the workers will (so a bad config is one line here, before
    any worker starts); a script's `key=value` arguments are read the same way, but what the script sets
    itself (dtrain.main(config=...)) is not seen here. A script's arguments that do not load as a config
    (a mistake its workers will name, or arguments of its own) may still name the run: its run.* keys."""
    from .config import ConfigError, load_config
    from .data import check_first_sample

    first = target[0]
    commands = next(a.choices for a in parser._subparsers._group_actions)
    if first in commands and first != "launch":
        entry = ["-m", "dtrain", *target]
        parsed = parser.parse_args(target)  # argparse's own error (exit 2) for a bad command line
        # eval, predict and export read a checkpoint: their overrides name no run of theirs (the default run
        # name's runs/digits/logs got their logs, and an unrelated run called digits would have too)
        if hasattr(parsed, "overrides") and hasattr(parsed, "config") and not hasattr(parsed, "checkpoint"):
            cfg = load_config(parsed.config, parsed.overrides)
            if first == "train":  # a data.sample field the first training sample lacks: the workers' line
                check_first_sample(cfg.data)
            return entry, _run_dir(cfg.run), ""
        return entry, Path("runs") / "launch", " (this command has no run directory)"
    if not first.endswith(".py") or not Path(first).is_file():
        raise ConfigError(
            f"launch: {first!r} is neither a dtrain command ({', '.join(sorted(set(commands) - {'launch'}))}) "
            "nor a Python script that exists"
        )
    config = [target[i + 1] for i, a in enumerate(target[1:-1], 1) if a == "--config"]
    overrides = [a for a in target[1:] if "=" in a and not a.startswith("-")]
    _check_script_keys(target[1:], overrides, parser)
    try:
        return (
            [first, *target[1:]],
            _run_dir(load_config(config, overrides).run),
            " (run directory from the script's key=value arguments)",
        )
    except ConfigError:  # the script's own arguments, or a mistake in dtrain's that its workers will name
        named = _run_named(config, [a for a in overrides if a.startswith("run.")])
    if named:  # the logs where the user looks for them, not under the script's name
        return [first, *target[1:]], named, " (run directory from the script's run.name)"
    return (
        [first, *target[1:]],
        Path("runs") / Path(first).stem,
        " (the script's arguments name no run directory dtrain can read)",
    )


def _run_dir(run) -> Path:
    """build.run_dir_of, imported only once the config loaded: build imports torch (1.5 s and more), which a
    config error's line need not wait for."""
    from .build import run_dir_of

    return run_dir_of(run)


def _check_script_keys(args: list[str], overrides: list[str], parser: argparse.ArgumentParser) -> None:
    """A script's `section.key=value` argument whose key dtrain's config lacks (a misspelling: optim.lrr=0.1) is
    dtrain's one line here, before any worker starts (its workers said it 10 s later, having started, imported
    torch and run the script), when every argument is one dtrain's command line takes: then dtrain.main reads
    them as `dtrain train` would, whatever the script sets itself (its config= defaults set values, not keys).
    Arguments of the script's own, or a key outside dtrain's sections (epochs=3), are left to the script."""
    from .config import Config, load_config

    with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage lines for arguments of the script's own
        try:
            commands = next(a.choices for a in parser._subparsers._group_actions)
            parser.parse_args(args if args[:1] and args[0] in commands else ["train", *args])
        except SystemExit:
            return
    for override in overrides:
        key = override.partition("=")[0].strip().split(".")
        if len(key) > 1 and key[0] in Config.model_fields and not _is_key(Config, key):
            load_config(None, [override])  # config's own line, naming the closest key


def _is_key(section, parts: list[str]) -> bool:
    """Whether dotted `parts` name a setting of pydantic model `section` (or lie inside a dict-valued one,
    such as model.kwargs.hidden)."""
    from pydantic import BaseModel

    field = section.model_fields.get(parts[0])
    if field is None:
        return False
    inner = field.annotation
    if len(parts) > 1 and isinstance(inner, type) and issubclass(inner, BaseModel):
        return _is_key(inner, parts[1:])
    return True


def _run_named(config: list[str], run_keys: list[str]) -> Path | None:
    """The run directory a script's --config files or its run.* arguments name, read without the rest of
    its arguments (which did not load); None when they name no run."""
    from .config import ConfigError, RunConfig, load_config

    for files in (config, []):
        with contextlib.suppress(ConfigError):
            run = load_config(files, run_keys).run
            if run.name != RunConfig().name:
                return _run_dir(run)
    return None


class Rendezvous:
    """What this node knows of the c10d rendezvous of several nodes, to say while it waits what for (after
    WAIT_SAID_AFTER_S, then every WAIT_SAID_EVERY_S) and, when it fails, the likely cause in one line.
    `endpoint` None: one node on a rendezvous of its own (localhost), which has nothing to wait for."""

    def __init__(self, endpoint: str | None, run_id: str, nnodes: str, min_nodes: int, wait_s: int):
        self.endpoint, self.run_id, self.nnodes, self.min_nodes, self.wait_s = (
            endpoint,
            run_id,
            nnodes,
            min_nodes,
            wait_s,
        )
        self.phase: str | None = None  # "store" (connecting to it), "join" (the nodes meeting), None
        self.handler = None  # torch's rendezvous handler, once connected
        self.most = 0  # the most nodes seen in the rendezvous: a node that gives up leaves it first
        self.formed: int | None = None  # the nodes of a rendezvous that completed with too few

    def connect(self, make_handler):
        """torch's rendezvous handler, `make_handler()`, which on a node that does not host the store waits
        for the store to answer: in a thread of its own, so that a signal meanwhile is handled at once (a
        signal handler runs in the main thread, which C++ would hold until it gave up) and the wait ends
        when said (torch's connection retries may take longer)."""
        from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

        made = {}

        def make():
            try:
                made["handler"] = make_handler()
            except Exception as e:  # noqa: BLE001  (raised again in the main thread)
                made["error"] = e

        thread = threading.Thread(target=make, daemon=True)  # left behind if the launcher ends first
        with self.waiting("store"):
            thread.start()
            thread.join(self.wait_s)
            if "error" in made:
                raise made["error"]
            if "handler" not in made:
                raise RendezvousConnectionError(f"no answer from {self.endpoint} within {self.wait_s} s")
        return made["handler"]

    @contextlib.contextmanager
    def waiting(self, phase: str, handler=None):
        """While the body waits in `phase`: say what for now and then; `phase` stays set if it fails."""
        self.phase, self.handler, self.most = phase, handler or self.handler, 0
        done = threading.Event()
        watch = threading.Thread(target=self._say_while_waiting, args=(done,), daemon=True)
        if self.endpoint:
            watch.start()
        try:
            yield
        finally:
            done.set()
            if watch.is_alive():
                watch.join()
        self.phase = None

    def _say_while_waiting(self, done: threading.Event) -> None:
        start, said_at = time.monotonic(), WAIT_SAID_AFTER_S
        while not done.wait(0.5):
            self.seen()
            waited = time.monotonic() - start
            if waited >= said_at:
                left = max(0, self.wait_s - waited)
                say(f"launch: {self.waiting_for()}; {left:.0f} s left of {self.wait_s} (--rdzv-timeout)")
                said_at += WAIT_SAID_EVERY_S

    def joined(self) -> int | None:
        """Nodes in the rendezvous now, from torch's handler's own copy of its state (the thread in
        next_rendezvous syncs it with the store each second); None before it connected. (A private
        attribute of torch's: without it the lines leave the count out.)"""
        state = getattr(getattr(self.handler, "_state_holder", None), "state", None)
        return len(state.participants) if state is not None else None

    def seen(self) -> int:
        """The most nodes seen in the rendezvous since this wait began (a node that gives up leaves it)."""
        self.most = max(self.most, self.joined() or 0)
        return self.most

    def _nodes(self, joined: int | None) -> str:
        need = self.nnodes.replace(":", "-")
        return f"{joined} of {need} nodes" if joined is not None else f"{need} nodes"

    def waiting_for(self) -> str:
        if self.phase == "store":
            return (
                f"waiting for the rendezvous store at {self.endpoint} to answer (the node whose address that "
                f"is hosts it, or the one given --rdzv-conf is_host=1)"
            )
        return (
            f"waiting for the other nodes: {self._nodes(self.joined())} joined the rendezvous at "
            f"{self.endpoint} (id {self.run_id})"
        )

    def check(self, nodes: int) -> None:
        """After each rendezvous, `nodes` met: fewer than this node's --nnodes N only when a node with a
        smaller --nnodes joined last (torch completes the rendezvous at the count of the node that joins
        last), and the job would train on fewer nodes than this one was told."""
        from torch.distributed.elastic.rendezvous.api import RendezvousError

        if nodes < self.min_nodes:
            self.formed = nodes
            raise RendezvousError(f"{nodes} nodes met")

    def where_now(self) -> str:
        """For a signal's line: where the launcher was, if it was waiting."""
        if self.phase == "store":
            return f" while waiting for the rendezvous store at {self.endpoint}"
        if self.phase == "join" and self.endpoint:
            return f" during the rendezvous ({self._nodes(self.seen())} had joined at {self.endpoint})"
        return ""

    def failure(self, error) -> str:
        """The one line for a failed rendezvous, naming the likely cause and the fix."""
        from torch.distributed.elastic.rendezvous.api import (
            RendezvousClosedError,
            RendezvousConnectionError,
            RendezvousTimeoutError,
        )

        at, same = f"{self.endpoint} (id {self.run_id})", f"--rdzv-endpoint {self.endpoint} --rdzv-id {self.run_id}"
        if self.phase == "store" and "in use" in _causes_text(error):
            return (
                f"launch: cannot host the rendezvous store at {self.endpoint}: the port is in use (another "
                f"job's?); give every node another --rdzv-endpoint port"
            )
        if self.phase == "store":
            return (
                f"launch: no rendezvous store answered at {self.endpoint} within {self.wait_s} s: start the node "
                f"that hosts it (the one whose address that is, or given --rdzv-conf is_host=1), give every "
                f"node the same --rdzv-endpoint, and check the port is open between the nodes"
            )
        most, seen = self.seen(), self._nodes(self.seen())
        if self.formed is not None:
            return (
                f"launch: the rendezvous at {at} completed with {self.formed} nodes, but this node has --nnodes "
                f"{self.nnodes}: another node was started with a smaller --nnodes; give every node the same "
                f"--nnodes"
            )
        if isinstance(error, RendezvousTimeoutError) and most >= self.min_nodes:
            return (
                f"launch: the rendezvous at {at} never completed within {self.wait_s} s though {seen} joined: "
                f"another node was started with a larger --nnodes (this one: {self.nnodes}); give every node "
                f"the same --nnodes"
            )
        if isinstance(error, RendezvousTimeoutError) and most <= 1:
            return (
                f"launch: no other node joined the rendezvous at {at} within {self.wait_s} s: start the others "
                f"with {same} (a node given another port or id waits in a rendezvous of its own), or "
                f"give them longer with --rdzv-timeout"
            )
        if isinstance(error, RendezvousTimeoutError):
            return (
                f"launch: only {seen} joined the rendezvous at {at} within {self.wait_s} s: start the others "
                f"with {same} --nnodes {self.nnodes}"
            )
        if isinstance(error, (RendezvousClosedError, RendezvousConnectionError)):  # closed, or its store gone
            return (
                f"launch: another node ended the rendezvous at {at} after {seen} had joined (it gave up "
                f"waiting or stopped; its own line says why): start every node with the same --nnodes (this "
                f"one: {self.nnodes}), {same}"
            )
        reason = str(error).strip().splitlines()[:1]
        return f"launch: the rendezvous at {at} failed ({type(error).__name__}{': ' + reason[0] if reason else ''})"


def _causes_text(error: BaseException) -> str:
    """An exception's message and its causes' (torch's RendezvousConnectionError says "see inner exception")."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return " ".join(texts)


def _quiet_cpp_warnings() -> None:
    """The rendezvous store is C++ (TCPStore): a store that does not answer, or a peer that goes away (a
    node that gave up closes the store under the others), is logged with a C++ stack dump on every node,
    and then raised to Python, where the launcher says what happened in one line. c10's level is read from
    TORCH_CPP_LOG_LEVEL once, as torch loads (here, long before the launcher runs), into a global of libc10:
    set to FATAL there, in this process only (the workers keep torch's lines), unless the user chose one."""
    import ctypes

    import torch

    if "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    try:
        level = ctypes.c_int.in_dll(
            ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so")), "FLAGS_caffe2_log_level"
        )
    except (OSError, ValueError):  # another build or platform: torch's lines stay
        return
    level.value = 3  # c10's FATAL


def _run_agent(args, nproc, min_nodes, max_nodes, rdzv_configs, entry, run_dir, logs) -> int:
    import logging

    from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig

    # The agent's own log lines (failures, restarts, shutdown) are said here, once, in dtrain's words.
    # Its modules' loggers each have a level of their own (torch's LOGLEVEL), so set each.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    _quiet_cpp_warnings()
    standalone = max_nodes == 1 and not args.rdzv_endpoint
    wait_s = int(rdzv_configs["join_timeout"])
    rdzv = Rendezvous(None if standalone else args.rdzv_endpoint, args.rdzv_id, args.nnodes, min_nodes, wait_s)
    config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex if standalone else args.rdzv_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else args.rdzv_endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=args.max_restarts,
        signals_to_handle=FORWARDED,
        logs_specs=DefaultLogsSpecs(),
        shutdown_timeout=int(args.stop_timeout),
    )
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle  # as launch_agent does
    # The workers' store: each re-formation a new one, opened by its rank 0 on a port node 0's agent picks
    # and publishes in that round of the rendezvous (torch's opt-out of sharing the agent's store). With the
    # shared store (torch's default) a node that joins later never gets in: torch 2.13's c10d handler
    # publishes the store's address in the first round only, so the newcomer waits for it (60 s) and both
    # agents fail. A new store also holds no keys of the workers before, whatever each agent's restart count.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"

    def stop(signum, frame):  # the agent's own handler, installed now: a signal during the rendezvous
        raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    for name in FORWARDED.split(","):  # or before the first worker starts is an interruption too, not a kill
        signal.signal(getattr(signal, name), stop)
    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers per node
    handler = agent = None
    try:
        handler = rdzv.connect(
            lambda: rdzv_registry.get_rendezvous_handler(
                RendezvousParameters(
                    backend=config.rdzv_backend,
                    endpoint=config.rdzv_endpoint,
                    run_id=config.run_id,
                    min_nodes=min_nodes,
                    max_nodes=max_nodes,
                    **config.rdzv_configs,
                )
            )
        )
        spec = WorkerSpec(
            role="dtrain",
            local_world_size=nproc,
            entrypoint=sys.executable,
            args=("-m", "dtrain.worker", str(logs.resolve()), str(os.getpid()), *entry),
            rdzv_handler=handler,
            max_restarts=config.max_restarts,
            monitor_interval=config.monitor_interval,
        )
        agent = _agent_class()(
            spec=spec,
            logs_specs=config.logs_specs,
            start_method="spawn",
            shutdown_timeout=config.shutdown_timeout,
            run_dir=run_dir,
            logs=logs,
            rdzv=rdzv,
        )
        result = agent.run()
    except SignalException as e:
        handler = None  # as torch's launch_agent: the rendezvous stays open for the nodes that go on
        return _interrupted(agent, signal.Signals(e.sigval).name, logs, rdzv)
    except RendezvousError as e:
        say(f"dtrain: error: {rdzv.failure(e)}")
        return EXIT_USER_ERROR
    finally:
        if handler is not None:
            handler.shutdown()
    if result.state == WorkerState.SUCCEEDED:
        return 0
    return _report_failure(agent.causes(result.failures), logs, agent.restarts, agent.stall_cause())


def _interrupted(agent, name: str, logs: Path, rdzv: Rendezvous) -> int:
    """After the agent forwarded a signal and the workers ended: 75 when every one saved and exited (75;
    0 if it had just finished; ended by that signal itself if it came before dtrain's handlers, when there
    was nothing to save yet), else 1 (killed after --stop-timeout, or an error on the way out).
    A signal while the nodes met, before any worker started, is 75 too: nothing failed, and the same
    command starts the run (or resumes it from its newest checkpoint), as after a signal one step later;
    a preemptible job's script requeues on 75, which is what a preempted rendezvous needs."""
    pcontext = getattr(agent, "_pcontext", None)
    if pcontext is None:
        say(
            f"launch: {name} received{rdzv.where_now()}: no worker had started, nothing to save; run the same "
            f"command again to start"
        )
        return EXIT_INTERRUPTED
    handlers = getattr(pcontext, "subprocess_handlers", {}) or {}
    codes = {rank: h.proc.returncode for rank, h in handlers.items()}
    clean = (0, EXIT_INTERRUPTED, -getattr(signal, name))
    bad = {r: c for r, c in codes.items() if c not in clean}
    if bad:
        rank, code = min(bad.items())
        say(
            f"dtrain: error: launch: {name} received; local rank {rank} did not stop cleanly ({_exit_text(code)}); "
            f"the newest complete checkpoint is intact: run the same command again (log {logs}/rank-N.log)"
        )
        return EXIT_FAILED
    say(f"launch: {name} received: the workers saved and stopped; run the same command again to resume")
    return EXIT_INTERRUPTED


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def error_line(failure) -> str:
    """A worker's one-line error from its error file: dtrain's own message, `Type: message` of a crash,
    or how the worker ended (no error file: killed by a signal, or an exit of its own)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [l for l in str(message or "").splitlines() if l.strip()]
    if not lines or failure.error_file == "<N/A>":
        return _exit_text(failure.exitcode)
    return lines[0].removeprefix("dtrain: error: ")


def traceback_of(failure) -> str | None:
    message = failure.message
    if isinstance(message, dict):
        stack = message.get("extraInfo", {}).get("py_callstack") or ""
        return stack if stack.startswith("Traceback") else None  # dtrain's handled errors: their line only
    return None


def _first(failures: dict) -> tuple[int, object]:
    """The root cause: the first failure the agent saw. Its failures dict keeps the order it found them
    in, the failed ranks first and then those it stopped itself (SIGTERM, or an error a stopped rank
    wrote on its way out); the error files' timestamps are whole seconds, too coarse to order them."""
    return next(iter(failures.items()))


def _report_failure(failures: dict, logs: Path, restarts: int, stalled: str | None = None) -> int:
    rank, failure = _first(failures)
    code = failure.exitcode
    where = f"rank {rank} on {socket.gethostname()}, log {logs}/rank-{rank}.log"
    if stalled and code == EXIT_FAILED:  # rank `rank` gave up waiting for the stalled one: name that one
        say(f"dtrain: error: launch: {stalled}; rank {rank} gave up waiting: {error_line(failure)} ({where})")
        return EXIT_FAILED
    if code == EXIT_INTERRUPTED:
        say(f"launch: the workers stopped (interrupted, resumable); run the same command again ({where})")
        return EXIT_INTERRUPTED
    if code == EXIT_USER_ERROR:
        say(f"dtrain: error: {error_line(failure)} ({where})")
        return EXIT_USER_ERROR
    stack = traceback_of(failure)
    if stack and not _on_the_terminal(stack, failures):
        print(stack.rstrip(), file=sys.stderr)
    after = f" after {restarts} restart(s)" if restarts else ""
    say(f"dtrain: error: launch: worker failed{after}: {error_line(failure)} ({where})")
    return EXIT_FAILED


def _on_the_terminal(stack: str, failures: dict) -> bool:
    """Whether rank 0, whose output the terminal shows, printed this crash already: its own, or the same
    crash in the same place (a bug every rank meets, each with its own message, e.g. a rank's number)."""
    ours = traceback_of(failures[0]) if 0 in failures else None
    return ours is not None and _frames(ours) == _frames(stack)


def _frames(stack: str) -> list[str]:
    return [line for line in stack.splitlines() if line.startswith("  File ")]


STALL_STATES = {
    "T": "stopped (SIGSTOP or a debugger)",
    "t": "stopped by a debugger",
    "D": "stuck in uninterruptible I/O",
}
STALLED_AFTER_S = 1.0  # in such a state this long when a peer gives up: the stall, not a passing disk wait


def stall_to_blame(
    stalls: dict[int, tuple[float, str, int | None]], rank: int, exitcode: int, now: float
) -> str | None:
    """The stall to name instead of failed rank `rank`: the longest of the other ranks' stalls (rank ->
    (since, state, step then)), only when `rank` gave up waiting (EXIT_FAILED: a collective timed out).
    A rank that died itself (a signal, a user error) is the cause even while a peer happens to sit in a
    slow disk write (seen: a SIGKILLed rank reported as rank 0 "stuck in uninterruptible I/O")."""
    if exitcode != EXIT_FAILED:
        return None
    longest = [
        (since, r, state, step)
        for r, (since, state, step) in stalls.items()
        if now - since >= STALLED_AFTER_S and r != rank
    ]
    if not longest:
        return None
    since, r, state, step = min(longest)
    return (
        f"rank {r} on {socket.gethostname()} stalled: {STALL_STATES[state]} for {now - since:.0f} s, "
        f"since step {step if step is not None else '?'}"
    )


def process_state(pid: int) -> str | None:
    """The one-letter state of /proc/PID/stat (R, S, D, T, ...), None when unknown (gone, not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0]  # after the command name, which may hold spaces


def last_logged_step(run_dir: Path) -> int | None:
    """The newest step in metrics.jsonl (its last few KB): where training was."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of `checkpoints/latest`, which only ever points at a complete checkpoint."""
    link = run_dir / "checkpoints" / "latest"
    try:
        return int(os.readlink(link).removeprefix("step-"))
    except (OSError, ValueError):
        return None


def torch_tested(version: str) -> bool:
    """Whether torch `version` (2.13.0, 2.13.1+cu128, 2.14.0.dev20270101) is in TORCH_TESTED: by its release's
    major.minor, as pip's >=,< read it (a 2.14 nightly is 2.14's)."""
    low, high = (tuple(map(int, bound.lstrip("<>=").split("."))) for bound in TORCH_TESTED.split(","))
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and low <= tuple(map(int, found.groups())) < high


def _check_agent(agent_or_class, names: tuple[str, ...]) -> None:
    """The one line for a torch whose agent lacks what dtrain's builds on, instead of an AttributeError inside
    torch's agent once the workers run."""
    import torch

    from .dist import LaunchError

    missing = [n for n in names if not hasattr(agent_or_class, n)]
    if missing:
        raise LaunchError(
            f"launch: torch {torch.__version__}'s elastic agent has no {', '.join(missing)}, which "
            f"dtrain launch builds on (tested with torch{TORCH_TESTED}): install a tested torch "
            f"(pip install 'torch{TORCH_TESTED}'), or start the workers with torchrun"
        )


def _agent_class():
    import torch
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if not torch_tested(torch.__version__):
        say(
            f"launch: warning: torch {torch.__version__} is not among the releases dtrain launch is tested with "
            f"(torch{TORCH_TESTED}); if its agent fails, install a tested torch or use torchrun"
        )
    _check_agent(LocalElasticAgent, AGENT_METHODS)

    class Agent(LocalElasticAgent):
        """torch's agent; a user error or an interruption is not retried, and each restart is one line."""

        def __init__(self, *a, run_dir: Path, logs: Path, rdzv: Rendezvous, **kw):
            super().__init__(*a, **kw)
            _check_agent(self, AGENT_ATTRIBUTES)
            self.run_dir, self.logs, self.restarts, self.cause, self.rdzv = run_dir, logs, 0, None, rdzv
            self.stalls: dict[int, tuple[float, str, int | None]] = {}  # rank -> (since, state, step then)
            self.last_stall: str | None = None
            self.killed: set[int] = set()  # stopped workers this agent SIGKILLed (not a failure's cause)

        def _watch_stalls(self, worker_group) -> None:
            """Each monitor tick (0.1 s): which local workers are stopped or stuck in I/O, since when. A
            stalled rank runs no code, so only its peers' collective timeout would end the job, naming the
            rank that waited; this names the one that stalled. (Same node only: the agent sees its own.)"""
            for w in worker_group.workers:
                state = process_state(w.id) if w.id else None
                if state in STALL_STATES:
                    if w.global_rank not in self.stalls:
                        self.stalls[w.global_rank] = (time.monotonic(), state, last_logged_step(self.run_dir))
                else:
                    self.stalls.pop(w.global_rank, None)

        def _end_stopped_workers(self, worker_group) -> None:
            """Once a worker has failed, torch's agent ends the others with SIGTERM and waits a fixed 30 s
            for each; a stopped worker (SIGSTOP, a debugger) cannot honour SIGTERM, and the job would end
            30 s later. It is SIGKILLed first (its last checkpoint is intact). (The agent's process context
            is torch's own attribute, as the methods this class overrides.)"""
            handlers = getattr(self._pcontext, "subprocess_handlers", None) or {}
            if not any(h.proc.poll() not in (None, 0) for h in handlers.values()):
                return
            for w in worker_group.workers:
                if w.id and process_state(w.id) in ("T", "t"):
                    try:
                        os.kill(w.id, signal.SIGKILL)
                        self.killed.add(w.global_rank)
                    except ProcessLookupError:
                        pass

        def _rendezvous(self, worker_group) -> None:
            with self.rdzv.waiting("join", worker_group.spec.rdzv_handler):  # say what it waits for
                super()._rendezvous(worker_group)
            self.rdzv.check(worker_group.group_world_size)

        def causes(self, failures: dict) -> dict:
            """The failures less the stopped workers this agent killed itself."""
            return {r: f for r, f in failures.items() if r not in self.killed} or failures

        def stall_cause(self) -> str | None:
            return self.last_stall

        def _monitor_workers(self, worker_group):
            self._watch_stalls(worker_group)
            stalls = dict(self.stalls)  # the failure below closes every worker: keep what was seen first
            self._end_stopped_workers(worker_group)
            result = super()._monitor_workers(worker_group)
            if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and result.failures:
                rank, failure = _first(self.causes(result.failures))
                self.last_stall = stall_to_blame(stalls, rank, failure.exitcode, time.monotonic())
                if failure.exitcode in (EXIT_USER_ERROR, EXIT_INTERRUPTED):
                    self._remaining_restarts = 0  # the same command would fail the same way / was asked to stop
                else:
                    self.cause = (
                        self.last_stall or f"rank {rank} on {socket.gethostname()} failed: {error_line(failure)}"
                    )
                self.stalls.clear()
            return result

        def _restart_workers(self, worker_group):
            joining = self.cause is None  # torch's agent saw a node waiting to join: not counted as a restart
            if joining:  # the workers save on SIGTERM: --stop-timeout to do it
                self._shutdown(timeout=self._shutdown_timeout)
            else:  # what is left of a failed group: torch's fixed 30 s before SIGKILL
                self._stop_workers(worker_group)
            worker_group.state = WorkerState.STOPPED
            step = newest_checkpoint_step(self.run_dir)
            resume = f"step {step}" if step is not None else "the start (no checkpoint yet)"
            if joining:
                say(
                    f"launch: a node is waiting to join: the workers saved and re-form with it; all workers "
                    f"resume from {resume}"
                )
            else:
                self.restarts += 1
                say(
                    f"launch: {self.cause}; restart {self.restarts} of {worker_group.spec.max_restarts}: all "
                    f"workers resume from {resume}"
                )
                self.cause = None
            self._initialize_workers(worker_group)

    return Agent
