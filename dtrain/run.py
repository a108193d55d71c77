"""One training run, start to end: `run(cfg, hooks) -> FitResult`, on every rank.

The lifecycle around the Trainer, in order: the config as this run uses it (--debug's), the process group
(`session`), the run lock (runlock.hold: one job per run directory), the brief health check (`check_health`),
training, rank 0's summary (the table, summary.json), the result every rank gets, the callbacks' end, and
last of all SLURM's requeue. An exception ends it on its rank: the callbacks are told, then it goes on up.
`dtrain train`, `dtrain.main` and `dtrain.fit` reach it the same way: cli.py parses the command line into a
Config and calls `run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

if TYPE_CHECKING:
    from torch import nn

    from .build import Hooks
    from .callbacks import Callbacks
    from .config import Config, DistConfig
    from .dist import DistInfo
    from .result import FitResult


class DoctorError(RuntimeError):
    """A health check failed; the message names it."""


def run(
    cfg: Config,
    hooks: Optional[Hooks] = None,
    debug: bool = False,
    command: Sequence[str] = (),
    program: Sequence[str] = ("dtrain",),
    print_outcome: bool = False,
) -> FitResult:
    """Train (and test) under `cfg` with the objects `hooks` hands in. -> the run's FitResult, on every rank.
    `command` goes on with this run and `program` runs its other commands (the summary says both);
    `print_outcome`: rank 0 prints the trainer's outcome as JSON on stdout (`dtrain train`'s last line)."""
    from . import ft_train

    if ft_train.enabled():  # one replica group of `dtrain launch --ft` (torchft): its own lifecycle
        return ft_train.run(cfg, hooks, debug, command, program, print_outcome)
    import torch

    from .build import run_dir_of
    from .callbacks import build_callbacks
    from .result import collect
    from .runlock import hold
    from .signals import StopReason, requeue_slurm_job
    from .summary import summarize
    from .trainer import Trainer

    if debug:
        cfg = _debug_config(cfg)
    if hooks is not None:
        cfg = hooks.record(cfg)  # config.yaml names the script's callables
    callbacks = build_callbacks(cfg.run.callbacks, hooks.callbacks if hooks is not None else None)
    run_dir = run_dir_of(cfg.run, debug)
    say = logging.getLogger("dtrain.run").info
    _say_where_the_rank_logs_are(run_dir, say)
    # --debug: anomaly detection for this run only (a context: `dtrain.main` may run in a longer-lived process)
    anomaly = torch.autograd.detect_anomaly() if debug else contextlib.nullcontext()
    with anomaly, session(cfg.dist, force_single=debug) as info, _told(callbacks):
        with hold(run_dir, info, say):  # one job per run dir
            trainer = Trainer(cfg, info, debug=debug, hooks=hooks, callbacks=callbacks)
            if cfg.run.doctor and info.distributed:
                check_health(cfg, info, trainer.run_dir, trainer.engine.module, brief=True, hooks=hooks)
            outcome = trainer.fit()  # config.yaml is written once the resume is settled (RunLogger.start)
            if info.is_global_zero:
                # the table on stderr, summary.json
                summarize(trainer, outcome, list(command), tuple(program))
                if print_outcome:
                    print(json.dumps(outcome), flush=True)
            result = collect(trainer, outcome)
            callbacks.emit("on_train_end", result)
        if info.is_global_zero and outcome["stop_reason"] == StopReason.SIGUSR1.value:
            # Last of all, since SLURM ends the job's steps as soon as it is requeued (a rank 0 that requeued
            # before its summary was killed printing it): the checkpoint is complete, the run lock released.
            # But before the session's closing barrier, where the other ranks wait: one that had left, exit
            # code 75, would get srun (--kill-on-bad-exit) to end rank 0 before it requeued the job.
            requeue_slurm_job(say)
    return result


def _debug_config(cfg: Config) -> Config:
    """`dtrain train --debug`: one process, data in the main process, no progress bars (per-step detail)."""
    from . import dist

    launch = dist.detect()
    if launch.world_size > 1:
        raise dist.LaunchError(
            f"launcher: --debug runs one process, but this is rank {launch.global_rank} of "
            f"{launch.world_size} ({launch.mode}); run `dtrain train --debug` without "
            "torchrun or srun (launch/debug.sh does)"
        )
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"num_workers": 0}),
            "log": cfg.log.model_copy(update={"progress": False}),
        }
    )


@contextlib.contextmanager
def _told(callbacks: Callbacks) -> Iterator[None]:
    """The callbacks' on_exception, on the rank where the run ends in an exception, before it goes on up."""
    try:
        yield
    except Exception as e:
        callbacks.emit("on_exception", e)
        raise


def _say_where_the_rank_logs_are(run_dir: Path, say: Callable[[str], None]) -> None:
    """Under `dtrain launch`, rank 0: a line where the launcher's rank logs are not in this run's directory. It
    reads a script's key=value arguments, not what the script sets itself (dtrain.main(config={"run.name": ..})),
    so such a run's logs went to the directory of its default name (found walking the README with a script)."""
    from .worker import rank_log

    log = rank_log()
    if log is not None and not is_other_rank() and log.parent.resolve() != (run_dir / "logs").resolve():
        say(
            f"launch: the rank logs are in {log.parent}, not in this run's {run_dir}: `dtrain launch` reads a "
            f"script's key=value arguments, not what it sets itself; pass run.name={run_dir.name} to keep them "
            "together"
        )


def is_other_rank() -> bool:
    """Not global rank 0 of a job of several ranks (as the launcher's variables say)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0"


@contextlib.contextmanager
def session(cfg: DistConfig, force_single: bool = False) -> Iterator[DistInfo]:
    """The process group of one command: set up, described once by rank 0, and torn down: cleanly
    (barrier, then leave) after success or a DoctorError, which every rank raises at the same point;
    abruptly after any other error, when a peer may be gone."""
    from . import dist

    info = dist.setup(cfg.backend, cfg.timeout_s, cfg.connect_timeout_s, force_single=force_single)
    clean = False
    try:
        if info.is_global_zero:
            from .worker import note, rank_log

            if rank_log() is not None:  # under `dtrain launch`, whose own line says what it started: in the log
                note(info.describe())
            else:
                logging.getLogger("dtrain.dist").info(info.describe())
        yield info
        clean = True
    except DoctorError:
        clean = True
        raise
    finally:
        dist.teardown(clean)


def check_health(
    cfg: Config, info: DistInfo, run_dir: Path, model: nn.Module, brief: bool, hooks: Optional[Hooks] = None
) -> None:
    """Collective. `dtrain doctor`'s checks (brief: before training), its table said by rank 0; a failed check
    is a DoctorError on every rank."""
    from . import doctor

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    checks = doctor.run(cfg, info, run_dir, brief=brief, model_bytes=model_bytes, hooks=hooks)
    if info.is_global_zero:
        logging.getLogger("dtrain.doctor").info(
            ("doctor (brief; `dtrain doctor` for the full check):\n" if brief else "doctor:\n") + doctor.table(checks)
        )
    failed = [c for c in checks if not c.ok]
    if failed:
        raise DoctorError(f"doctor: {failed[0].name} check failed: {failed[0].detail}")
