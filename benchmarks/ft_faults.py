"""Time lost per fault: per-step fault tolerance (dtrain.ft on torchft) vs `dtrain launch --max-restarts`
(every worker restarts and resumes from the newest checkpoint), the same model on both sides, the same
checkpoint interval, with 1 and 3 faults (a SIGKILLed worker).

    python benchmarks/ft_faults.py --model-mb 200        # both sides, faults 1 3: JSON lines, then a table
    python benchmarks/ft_faults.py --model-mb 10 --only ft --faults 1
    python benchmarks/ft_faults.py --only ft --ft-side worker   # the ft side on tests/ft_worker.py's groups
    python benchmarks/ft_faults.py --model-mb 10 --ranks 2 3 4 --faults 3 --global-batch 24   # rank count

--ranks N...: the ft side runs N replica groups (group N-1 killed), the restart side N ranks (the last one
killed), each count its own runs, the global batch the same at every count (a multiple of each N); the last
table gives, for each (size, count, side), the median over all the faults of its runs (--repeat R runs each),
with the load averages (1 min) the runs began and ended at.

The model: dtrain's MLP of --layers hidden layers of a width that makes model + AdamW state --model-mb MB
(12 bytes a parameter), batch 16 (global), a checkpoint every --every steps on both sides. The work of a step
is small on purpose: what is measured is what a fault costs (restart, checkpoint read, healing), not compute.

ft (--ft-side launch, the default): what users run, `dtrain launch --ft --nproc-per-node 3 --max-restarts K
         --ft-timeout T train` on digits (data.in_memory=true) with the restart side's model, global batch
         (data.batch_size=16, dealt over each step's quorum) and checkpoint.every; dtrain's trainer, checkpointer,
         validation (each epoch, by every group) and metrics.jsonl (train.log_every=1, written by group 0).
         Once the Lighthouse's last quorum has all 3 groups (group 0 may train alone for tens of steps while the
         others start), group 2 (the launcher's child with REPLICA_GROUP_ID=2) is SIGKILLed from outside once
         the run has logged the restart side's step (every*c + every/2), or the first step of that phase after
         the last heal; the launcher restarts it, it reads the newest checkpoint, heals from a live peer
         ("healed ... at step H" in logs/group-2.log) and rejoins. Time lost, from when each step's record first
         appears in metrics.jsonl (polled every 25 ms, as the restart side's): the stall at the fault (the
         longest of the 3 gaps after the kill) plus the stall at the rejoin (the gap at step H or H+1), each less
         the usual gap of its kind (a step, a step with a save, a validation). The run then ends by SIGTERM
         (exit 75).
ft --ft-side worker: 3 replica groups of one process each (tests/ft_worker.py --hidden W: dtrain's MLP, AdamW) under a
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
import contextlib
import json
import math
import os
import re
import shutil
import signal
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
    lighthouse = subprocess.Popen(
        [
            "torchft_lighthouse",
            "--min_replicas",
            "2",
            "--join_timeout_ms",
            "30000",
            "--quorum_tick_ms",
            "50",
            "--heartbeat_timeout_ms",
            "1000",
            "--bind",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def group(g: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--replica-id",
                str(g),
                "--lighthouse",
                f"http://127.0.0.1:{port}",
                "--out",
                str(out),
                "--steps",
                "100000",
                "--stop-file",
                str(stop),
                "--global-batch",
                str(GLOBAL_BATCH),
                "--timeout",
                str(timeout),
                "--hidden",
                str(hidden),
                "--layers",
                str(layers),
                *extra,
            ],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=(out / f"g{g}-{time.monotonic_ns()}.err").open("w"),
        )

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
    return {
        "model_mb": round(saves[-1]["bytes"] / 1e6, 1) if saves else None,
        "step_s": round(everywhere, 3),
        "step_s_by_groups": {n: round(v, 3) for n, v in sorted(steps.items())},
        "save_s": rounded(statistics.median(r["save_s"] for r in saves)) if saves else None,
        "stall_s": [rounded(s) for s in stalls],
        "failed_try_s": [rounded(s) for s in failed_try],
        "requorum_s": [rounded(s) for s in requorum],
        "rejoin_s": [rounded(s) for s in rejoins],
        "heal_transfer_s": [
            rounded(r["heal_transfer_s"]) for r in victim if "heal_transfer_s" in r and r["t"] > starts[0]
        ],
        # not lost: the others train meanwhile (the first group 2's own start is not a fault's)
        "replacement_start_s": [
            rounded(next((t for t in started if t > s), math.nan) - s) for s in starts if s < math.inf
        ],
        "replacement_heal_s": [
            rounded(next((t for t in healed if t > s), math.nan) - s) for s in starts if s < math.inf
        ],
    }


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


def restart_run(
    faults: int,
    hidden: int,
    layers: int,
    every: int,
    data_root: Path,
    log: Path | None,
    ranks: int = 2,
    global_batch: int = GLOBAL_BATCH,
) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="restart-bench-"))
    tag, run = uuid.uuid4().hex, cwd / "runs" / "b"
    kill_at = [every * (c + 1) + every // 2 for c in range(faults)]
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "launch",
        "--nproc-per-node",
        str(ranks),
        "--max-restarts",
        "3",
        "train",
        f"data.root={data_root}",
        "run.name=b",
        f"data.batch_size={global_batch // ranks}",
        "log.progress=false",
        "train.log_every=1",
        f"checkpoint.every={every}",
        "checkpoint.save_best=false",
        f"train.max_steps={(kill_at[-1] if kill_at else every * 2) + every}",
        "model.kwargs={hidden: [" + ", ".join([str(hidden)] * layers) + "]}",
    ]
    lines: list[tuple[float, str]] = []  # the launcher's stderr (rank 0's lines with it), as it comes

    def read(stream) -> None:
        for line in stream:
            lines.append((time.monotonic(), line.rstrip()))

    def first(pattern: str, after: float):
        return next((t for t, line in list(lines) if t > after and re.search(pattern, line)), None)

    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(DTRAIN_BENCH_TAG=tag), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
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
        marks.append(
            {
                "step logged": reached,
                "worker killed": reached,
                "new worker seen": spawned,
                "first step after the checkpoint": step1,
                "step logged again": back,
            }
        )
        per_fault.append(
            {
                "lost": back - reached,
                "stop": restarted and restarted - reached,
                "spawn": spawned and restarted and spawned - restarted,
                "start": doctor and (spawned or restarted) and doctor - (spawned or restarted),
                "build_and_read": resumed and doctor and resumed - doctor,
                "first_step": resumed and step1 and step1 - resumed,
                "redo": step1 and back - step1,
                "redone_steps": step - (step // every) * every,
            }
        )
    proc.wait(timeout=900)
    reader.join(timeout=5)
    wall = time.monotonic() - start
    if log is not None:  # the launcher's lines, seconds from its start, with the benchmark's own events
        events = [(t, f"[bench] fault {i}: {name}") for i, f in enumerate(marks, 1) for name, t in f.items() if t]
        log.parent.mkdir(parents=True, exist_ok=True)  # --only restart: no ft run made the folder
        log.write_text("".join(f"{t - start:8.2f} {line}\n" for t, line in sorted(lines + events)))
    assert proc.returncode == 0, "\n".join(line for _, line in lines[-30:])
    newest = sorted((run / "checkpoints").glob("step-*"))
    state_mb = (newest[-1] / "state.pt").stat().st_size / 1e6 if newest else None
    times = [
        json.loads(line).get("step_time_s")
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"step_time_s"' in line
    ]
    shutil.rmtree(cwd, ignore_errors=True)
    row = {
        "mode": "restart",
        "model_mb": rounded(state_mb, 1),
        "ranks": ranks,
        "faults": faults,
        "wall_s": round(wall, 1),
        "step_s": rounded(statistics.median(times), 3) if times else None,
    }
    for key in per_fault[0] if per_fault else ():
        row[f"{key}_s" if key != "redone_steps" else key] = [rounded(f[key]) for f in per_fault]
    return row


# ---- ft, launch: `dtrain launch --ft`, what users run; group 2 killed, restarted by the launcher --------------
class StepTimes:
    """When each step's record first appears in run/metrics.jsonl (polled every 25 ms from a thread: the
    records carry no time), the same clock for both sides; a file cut back (a resumed run drops the records
    after its checkpoint) is read again from its start. Also the peak RSS of `pid`'s descendants."""

    def __init__(self, run: Path, pid: int):
        self.path, self.pid = run / "metrics.jsonl", pid
        self.seen: list[tuple[float, dict]] = []  # (monotonic time first seen, record), in file order
        self.peak_rss_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        offset, buffer, polls = 0, "", 0
        while not self._done.is_set():
            try:
                size = self.path.stat().st_size
                if size < offset:
                    offset, buffer = 0, ""
                with open(self.path) as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk.encode())
                buffer += chunk
            except OSError:
                pass
            now = time.monotonic()
            *lines, buffer = buffer.split("\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    self.seen.append((now, json.loads(line)))
            polls += 1
            if polls % 20 == 0:
                self.peak_rss_mb = max(self.peak_rss_mb, tree_rss_mb(self.pid))
            time.sleep(0.025)

    def last_step(self) -> int:
        return max((r.get("step", -1) for _, r in list(self.seen)), default=-1)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss_mb(pid: int) -> float:
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children(p)
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    return total


def group_pid(launcher: int, group: str) -> int | None:
    """The launcher's child with REPLICA_GROUP_ID=group in its environment (not group 0's tee processes)."""
    for pid in children(launcher):
        with contextlib.suppress(OSError):
            if f"REPLICA_GROUP_ID={group}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    return None


def launch_ft_run(
    faults: int,
    hidden: int,
    layers: int,
    every: int,
    timeout: float,
    data_root: Path,
    run_timeout: float,
    log: Path | None,
    groups: int = 3,
    global_batch: int = GLOBAL_BATCH,
) -> dict:
    cwd = Path(tempfile.mkdtemp(prefix="ft-launch-bench-"))
    victim = str(groups - 1)
    run = cwd / "runs" / "b"
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "launch",
        "--ft",
        "--nproc-per-node",
        str(groups),
        "--max-restarts",
        str(max(faults, 1)),
        "--ft-timeout",
        f"{timeout:g}",
        "train",
        f"data.root={data_root}",
        "run.name=b",
        f"data.batch_size={global_batch}",
        "data.in_memory=true",
        "log.progress=false",
        "train.log_every=1",
        f"checkpoint.every={every}",
        "checkpoint.save_best=false",
        "train.epochs=1000",
        "train.max_steps=1000000",
        "model.kwargs={hidden: [" + ", ".join([str(hidden)] * layers) + "]}",
    ]
    start = time.monotonic()
    deadline = start + run_timeout
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), l.rstrip()) for l in proc.stderr), daemon=True
    )
    reader.start()
    watch = StepTimes(run, proc.pid)
    group_log = run / "logs" / f"group-{victim}.log"

    def wait_for(what: str, ok) -> None:
        while not ok():
            if proc.poll() is not None or time.monotonic() > deadline:
                how = "timed out" if proc.poll() is None else f"exited {proc.returncode}"
                raise RuntimeError(
                    f"launch --ft: {what}: launcher {how}; its last lines: "
                    + " | ".join(l for _, l in lines[-8:])
                    + f"; run dir {run}"
                )
            time.sleep(0.05)

    def all_groups() -> bool:
        """The Lighthouse's last quorum has every group (with --ft-min-replicas 1, group 0 may train alone
        for tens of steps before the others have started; a group lost then costs nothing)."""
        log = run / "logs" / "lighthouse.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        quorums = [line for line in text.splitlines() if "Quorum! " in line]
        return bool(quorums) and quorums[-1].count("replica_id:") == groups

    def healed_steps() -> list[int]:
        text = group_log.read_text() if group_log.exists() else ""
        return [int(m) for m in re.findall(r"healed from a live peer at step (\d+)", text)]

    kills, heals = [], []  # the SIGKILLs' monotonic times, the steps the replacements healed at
    try:
        for c in range(1, faults + 1):
            # the restart side's step (every*c + every/2), or, once all groups train, the first one of that
            # phase 2 steps later
            wait_for(f"all {groups} groups in the quorum", all_groups)
            step = every * c + every // 2
            while step <= watch.last_step() + 2:
                step += every
            wait_for(f"step {step}", lambda: watch.last_step() >= step)
            pid = group_pid(proc.pid, victim)
            assert pid is not None, f"no replica group {victim} among the launcher's children"
            os.kill(pid, signal.SIGKILL)
            kills.append(time.monotonic())
            known = len(healed_steps())
            wait_for(f"group {victim} restarted and healed", lambda: len(healed_steps()) > known)
            heals.append(healed_steps()[-1])
        wait_for(
            "3 steps after the last heal",
            lambda: watch.last_step() >= max(heals or [every]) + 3 and watch.last_step() >= 2 * every,
        )
        proc.send_signal(signal.SIGTERM)  # the groups save and stop (75): the measurement is over
        proc.wait(timeout=max(deadline - time.monotonic(), 30))
    finally:
        if proc.poll() is None:  # the launcher and its groups (each in a session of its own), by their ids
            tree, todo = [], [proc.pid]
            while todo:
                tree.append(todo.pop())
                todo += children(tree[-1])
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        watch.stop()
        reader.join(timeout=5)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(run / "logs", log, dirs_exist_ok=True)
            (log / "steps.json").write_text(
                json.dumps(
                    {"start": start, "kills": kills, "heals": heals, "seen": [(t, r["step"]) for t, r in watch.seen]}
                )
            )
    assert proc.returncode == 75, f"launch --ft exited {proc.returncode}: " + " | ".join(l for _, l in lines[-8:])
    newest = sorted((run / "checkpoints").glob("step-*"))
    state_mb = (newest[-1] / "state.pt").stat().st_size / 1e6 if newest else None
    row = {
        "mode": "ft-launch",
        "model_mb": rounded(state_mb, 1),
        "ranks": groups,
        "faults": faults,
        "wall_s": round(time.monotonic() - start, 1),
        "peak_rss_mb": round(watch.peak_rss_mb),
        **step_figures(watch.seen, kills, heals, every),
    }
    shutil.rmtree(cwd, ignore_errors=True)
    return row


