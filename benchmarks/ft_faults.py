"""Time lost per fault: per-step fault tolerance (dtrain.ft on torchft) vs `dtrain launch --max-restarts`
(every worker restarts and resumes from the newest checkpoint), the same model on both sides, the same
checkpoint interval, with 1 and 3 faults (a SIGKILLed worker).

    python benchmarks/ft_faults.py --model-mb 200        # both sides, faults 1 3: JSON lines, then a table
    python benchmarks/ft_faults.py --model-mb 10 --only ft --faults 1

The model: dtrain's MLP of --layers hidden layers of a width that makes model + AdamW state --model-mb MB
(12 bytes a parameter), batch 16 (global), a checkpoint every --every steps on both sides. The work of a step
is small on purpose: what is measured is what a fault costs (restart, checkpoint read, healing), not compute.

ft:      3 replica groups of one process each (tests/ft_worker.py --hidden W: dtrain's MLP, AdamW) under a
         torchft_lighthouse; group 0 saves `runner.checkpoint_state()` with torch.save every --every committed
         steps (one copy, as dtrain's rank 0 saves one). Group 2 is SIGKILLed mid-step (after its backward
         pass, before the all-reduce) at step every + every/2, then each replacement after --kill-every step
         tries, and restarted at once, alone, as the launcher will; it heals from a live peer (torchft's HTTP transport) and rejoins. Time lost, group 0's
         view: its *stall* at the fault (last commit before it to first commit after it, less one median step:
         the failed try, then the new quorum without the lost group) plus its stall when the replacement joins
         (the state sent to it); its saves and holds in those windows are not counted.
restart: `dtrain launch --nproc-per-node 2 --max-restarts 3 train` on digits with model.kwargs.hidden of the
         same width (global batch 16, checkpoint.every the same); a worker SIGKILLed once the run has logged
         step every*c + every/2 (c = 1, 2, 3: half an interval after a checkpoint, the mean for a fault at a
         random moment). Time lost: from the moment the run first logged that step to the moment it logs it
         again after the restart, cut at the launcher's and the workers' lines: the launcher sees the death
         and stops the other worker; new workers start (interpreter, imports, rendezvous, dtrain's brief
         doctor); the model is built and the checkpoint read; the first step; the steps redone since the
         checkpoint.
The two sides' steps differ (3 processes vs 2 on a shared 2-core machine, 1 input feature set vs digits):
compare the time lost, not the wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ft_worker.py"
GLOBAL_BATCH = 16


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    out.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def width(model_mb: float, layers: int) -> int:
    """The hidden width (a multiple of 64) whose MLP of `layers` hidden layers has `model_mb` MB of weights and
    AdamW state (4 + 8 bytes a parameter); the (layers - 1) width x width matrices are nearly all of it."""
    return max(64, round(math.sqrt(model_mb * 1e6 / 12 / max(layers - 1, 1)) / 64) * 64)


def rounded(x, digits=2):
    return None if x is None else round(x, digits)


# ---- ft: 3 replica groups, group 2 killed and restarted alone ---------------------------------------------
def records(out: Path, group: int) -> list[dict]:
    path = out / f"g{group}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ft_run(faults: int, hidden: int, layers: int, every: int, kill_every: int, timeout: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    port, stop = free_port(), out / "stop"
    # --join_timeout_ms: how long a quorum waits for a live group that has not asked yet (one saving a large
    # checkpoint, or slower on a loaded machine); at 1 s such a group is left out and heals at the next step.
    # A dead group is dropped after --heartbeat_timeout_ms whatever this is.
    lighthouse = subprocess.Popen(["torchft_lighthouse", "--min_replicas", "2", "--join_timeout_ms", "30000",
                                   "--quorum_tick_ms", "50", "--heartbeat_timeout_ms", "1000",
                                   "--bind", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)

    def group(g: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(WORKER), "--replica-id", str(g), "--lighthouse",
                                 f"http://127.0.0.1:{port}", "--out", str(out), "--steps", "100000",
                                 "--stop-file", str(stop), "--global-batch", str(GLOBAL_BATCH), "--timeout",
                                 str(timeout), "--hidden", str(hidden), "--layers", str(layers), *extra],
                                env=env(), stdout=subprocess.DEVNULL,
                                stderr=(out / f"g{g}-{time.monotonic_ns()}.err").open("w"))

    def end_soon(since: float, heal: bool) -> None:
        """Once the last group 2 has healed (after a fault) and committed 2 steps: every group ends 3 steps
        later (and not before step 2 * every)."""
        while True:
            mine = [r for r in records(out, 2) if r["t"] > since]
            healed = next((i for i, r in enumerate(mine) if "healed" in r), None if heal else 0)
            done = [r for r in mine[healed:] if r.get("committed")] if healed is not None else []
            if len(done) >= 2:
                (out / "stop.tmp").write_text(str(max(done[-1]["step"] + 4, 2 * every)))  # a save at least
                (out / "stop.tmp").replace(stop)
                return
            time.sleep(0.1)

    kill = ["--kill-after", str(kill_every)]
    starts = []  # wall clock of each replacement's start
    try:
        start = time.monotonic()
        # all three start together (the survivors wait at step 0 for group 2's manager); the first fault at the
        # step the restart side's first is at, the next ones --kill-every tries after each replacement's start
        together = ["--hold-at", "0", "--hold-for", "2"]
        procs = [group(0, "--save-every", str(every), *together), group(1, *together)]
        victim = group(2, *(["--kill-at", str(every + every // 2)] if faults else []))
        for k in range(faults):
            assert victim.wait(timeout=600) == -9, f"the victim was to die by its own SIGKILL: see {out}"
            starts.append(time.time())
            victim = group(2, *(kill if k + 1 < faults else []))  # restarted at once, alone
        end_soon(starts[-1] if starts else 0.0, heal=bool(faults))
        for p in [*procs, victim]:
            assert p.wait(timeout=600) == 0, f"a replica group failed: its stderr is in {out}"
        wall = time.monotonic() - start
    finally:
        lighthouse.kill()
    row = ft_figures(records(out, 0), records(out, 2), starts)
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": "ft", "model_mb": row.pop("model_mb"), "faults": faults, "wall_s": round(wall, 1), **row}


def ft_figures(mine: list[dict], victim: list[dict], starts: list[float]) -> dict:
    """Group 0's stalls at each fault and each rejoin, less its own saves and holds in that window. (The first
    group 2 may join a step after the others and heal too: what happens before the first fault is no fault's.)"""
    starts = starts or [math.inf]
    def paused(a: float, b: float) -> float:
        return sum(r.get("save_s", 0) + r.get("held_s", 0) for r in mine if a < r["t"] <= b)

    # one step, at each quorum size (2 groups train larger shares than 3)
    commits = [r for r in mine if r.get("committed")]
    gaps: dict[int, list[float]] = {}
    for a, b in zip(commits, commits[1:]):
        if a["participants"] == b["participants"] and b["step"] == a["step"] + 1:
            gaps.setdefault(b["participants"], []).append(b["t"] - a["t"] - paused(a["t"], b["t"]))
    steps = {n: statistics.median(g) for n, g in gaps.items()}
    everywhere = statistics.median(g for n in gaps.values() for g in n)

    def step_s(r: dict) -> float:
        return steps.get(r["participants"], everywhere)

    stalls, failed_try, requorum, rejoins = [], [], [], []
    last, failed = None, None
    for r in (r for r in mine if "step" in r):
        if not r["committed"]:
            failed = failed or r
            continue
        if last is not None and failed is not None:
            stalls.append(r["t"] - last["t"] - step_s(r) - paused(last["t"], r["t"]))
            failed_try.append(failed["t"] - last["t"] - paused(last["t"], failed["t"]))
            requorum.append(r["t"] - failed["t"] - step_s(r) - paused(failed["t"], r["t"]))
        elif last is not None and r["participants"] > last["participants"] and r["t"] > starts[0]:
            rejoins.append(r["t"] - last["t"] - step_s(r) - paused(last["t"], r["t"]))
        last, failed = r, None
    started = [r["t"] for r in victim if "started" in r]
    healed = [r["t"] for r in victim if "healed" in r]
    saves = [r for r in mine if "save_s" in r]
    return {"model_mb": round(saves[-1]["bytes"] / 1e6, 1) if saves else None, "step_s": round(everywhere, 3),
            "step_s_by_groups": {n: round(v, 3) for n, v in sorted(steps.items())},
            "save_s": rounded(statistics.median(r["save_s"] for r in saves)) if saves else None,
            "stall_s": [rounded(s) for s in stalls], "failed_try_s": [rounded(s) for s in failed_try],
            "requorum_s": [rounded(s) for s in requorum], "rejoin_s": [rounded(s) for s in rejoins],
            "heal_transfer_s": [rounded(r["heal_transfer_s"]) for r in victim
                                if "heal_transfer_s" in r and r["t"] > starts[0]],
            # not lost: the others train meanwhile (the first group 2's own start is not a fault's)
            "replacement_start_s": [rounded(next((t for t in started if t > s), math.nan) - s) for s in starts
                                    if s < math.inf],
            "replacement_heal_s": [rounded(next((t for t in healed if t > s), math.nan) - s) for s in starts
                                   if s < math.inf]}


