"""The sinks of log.loggers, read back with their own readers: metrics.csv with the csv module, TensorBoard's
event files with tensorboard's EventAccumulator. A killed and resumed real run: tests/test_runs.py."""

import csv
from pathlib import Path

import pytest
import torch

from dtrain import dist
from dtrain.config import ConfigError, load_config
from dtrain.loggers import CsvLogger, active_loggers
from dtrain.logging import NullLogger, build_logger


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_loggers_list_and_the_older_wandb_switch():
    assert active_loggers([], False) == ["jsonl"]  # jsonl always
    assert active_loggers(["csv", "tensorboard", "csv"], False) == ["jsonl", "tensorboard", "csv"]
    assert active_loggers(["csv"], True) == active_loggers(["csv", "wandb"], False) == ["jsonl", "csv", "wandb"]
    assert load_config(None, ["log.loggers=[tensorboard,csv]"]).log.loggers == ["tensorboard", "csv"]
    with pytest.raises(ConfigError, match="log.loggers"):
        load_config(None, ["log.loggers=[tensorbord]"])


def test_csv_header_grows_and_a_resume_keeps_each_step_once(tmp_path):
    log = CsvLogger(tmp_path, 0)
    for step in (1, 2, 3, 4):
        log.log({"step": step, "loss": 1.0 / step, "lr": 0.1})
        if step % 2 == 0:
            log.log({"step": step, "val/loss": 2.0 / step})  # a new column: the file is rewritten wider
    log.log({"step": 4, "event": "early_stop", "best_step": 2})
    log.close()
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "loss", "lr", "val/loss", "event", "best_step"]  # old columns keep their place
    assert [(r["step"], r["loss"], r["val/loss"]) for r in rows[:3]] == [
        ("1", "1.0", ""),
        ("2", "0.5", ""),
        ("2", "", "1.0"),
    ]
    assert rows[-1]["event"] == "early_stop" and rows[-1]["best_step"] == "2"

    # killed while writing a row after the checkpoint of step 2: resumed there, the rows of steps 3-4 and the
    # torn line go, and the steps are logged again once
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("5,0.2")
    said = []
    log = CsvLogger(tmp_path, 2, said.append)
    assert said and "dropped an incomplete last line" in said[0]
    for step in (3, 4):
        log.log({"step": step, "loss": 1.0 / step, "lr": 0.1, "mfu": 0.5})
    log.close()
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0])[-1] == "mfu" and [r["step"] for r in rows if r["loss"]] == ["1", "2", "3", "4"]
    assert len(rows) == 5 and not rows[1]["mfu"] and rows[-1]["mfu"] == "0.5"


