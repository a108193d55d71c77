"""What rank 0 reports: a progress bar, log lines, and metric records to the sinks of log.loggers
(metrics.jsonl always; TensorBoard, metrics.csv, a W&B run: dtrain.loggers). Other ranks get a logger that
does nothing (or, with log.all_ranks, prints rank-prefixed lines).

The W&B run id is part of the logger's state, saved with every checkpoint: a resumed run passes it to
`wandb.init(id=..., resume="allow")` and continues the same W&B run. (Online, W&B ignores steps it has
already seen; after a kill those are the steps between the checkpoint and the kill, and since resuming is
exact the killed run logged the same values for them.)

Lines go through Python's `logging`: the `dtrain` logger (child loggers `dtrain.<part>`), level INFO, with
one handler that writes the bare message to stderr, so the output reads as it always did. A user can add
handlers, change the level (`dtrain -q` / `-v` on the command line), or remove ours (`STDERR_HANDLER`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Optional

import yaml
from tqdm import tqdm

from .config import ConfigError
from .loggers import CsvLogger, JsonlLogger, MetricsLogger, TensorBoardLogger, active_loggers, numbers
from .loggers import metrics_record  # noqa: F401  (its readers import it from here)
from .records import keep_records
from .redaction import redact, redact_command

log = logging.getLogger("dtrain")


class StderrHandler(logging.Handler):
    """dtrain's own handler: the bare message on the current sys.stderr (looked up per line: a test or a
    notebook may swap it), above any progress bar, in one write (ranks share stderr, and print()'s separate
    newline write interleaves)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text, stream = self.format(record) + "\n", sys.stderr
            if getattr(tqdm, "_instances", None):  # a bar on the terminal: clear it, write, redraw it
                with tqdm.external_write_mode(file=stream):
                    stream.write(text)
                    stream.flush()
            else:
                stream.write(text)
                stream.flush()
        except Exception:
            self.handleError(record)


def _install() -> StderrHandler:
    """Once per process: dtrain's handler on the `dtrain` logger, INFO unless the user set a level first.
    It doesn't propagate: a user's root handlers (or pytest's) would print every line a second time."""
    for handler in log.handlers:
        if type(handler).__name__ == "StderrHandler":  # also one installed before a reload of this module
            return handler
    handler = StderrHandler()
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.propagate = False
    return handler


STDERR_HANDLER = _install()


