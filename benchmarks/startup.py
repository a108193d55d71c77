"""How long dtrain takes to answer (issue 35.4 and 35.5): the time to a command's output, to a config error's
line, and to the first optimizer step, for `dtrain train`, `dtrain launch` of a config and `dtrain launch` of a
script, each run as a whole process the way a user runs it.

    python benchmarks/startup.py [--reps 3] [--only help,train.first_step] [--json out.jsonl]
    git archive HEAD~3 dtrain | tar -x -C /tmp/before     # another dtrain's tree, then both interleaved:
    python benchmarks/startup.py --tree /tmp/before . --json both.jsonl
    python benchmarks/startup.py --table before.jsonl after.jsonl         # medians side by side

Each case is repeated --reps times, interleaved (case a, b, c, then a, b, c again; with two trees each case
of the one then of the other), and printed as a JSON line per run, then a table of medians:

  event_s   seconds from the process's start to what the case waits for: its exit (help, config), the
            `dtrain: error:` line (the error cases), or rank 0's first optimizer step, which a callback of the
            run's (run.callbacks, in a module this script writes) stamps with the wall clock
  exit_s    seconds to the process's exit (the first-step cases stop at step 1: run.stop_at_step=1)
  cpu_s     user + system CPU seconds of the process and every process it waited for (the launcher's
            workers), to its exit: what the other jobs of a shared machine disturb far less than the clock
  step_cpu_s  the first-step cases: rank 0's own CPU seconds at its first step (the process that trains,
            not the launcher nor the other ranks): the single process's start-up work, whatever the load

The digits shards are written once into the work directory before any timed run; each run has a run
directory of its own. --tree runs `python -m dtrain` with that tree first on PYTHONPATH (the workers of
`dtrain launch` inherit it); given two, the first is before and the second after, timed by the same python
in the same interleaving, so under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_MARK = "dtrain-startup: first step at "

PROBE = f'''"""Written by benchmarks/startup.py: stamps rank 0's first optimizer step with the wall clock."""
import os, resource, sys, time

class FirstStep:
    def on_step_end(self, step, loss):
        if os.environ.get("RANK", "0") == "0":
            use = resource.getrusage(resource.RUSAGE_SELF)
            print(f"{STEP_MARK}{{time.time():.6f}} cpu {{use.ru_utime + use.ru_stime:.3f}}", file=sys.stderr, flush=True)
