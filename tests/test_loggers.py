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
    assert [(r["step"], r["loss"], r["val/loss"]) for r in rows[:3]] == [("1", "1.0", ""), ("2", "0.5", ""),
                                                                         ("2", "", "1.0")]
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
    first = build_logger(cfg.log, rank0, tmp_path, 20, None, {"optim": {"lr": 0.5}, "api_key": "s3cret"})
    first.start(0)
    for step in range(1, 11):
        first.metrics({"step": step, "loss": float(step), "lr": 0.1, "mfu": 0.25})
    first.metrics({"step": 10, "val/loss": float("nan")})  # non-finite: not a scalar (JSON null)
    first.close()  # a kill after step 10 loses nothing written: each record is flushed
    resumed = build_logger(cfg.log, rank0, tmp_path, 20, None, {"optim": {"lr": 0.5}})
    resumed.start(6)  # the checkpoint of step 6
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
    logger = build_logger(cfg.log, rank1, tmp_path, 10, cfg.wandb, cfg.to_dict())
    logger.start(0)
    logger.metrics({"step": 1, "loss": 1.0})
    logger.close()
    assert isinstance(logger, NullLogger) and not any(tmp_path.iterdir())