def progress_bar(iterable=None, *, total=None, desc=None, unit="it", enabled=True, leave=False, **kwargs) -> tqdm:
    """A bar for long work (training; validation, `dtrain index`, `shard`, `eval`, `export`): on a terminal
    only, and only where `enabled` (log.progress, rank 0). A log file gets no bar lines: the line the work
    ends with (a validation's metrics, `wrote ...`, the summary) is its record. A bar other than training's
    goes when done (leave=False), so that line follows the training bar, not a finished bar."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=leave,
        file=sys.stderr,
        mininterval=0.5,
        disable=not (enabled and sys.stderr.isatty()),
        **kwargs,
    )


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    """`-q`: warnings and errors only; `-v`: debug lines too; neither: the level stays as it is (INFO, or
    what a script set)."""
    if quiet or verbose:
        log.setLevel(logging.WARNING if quiet else logging.DEBUG)


class WandbRun(MetricsLogger):
    """Rank 0's W&B run: numeric metrics at their step, the resolved config (secrets redacted), events
    as summary values. The files go to <run dir>/wandb/ (offline mode keeps them there)."""

    def __init__(self, cfg, run_dir: Path, run_config: dict, run_id: Optional[str]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("config: wandb.enabled needs the wandb package; pip install 'dtrain[wandb]'") from None
        # a fresh id from the OS, not from random/torch: drawing from the seeded RNGs would shift every
        # dropout mask after it and break bit-exact resume
        self.id = run_id or secrets.token_hex(6)
        self.log_checkpoints, self.references = cfg.log_checkpoints, cfg.checkpoint_references
        if cfg.log_checkpoints and isinstance(self.references, str) and importlib.util.find_spec("boto3") is None:
            # wandb's S3 handler imports boto3 (and builds a client) for every s3:// reference, checksum or not
            raise ConfigError(
                f"config: wandb.checkpoint_references={self.references} needs the boto3 package "
                "(W&B's s3:// references import it); pip install 'wandb[aws]'"
            )
        settings = wandb.Settings(
            console="off", save_code=False, disable_git=True, disable_job_creation=True, silent=True
        )
        with _command_line_redacted():  # W&B records sys.argv, overrides and all, in the run's metadata
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                tags=redact(list(cfg.tags)),
                name=redact(cfg.name or run_config.get("run", {}).get("name")),
                mode=cfg.mode,
                dir=str(run_dir),
                id=self.id,
                resume="allow",
                config=redact(run_config),
                settings=settings,
            )

    def log(self, record: dict) -> None:
        step, values = record.get("step"), numbers(record)
        if "event" in record:  # e.g. early_stop: summary values ("early_stop/step"), not a curve
            self.run.summary.update({f"{record['event']}/{k}": v for k, v in {"step": step, **values}.items()})
            return
        if values:
            self.run.log(values, step=step)

    def log_checkpoint(self, path: Path, step: int, best: bool) -> None:
        """A published checkpoint (complete, its manifest's checksums written) as a version of the artifact
        `checkpoint-<run id>`, aliases `latest` and, for a best one, `best`. Called from the save thread: W&B
        hashes and stages (or, by file:// reference, lists and hashes) the files there and uploads from its
        own process; an s3:// reference is the URI alone."""
        if not self.log_checkpoints or (self.log_checkpoints == "best" and not best):
            return
        import wandb

        manifest = json.loads((path / "manifest.json").read_text())
        artifact = wandb.Artifact(
            f"checkpoint-{self.id}",
            type="model",
            metadata={
                "step": step,
                "best": best,
                "world_size": manifest["world_size"],
                "config_hash": manifest["config_hash"],
            },
        )
        if isinstance(self.references, str):
            # the step directory's URI in the bucket it is mirrored to, unchecksummed: W&B records the URI and
            # reads nothing (the mirror may lag; with a checksum W&B would list every object now)
            artifact.add_reference(f"{self.references}/{path.name}", name=path.name, checksum=False)
        elif self.references:
            artifact.add_reference(path.resolve().as_uri(), name=path.name)
        else:
            artifact.add_dir(str(path), name=path.name)
        aliases = [f"step-{step}"] + (["latest"] if self.log_checkpoints == "all" else []) + (["best"] if best else [])
        self.run.log_artifact(artifact, aliases=aliases)
        log.info(f"wandb: checkpoint {path.name} logged as artifact checkpoint-{self.id} ({', '.join(aliases)})")

    def close(self) -> None:
        self.run.finish()


@contextlib.contextmanager
def _command_line_redacted():
    """sys.argv with its secrets as "<redacted>" (dtrain.redaction) inside the block: wandb.init reads it (its
    Settings._args, the metadata's `args`), and no setting of W&B's leaves that out but x_disable_meta, which
    drops the hardware description too."""
    argv = list(sys.argv)
    sys.argv[:] = redact_command(argv)
    try:
        yield
    finally:
        sys.argv[:] = argv


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        progress: bool,
        prefix: str = "",
        wandb_cfg=None,
        run_config: Optional[dict] = None,
        loggers=("jsonl",),
    ):
        self.run_dir = Path(run_dir)
        self.show_progress, self.prefix = progress, prefix
        self.bar = None
        self.wandb_cfg, self.run_config = wandb_cfg, run_config or {}
        self.names = active_loggers(loggers, wandb_cfg is not None and wandb_cfg.enabled)
        self.sinks: list[MetricsLogger] = []
        self.wandb: Optional[WandbRun] = None
        self.wandb_run_id: Optional[str] = None

    def state_dict(self) -> dict:
        return {"wandb_run_id": self.wandb_run_id} if self.wandb_run_id else {}

    def load_state_dict(self, state: dict) -> None:
        self.wandb_run_id = state.get("wandb_run_id")

    def start(self, step: int, total_steps: int) -> None:
        """Write config.yaml, open the sinks at `step` (each drops the records a killed run logged after its
        checkpoint, and a line it was cut off in), the progress bar (of the run's `total_steps`) and the W&B
        run. Called once a resume is settled: a run refused for a changed config or found finished has written
        nothing, and the length is the resumed run's (a resume on other ranks keeps the checkpoint's epochs)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.run_config:  # secrets sealed: config.yaml is read back (it may be a resume's --config)
            _write_atomic(
                self.run_dir / "config.yaml", yaml.safe_dump(redact(self.run_config, keyed=True), sort_keys=False)
            )
        if not self.sinks:
            self.sinks = [self._open(name, step) for name in self.names]
            for sink in self.sinks:
                sink.log_config(redact(self.run_config))
        if self.show_progress and sys.stderr.isatty():
            self.bar = progress_bar(total=total_steps, initial=step, unit="step", leave=True)

    def _open(self, name: str, step: int) -> MetricsLogger:
        if name == "jsonl":
            return JsonlLogger(self.run_dir, step, self.info)
        if name == "csv":
            return CsvLogger(self.run_dir, step, self.info)
        if name == "tensorboard":
            return TensorBoardLogger(self.run_dir, step)
        self.wandb = WandbRun(self.wandb_cfg, self.run_dir, self.run_config, self.wandb_run_id)
        self.info(
            f"wandb: {'resumed' if self.wandb_run_id else 'started'} run {self.wandb.id} "
            f"({self.wandb_cfg.mode}, {self.run_dir / 'wandb'})"
        )
        self.wandb_run_id = self.wandb.id
        return self.wandb

    def info(self, msg: str) -> None:
        log.info(f"{self.prefix}{msg}")

    def warning(self, msg: str) -> None:
        log.warning(f"{self.prefix}{msg}")

    def metrics(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        for sink in self.sinks:
            sink.log(record)

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
        for sink in self.sinks:
            sink.close()
        self.sinks, self.wandb = [], None


class NullLogger(RunLogger):
    def __init__(self, prefix: str = "", echo: bool = False):
        self.prefix, self.echo, self.bar, self.wandb, self.wandb_run_id = prefix, echo, None, None, None
        self.show_progress = False
        self.sinks = []

    def start(self, step, total_steps):
        pass

    def metrics(self, record):
        pass

    def progress(self, step, **postfix):
        pass

    def advance(self, step):
        pass

    def info(self, msg):
        if self.echo:
            log.info(f"{self.prefix}{msg}")

    def warning(self, msg):
        if self.echo:
            log.warning(f"{self.prefix}{msg}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_logger(cfg, dist_info, run_dir: Path, wandb_cfg=None, run_config: Optional[dict] = None) -> RunLogger:
    """Rank 0 alone writes metrics (the sinks of cfg.loggers); `run_config` is the resolved config they record."""
    prefix = f"[rank {dist_info.global_rank}] " if dist_info.distributed and cfg.all_ranks else ""
    if dist_info.is_global_zero:
        return RunLogger(run_dir, cfg.progress, prefix, wandb_cfg, run_config, cfg.loggers)
    return NullLogger(prefix, echo=cfg.all_ranks)


class SampleKeyLog:
    """`sample_keys/rank-N.txt`: one line per optimizer step, `step key key ...` (log.sample_keys).
    Lets a test or a user prove that no sample was seen twice or skipped across a resume."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / "sample_keys" / f"rank-{rank:05d}.txt"
        self.file = None

    def start(self, step: int, world_size: int, is_global_zero: bool, report=None) -> None:
        """Forget the steps logged after `step` (by a run killed after its checkpoint, or before its first):
        this rank's, and on rank 0 those of ranks a resume on fewer ranks left behind."""
        self.truncate(step, report)
        if is_global_zero:
            self.truncate_ranks_from(world_size, step, report)

    def truncate(self, step: int, report=None) -> None:
        """Forget steps after the checkpoint we resume from (a killed run logged them, then lost them)."""
        keep_records(self.path, lambda logged: logged <= step, key_log_step, report)

    def truncate_ranks_from(self, world_size: int, step: int, report=None) -> None:
        """Resumed on fewer ranks: the files of ranks that no longer run keep only their steps up to the
        checkpoint, as truncate() does for those that do."""
        for path in self.path.parent.glob("rank-*.txt"):
            rank = int(path.stem.split("-")[1])
            if rank >= world_size:
                SampleKeyLog(self.path.parent.parent, rank).truncate(step, report)

    def write(self, step: int, keys: list[str]) -> None:
        if self.file is None:  # created on first use: nothing is written before training starts
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1)
        self.file.write(f"{step} {' '.join(keys)}\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def key_log_step(line: str) -> int:
    """The step of one line of a sample-key log (for dtrain.records)."""
    return int(line.split(" ", 1)[0])
