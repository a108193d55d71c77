"""Where rank 0's metric records go (log.loggers): metrics.jsonl, TensorBoard, metrics.csv, W&B.

Each sink is a `MetricsLogger`: opened at the step a run starts from, it records the resolved config once,
then one record per `log()` (a dict with an integer "step": a train line, a validation, the test, an
event), and is closed at the end. A resumed run appends to the same files and forgets what a killed run
logged after its checkpoint, so every sink holds each step once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

import yaml

from .config import ConfigError
from .records import keep_records, read_records

NAMES = ("jsonl", "tensorboard", "csv", "wandb")


class MetricsLogger:
    """One sink. Built on rank 0 only (other ranks have none) once a resume is settled, at `step`."""

    def log_config(self, config: dict) -> None:
        """The resolved config (secrets redacted), once per start."""

    def log(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def active_loggers(names, wandb_enabled: bool) -> list[str]:
    """log.loggers in NAMES order, jsonl always (dtrain plot, eval and the resume checks read it), wandb also
    when the older wandb.enabled is set."""
    wanted = {"jsonl", *names} | ({"wandb"} if wandb_enabled else set())
    return [name for name in NAMES if name in wanted]


def numbers(record: dict) -> dict:
    """The record's numeric values but its step (bools are no metric; None is a non-finite value)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLogger(MetricsLogger):
    """metrics.jsonl: one JSON object a line, as logged (non-finite values as null)."""

    def __init__(self, run_dir: Path, step: int, report=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        keep_records(self.path, lambda record: record["step"] <= step, metrics_record, report)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def metrics_record(line: str) -> dict:
    """One line of metrics.jsonl (for dtrain.records): a JSON object with an integer step."""
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a JSON object with an integer step")
    return record


class CsvLogger(MetricsLogger):
    """metrics.csv: a row per record, a column per key ever logged, "step" first, the others in the order they
    first appeared (an empty cell: not in that record). Read with the csv module or any spreadsheet."""

    def __init__(self, run_dir: Path, step: int, report=None):
        self.path = Path(run_dir) / "metrics.csv"
        rows = read_records(self.path, _csv_row, report)  # torn last line and malformed lines dropped
        self.header = rows[0][1] if rows else ["step"]
        kept = [row for _, row in rows[1:] if _step_of(row, self.header) <= step]
        self._rewrite(kept)  # the rows after `step` a killed run logged go; so does a torn line

    def log(self, record: dict) -> None:
        new = [k for k in record if k not in self.header]
        if new:
            # A new key widens the header. CSV has one header, at the top: the whole file is rewritten with
            # the wider one (atomically, so a kill leaves the old file or the new), which happens once per
            # new key (the first validation, the test), not per row.
            self._rewrite([row for _, row in read_records(self.path, _csv_row)[1:]], self.header + new)
        self.file.write(_csv_line([_cell(record.get(k)) for k in self.header]))
        self.file.flush()  # a kill loses at most the row being written (dropped as torn at the next start)

    def _rewrite(self, rows: list[list[str]], header: Optional[list[str]] = None) -> None:
        if getattr(self, "file", None) is not None:
            self.file.close()
        header = header or self.header
        text = _csv_line(header) + "".join(_csv_line(row + [""] * (len(header) - len(row))) for row in rows)
        self.header = header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.read_text() != text:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # the rename must not publish a file whose data is still in flight
            os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")

    def close(self) -> None:
        self.file.close()


def _csv_row(line: str) -> list[str]:
    return next(csv.reader([line]))


def _csv_line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


def _step_of(row: list[str], header: list[str]) -> float:
    """A row's step; one without (a hand edit) counts as after any resume point, so it goes too."""
    try:
        return int(row[header.index("step")])
    except (IndexError, ValueError):
        return float("inf")


def _cell(value) -> str:
    return "" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


class TensorBoardLogger(MetricsLogger):
    """<run dir>/tensorboard/: the records' numbers as scalars (tag = key: loss, lr, samples_per_s, mfu,
    val/loss, test/acc, ...), an event's as `<event>/<key>`, the config as text. An event file per start."""

    def __init__(self, run_dir: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "config: log.loggers has tensorboard, which needs the tensorboard package; "
                "pip install 'dtrain[tensorboard]'"
            ) from None
        # purge_step: the new event file starts with a marker that makes TensorBoard's readers discard the
        # events of steps >= step + 1 in the older files (those a killed run logged after its checkpoint)
        self.step = step
        _sort_after_older_event_files(Path(run_dir) / "tensorboard")
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=step + 1)

    def log_config(self, config: dict) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        # markdown: an indented block keeps the YAML's layout
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), self.step)
        self.writer.flush()

    def log(self, record: dict) -> None:
        step, prefix = record["step"], f"{record['event']}/" if "event" in record else ""
        for key, value in numbers(record).items():
            self.writer.add_scalar(prefix + key, value, step)
        # what is logged before a checkpoint must be on disk when it is: a kill after that checkpoint would
        # otherwise lose steps the resumed run does not log again (every log_every steps: cheap)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _sort_after_older_event_files(logdir: Path, wait_s: float = 3.0) -> None:
    """TensorBoard reads a directory's event files in name order, and tensorboard names a file
    `events.out.tfevents.<second>.<host>.<pid>.<n>`. A restart within the second the killed run started in
    (measured: a SIGKILLed run resumed 0.3 s later) with a smaller pid, or on a node whose clock is behind,
    gets a name that sorts first: the reader then takes the killed run's file last, and its older steps
    replace the resumed run's (TensorBoard drops events that go back in step). So wait, at most `wait_s`,
    until this start's name sorts after every older one; past that, say so."""
    older = [p.name for p in logdir.glob("events.out.tfevents.*")]
    if not older:
        return
    newest = max(older)

    def sorts_last() -> bool:  # the name tensorboard would give this start's file now (an equal prefix: this process's)
        mine = "events.out.tfevents.%010d.%s.%s." % (time.time(), socket.gethostname(), os.getpid())
        return mine > newest or newest.startswith(mine)

    deadline = time.monotonic() + wait_s
    while not sorts_last() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not sorts_last():
        logging.getLogger("dtrain.run").warning(
            f"tensorboard: {logdir / newest} is dated ahead of this host's clock; TensorBoard may show the steps "
            "an earlier start logged after its checkpoint (check the clocks of the nodes)"
        )
