"""Time lost per fault: per-step fault tolerance (dtrain.ft on torchft) vs `dtrain launch --max-restarts`
(every worker restarts and resumes from the newest checkpoint), with 0, 1 and 3 faults (a SIGKILLed worker).

    python benchmarks/ft_faults.py                  # both, faults 0 1 3, one JSON line per run, then a table
    python benchmarks/ft_faults.py --only ft --faults 0 1

ft:      3 replica groups of one process each (tests/ft_worker.py: a small MLP on 96 synthetic samples, global
         batch 16, each step padded to >= 50 ms by --step-delay) under a torchft_lighthouse; group 2 is SIGKILLed mid-step and restarted at once, as the
         launcher will restart only the lost group; it heals from a live peer and rejoins. Per fault, the
         survivors' *stall*: the time from their last commit before the fault to their first commit after it,
         less one median step; and when the replacement joins, the same at the quorum's 2 -> 3 change.
restart: `dtrain launch --nproc-per-node 2 --max-restarts 3` on the digits example (checkpoint.every=4); a
         worker SIGKILLed at logged steps 8, 24 and 40; all workers restart and resume from the newest checkpoint.
Time lost per fault: ft, the survivors' stall at the fault plus at the rejoin (their wall time moves by about
a second in minutes, under the noise of a shared machine); restart, (wall time with k faults - without) / k.
The two workloads differ (steps of ~60 ms vs dtrain's digits run): compare the time lost, not the wall times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ft_worker.py"


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    out.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- ft: 3 replica groups, group 2 killed and restarted ----------------------------------------------------
def records(out: Path, group: int) -> list[dict]:
    path = out / f"g{group}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ft_run(faults: int, steps: int, kill_every: int, step_delay: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    port = free_port()
    lighthouse = subprocess.Popen(["torchft_lighthouse", "--min_replicas", "2", "--join_timeout_ms", "1000",
                                   "--quorum_tick_ms", "50", "--heartbeat_timeout_ms", "1000",
                                   "--bind", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)

    def group(g: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(WORKER), "--replica-id", str(g), "--lighthouse",
                                 f"http://127.0.0.1:{port}", "--out", str(out), "--steps", str(steps),
                                 "--timeout", "5", "--step-delay", str(step_delay), *extra], env=env(), stdout=subprocess.DEVNULL,
                                stderr=(out / f"g{g}-{time.monotonic_ns()}.err").open("w"))
    try:
        start = time.monotonic()
        # a safety net, not a wait: the last replacement joins before the survivors' end (--steps leaves it time)
        survivors = [group(g, "--hold-at", str(steps - 5), "--hold-for", "2") for g in (0, 1)]
        victim = group(2, *(["--kill-after", str(kill_every)] if faults else []))
        for k in range(faults):
            assert victim.wait(timeout=300) == -9, "the victim was to die by its own SIGKILL"
            (out / "g2.up").unlink()
            victim = group(2, *(["--kill-after", str(kill_every)] if k + 1 < faults else []))  # restart at once
        for p in [*survivors, victim]:
            assert p.wait(timeout=600) == 0, f"a replica group failed: its stderr is in {out}"
        wall = time.monotonic() - start
    finally:
        for p in (lighthouse,):
            p.kill()
    tries = [r for r in records(out, 0) if "step" in r]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(tries)]
    step_s = statistics.median(gaps)
    stalls, rejoins, last, failed = [], [], None, False
    for t in tries:  # a group 0's view: a stall is from its last commit to the next one, less one step
        if not t["committed"]:
            failed = True
            continue
        if last is not None and failed:
            stalls.append(t["t"] - last["t"] - step_s)
        elif last is not None and t["participants"] > last["participants"]:
            rejoins.append(t["t"] - last["t"] - step_s)
        last, failed = t, False
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": "ft", "faults": faults, "wall_s": round(wall, 2), "step_s": round(step_s, 4),
            "stall_s": [round(s, 2) for s in stalls], "rejoin_s": [round(s, 2) for s in rejoins]}


# ---- restart: dtrain launch --max-restarts, a worker killed ------------------------------------------------
DIGITS = ["train", "train.epochs=4", "data.batch_size=32", "log.progress=false", "train.log_every=1",
          "checkpoint.every=4", "data.shuffle_buffer=200"]


def latest_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return -1
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines()
                if line.strip().endswith("}")), default=-1)


def worker_pids(tag: str) -> list[int]:
    """The dtrain workers started with DTRAIN_BENCH_TAG=tag (`python -m dtrain.worker`: not the launcher, nor the
    tee processes of rank 0's output, which inherit the same environment), read from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"DTRAIN_BENCH_TAG={tag}".encode() in environ and b"dtrain.worker" in cmdline:
            found.append(int(pid))
    return sorted(found)


def restart_run(faults: int, data_root: Path, kill_at=(8, 24, 40)) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="restart-bench-"))
    tag, run = uuid.uuid4().hex, cwd / "runs" / "b"
    cmd = [sys.executable, "-m", "dtrain", "launch", "--nproc-per-node", "2", "--max-restarts", "3", *DIGITS,
           f"data.root={data_root}", "run.name=b"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(DTRAIN_BENCH_TAG=tag), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for step in kill_at[:faults]:
        while latest_step(run) < step:
            time.sleep(0.05)
        os.kill(worker_pids(tag)[-1], 9)
        time.sleep(1.0)  # the launcher sees the death before the next threshold is looked for
    _, err = proc.communicate(timeout=900)
    wall = time.monotonic() - start
    assert proc.returncode == 0, err[-2000:]
    assert f"restart {faults} of 3" in err or not faults, "a kill was not seen as a fault: " + err[-2000:]
    shutil.rmtree(cwd, ignore_errors=True)
    return {"mode": "restart", "faults": faults, "wall_s": round(wall, 2),
            "restarts": sum("restart" in line and " of 3" in line for line in err.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument("--only", choices=["ft", "restart"])
    ap.add_argument("--steps", type=int, default=600, help="ft: steps of the run")
    ap.add_argument("--step-delay", type=float, default=0.05, help="ft: seconds of 'compute' added to each step")
    ap.add_argument("--kill-every", type=int, default=40, help="ft: a group's step tries before it is killed")
    args = ap.parse_args()
    rows = []

    def measured(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.only != "restart":
        for k in args.faults:
            measured(ft_run(k, args.steps, args.kill_every, args.step_delay))
    if args.only != "ft":
        from dtrain.data import make_builtin
        data_root = Path(tempfile.mkdtemp(prefix="bench-data-"))
        make_builtin("digits", data_root / "digits", 250)
        for k in args.faults:
            measured(restart_run(k, data_root))
    print("\n| mode | faults | wall s | time lost per fault s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['faults']} | {row['wall_s']} | {lost_per_fault(row, rows)} |")


def lost_per_fault(row: dict, rows: list[dict]) -> str:
    """ft: the survivors' stall at the fault and at the rejoin (their wall time hardly moves: a second in
    minutes, under the noise of a shared machine); restart: the wall time over the run without faults."""
    if not row["faults"]:
        return "-"
    if row["mode"] == "ft":
        return f"{statistics.mean(row['stall_s']) + statistics.mean(row['rejoin_s']):.2f} (stall + rejoin)"
    base = [r["wall_s"] for r in rows if r["mode"] == row["mode"] and r["faults"] == 0]
    return f"{(row['wall_s'] - base[0]) / row['faults']:.1f} (wall time)" if base else "-"


if __name__ == "__main__":
    main()
