"""What rank 0 reports: a progress bar, log lines, and metrics.jsonl. Other ranks get a logger that
does nothing (or, with log.all_ranks, prints rank-prefixed lines)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, progress: bool, prefix: str = ""):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps, self.show_progress, self.prefix = total_steps, progress, prefix
        self.bar = None

    def start(self, step: int) -> None:
        """Open the progress bar at `step` and drop metrics a killed run logged after its checkpoint."""
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            os.replace(tmp, self.path)
        if self.show_progress:
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True,
                            mininterval=0.5 if tty else 30, file=sys.stderr)

    def info(self, msg: str) -> None:
        text = f"{self.prefix}{msg}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            _write_line(text)

    def metrics(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, step: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NullLogger(RunLogger):
    def __init__(self, prefix: str = "", echo: bool = False):
        self.prefix, self.echo, self.bar = prefix, echo, None

    def start(self, step): pass
    def metrics(self, record): pass
    def progress(self, step, **postfix): pass
    def advance(self, step): pass

    def info(self, msg):
        if self.echo:
            _write_line(f"{self.prefix}{msg}")


def _write_line(text: str) -> None:
    """One write per line: ranks share stderr, and print()'s separate newline write interleaves."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def build_logger(cfg, dist_info, run_dir: Path, total_steps: int) -> RunLogger:
    prefix = f"[rank {dist_info.global_rank}] " if dist_info.distributed and cfg.all_ranks else ""
    if dist_info.is_global_zero:
        return RunLogger(run_dir, total_steps, cfg.progress, prefix)
    return NullLogger(prefix, echo=cfg.all_ranks)


class SampleKeyLog:
    """`sample_keys/rank-N.txt`: one line per optimizer step, `step key key ...` (log.sample_keys).
    Lets a test or a user prove that no sample was seen twice or skipped across a resume."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / "sample_keys" / f"rank-{rank:05d}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = None

    def truncate(self, step: int) -> None:
        """Forget steps after the checkpoint we resume from (a killed run logged them, then lost them)."""
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and int(l.split(" ", 1)[0]) <= step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def write(self, step: int, keys: list[str]) -> None:
        if self.file is None:
            self.file = open(self.path, "a", buffering=1)
        self.file.write(f"{step} {' '.join(keys)}\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
