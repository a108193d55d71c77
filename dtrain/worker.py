"""The worker side of `dtrain launch`, and what any launcher's worker writes when it fails.

`python -m dtrain.worker LOG_DIR LAUNCHER_PID TARGET ...` is what `dtrain launch` starts per rank: it dies
with the launcher, sends its output to runs/<name>/logs/rank-N.log (rank 0's also to the terminal) and runs
TARGET (`-m dtrain ARGS` or `SCRIPT.py ARGS`) as python would. `report_error` and `note` are used by every
worker (dtrain.cli), under torchrun, srun or `dtrain launch`: a handled error's one line in torch's error file
and on stderr or in the rank's log."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOG_DIR_ENV = "DTRAIN_LAUNCH_LOGS"  # set in `dtrain launch`'s workers: where rank-N.log goes
LOG_FILE_ENV = "DTRAIN_LAUNCH_LOG"  # set in `dtrain launch --ft`'s replica groups: their group-N.log


def worker_main(argv: list[str]) -> None:
    """A worker of `dtrain launch`: `LOG_DIR LAUNCHER_PID -m dtrain ARGS` or `... SCRIPT.py ARGS`, the
    target run as `python` would run it."""
    import runpy

    logs, launcher_pid, *argv = argv
    os.environ[LOG_DIR_ENV] = logs  # for this worker (report_error, note) and its children, not the launcher
    die_with_launcher(int(launcher_pid))
    _send_output_to_log()
    if argv[:1] == ["-m"]:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as `python script.py` puts its folder first
        runpy.run_path(argv[0], run_name="__main__")


def die_with_launcher(launcher: int) -> None:
    """SIGTERM when the launcher dies, even by SIGKILL: torch's agent starts workers in sessions of their
    own, so nothing else ends them (they would train on as orphans). SIGTERM, not SIGKILL: they save first.
    `launcher`: its pid, which must still be our parent (1, or any other: it is already gone)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != launcher:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def rank_log() -> Path | None:
    """This worker's log under `dtrain launch` (`--ft`: its replica group's), else None."""
    if os.environ.get(LOG_FILE_ENV):
        return Path(os.environ[LOG_FILE_ENV])
    logs = os.environ.get(LOG_DIR_ENV)
    return Path(logs) / f"rank-{os.environ.get('RANK', '0')}.log" if logs else None


def _send_output_to_log() -> None:
    """stdout and stderr (file descriptors: C++ and child processes too) appended to rank-N.log; global
    rank 0's also to the launcher's terminal, through `tee` processes of its own session (the agent's
    signals to the worker's process group must not end them; they end when the worker's pipe closes)."""
    path = rank_log()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # appended across restarts and runs: where each attempt begins
        f.write(
            f"---- dtrain launch: {time.strftime('%Y-%m-%d %H:%M:%S')}, rank {os.environ.get('RANK', '0')}, "
            f"attempt {int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')) + 1}, pid {os.getpid()} ----\n"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("RANK", "0") == "0":
        for fd in (1, 2):
            terminal = os.dup(fd)
            tee = subprocess.Popen(
                ["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=terminal, start_new_session=True
            )
            os.close(terminal)
            os.dup2(tee.stdin.fileno(), fd)
            tee.stdin.close()
    else:
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)


def note(line: str, level: int = logging.INFO) -> None:
    """A worker's line for its log: under `dtrain launch` this rank's log only (the launcher speaks for
    the job on the terminal), else the `dtrain` logger (stderr, and any handler a user added)."""
    log = rank_log()
    if log is None:
        from .logging import STDERR_HANDLER  # noqa: F401  (importing it installs dtrain's stderr handler)

        logging.getLogger("dtrain").log(level, line)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "a") as f:
        f.write(line + "\n")


def report_error(message: str, quiet: bool = False) -> None:
    """A handled error's one line, `dtrain: error: MESSAGE`, where each launcher wants it: in torch's error
    file (TORCHELASTIC_ERROR_FILE, set by torchrun and `dtrain launch`) as that line, not as a traceback,
    so torchrun's failure summary and `dtrain launch` name it; then as a `note`, unless `quiet` (an error
    every rank meets alike, said by rank 0) and not under `dtrain launch`, where the log keeps it."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                # the layout of torch's ErrorHandler.record_exception, with the line for a traceback:
                # torchrun's summary shows py_callstack, and a message of another layout makes it warn
                line = f"dtrain: error: {message}"
                json.dump(
                    {
                        "message": {
                            "message": line,
                            "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))},
                        }
                    },
                    f,
                )
        except OSError:
            pass
    if not quiet or rank_log() is not None:
        note(f"dtrain: error: {message}", logging.ERROR)


if __name__ == "__main__":
    try:
        worker_main(sys.argv[1:])
    except Exception as e:
        # as torch's `record`, unless dtrain.main's own `record` already wrote it, closer to the user's code
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file and not os.path.exists(error_file):
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)
        raise
