"""A stand-in replica group for tests/test_ft_launch.py: `dtrain launch --ft` starts it as it starts dtrain's
own (`python tests/ft_fake_worker.py --out DIR run.name=NAME`); it keeps to the workers' side of the contract
without training anything, and imports no torch (a group starts in a fraction of a second).

It writes its environment to DIR/env-<group>-<pid>.json, whether the Lighthouse answered, then counts steps
(group 0 logs them to runs/NAME/metrics.jsonl, as rank 0 does) until told, by a file DIR/<what>-<group>:
(its rank 0; DIR/<what>-<group>-r<R>: its rank R) `die` SIGKILL itself, `crash` exit 1 with a traceback, `usererror` exit 2 with dtrain's one-line error, `done`
exit 0; SIGTERM or SIGINT: it "saves" (DIR/saved-<group>-<pid>) and exits 75, or with DIR/crashonstop-<group>
exits 1."""

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from dtrain.worker import report_error

out = Path(sys.argv[sys.argv.index("--out") + 1])
run = Path("runs") / next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run.name="))
group, rank, pid = os.environ["REPLICA_GROUP_ID"], os.environ["RANK"], os.getpid()


def saved(signum, frame):
    if (out / f"crashonstop-{group}").exists():  # a group that fails on its way out
        sys.exit(1)
    (out / f"saved-{group}-{pid}").write_text(signal.Signals(signum).name)
    sys.exit(75)


signal.signal(signal.SIGTERM, saved)
signal.signal(signal.SIGINT, saved)
host, port = os.environ["TORCHFT_LIGHTHOUSE"].removeprefix("http://").rsplit(":", 1)
try:
    socket.create_connection((host, int(port)), timeout=5).close()
    lighthouse = True
except OSError:
    lighthouse = False
record = {"env": dict(os.environ), "lighthouse_answered": lighthouse, "ppid": os.getppid()}
(out / f"env-{group}-{pid}.json.tmp").write_text(json.dumps(record))
os.replace(out / f"env-{group}-{pid}.json.tmp", out / f"env-{group}-{pid}.json")
print(f"fake group {group} started (pid {pid})", flush=True)
step = 0
while True:
    step += 1
    if group == "0" and rank == "0":
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
    for what in ("die", "crash", "usererror", "done"):
        # an order to the group goes to its rank 0; one to rank R of a group of several: <what>-<group>-r<R>
        order = out / (f"{what}-{group}" if rank == "0" else f"{what}-{group}-r{rank}")
        if not order.exists():
            order = out / f"{what}-{group}-r{rank}"
        if order.exists():
            order.unlink()
            if what == "die":
                os.kill(pid, signal.SIGKILL)
            if what == "crash":
                raise RuntimeError(f"fake crash of group {group}")
            if what == "usererror":
                report_error(f"config: fake mistake in group {group}")
                sys.exit(2)
            if what == "done":  # as the writing group ends a run: its summary (on stdout, in its log)
                print(f"summary\nrun  fake end of group {group}", flush=True)
            sys.exit(0)
    time.sleep(0.05)
