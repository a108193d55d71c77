"""PNG plots: a run's curves (`dtrain plot RUN_DIR`), an LR schedule before training (`dtrain plot --lr
CONFIG`) and an augmentation preview (`dtrain augment-preview`).

Every function returns the data it drew and writes it beside the PNG as JSON (`*.json`), so the numbers
behind a picture can be checked (the tests do) or re-plotted elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from .config import AugmentConfig, Config, ConfigError, DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from .data import DataError
from .summary import BEST_SO_FAR


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot: matplotlib is not installed; pip install 'dtrain[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> dict:
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return {"step": [s for s, _ in rows], "value": [v for _, v in rows]}


# ---- a finished (or running) run ------------------------------------------------------------------
def run_summary(records: list[dict]) -> dict:
    """Series by name (train loss and terms, lr, every val/ metric) plus the best checkpoint's step (the
    last validation that improved: the monitored metric equals its best so far, e.g. val/loss == val/best_loss)
    and the early-stop step, if any."""
    keys: list[str] = []
    for r in records:
        if "event" in r or any(k.startswith("test/") for k in r):
            continue
        keys += [k for k in r if k not in keys and k not in ("step", "epoch", "samples_per_s")]
    series = {k: _series(records, k) for k in keys}
    # where validation improved: the monitored metric (val/X) equals its best so far (val/best_X, summary.py)
    improved = [
        r
        for r in records
        if any(
            k.startswith(BEST_SO_FAR) and v is not None and r.get("val/" + k[len(BEST_SO_FAR) :]) == v
            for k, v in r.items()
        )
    ]
    stops = [r for r in records if r.get("event") == "early_stop"]
    return {
        "series": series,
        "best_step": improved[-1]["step"] if improved else None,
        "best_val_loss": improved[-1].get("val/loss") if improved else None,
        "early_stop_step": stops[-1]["step"] if stops else None,
    }


def _warn(message: str) -> None:
    logging.getLogger("dtrain.plot").warning(f"plot: {message}")


def read_metrics(run_dir: Path, report=_warn) -> list[dict]:
    """The records of a run's metrics.jsonl; a line cut off (the run is writing it, or was killed) or
    malformed is left out and reported."""
    from .logging import metrics_record
    from .records import read_records

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"plot: {path} does not exist; give a run directory (runs/<run.name>)")
    return [record for _, record in read_records(path, metrics_record, report)]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """loss.png (train and val loss and their terms), metrics.png (validation metrics), lr.png; the best
    checkpoint is a star on the val loss and a dotted line elsewhere, the early stop a dashed red line."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    summary = run_summary(read_metrics(run_dir))
    series, best, stop = summary["series"], summary["best_step"], summary["early_stop_step"]

    def marks(ax):
        if best is not None:
            ax.axvline(best, color="green", linestyle=":", label=f"best checkpoint (step {best})")
        if stop is not None:
            ax.axvline(stop, color="red", linestyle="--", label=f"early stop (step {stop})")

    files = {}
    loss_keys = [k for k in series if k == "loss" or k.startswith("loss/") or k.startswith("val/loss")]
    loss_keys = [k for k in loss_keys if k != "val/best_loss"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in loss_keys:
        ax.plot(
            series[k]["step"],
            series[k]["value"],
            label="train/" + k if not k.startswith("val/") else k,
            marker="o" if k.startswith("val/") else None,
            markersize=3,
        )
    if best is not None:
        ax.plot([best], [summary["best_val_loss"]], marker="*", markersize=14, color="green", linestyle="none")
    marks(ax)
    ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: loss")
    if all(v > 0 for k in loss_keys for v in series[k]["value"]):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    files["loss"] = _save(fig, out / "loss.png", plt)

    metric_keys = [k for k in series if k.startswith("val/") and k not in loss_keys and not k.startswith(BEST_SO_FAR)]
    if metric_keys:
        fig, axes = plt.subplots(1, len(metric_keys), figsize=(4.5 * len(metric_keys), 4), squeeze=False)
        for ax, k in zip(axes[0], metric_keys):
            ax.plot(series[k]["step"], series[k]["value"], marker="o", markersize=3)
            marks(ax)
            ax.set(xlabel="step", title=k)
        if best is not None or stop is not None:
            axes[0][0].legend(fontsize=8)
        files["metrics"] = _save(fig, out / "metrics.png", plt)

    if "lr" in series:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(series["lr"]["step"], series["lr"]["value"])
        marks(ax)
        ax.set(xlabel="step", ylabel="learning rate", title=f"{run_dir.name}: learning rate")
        files["lr"] = _save(fig, out / "lr.png", plt)

    result = {**summary, "files": files, "series": {k: series[k] for k in series}}
    (out / "series.json").write_text(json.dumps(result))
    return result


# ---- an LR schedule, before training -------------------------------------------------------------
def schedule_series(
    data_cfg: DataConfig,
    train: TrainConfig,
    optim: OptimConfig,
    schedule_cfg: ScheduleConfig,
    seed: int,
    world_size: int = 1,
) -> dict:
    """The LR of every optimizer step (0-based) these sections would train, per param group."""
    from .data import ShardStream, resolve_shards
    from .optim import build_schedule
    from .data.feed import plan_total_steps

    index = resolve_shards(data_cfg, seed)
    if data_cfg.train_subset:
        index = index.subset("train", data_cfg.train_subset)
    stream = ShardStream(
        index,
        "train",
        batch_size=data_cfg.batch_size,
        rank=0,
        world_size=world_size,
        train=True,
        grad_accum=train.grad_accum,
        remainder=data_cfg.remainder,
    )
    total = plan_total_steps(train, stream.steps_per_epoch)
    schedule = build_schedule(schedule_cfg, total)
    steps = list(range(total))
    groups = {"lr": optim.lr}
    if optim.backbone_lr_ratio != 1:
        groups = {"lr/head": optim.lr, "lr/backbone": optim.lr * optim.backbone_lr_ratio}
    restarts = []
    if schedule_cfg.name == "cosine_restarts":
        warmup = min(schedule_cfg.warmup_steps, max(total - 1, 0))
        start = 0
        while warmup + start < total:
            restarts.append(warmup + start)
            start = sum(schedule.cycle(start))  # this cycle's start + length: the next one's start
        restarts = restarts[1:]  # the first cycle starts with training, not a restart
    return {
        "step": steps,
        **{name: [peak * schedule(s) for s in steps] for name, peak in groups.items()},
        "total_steps": total,
        "steps_per_epoch": stream.steps_per_epoch,
        "restarts": restarts,
        "warmup_steps": min(schedule_cfg.warmup_steps, max(total - 1, 0)),
    }


def plot_schedule(cfg: Config, out: str | Path, world_size: int = 1) -> dict:
    plt = _pyplot()
    data = schedule_series(cfg.data, cfg.train, cfg.optim, cfg.schedule, cfg.run.seed, world_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in (k for k in data if k.startswith("lr")):
        ax.plot(data["step"], data[name], label=name)
    if data["warmup_steps"]:
        ax.axvline(data["warmup_steps"], color="gray", linestyle=":", label="end of warmup")
    for i, s in enumerate(data["restarts"]):
        ax.axvline(s, color="orange", linestyle="--", linewidth=0.8, label="restart" if i == 0 else None)
    for epoch in range(1, math.ceil(data["total_steps"] / data["steps_per_epoch"])):
        ax.axvline(epoch * data["steps_per_epoch"], color="lightgray", linewidth=0.5)
    ax.set(
        xlabel="optimizer step (gray lines: epochs)",
        ylabel="learning rate",
        title=f"{cfg.run.name}: {cfg.schedule.name} schedule, {data['total_steps']} steps",
    )
    ax.legend(fontsize=8)
    data["file"] = _save(fig, out, plt)
    out.with_suffix(".json").write_text(json.dumps(data))
    return data


# ---- augmentation preview ------------------------------------------------------------------------
def augment_preview(
    augment_cfg: AugmentConfig, data_cfg: DataConfig, seed: int, out: str | Path, samples: int = 8, versions: int = 3
) -> dict:
    """A grid: the first `samples` training images (top row) and `versions` augmented draws of each
    (the draws of epochs 0, 1, ...), exactly as the training stream would produce them."""
    from . import batch as batches
    from .data import build_streams
    from .data.augment import build_augment

    augment = build_augment(augment_cfg, seed)
    if augment is None:
        raise ConfigError("config: augment: every probability is 0; set e.g. augment.crop.p=0.5")
    streams = build_streams(data_cfg, seed=seed, rank=0, world_size=1, num_workers=0)
    batch = streams.train.first_batch(samples)  # in shard order, not augmented
    x, keys = batches.model_input(batch), batches.keys(batch)
    rows = [x.numpy()] + [
        np.stack([augment(xi, key=k, epoch=v).numpy() for xi, k in zip(x, keys)]) for v in range(versions)
    ]
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(keys), figsize=(1.3 * len(keys), 1.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel("original" if r == 0 else f"epoch {r - 1}", fontsize=8)
    fig.suptitle(f"augmentation: {', '.join(augment.active)}", fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    file = _save(fig, out, plt)
    return {"file": file, "keys": list(keys), "original": rows[0], "augmented": rows[1:]}


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