def step_figures(seen: list[tuple[float, dict]], kills: list[float], heals: list[int], every: int) -> dict:
    """The writing group's stalls, from when each step's record appeared: at each fault (the longest of the 3
    gaps after the kill) and at each heal (the longer of the gaps ending at the heal step and the next one), each
    less the usual gap of a step of its kind (a save every `every` steps, a validation where the record has
    val_ keys, else a plain step); `window`: the sum of every gap's excess from the kill to 2 steps after the
    heal (the steps at 2 groups' pace included)."""
    first: dict[int, tuple[float, dict]] = {}
    for t, r in seen:
        first.setdefault(r["step"], (t, r))
    steps = sorted(first)

    def kind(s: int) -> str:  # what came between step s-1's record and step s's
        if any(k.startswith("val") for k in first[s][1]):
            return "val"
        return "save" if (s - 1) % every == 0 and s > 1 else "step"

    gap = {s: first[s][0] - first[p][0] for p, s in zip(steps, steps[1:]) if s == p + 1}
    kills = [max((s for s in steps if first[s][0] <= t), default=0) for t in kills]  # the step logged last
    faulty = {s for k, h in zip(kills, heals) for s in range(k, h + 4)}
    usual = {}
    for name in ("step", "save", "val"):
        clean = [g for s, g in gap.items() if kind(s) == name and s not in faulty]
        usual[name] = statistics.median(clean) if clean else statistics.median(gap.values())

    def excess(s: int) -> float:
        return gap.get(s, 0.0) - usual[kind(s)] if s in gap else 0.0

    stalls, rejoins, windows = [], [], []
    for k, h in zip(kills, heals):
        at = max(range(k + 1, k + 4), key=excess)
        stalls.append(excess(at))
        # the replacement may heal within the fault's stall (a survivor held by the collective timeout): that
        # gap is counted once
        rejoins.append(max([excess(s) for s in (h, h + 1) if s != at], default=0.0))
        windows.append(sum(excess(s) for s in range(k + 1, h + 3)))
    return {
        "step_s": round(usual["step"], 3),
        "save_gap_s": round(usual["save"], 2),
        "kill_steps": kills,
        "heal_steps": heals,
        "stall_s": [rounded(s) for s in stalls],
        "rejoin_s": [rounded(s) for s in rejoins],
        "window_s": [rounded(s) for s in windows],
    }