'''
SCRIPT = '"""A script of ones own, as the README\'s: dtrain.main with no objects."""\nimport dtrain\n\ndtrain.main()\n'


def cases(work: Path) -> dict[str, list[str]]:
    """name -> dtrain's arguments. The error cases: a misspelled key (optim.lrr) in a config file, or as a
    script's key=value argument; a data.sample field naming no member of the shards (a data error, found
    where the first sample is read)."""
    digits, bad_key, bad_sample = (str(work / f) for f in ("digits.yaml", "bad_key.yaml", "bad_sample.yaml"))
    step = ["run.callbacks=[startup_probe:FirstStep]", "run.stop_at_step=1"]
    launch = ["launch", "--nproc-per-node", "2"]
    script = str(work / "train_script.py")
    return {
        "help": ["--help"],
        "config": ["config", "--config", digits],
        "config.describe": ["config", "--describe"],
        "train.config_error": ["train", "--config", bad_key],
        "train.sample_error": ["train", "--config", bad_sample],
        "train.first_step": ["train", "--config", digits, *step],
        "launch.config_error": [*launch, "train", "--config", bad_key],
        "launch.sample_error": [*launch, "train", "--config", bad_sample],
        "launch.first_step": [*launch, "train", "--config", digits, *step],
        "script.key_error": [*launch, script, "--config", digits, "optim.lrr=0.1"],
        "script.sample_error": [*launch, script, "--config", bad_sample],
        "script.first_step": [*launch, script, "--config", digits, *step],
    }


def prepare(work: Path, env: dict) -> None:
    """The configs, the probe, the script, and the digits shards (written by one untimed `dtrain shard`)."""
    text = (REPO / "configs" / "digits.yaml").read_text()
    (work / "digits.yaml").write_text(text)
    (work / "bad_key.yaml").write_text(text.replace("lr: 0.003", "lrr: 0.003"))
    (work / "bad_sample.yaml").write_text(
        text.replace("shard_size: 250}", "shard_size: 250, sample: {x: nosuch.npy, y: cls}}")
    )
    (work / "startup_probe.py").write_text(PROBE)
    (work / "train_script.py").write_text(SCRIPT)
    subprocess.run(
        [sys.executable, "-m", "dtrain", "shard", "--dataset", "digits", "--out", "data/digits"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )


def time_one(name: str, argv: list[str], work: Path, env: dict, run_dir: Path, timeout: float) -> dict:
    waits_for_exit = name in ("help", "config", "config.describe")
    argv = argv if waits_for_exit else [*argv, f"run.dir={run_dir}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start_wall, start = time.time(), time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtrain", *argv],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    event, step_cpu, lines = None, None, []

    def read():
        nonlocal event, step_cpu
        for line in proc.stdout:
            lines.append(line)
            if event is None and line.startswith("dtrain: error:"):
                event = time.monotonic() - start
            elif event is None and line.startswith(STEP_MARK):
                at, _, cpu = line[len(STEP_MARK) :].partition(" cpu ")
                event, step_cpu = float(at) - start_wall, float(cpu)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        code = proc.wait()
    exit_s = time.monotonic() - start
    reader.join(10)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    errors = [l.strip() for l in lines if l.startswith("dtrain: error:")]
    return {
        "case": name,
        "event_s": round(exit_s if waits_for_exit else event, 3) if (waits_for_exit or event) else None,
        "exit_s": round(exit_s, 3),
        "cpu_s": round(cpu, 3),
        "step_cpu_s": step_cpu,
        "exit_code": code,
        "error": errors[0][:160] if errors else None,
    }


def table(rows: list[dict], other: list[dict] | None = None) -> str:
    def medians(rs):
        out = {}
        for name in dict.fromkeys(r["case"] for r in rs):
            mine = [r for r in rs if r["case"] == name]
            out[name] = {
                k: statistics.median(v) if (v := [r[k] for r in mine if r.get(k) is not None]) else None
                for k in ("event_s", "exit_s", "cpu_s", "step_cpu_s")
            }
        return out

    def f(x):
        return f"{x:7.2f}" if x is not None else "      -"

    ours = medians(rows)
    if other is None:
        head = f"{'case':<22}{'event_s':>8}{'exit_s':>8}{'cpu_s':>8}{'step_cpu_s':>11}"
        return "\n".join(
            [head]
            + [
                f"{n:<22} {f(m['event_s'])} {f(m['exit_s'])} {f(m['cpu_s'])}    {f(m['step_cpu_s'])}"
                for n, m in ours.items()
            ]
        )
    theirs = medians(other)
    head = (
        f"{'case (medians)':<22}{'event before':>13}{'after':>8}{'cpu before':>12}{'after':>8}"
        f"{'step cpu before':>17}{'after':>8}"
    )
    lines = [head]
    for n in dict.fromkeys([*ours, *theirs]):
        a, b = ours.get(n, {}), theirs.get(n, {})
        lines.append(
            f"{n:<22}      {f(a.get('event_s'))} {f(b.get('event_s'))}     {f(a.get('cpu_s'))} "
            f"{f(b.get('cpu_s'))}          {f(a.get('step_cpu_s'))} {f(b.get('step_cpu_s'))}"
        )
    return "\n".join(lines)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tree",
        nargs="+",
        default=[str(REPO)],
        help="the dtrain source tree(s) to time (default: this checkout); two: before and after, interleaved",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    p.add_argument("--json", help="also write the JSON lines here")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take before it is killed")
    p.add_argument(
        "--table",
        nargs="+",
        metavar="JSONL",
        help="print the medians of these files (two: side by side, the first as before) and exit",
    )
    args = p.parse_args()
    if args.table:
        print(table(*[read_jsonl(f) for f in args.table[:2]]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="dtrain-startup-"))
    envs = {
        tree: {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree).resolve()), str(work)])}
        for tree in args.tree
    }
    for env in envs.values():
        env.pop("DTRAIN_LAUNCH_COMMAND", None)
    prepare(work, envs[args.tree[0]])
    chosen = {n: a for n, a in cases(work).items() if not args.only or n in args.only.split(",")}
    rows = []
    out = open(args.json, "w") if args.json else None
    for rep in range(args.reps):
        for name, argv in chosen.items():
            for i, (tree, env) in enumerate(envs.items()):
                run_dir = work / "runs" / f"{name.replace('.', '-')}-{rep}-{i}"
                row = time_one(name, argv, work, env, run_dir, args.timeout)
                rows.append({**row, "rep": rep, "tree": tree})
                line = json.dumps(rows[-1])
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
    if len(envs) == 2:
        print(table(*[[r for r in rows if r["tree"] == tree] for tree in args.tree]))
        return 0
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
