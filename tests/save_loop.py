"""Fault-injection target: save checkpoints back to back (resuming from the newest complete one)
until killed. Each step's state is a pure function of the step, so the parent can check contents."""

import os
import sys
from pathlib import Path

import torch

from dtrain.checkpoint import Checkpointer
from dtrain.dist import DistInfo


def say(line: str) -> None:
    """One line in one write (atomic on a pipe): the server and its forked saver share stdout, and print's
    buffered pieces interleaved ("readypid 31910", "0": the test then waited for lines it never got)."""
    os.write(1, (line + "\n").encode())


def state_for(step: int) -> dict:
    return {"weights": torch.full((1_000_000,), float(step)), "step": step}


def save_until_killed(root: Path) -> None:
    info = DistInfo("single", 0, 0, 1, torch.device("cpu"), None)
    ckpt = Checkpointer(root, keep_last=2, dist_info=info, config_hash="test")
    found = ckpt.load_latest(lambda m: print(m, file=sys.stderr, flush=True))
    step = found[1]["step"] if found else 0
    say(f"ready {step}")
    while True:
        step += 1
        ckpt.save(step, state_for(step), {"rank": 0})


def fork_server() -> None:
    """Python and torch imported once, a fresh saver process forked for each checkpoint directory
    read from stdin: a trial costs a fork, not an interpreter start. Prints the child's pid, then
    `reaped CODE` once it has died (the test SIGKILLs it: CODE -9; os.waitstatus_to_exitcode)."""
    # one intra-op thread: a fork must not inherit a thread pool (a forked saver hung for 600 s in one ci-like
    # run, and another died before `ready`); the saves here are I/O, not arithmetic
    torch.set_num_threads(1)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                save_until_killed(Path(line.strip()))
            except BaseException as e:  # on stdout, so a test's failure names it (stderr is not in its report)
                say("error " + repr(e).replace("\n", " "))
            finally:
                os._exit(1)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"reaped {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    fork_server() if sys.argv[1] == "--fork-server" else save_until_killed(Path(sys.argv[1]))
