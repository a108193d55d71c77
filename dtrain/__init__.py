"""dtrain: distributed data-parallel training with PyTorch.

From a config: `dtrain train --config X.yaml key=value ...`. From your own script, with your own objects:

    import dtrain
    dtrain.main(model=build_model, loss=my_loss, metrics=my_metrics)

launched exactly as the command is (`python train.py ...`, `torchrun --nproc-per-node N train.py ...`,
`srun python train.py ...`), with the same config, overrides, run directory and guarantees. `dtrain.fit(...)`
takes the same arguments and returns the run's result instead of exiting (a notebook, a sweep, a script).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

from .version import __version__

if TYPE_CHECKING:  # imported when first used (`import dtrain` stays light: no torch until a run needs it)
    from .checkpoint import CheckpointError
    from .run import DoctorError
    from .config import ConfigError
    from .data.errors import DataError
    from .dist import CollectiveError, LaunchError
    from .load import load_model
    from .result import FitResult
    from .runlock import RunDirError

__all__ = [
    "main",
    "fit",
    "load_model",
    "FitResult",
    "ConfigError",
    "DataError",
    "LaunchError",
    "CheckpointError",
    "DoctorError",
    "RunDirError",
    "CollectiveError",
    "__version__",
]

# public name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {
    "FitResult": "result",
    "load_model": "load",
    "ConfigError": "config",
    "DataError": "data.errors",
    "LaunchError": "dist",
    "CollectiveError": "dist",
    "CheckpointError": "checkpoint",
    "DoctorError": "run",
    "RunDirError": "runlock",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    config: Optional[dict[str, Any]] = None,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
    forward: Any = None,
    param_groups: Any = None,
    sample: Any = None,
    transform: Any = None,
    collate: Any = None,
    callbacks: Optional[Sequence[Any]] = None,
    optimizer: Any = None,
    scheduler: Any = None,
) -> NoReturn:
    """Run dtrain's command line with objects of your own, then exit with its exit code (0, 2 for a user
    error, 75 when interrupted and resumable). `argv` defaults to sys.argv[1:]; its command defaults to
    `train` (also: eval, export, doctor, config, plot).

    config        the script's own defaults, {"dotted.key": value} (e.g. {"data.dataset": "text"}): above
                  dtrain's defaults, below --config FILE and key=value overrides

    model         an nn.Module, or a callable returning one: it is called with model.kwargs (plus
                  `input_shape` and `num_outputs` from the data set where its signature names them) after
                  seeding with run.seed, so every rank builds the same weights (prefer the callable)
    loss          loss(output, batch) -> a scalar tensor, or a dict of named scalar terms (each logged; the
                  total is its "loss" entry, else their sum)
    metrics       metrics(output, batch) -> {name: per-batch sum} or {name: (numerator, denominator)}
                  (added over batches and ranks exactly), or {name: torchmetrics.Metric} (updated with
                  (logits, target), synchronised by torchmetrics), or a list of those
    forward       forward(model, batch) -> output (default: model(x), or model(**batch) for dict batches)
    param_groups  param_groups(model) -> torch optimizer param groups (lr, weight_decay per group)
    sample        sample(raw webdataset sample) -> {field: value}, or {field: "ext;ext"} (as data.sample)
    transform     transform(input) -> input, on training samples in the data workers, with torch's, Python's
                  and NumPy's generators seeded per sample (as data.transform): resumes exactly
    collate       collate(list of sample dicts) -> batch dict (as data.collate)
    callbacks     objects told what the run does, on every rank: on_train_start(run), on_step_end(step, loss),
                  on_validation_end(step, metrics), on_checkpoint(path, step, best), on_train_end(result),
                  on_exception(error), any of them (dtrain.callbacks); in place of run.callbacks
    optimizer     optimizer(param_groups) -> torch.optim.Optimizer, e.g. torch.optim.RAdam or
                  functools.partial(torch.optim.RAdam, eps=1e-6): a factory (the engine calls it once it has
                  placed the parameters), called with the param groups (optim.lr, weight_decay, backbone_lr_ratio,
                  param_groups); in place of optim.name
    scheduler     scheduler(optimizer) -> LR scheduler, stepped once per optimizer step, e.g.
                  torch.optim.lr_scheduler.OneCycleLR (dtrain passes total_steps, T_max and max_lr where the
                  signature names them, as for schedule.name) or lambda opt: StepLR(opt, 100); in place of
                  schedule.name
    """
    from .build import Hooks
    from .cli import main as cli_main

    hooks = Hooks(
        model,
        loss,
        metrics,
        forward,
        param_groups,
        sample,
        transform,
        collate,
        None if callbacks is None else list(callbacks),
        optimizer,
        scheduler,
    )
    raise SystemExit(cli_main(None if argv is None else list(argv), hooks, config))


def fit(
    argv: Optional[Sequence[str]] = None,
    *,
    config: Optional[dict[str, Any]] = None,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
    forward: Any = None,
    param_groups: Any = None,
    sample: Any = None,
    transform: Any = None,
    collate: Any = None,
    callbacks: Optional[Sequence[Any]] = None,
    optimizer: Any = None,
    scheduler: Any = None,
) -> FitResult:
    """Train exactly as `main` does (the same arguments, argv, config, hooks; under torchrun or srun too),
    then return the run's `dtrain.result.FitResult` on every rank instead of exiting: exit_code, stop_reason,
    step, total_steps, run_dir, metrics (the last value of each), best_metrics and best_step (the best
    early_stop.monitor: by default the lowest validation loss), best_checkpoint, latest_checkpoint.

    Named after what a Lightning or Keras user calls to train (`trainer.fit(...)`, `model.fit(...)`, which
    returns its History): it trains (and tests the best weights); the other commands stay with `main`.

    How it ends, as a Python caller expects:
    - done, or interrupted (SIGTERM, SIGUSR1, run.stop_at_step): it returns; `result.interrupted` (exit code
      75) says the same call again resumes the run.
    - bad input (config, data, hooks, launch, a checkpoint that can't be resumed, a held run directory):
      it raises dtrain's own error (`dtrain.cli.user_errors()`: ConfigError, DataError, ...), whose text is
      the one line `main` would print before exiting 2. Nothing is written.
    - a rank stalled or died: dtrain.dist.CollectiveError (main: exit 1); an error in your own code: yours,
      with its traceback.

    `argv` defaults to sys.argv[1:] (in a Jupyter kernel, to []); its command may be omitted or `train`.
    """
    from .build import Hooks
    from .cli import fit as cli_fit

    return cli_fit(
        None if argv is None else list(argv),
        Hooks(
            model,
            loss,
            metrics,
            forward,
            param_groups,
            sample,
            transform,
            collate,
            None if callbacks is None else list(callbacks),
            optimizer,
            scheduler,
        ),
        config,
    )
