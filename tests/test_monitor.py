"""The best checkpoint and early stopping follow the metric the user names (early_stop.monitor, early_stop.mode;
issue 34, point 1): the best pointer, summary.json, FitResult and the stop, on one rank and two, through a
resume in the middle; a name validation never logs is one line before anything is written."""

import json
import os

import pytest

import dtrain
from conftest import metrics_of, run_dtrain, run_ranks
from dtrain.config import ConfigError, EarlyStopConfig
from dtrain.evaluate import Evaluator

# 3 epochs of 19 steps, validated every 3 steps and at each epoch's end: 21 validations. On these digits val/acc
# peaks early (step 36 of 57) while val/loss falls to the end, so the two monitors pick different steps.
ARGS = ["log.progress=false", "train.epochs=3", "train.val_every=3", "train.log_every=3"]
ACC = ["early_stop.monitor=val/acc", "early_stop.mode=max"]


def validations(run_dir) -> list[dict]:
    return [r for r in metrics_of(run_dir) if "val/loss" in r]


def best_of(records: list[dict], key: str, mode: str) -> int:
    """The step of the first validation with the best value (a tie is no improvement)."""
    best = (max if mode == "max" else min)(r[key] for r in records)
    return next(r["step"] for r in records if r[key] == best)


def stop_of(records: list[dict], key: str, patience: int) -> int:
    """The step of the validation that uses up the patience, replayed on the logged values (mode max)."""
    best, bad = float("-inf"), 0
    for r in records:
        best, bad = (r[key], 0) if r[key] > best else (best, bad + 1)
        if bad == patience:
            return r["step"]
    raise AssertionError("the patience is never used up")


def pointer(run_dir, name: str) -> int:
    return int(os.readlink(run_dir / "checkpoints" / name).rsplit("-", 1)[1])


