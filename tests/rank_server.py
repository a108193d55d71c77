"""Forks the ranks of a multi-rank run from one warm interpreter (a fork server, as tests/save_loop.py's).

A rank that torchrun starts is a new python, and pays ~3.5 s of CPU before its first step: importing torch,
torch._dynamo (which the optimizer's first step imports), dtrain; DeepSpeed adds ~3.7 s, transformers ~1.9 s,
and torchrun's agent ~1.5 s. Here they are imported once per test worker, and each rank is a fork that starts
with them loaded (and nothing run: no thread pool to inherit). A forked rank runs the same code as torchrun's
from `dtrain.cli.main` (or the user's script, as python runs it) on, in the environment the test gives each
rank (a launcher's variables: torchrun's without its agent, srun's, or none), with its own working directory,
sys.path, stdout, stderr and exit code. Tests whose subject is a launcher (torchrun's agent and its restarts,
`dtrain launch`, SLURM), a signal or a kill keep starting real launchers.

Protocol: one JSON request a line on stdin ({"args", "cwd", "env": one environment per rank, "script", "stdout",
"stderr", "timeout", "preload"}), one JSON line back once every rank has ended ({"codes": each rank's exit code,
"failed": the first non-zero one to come, "timed_out"}).
"""

import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback


def run_as_python(args: list[str], script: str | None = None) -> int:
    """`python -m dtrain ARGS`, or `python SCRIPT ARGS` (run as __main__), in this process -> its exit code.
    Sets sys.argv as python would; sys.path, the environment and the working directory are the caller's.
    (conftest's in-process runner uses it too.)"""
    import dtrain.cli

    sys.argv = [str(script) if script else os.path.join(os.path.dirname(dtrain.cli.__file__), "__main__.py"), *args]
    try:
        if script is None:
            return dtrain.cli.main(list(args))
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as e:  # argparse, dtrain.main, a script's sys.exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def _rank(req: dict, rank: int) -> None:
    """The forked child: become rank `rank` of the request's run; never returns."""
    code = 1
    try:
        out = os.open(req["stdout"], os.O_WRONLY | os.O_APPEND)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_APPEND)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"][rank])
        # as python's: the script's folder (or, for `-m dtrain`, the working directory), then PYTHONPATH's
        script = req.get("script")
        sys.path[0:1] = [
            os.path.dirname(os.path.abspath(script)) if script else os.getcwd(),
            *(p for p in req["env"][rank].get("PYTHONPATH", "").split(os.pathsep) if p),
        ]
        code = run_as_python(req["args"], script)
    except BaseException:  # noqa: BLE001 - as python prints an uncaught exception, and exits 1
        traceback.print_exc()
        code = 1
    finally:
        try:  # as the interpreter ends (and multiprocessing's forked Process): threads joined, exit functions run
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        for module in req.get("preload", []):  # DeepSpeed, transformers: imported once, for every later fork
            importlib.import_module(module)
        sys.stdout.flush()  # nothing buffered for the forks to inherit
        pids = []
        for rank in range(len(req["env"])):
            pid = os.fork()
            if pid == 0:
                _rank(req, rank)
            pids.append(pid)
        codes, deadline, killed, timed_out, failed = {}, time.monotonic() + req["timeout"], False, False, None
        while len(codes) < len(pids):
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
                        if codes[pid] != 0 and failed is None:  # as torchrun's agent: a failed rank ends the
                            failed, deadline = codes[pid], min(deadline, time.monotonic() + 10)  # others (a grace)
            if len(codes) < len(pids) and time.monotonic() > deadline and not killed:
                killed, timed_out = True, all(c == 0 for c in codes.values())  # not a failed rank's grace
                for pid in pids:
                    if pid not in codes:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        reply = {"codes": [codes[p] for p in pids], "failed": failed or 0, "timed_out": timed_out}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is imported (a preload)
    # what every rank imports before its first step, so that no fork pays for it; one intra-op thread (the
    # tests' environment sets OMP_NUM_THREADS=1) and no tensor op here: a fork must not inherit a thread pool
    import torch._dynamo  # noqa: F401  (the optimizer's first step imports it)
    import dtrain.trainer  # noqa: F401

    serve()
