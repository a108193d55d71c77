"""The end of a run in one table (rank 0, stderr) and in `summary.json`: final and best metrics and their
steps, where this start's wall time went, throughput and MFU, the checkpoint to use and the command that
goes on from it.

Metrics come from metrics.jsonl, which holds the whole run (every start, each step once); the wall time
split is this start's (a resumed run's earlier starts timed their own).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import time
from pathlib import Path
from typing import Optional

from .loggers import metrics_record, numbers
from .records import read_records
from .trust import naming
from .redaction import REDACTED, redact_command, sealed_settings

SPEED = ("samples_per_s", "tokens_per_s", "step_time_s", "data_wait_frac", "mfu", "peak_mem_mb")
# A validation record's best value so far of the monitored metric (evaluate.py): val/best_loss, val/best_acc...
BEST_SO_FAR = "val/best_"


class Stopwatch:
    """Wall time of one start by part. A part inside another (a best checkpoint saved during a validation)
    counts for the inner one only, so the parts add up to no more than the total."""

    def __init__(self):
        self.started, self.spent, self._inner = time.perf_counter(), {}, [0.0]

    @contextlib.contextmanager
    def part(self, name: str):
        t = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t
            self.spent[name] = self.spent.get(name, 0.0) + elapsed - self._inner.pop()
            self._inner[-1] += elapsed

    def times(self, **more: float) -> dict:
        return {"total": time.perf_counter() - self.started, **self.spent, **more}


def build_summary(
    records: list[dict],
    result: dict,
    best_step: Optional[int],
    times: dict,
    checkpoint: Optional[Path],
    command: list[str],
    eval_split: Optional[str] = "test",
    program: tuple[str, ...] = ("dtrain",),
    eval_args: tuple[str, ...] = (),
    monitor: Optional[str] = None,
) -> dict:
    """`records`: metrics.jsonl in order; `result`: what training returned (step, stop_reason, test/*);
    `times`: seconds of this start by part ("total", "validation", "checkpoint", "test", "data_wait");
    `command`: the one that started it; `eval_split`: the split `evaluate` names (test, else val: one the
    run's data has), None for none; `program`: what `evaluate` runs (a script of one's own: `python train.py`,
    since only it can rebuild the model it handed in); `eval_args`: what `evaluate` adds (the overrides naming the
    run's own code, which eval does not take from a checkpoint: dtrain.trust); `monitor`: the metric that chose
    best_step (early_stop.monitor), said in the summary's best."""
    final: dict = {}
    for record in records:
        if "event" not in record:
            for key, value in numbers(record).items():
                if (
                    key not in SPEED
                    and key != "epoch"
                    and not key.startswith(BEST_SO_FAR)
                    and not key.endswith("weights_step")
                ):
                    final[key] = {"value": value, "step": record["step"]}
    best = next((r for r in reversed(records) if r["step"] == best_step and "val/loss" in r), None)
    train = [r for r in records if "loss" in r and "samples_per_s" in r]
    speed = {
        key: statistics.median(v)
        for key in SPEED
        if (v := [r[key] for r in train if isinstance(r.get(key), (int, float))])
    }
    if speed.get("tokens_per_s") == speed.get("samples_per_s"):  # not sequences: a token is a sample
        speed.pop("tokens_per_s", None)
    spent = {k: v for k, v in times.items() if k != "total"}
    split = {
        "train": max(times.get("total", 0.0) - sum(v for k, v in spent.items() if k != "data_wait"), 0.0),
        **spent,
    }  # data_wait is part of train
    stop = result.get("stop_reason", "")
    finished = stop in ("completed", "early_stop", "already_completed")
    summary = {
        "step": result.get("step"),
        "stop_reason": stop,
        "final": final,
        "best": {
            "step": best_step,
            **({"monitor": monitor} if monitor else {}),
            **{k: v for k, v in numbers(best).items() if k.startswith("val/") and not k.startswith(BEST_SO_FAR)},
        }
        if best
        else None,
        "wall_time_s": {"total": times.get("total", 0.0), **split},
        "throughput": speed,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    if checkpoint is not None and eval_split is not None:
        summary["evaluate"] = shlex.join(
            [*program, "eval", "--checkpoint", str(checkpoint), "--split", eval_split, *eval_args]
        )
    # a diverged run (nonfinite) resumed as it is diverges again: its stop line says what to change instead
    if not finished and stop != "nonfinite":  # a run stopped by run.stop_at_step would stop again at once with it
        summary["resume"] = shlex.join(
            [a for a in command if not (stop == "stop_at_step" and a.startswith("run.stop_at_step="))]
        )
    return _without_secrets(summary)


def _secrets_to_give(config: dict) -> list[str]:
    """`key=<redacted>` for each secret the checkpoint holds sealed: eval takes it from the user again."""
    return [f"{key}={REDACTED}" for key in sealed_settings(config)]


def _without_secrets(summary: dict) -> dict:
    """The commands' secrets (an override's token, a config's api_key they repeat) as "<redacted>", and a note
    saying to give them again (dtrain.redaction: no secret in summary.json, the table, or a rank's log)."""
    for key in ("resume", "evaluate"):
        if key in summary:
            summary[key] = shlex.join(redact_command(shlex.split(summary[key])))
    if any(REDACTED in summary.get(key, "") for key in ("resume", "evaluate")):
        summary["commands_note"] = f"give the secrets shown as {REDACTED} again"
    return summary


def table(summary: dict) -> str:
    """The summary as aligned `name  value` lines (what a terminal shows)."""
    rows = [("run", f"step {summary['step']}, {summary['stop_reason']}")]
    rows += [(k, f"{_fmt(v['value'])} (step {v['step']})") for k, v in summary["final"].items()]
    if summary["best"]:
        monitor = summary["best"].get("monitor")
        rows += [
            (f"best {k}", f"{_fmt(v)} (step {summary['best']['step']}{', monitored' if k == monitor else ''})")
            for k, v in summary["best"].items()
            if k not in ("step", "monitor")
        ]
    wall = dict(summary["wall_time_s"])
    total, wait = wall.pop("total") or 1e-9, wall.pop("data_wait", 0.0)
    parts = [
        f"{k} {v:.1f} s ({100 * v / total:.0f}%)" + (f", of it data wait {wait:.1f} s" if k == "train" else "")
        for k, v in wall.items()
    ]
    rows.append(("wall time", f"{total:.1f} s (this start): " + "; ".join(parts)))
    rows += [(k, _fmt(v)) for k, v in summary["throughput"].items()]
    if summary["checkpoint"]:
        rows.append(("checkpoint", summary["checkpoint"]))
    for key in ("resume", "evaluate", "commands_note"):
        if key in summary:
            rows.append((key, summary[key]) if key != "commands_note" else ("", f"({summary[key]})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_summary(
    run_dir: Path,
    result: dict,
    best_step: Optional[int],
    times: dict,
    checkpoint: Optional[Path],
    command: list[str],
    eval_split: Optional[str] = "test",
    program: tuple[str, ...] = ("dtrain",),
    eval_args: tuple[str, ...] = (),
    monitor: Optional[str] = None,
) -> dict:
    """Read metrics.jsonl, write summary.json (atomically) and return the summary."""
    records = [r for _, r in read_records(Path(run_dir) / "metrics.jsonl", metrics_record)]
    summary = build_summary(
        records, result, best_step, times, checkpoint, command, eval_split, program, eval_args, monitor
    )
    path = Path(run_dir) / "summary.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)
    return summary


def summarize(trainer, result: dict, command: list[str], program: tuple[str, ...]) -> Optional[dict]:
    """Rank 0, after trainer.fit(): the end-of-run table on stderr and <run dir>/summary.json. A start that
    found the run finished and tested writes nothing: the summary of the start that did stands. `command`
    resumes the run, `program` (dtrain, or `python train.py`) evaluates its checkpoint."""
    if result["stop_reason"] == "already_completed":
        return None
    best = trainer.checkpointer.pointer("best")
    split = "test" if trainer.test_data is not None else "val" if trainer.val_data is not None else None
    summary = write_summary(
        trainer.run_dir,
        result,
        trainer.evaluator.best_step if best else None,
        trainer.clock.times(data_wait=trainer.meter.total_data_wait),
        best or trainer.checkpointer.pointer("latest"),
        command,
        split,
        program,
        (*naming(trainer.cfg), *_secrets_to_give(trainer.cfg.to_dict())),
        trainer.evaluator.monitor,
    )
    trainer.log.info("summary\n" + table(summary))
    return summary