def test_monitor_max_picks_the_step_of_the_highest_val_acc(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = dtrain.fit([f"data.root={data_root}", *ARGS, *ACC, "run.name=acc"])
    run_dir = tmp_path / "runs" / "acc"
    val = validations(run_dir)
    best = best_of(val, "val/acc", "max")
    assert best != best_of(val, "val/loss", "min")  # the premise: val/loss would have picked another step
    assert result.best_step == best and result.monitor == "val/acc"
    assert result.best_metrics["val/acc"] == max(r["val/acc"] for r in val)
    assert pointer(run_dir, "best") == best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["step"] == best and summary["best"]["monitor"] == "val/acc"
    assert summary["checkpoint"].endswith(f"step-{best:08d}")
    assert metrics_of(run_dir)[-1]["test/weights_step"] == best  # the test used the best val/acc weights
    assert all(r["val/best_acc"] == max(v["val/acc"] for v in val if v["step"] <= r["step"]) for r in val)

    # auto is max for acc: the same choice, and the same best pointer
    run_dtrain(["train", f"data.root={data_root}", *ARGS, "early_stop.monitor=val/acc", "run.name=auto"], tmp_path)
    assert pointer(tmp_path / "runs" / "auto", "best") == best


def test_early_stop_patience_on_val_acc_stops_at_the_validation_that_uses_it_up(tmp_path, data_root):
    run_dtrain(["train", f"data.root={data_root}", *ARGS, *ACC, "early_stop.patience=3", "run.name=p"], tmp_path)
    records = metrics_of(tmp_path / "runs" / "p")
    val = [r for r in records if "val/loss" in r]
    stop = stop_of(val, "val/acc", 3)
    assert stop < 57 and val[-1]["step"] == stop
    assert [r for r in records if r.get("event") == "early_stop"] == [
        {"step": stop, "event": "early_stop", "best_step": best_of(val, "val/acc", "max")}
    ]


def test_a_metric_validation_never_logs_is_one_line_before_anything_is_written(tmp_path, data_root):
    proc = run_dtrain(
        ["train", f"data.root={data_root}", *ARGS, "early_stop.monitor=val/mea", "run.name=typo"], tmp_path, check=False
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        "dtrain: error: config: early_stop.monitor: 'val/mea' is not a validation metric; validation "
        "logs val/loss, val/acc; did you mean val/acc?"
    ]
    assert not (tmp_path / "runs" / "typo" / "checkpoints").exists()
    assert not (tmp_path / "runs" / "typo" / "metrics.jsonl").exists()


class _Loss:
    names = ["loss"]


class _Metrics:
    names = {"acc": False, "f1": True}
    torchmetrics = {"auroc": None}


def _evaluator(**early_stop) -> Evaluator:
    return Evaluator(None, None, _Loss(), _Metrics(), "classification", 0, EarlyStopConfig(**early_stop))


def test_a_metric_of_unknown_direction_needs_min_or_max():
    with pytest.raises(
        ConfigError,
        match=r"^config: early_stop.mode: auto does not know whether val/f1 is better "
        r"lower or higher; set early_stop.mode=min or early_stop.mode=max$",
    ):
        _evaluator(monitor="val/f1").check_monitor(True, print)
    _evaluator(monitor="val/f1", mode="max").check_monitor(True, print)
    _evaluator(monitor="val/auroc/macro", mode="max").check_monitor(True, print)  # a torchmetrics dict's key
    warned = []
    _evaluator(monitor="val/acc").check_monitor(False, warned.append)  # no validation split: said, not refused
    assert warned == [
        "early_stop: the data has no validation split, so val/acc is never measured: no best "
        "checkpoint, no early stopping (the test uses the last weights)"
    ]


def test_min_delta_counts_upwards_under_max():
    ev = _evaluator(monitor="val/acc", patience=2, min_delta=0.1)
    seen = [ev.observe(acc, step) for step, acc in [(1, 0.5), (2, 0.55), (3, 0.7), (4, 0.75), (5, 0.6)]]
    assert seen == [(True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (ev.best_val, ev.best_step) == (0.7, 3)


def test_resume_in_the_middle_keeps_the_best_value_and_the_patience(tmp_path, data_root):
    """Stopped at the first validation after the best (one bad validation counted), the resumed run picks the
    same best step and stops early at the same step as the run that was never stopped, with the same records."""
    args = ["train", f"data.root={data_root}", *ARGS, *ACC, "early_stop.patience=4"]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    straight = validations(tmp_path / "runs" / "straight")
    best = best_of(straight, "val/acc", "max")
    stop_at = next(r["step"] for r in straight if r["step"] > best)
    run_dtrain(args + ["run.name=resumed", f"run.stop_at_step={stop_at}"], tmp_path)
    assert validations(tmp_path / "runs" / "resumed")[-1]["step"] == stop_at
    proc = run_dtrain(args + ["run.name=resumed", "early_stop.monitor=val/loss"], tmp_path, check=False)
    assert proc.returncode == 2 and "config: early_stop.monitor cannot change when a run resumes" in proc.stderr
    run_dtrain(args + ["run.name=resumed"], tmp_path)
    resumed = validations(tmp_path / "runs" / "resumed")
    assert resumed == straight
    assert pointer(tmp_path / "runs" / "resumed", "best") == pointer(tmp_path / "runs" / "straight", "best") == best
    stops = [
        [r for r in metrics_of(tmp_path / "runs" / name) if r.get("event") == "early_stop"]
        for name in ("straight", "resumed")
    ]
    assert stops[0] == stops[1] == [{"step": stop_of(straight, "val/acc", 4), "event": "early_stop", "best_step": best}]


@pytest.mark.multiproc
def test_two_ranks_pick_the_same_best_step_as_one(tmp_path, data_root):
    args = ["train", f"data.root={data_root}", *ARGS, *ACC, "data.shuffle_buffer=0", "model.kwargs.dropout=0"]
    run_dtrain(args + ["data.batch_size=128", "run.name=one"], tmp_path)
    run_ranks(2, args + ["data.batch_size=64", "run.name=two"], tmp_path)
    one, two = (validations(tmp_path / "runs" / name) for name in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two]
    best = best_of(one, "val/acc", "max")
    assert best == best_of(two, "val/acc", "max") != best_of(one, "val/loss", "min")
    assert pointer(tmp_path / "runs" / "one", "best") == pointer(tmp_path / "runs" / "two", "best") == best
    summaries = [json.loads((tmp_path / "runs" / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[0]["best"]["step"] == summaries[1]["best"]["step"] == best


def test_metrics_cannot_change_at_resume_while_a_metric_decides_the_best():
    from dtrain.config import load_config
    from dtrain.resume import config_changes

    for monitor, fixed in [("val/acc", True), ("val/loss", False)]:
        saved = load_config(None, [f"early_stop.monitor={monitor}"]).to_dict()
        (change,) = config_changes(saved, load_config(None, [f"early_stop.monitor={monitor}", "metrics.builtin=false"]))
        assert change.key == "metrics.builtin" and bool(change.fixed) == fixed, monitor