# ---- restart: dtrain launch --max-restarts, a worker killed ------------------------------------------------
def metrics_steps(run: Path) -> list[int]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except OSError:
        return []
    return [json.loads(line).get("step", -1) for line in text.splitlines() if line.strip().endswith("}")]


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


def restart_run(faults: int, hidden: int, layers: int, every: int, data_root: Path, log: Path | None) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="restart-bench-"))
    tag, run = uuid.uuid4().hex, cwd / "runs" / "b"
    kill_at = [every * (c + 1) + every // 2 for c in range(faults)]
    cmd = [sys.executable, "-m", "dtrain", "launch", "--nproc-per-node", "2", "--max-restarts", "3", "train",
           f"data.root={data_root}", "run.name=b", f"data.batch_size={GLOBAL_BATCH // 2}", "log.progress=false",
           "train.log_every=1", f"checkpoint.every={every}", "checkpoint.save_best=false",
           f"train.max_steps={(kill_at[-1] if kill_at else every * 2) + every}",
           "model.kwargs={hidden: [" + ", ".join([str(hidden)] * layers) + "]}"]
    lines: list[tuple[float, str]] = []  # the launcher's stderr (rank 0's lines with it), as it comes

    def read(stream) -> None:
        for line in stream:
            lines.append((time.monotonic(), line.rstrip()))

    def first(pattern: str, after: float):
        return next((t for t, line in list(lines) if t > after and re.search(pattern, line)), None)

    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(DTRAIN_BENCH_TAG=tag), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    reader = threading.Thread(target=read, args=(proc.stderr,), daemon=True)
    reader.start()
    per_fault, marks = [], []
    for i, step in enumerate(kill_at, 1):
        while max(metrics_steps(run), default=-1) < step:
            assert proc.poll() is None, "the run ended before the fault: " + "\n".join(l for _, l in lines[-20:])
            time.sleep(0.05)
        reached = time.monotonic()
        old = worker_pids(tag)
        os.kill(old[-1], 9)
        spawned = step1 = back = None
        cut = False  # the resumed run has cut metrics.jsonl back to its checkpoint
        while back is None:
            assert proc.poll() is None, "the run ended during a fault: " + "\n".join(l for _, l in lines[-20:])
            now, steps = time.monotonic(), metrics_steps(run)
            if spawned is None and set(worker_pids(tag)) - set(old):
                spawned = now
            cut = cut or (steps and steps[-1] < step)
            if cut and steps and step1 is None and steps[-1] > (step // every) * every:
                step1 = now
            if cut and steps and steps[-1] >= step:
                back = now
            time.sleep(0.05)
        restarted = first(rf"restart {i} of", reached)
        doctor = first(r"^doctor \(", restarted or reached)
        resumed = first(r"^resumed from", restarted or reached)
        marks.append({"step logged": reached, "worker killed": reached, "new worker seen": spawned,
                      "first step after the checkpoint": step1, "step logged again": back})
        per_fault.append({"lost": back - reached, "stop": restarted and restarted - reached,
                          "spawn": spawned and restarted and spawned - restarted,
                          "start": doctor and (spawned or restarted) and doctor - (spawned or restarted),
                          "build_and_read": resumed and doctor and resumed - doctor,
                          "first_step": resumed and step1 and step1 - resumed, "redo": step1 and back - step1,
                          "redone_steps": step - (step // every) * every})
    proc.wait(timeout=900)
    reader.join(timeout=5)
    wall = time.monotonic() - start
    if log is not None:  # the launcher's lines, seconds from its start, with the benchmark's own events
        events = [(t, f"[bench] fault {i}: {name}") for i, f in enumerate(marks, 1) for name, t in f.items() if t]
        log.write_text("".join(f"{t - start:8.2f} {line}\n" for t, line in sorted(lines + events)))
    assert proc.returncode == 0, "\n".join(line for _, line in lines[-30:])
    newest = sorted((run / "checkpoints").glob("step-*"))
    state_mb = (newest[-1] / "state.pt").stat().st_size / 1e6 if newest else None
    times = [json.loads(line).get("step_time_s") for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"step_time_s"' in line]
    shutil.rmtree(cwd, ignore_errors=True)
    row = {"mode": "restart", "model_mb": rounded(state_mb, 1), "faults": faults, "wall_s": round(wall, 1),
           "step_s": rounded(statistics.median(times), 3) if times else None}
    for key in per_fault[0] if per_fault else ():
        row[f"{key}_s" if key != "redone_steps" else key] = [rounded(f[key]) for f in per_fault]
    return row


# ---- the table -----------------------------------------------------------------------------------------------
def mean(values) -> float | None:
    values = [v for v in values or () if v is not None and not math.isnan(v)]
    return statistics.mean(values) if values else None


def lost_per_fault(row: dict) -> float | None:
    """ft: group 0's stall at the fault plus at the rejoin; restart: from the step's first log to its second."""
    if row["mode"] == "ft":
        stall, rejoin = mean(row["stall_s"]), mean(row["rejoin_s"])
        return None if stall is None else stall + (rejoin or 0.0)
    return mean(row.get("lost_s"))


def breakdown(row: dict) -> str:
    def part(name: str, key: str) -> str:
        value = mean(row.get(key))
        return f"{name} {value:.2f}" if value is not None else f"{name} -"
    if row["mode"] == "ft":
        return ", ".join([part("failed try", "failed_try_s"), part("new quorum", "requorum_s"),
                          part("rejoin", "rejoin_s"), part("(heal transfer", "heal_transfer_s") + ")",
                          part("not lost: replacement start", "replacement_start_s")])
    return ", ".join([part("stop", "stop_s"), part("spawn", "spawn_s"), part("start", "start_s"), part("build + read", "build_and_read_s"),
                      part("first step", "first_step_s"), part("redo", "redo_s")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-mb", type=float, nargs="+", default=[10.0, 200.0],
                    help="model + AdamW state, MB (each size one set of runs)")
    ap.add_argument("--layers", type=int, default=4, help="hidden layers of the MLP")
    ap.add_argument("--faults", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--only", choices=["ft", "restart"])
    ap.add_argument("--every", type=int, default=10, help="checkpoint every N steps, both sides")
    ap.add_argument("--kill-every", type=int, default=3, help="ft: the victim's step tries before it is killed")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="ft: torchft's timeout (collectives, healing), seconds: a large state takes seconds to send")
    ap.add_argument("--log", type=Path, help="restart: write the launcher's timed lines to this folder")
    args = ap.parse_args()
    rows = []

    def measured(row: dict) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
    data_root = None
    for mb in args.model_mb:
        hidden = width(mb, args.layers)
        if args.only != "restart":
            for k in args.faults:
                measured(ft_run(k, hidden, args.layers, args.every, args.kill_every, args.timeout))
        if args.only != "ft":
            if data_root is None:
                from dtrain.data import make_builtin
                data_root = Path(tempfile.mkdtemp(prefix="bench-data-"))
                make_builtin("digits", data_root / "digits", 250)
            for k in args.faults:
                log = args.log and args.log / f"restart-{mb:g}MB-{k}.log"
                measured(restart_run(k, hidden, args.layers, args.every, data_root, log))
    if data_root is not None:
        shutil.rmtree(data_root, ignore_errors=True)
    print("\n| mode | state MB | faults | step s | time lost per fault s | of which (means per fault) |\n"
          "|---|---:|---:|---:|---:|---|")
    for row in rows:
        lost = lost_per_fault(row)
        print(f"| {row['mode']} | {row['model_mb']} | {row['faults']} | {row['step_s']} | "
              f"{'-' if lost is None else f'{lost:.2f}'} | {breakdown(row)} |")
    for row in (r for r in rows if r["mode"] == "restart"):
        ft = next((r for r in rows if r["mode"] == "ft" and r["faults"] == row["faults"]
                   and r["model_mb"] and row["model_mb"] and abs(r["model_mb"] / row["model_mb"] - 1) < 0.1), None)
        if ft and lost_per_fault(ft) and lost_per_fault(row):
            print(f"restart / ft, {row['model_mb']} MB, {row['faults']} fault(s): "
                  f"{lost_per_fault(row) / lost_per_fault(ft):.1f}x the time lost per fault")


if __name__ == "__main__":
    main()