def test_tensorboard_scalars_config_text_and_a_resume_purges_what_the_killed_run_logged(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(None, ["log.loggers=[tensorboard]", "log.progress=false"])
    rank0 = dist.DistInfo("none", 0, 0, 1, torch.device("cpu"), "gloo")
    first = build_logger(cfg.log, rank0, tmp_path, None, {"optim": {"lr": 0.5}, "api_key": "s3cret"})
    first.start(0, 20)
    for step in range(1, 11):
        first.metrics({"step": step, "loss": float(step), "lr": 0.1, "mfu": 0.25})
    first.metrics({"step": 10, "val/loss": float("nan")})  # non-finite: not a scalar (JSON null)
    first.close()  # a kill after step 10 loses nothing written: each record is flushed
    # ...by another process, started in this second, whose name (pid 99999999) sorts after this one's: the
    # resumed run's file must still be read last (it waits for the next second)
    import os
    import socket
    import time

    (killed,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    killed.rename(killed.with_name("events.out.tfevents.%010d.%s.99999999.0" % (time.time(), socket.gethostname())))
    t0 = time.monotonic()
    resumed = build_logger(cfg.log, rank0, tmp_path, None, {"optim": {"lr": 0.5}})
    resumed.start(6, 20)  # the checkpoint of step 6
    assert time.monotonic() - t0 < 2.5
    assert max(p.name for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*")).split(".")[-2] == str(
        os.getpid()
    )
    for step in range(7, 13):
        resumed.metrics({"step": step, "loss": step + 0.5, "lr": 0.1, "mfu": 0.25})
    resumed.metrics({"step": 12, "event": "early_stop", "best_step": 9})
    resumed.close()

    got = scalars(tmp_path)
    assert set(got) == {"loss", "lr", "mfu", "early_stop/best_step"}
    assert got["loss"] == [(s, float(s)) for s in range(1, 7)] + [(s, s + 0.5) for s in range(7, 13)]
    assert [s for s, _ in got["lr"]] == list(range(1, 13)) and got["early_stop/best_step"] == [(12, 9.0)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per start

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")]
    assert len(texts) == 2 and "lr: 0.5" in texts[0] and "s3cret" not in texts[0]


def test_other_ranks_write_no_files(tmp_path):
    cfg = load_config(None, ["log.loggers=[tensorboard,csv]"])
    rank1 = dist.DistInfo("torchrun", 1, 1, 2, torch.device("cpu"), "gloo")
    logger = build_logger(cfg.log, rank1, tmp_path, cfg.wandb, cfg.to_dict())
    logger.start(0, 10)
    logger.metrics({"step": 1, "loss": 1.0})
    logger.close()
    assert isinstance(logger, NullLogger) and not any(tmp_path.iterdir())


# ---- the end-of-run summary ---------------------------------------------------------------------------
def test_summary_picks_final_and_best_and_splits_the_wall_time():
    from dtrain.summary import build_summary, table

    records = [
        {"step": 5, "epoch": 0, "loss": 2.0, "lr": 0.1, "samples_per_s": 100.0, "tokens_per_s": 100.0, "mfu": 0.2},
        {"step": 5, "epoch": 0, "val/loss": 1.5, "val/acc": 0.6, "val/best_loss": 1.5},
        {"step": 10, "epoch": 0, "loss": 1.0, "lr": 0.05, "samples_per_s": 300.0, "tokens_per_s": 300.0, "mfu": 0.4},
        {"step": 10, "epoch": 0, "val/loss": 1.7, "val/acc": 0.7, "val/best_loss": 1.5},
        {"step": 10, "event": "early_stop", "best_step": 5},
        {"step": 10, "test/loss": 1.4, "test/weights_step": 5},
    ]
    times = {"total": 10.0, "validation": 2.0, "checkpoint": 1.0, "test": 1.0, "data_wait": 0.5}
    cmd = ["dtrain", "train", "run.name=a b", "run.stop_at_step=10"]
    s = build_summary(records, {"step": 10, "stop_reason": "early_stop"}, 5, times, Path("runs/x/step-5"), cmd)
    assert s["final"] == {
        "loss": {"value": 1.0, "step": 10},
        "lr": {"value": 0.05, "step": 10},
        "val/loss": {"value": 1.7, "step": 10},
        "val/acc": {"value": 0.7, "step": 10},
        "test/loss": {"value": 1.4, "step": 10},
    }
    assert s["best"] == {"step": 5, "val/loss": 1.5, "val/acc": 0.6}
    assert s["wall_time_s"] == {
        "total": 10.0,
        "train": 6.0,
        "validation": 2.0,
        "checkpoint": 1.0,
        "test": 1.0,
        "data_wait": 0.5,
    }
    assert s["throughput"] == {"samples_per_s": 200.0, "mfu": pytest.approx(0.3)}  # medians; tokens = samples
    assert s["evaluate"] == "dtrain eval --checkpoint runs/x/step-5 --split test" and "resume" not in s
    stopped = build_summary(records, {"step": 10, "stop_reason": "stop_at_step"}, 5, times, None, cmd)
    assert stopped["resume"] == "dtrain train 'run.name=a b'" and "evaluate" not in stopped
    assert "10.0 s (this start): train 6.0 s (60%), of it data wait 0.5 s; validation 2.0 s (20%)" in table(s)


def test_stopwatch_counts_a_part_inside_another_once(monkeypatch):
    from dtrain import summary

    now = iter(range(0, 100, 1))  # each clock reading one second later
    monkeypatch.setattr(summary.time, "perf_counter", lambda: float(next(now)))
    clock = summary.Stopwatch()  # 0
    with clock.part("validation"):  # 1 .. 4
        with clock.part("checkpoint"):  # a best checkpoint saved during a validation: 2 .. 3
            pass
    assert clock.times(data_wait=0.5) == {"total": 5.0, "validation": 2.0, "checkpoint": 1.0, "data_wait": 0.5}


def test_summary_of_a_stopped_run_resumes_and_evaluates_with_the_commands_it_gives(tmp_path, data_root):
    import json
    import shlex

    from conftest import result_of, run_dtrain

    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=2",
        "log.progress=false",
        "train.log_every=10",
        "run.name=s",
    ]
    first = run_dtrain(args + ["run.stop_at_step=20"], tmp_path)
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    assert summary["stop_reason"] == "stop_at_step" and summary["final"]["loss"]["step"] == 20
    assert f"resume          {summary['resume']}" in first.stderr and "run.stop_at_step" not in summary["resume"]
    resumed = run_dtrain(shlex.split(summary["resume"])[1:], tmp_path)  # without "dtrain"
    assert result_of(resumed)["stop_reason"] == "completed"
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    assert "resume" not in summary and summary["final"]["test/acc"]["step"] == 38
    assert summary["best"]["step"] == int(summary["checkpoint"].rsplit("-", 1)[1])
    evaluated = run_dtrain(shlex.split(summary["evaluate"])[1:], tmp_path)
    assert f"{summary['final']['test/acc']['value']:.4f}" in evaluated.stdout + evaluated.stderr


def test_summary_of_a_run_without_a_test_split_evaluates_a_split_it_has(tmp_path):
    """Shards with train and val only (a user's own, as often): `evaluate` names val, and it works; it named
    `--split test`, which is one error line (`eval: the run's data has no 'test' split`)."""
    import json
    import shlex

    from conftest import run_dtrain
    from dtrain.data.datasets import digits
    from dtrain.data.shards import write_shards

    splits, meta = digits()
    write_shards(tmp_path / "d", {"train": splits["train"], "val": splits["val"]}, meta, shard_size=500)
    run_dtrain(
        ["train", f"data.dataset=folder:{tmp_path / 'd'}", "train.max_steps=4", "log.progress=false", "run.name=nt"],
        tmp_path,
    )
    summary = json.loads((tmp_path / "runs" / "nt" / "summary.json").read_text())
    assert summary["evaluate"].endswith("--split val"), summary["evaluate"]
    evaluated = run_dtrain(shlex.split(summary["evaluate"])[1:], tmp_path)
    assert "val/acc" in evaluated.stdout, evaluated.stdout


def test_tensorboard_without_its_package_is_one_line_naming_the_extra(tmp_path, data_root, monkeypatch, capsys):
    from dtrain.cli import main

    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"data.root={data_root}", "log.loggers=[tensorboard]", "log.progress=false"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "dtrain: error: config: log.loggers has tensorboard, which needs the tensorboard package; "
        "pip install 'dtrain[tensorboard]'"
    ), last