# ---- the table -----------------------------------------------------------------------------------------------
def mean(values) -> float | None:
    values = [v for v in values or () if v is not None and not math.isnan(v)]
    return statistics.mean(values) if values else None


def lost_per_fault(row: dict) -> float | None:
    """ft: group 0's stall at the fault plus at the rejoin; restart: from the step's first log to its second."""
    if row["mode"] in ("ft", "ft-launch"):
        stall, rejoin = mean(row["stall_s"]), mean(row["rejoin_s"])
        return None if stall is None else stall + (rejoin or 0.0)
    return mean(row.get("lost_s"))


def breakdown(row: dict) -> str:
    def part(name: str, key: str) -> str:
        value = mean(row.get(key))
        return f"{name} {value:.2f}" if value is not None else f"{name} -"

    if row["mode"] == "ft":
        return ", ".join(
            [
                part("failed try", "failed_try_s"),
                part("new quorum", "requorum_s"),
                part("rejoin", "rejoin_s"),
                part("(heal transfer", "heal_transfer_s") + ")",
                part("not lost: replacement start", "replacement_start_s"),
            ]
        )
    if row["mode"] == "ft-launch":
        return ", ".join(
            [
                part("stall", "stall_s"),
                part("rejoin", "rejoin_s"),
                part("(kill to heal + 2, all excess", "window_s") + ")",
                f"killed after steps {row['kill_steps']}, healed at {row['heal_steps']}",
                f"peak RSS {row['peak_rss_mb']} MB",
            ]
        )
    return ", ".join(
        [
            part("stop", "stop_s"),
            part("spawn", "spawn_s"),
            part("start", "start_s"),
            part("build + read", "build_and_read_s"),
            part("first step", "first_step_s"),
            part("redo", "redo_s"),
        ]
    )


def fault_figures(row: dict) -> list[float]:
    """Each fault's time lost in a row (ft: its stall plus its rejoin; restart: its lost_s)."""
    if row["mode"] in ("ft", "ft-launch"):
        return [s + (r or 0.0) for s, r in zip(row["stall_s"], row["rejoin_s"]) if s is not None]
    return [x for x in row.get("lost_s") or [] if x is not None]


def rank_table(rows: list[dict]) -> str:
    """The median time lost per fault for each (size, ranks, side), over all the faults of its runs, with the
    range and the load averages (1 min) the runs started and ended at."""
    keys = sorted({(round(r["model_mb"] or 0), r.get("ranks", 3), r["mode"]) for r in rows})
    out = [
        "\n| state MB | ranks | side | faults | time lost per fault s, median (range) | step s | load (1 min) |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for mb, n, mode in keys:
        mine = [r for r in rows if (round(r["model_mb"] or 0), r.get("ranks", 3), r["mode"]) == (mb, n, mode)]
        lost = [x for r in mine for x in fault_figures(r)]
        loads = [x for r in mine for x in (r["load_before"][0], r["load_avg"][0])]
        steps = [r["step_s"] for r in mine if r.get("step_s") is not None]
        figure = f"{statistics.median(lost):.2f} ({min(lost):.2f}-{max(lost):.2f})" if lost else "-"
        out.append(
            f"| {mb} | {n} | {mode} | {len(lost)} | {figure} | "
            f"{statistics.median(steps) if steps else '-'} | {min(loads)}-{max(loads)} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model-mb",
        type=float,
        nargs="+",
        default=[10.0, 200.0],
        help="model + AdamW state, MB (each size one set of runs)",
    )
    ap.add_argument("--layers", type=int, default=4, help="hidden layers of the MLP")
    ap.add_argument("--faults", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--only", choices=["ft", "restart"])
    ap.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        help="launch ft side: replica groups (the last one killed), restart: ranks (the last one killed), the "
        "same count on both sides, each count one set of runs; default 3 groups and 2 ranks",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each setting (the table gives their median)")
    ap.add_argument(
        "--global-batch",
        type=int,
        default=GLOBAL_BATCH,
        help="samples a step, both sides (the restart side's ranks read an equal share each: a multiple of --ranks)",
    )
    ap.add_argument(
        "--ft-side",
        choices=["launch", "worker"],
        default="launch",
        help="ft: `dtrain launch --ft --nproc-per-node 3 train` (what users run), or tests/ft_worker.py's "
        "hand-made groups",
    )
    ap.add_argument("--run-timeout", type=float, default=900.0, help="launch ft side: a run's limit, seconds")
    ap.add_argument("--every", type=int, default=10, help="checkpoint every N steps, both sides")
    ap.add_argument("--kill-every", type=int, default=3, help="ft: the victim's step tries before it is killed")
    ap.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="ft: torchft's timeout (collectives, healing), seconds: a large state takes seconds to send",
    )
    ap.add_argument(
        "--log",
        type=Path,
        help="restart: write the launcher's timed lines to this folder; launch ft side: copy the groups' logs there",
    )
    args = ap.parse_args()
    if args.ranks and args.ft_side == "worker":
        ap.error("--ranks: the worker side runs 3 groups; use --ft-side launch")
    if args.only != "ft" and any(args.global_batch % n for n in args.ranks or [2]):
        ap.error(
            f"--global-batch {args.global_batch}: the restart side's ranks need an equal share; a multiple of each --ranks"
        )
    rows = []

    def measured(run, **kwargs) -> None:
        before = [round(x, 1) for x in os.getloadavg()]
        row = run(**kwargs)
        # shared machine: the load (1, 5, 15 min) when the run started and when it ended
        row["load_before"], row["load_avg"] = before, [round(x, 1) for x in os.getloadavg()]
        print(json.dumps(row), flush=True)
        rows.append(row)

    data_root = None

    def digits() -> Path:
        nonlocal data_root
        if data_root is None:
            from dtrain.data import make_builtin

            data_root = Path(tempfile.mkdtemp(prefix="bench-data-"))
            make_builtin("digits", data_root / "digits", 250)
        return data_root

    bs = args.global_batch
    for mb in args.model_mb:
        hidden = width(mb, args.layers)
        for n in args.ranks or [None]:
            for k in args.faults:
                for rep in range(args.repeat):
                    tag = f"{mb:g}MB-{k}" + (f"-n{n}" if n else "") + (f"-r{rep}" if args.repeat > 1 else "")
                    if args.only != "restart" and args.ft_side == "worker":
                        measured(
                            ft_run,
                            faults=k,
                            hidden=hidden,
                            layers=args.layers,
                            every=args.every,
                            kill_every=args.kill_every,
                            timeout=args.timeout,
                        )
                    elif args.only != "restart":
                        measured(
                            launch_ft_run,
                            faults=k,
                            hidden=hidden,
                            layers=args.layers,
                            every=args.every,
                            timeout=args.timeout,
                            data_root=digits(),
                            run_timeout=args.run_timeout,
                            log=args.log and args.log / f"ft-launch-{tag}",
                            groups=n or 3,
                            global_batch=bs,
                        )
                    if args.only != "ft":
                        measured(
                            restart_run,
                            faults=k,
                            hidden=hidden,
                            layers=args.layers,
                            every=args.every,
                            data_root=digits(),
                            log=args.log and args.log / f"restart-{tag}.log",
                            ranks=n or 2,
                            global_batch=bs,
                        )
    if data_root is not None:
        shutil.rmtree(data_root, ignore_errors=True)
    print(f"load average at the end (1, 5, 15 min; {os.cpu_count()} CPUs): {os.getloadavg()}")
    print(
        "\n| mode | state MB | ranks | faults | step s | time lost per fault s | of which (means per fault) "
        "| load before, after |\n|---|---:|---:|---:|---:|---:|---|---|"
    )
    for row in rows:
        lost = lost_per_fault(row)
        print(
            f"| {row['mode']} | {row['model_mb']} | {row.get('ranks', 3)} | {row['faults']} | {row['step_s']} | "
            f"{'-' if lost is None else f'{lost:.2f}'} | {breakdown(row)} | {row['load_before'][0]}, "
            f"{row['load_avg'][0]} |"
        )
    print(rank_table(rows))
    for row in (r for r in rows if r["mode"] == "restart"):
        ft = next(
            (
                r
                for r in rows
                if r["mode"] in ("ft", "ft-launch")
                and r["faults"] == row["faults"]
                and r.get("ranks") == row.get("ranks")
                and r["model_mb"]
                and row["model_mb"]
                and abs(r["model_mb"] / row["model_mb"] - 1) < 0.1
            ),
            None,
        )
        if ft and lost_per_fault(ft) and lost_per_fault(row):
            print(
                f"restart / {ft['mode']}, {row['model_mb']} MB, {row['faults']} fault(s): "
                f"{lost_per_fault(row) / lost_per_fault(ft):.1f}x the time lost per fault"
            )


if __name__ == "__main__":
    main()
