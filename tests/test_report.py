"""Reporting: `dtrain plot` (checked on the data it drew), W&B offline runs read back, confusion matrix."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, metrics_of, result_of, run_dtrain, run_ranks, wait_for
from dtrain import dist
from dtrain.callbacks import Callbacks, Reporter
from dtrain.checkpoint import Checkpointer
from dtrain.cli import main
from dtrain.config import ConfigError, load_config
from dtrain.logging import NullLogger, WandbRun, build_logger, redact
from dtrain.optim import Schedule
from dtrain.redaction import secret_values
from dtrain.plot import plot_run
from wandb_records import read_run

SINGLE = dist.DistInfo("single", 0, 0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, data_root):
    """configs/overfit.yaml as shipped: 100 training digits, no regularisation, early stopping."""
    cwd = tmp_path_factory.mktemp("overfit")
    proc = run_dtrain(
        ["train", "--config", str(CONFIGS / "overfit.yaml"), f"data.root={data_root}", "log.progress=false"], cwd
    )
    return cwd / "runs" / "overfit", result_of(proc)


def test_overfit_example_stops_early_after_val_loss_turns_up(overfit_run):
    run_dir, result = overfit_run
    assert result["stop_reason"] == "early_stop"
    records = metrics_of(run_dir)
    val = [r for r in records if "val/loss" in r]
    best = min(val, key=lambda r: r["val/loss"])
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < 0.05 * train[0]  # it memorised the training set ...
    assert val[-1]["val/loss"] > best["val/loss"]  # ... while the validation loss went back up


def test_plot_run_draws_the_logged_series_with_best_and_early_stop(overfit_run, tmp_path, capsys):
    run_dir, result = overfit_run
    records = metrics_of(run_dir)
    drawn = plot_run(run_dir, tmp_path / "plots")
    series = drawn["series"]
    for key in ("loss", "val/loss", "val/acc", "lr"):
        rows = [r for r in records if key in r and "test/loss" not in r]
        assert series[key]["step"] == [r["step"] for r in rows] and series[key]["value"] == [r[key] for r in rows]
    test_record = next(r for r in records if "test/weights_step" in r)
    assert drawn["best_step"] == test_record["test/weights_step"]  # the checkpoint the test split used
    assert drawn["best_val_loss"] == min(series["val/loss"]["value"])
    assert drawn["early_stop_step"] == result["step"] == next(r["step"] for r in records if r.get("event"))
    schedule = Schedule("constant", 600, warmup_steps=10)  # 300 epochs x 2 steps
    assert series["lr"]["value"] == pytest.approx([0.003 * schedule(s) for s in series["lr"]["step"]])
    assert json.loads((tmp_path / "plots" / "series.json").read_text())["best_step"] == drawn["best_step"]
    import matplotlib.image

    for name in ("loss", "metrics", "lr"):
        pixels = matplotlib.image.imread(tmp_path / "plots" / f"{name}.png")[..., :3]
        assert pixels.var() > 0.005, name  # curves, not an empty canvas
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"best checkpoint at step {drawn['best_step']}, early stop at step {result['step']}" in printed
    assert (run_dir / "plots" / "loss.png").is_file()


def test_plot_of_a_missing_run_is_one_line(tmp_path):
    proc = run_dtrain(["plot", "runs/nothing"], tmp_path, check=False)
    assert proc.returncode == 2 and "dtrain: error: plot: runs/nothing/metrics.jsonl does not exist" in proc.stderr


def test_eval_prints_a_confusion_matrix(overfit_run):
    run_dir, _ = overfit_run
    proc = run_dtrain(["eval", "--checkpoint", str(run_dir), "--split", "test"], run_dir)
    acc = float(re.search(r"test/acc\s+([0-9.]+)", proc.stdout).group(1))
    lines = proc.stdout.split("confusion matrix (rows: true class, columns: predicted)\n")[1].splitlines()
    cm = np.array([[int(v) for v in line.split()[1:]] for line in lines[1:11]])
    assert cm.shape == (10, 10) and cm.sum() == 271  # every test sample once
    assert np.trace(cm) / cm.sum() == pytest.approx(acc, abs=1e-5)


# a tiny run of each task kind; `indexed`: digits shards under a descriptor of `dtrain index` (no task, no class
# count: classification with the classes unknown, as shards of one's own are)
KINDS = {
    "classification": ["data.dataset=digits"],
    "regression": ["data.dataset=count", "data.count_samples=120"],
    "lm": [
        "data.dataset=text",
        "data.text_context=16",
        "data.text_bytes=4000",
        "model.factory=gpt",
        "model.kwargs={n_layer: 1, n_head: 1, n_embd: 8}",
    ],
    "indexed": [
        "data.train=train.json",
        "data.val=val.json",
        "data.test=test.json",
        "data.sample={x: x.npy, y: y.cls}",
        "data.collate=matrix_script:digits_collate",
        "model.kwargs={num_outputs: 10}",
    ],
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_commands_the_summary_prints_run_as_printed(tmp_path, data_root, kind):
    """#32.10: the summary's evaluate command printed the metrics, then crashed (exit 1) in the confusion
    matrix where the class count is unknown. A run stopped early is resumed by its `resume` command, then
    evaluated by its `evaluate` command, each run exactly as printed."""
    import shlex
    import shutil

    if kind == "indexed":
        for split in ("train", "val", "test"):
            run_dtrain(
                ["index", *map(str, sorted((data_root / "digits").glob(f"{split}-*.tar"))), "--out", f"{split}.json"],
                tmp_path,
            )
    elif kind != "classification":
        shutil.copytree(data_root, tmp_path / "data")  # the other built-in data sets are made beside digits
    root = data_root if kind in ("classification", "indexed") else tmp_path / "data"
    train = [
        "train",
        f"data.root={root}",
        *KINDS[kind],
        "data.batch_size=16",
        "data.train_subset=64",
        "train.epochs=1",
        "run.doctor=false",
        "log.progress=false",
        "run.name=r",
    ]
    usercode = {"PYTHONPATH": str(Path(__file__).parent / "usercode")}  # the indexed run's collate
    first = run_dtrain([*train, "run.stop_at_step=2"], tmp_path, env=usercode)
    assert result_of(first)["stop_reason"] == "stop_at_step"
    summary = tmp_path / "runs" / "r" / "summary.json"
    resume = shlex.split(json.loads(summary.read_text())["resume"])
    assert resume[:2] == ["dtrain", "train"], resume
    assert result_of(run_dtrain(resume[1:], tmp_path, env=usercode))["stop_reason"] == "completed"
    evaluate = shlex.split(json.loads(summary.read_text())["evaluate"])
    assert evaluate[:2] == ["dtrain", "eval"], evaluate
    assert ("data.collate=matrix_script:digits_collate" in evaluate) == (kind == "indexed")  # the run's own code
    proc = run_dtrain(evaluate[1:], tmp_path, env=usercode)
    assert "test/loss" in proc.stdout
    assert ("confusion matrix" in proc.stdout) == (kind == "classification")  # only where the classes are known


def test_export_writes_a_regular_file_and_nothing_else(tmp_path, data_root):
    """#32: `export --out` replaced whatever was at the path: a device (as root, /dev/full became the file), a
    file of the checkpoint it was reading (which then read as truncated: resume fell back a step); a directory
    was an IsADirectoryError. Now a regular file, written atomically, or one line."""
    import os

    from dtrain.checkpoint import verify

    run_dtrain(
        [
            "train",
            f"data.root={data_root}",
            "train.max_steps=2",
            "data.train_subset=64",
            "run.doctor=false",
            "log.progress=false",
            "run.name=d",
        ],
        tmp_path,
    )
    step = (tmp_path / "runs" / "d" / "checkpoints" / "latest").resolve()
    state = (step / "state.pt").read_bytes()
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(step / "state.pt")
    run_dtrain(["export", "--checkpoint", "runs/d", "--out", "m.pt"], tmp_path)
    refused = {
        "adir": "is a directory",
        "fifo": "is not a regular file",
        "link": "is a symbolic link",
        str(step / "state.pt"): "is inside a checkpoint directory",
        str(step / "fsdp" / "m.pt"): "is inside a checkpoint directory",
    }
    for out, why in refused.items():
        proc = run_dtrain(["export", "--checkpoint", "runs/d", "--out", out], tmp_path, check=False)
        said = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
        assert proc.returncode == 2 and said == [
            f"dtrain: error: export: --out {out} {why}; give the path of a new "
            "or regular file outside the run's checkpoints"
        ], proc.stderr[-2000:]
    proc = run_dtrain(["export", "--checkpoint", "m.pt", "--out", "m.pt"], tmp_path, check=False)
    assert proc.returncode == 2 and "export: --out m.pt is the file being exported" in proc.stderr
    verify(step)  # the checkpoint read is whole, nothing added to it
    assert not (step / "fsdp").exists()
    assert (step / "state.pt").read_bytes() == state and (tmp_path / "fifo").is_fifo() and (tmp_path / "adir").is_dir()
    run_dtrain(["export", "--checkpoint", "runs/d", "--out", "m.pt"], tmp_path)  # over a regular file: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "fifo", "link", "m.pt", "runs"]  # no temporary left
    assert (os.stat(tmp_path / "m.pt").st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_index_of_one_shard_says_one_shard(tmp_path, data_root):
    shard = sorted((data_root / "digits").glob("test-*.tar"))[0]
    proc = run_dtrain(["index", str(shard), "--out", "one.json"], tmp_path)
    assert re.fullmatch(r"1 shard, \d+ samples: wrote one.json", proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_wandb_offline_run_resumes_with_the_same_id_and_never_records_secrets(tmp_path, data_root):
    pytest.importorskip("wandb")
    secret, token = "fake0123456789abcdef0123456789abcdef0123", "another-fake-token-7b1e9d"
    env = {"WANDB_API_KEY": secret, "HF_TOKEN": token}
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=2",
        "wandb.enabled=true",
        "wandb.project=tests",
        "run.name=wb",
        "log.progress=false",
        "train.log_every=10",
    ]
    first = run_ranks(1, args + ["run.stop_at_step=20"], tmp_path, env=env, launcher="single")
    assert "wandb: started run" in first.stderr
    second = run_ranks(1, args, tmp_path, env=env, launcher="single")
    run_dir = tmp_path / "runs" / "wb"
    run_id = torch.load(run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)["logger"]["wandb_run_id"]
    assert f"wandb: resumed run {run_id}" in second.stderr
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    before, after = read_run(files[0]), read_run(files[1])
    assert before["id"] == after["id"] == run_id and before["project"] == "tests"
    assert before["config"]["optim"]["lr"] == 0.003 and before["config"]["run"]["name"] == "wb"

    def keys(run):
        return set().union(*(row.keys() for row in run["history"]))

    assert {"loss", "lr", "samples_per_s", "val/loss", "val/acc"} <= keys(before)
    assert {"loss", "val/loss", "test/acc"} <= keys(after)
    assert max(r["_step"] for r in before["history"]) <= 20 < min(r["_step"] for r in after["history"])
    for path in tmp_path.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert secret.encode() not in blob and token.encode() not in blob, path


def test_only_rank_zero_logs_and_secrets_are_redacted(tmp_path):
    cfg = load_config(None, ["wandb.enabled=true"])
    import torch as _torch

    rank1 = dist.DistInfo("torchrun", 1, 1, 2, _torch.device("cpu"), "gloo")
    logger = build_logger(cfg.log, rank1, tmp_path, cfg.wandb, cfg.to_dict())
    assert isinstance(logger, NullLogger)
    logger.start(0, 10)
    logger.metrics({"step": 1, "loss": 1.0})
    assert logger.wandb is None and not any(tmp_path.iterdir())
    assert redact({"a": {"api_key": "x", "hf_token": "y", "lr": 1}, "b": [{"password": "z"}]}) == {
        "a": {"api_key": "<redacted>", "hf_token": "<redacted>", "lr": 1},
        "b": [{"password": "<redacted>"}],
    }


def test_redaction_keeps_every_hyperparameter_and_catches_secrets_by_key_and_by_value(tmp_path):
    env = {
        "WANDB_API_KEY": "fake0123456789abcdef",
        "HF_TOKEN": "hf_fakeFAKEfake123",
        "MY_SERVICE_PASSWORD": "hunter2!x",
        "AWS_SECRET_ACCESS_KEY": "aws/fake+secret=42",
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path),
        "TOKENIZERS_PARALLELISM": "false",
        "SHORT_TOKEN": "abc",
        "HOME": "/home/someone-long-enough",
    }
    secrets = secret_values(env)
    assert secrets == {"fake0123456789abcdef", "hf_fakeFAKEfake123", "hunter2!x", "aws/fake+secret=42"}
    # hyperparameters whose names contain token, key, secret...: kept as they are (W&B showed pad_token_id
    # as "<redacted>" while config.yaml kept 0)
    hyper = {
        "model": {
            "kwargs": {
                "config": {
                    "_target_": "transformers:BertConfig",
                    "pad_token_id": 0,
                    "max_tokens": 512,
                    "tokenizer": "bytes",
                    "num_keys": 4,
                    "secret_sharing_rounds": 3,
                    "key_dim": [64, 64],
                }
            }
        },
        "run": {"dir": str(tmp_path), "name": "a-token-run"},
        "data": {"sample": {"x": "txt", "y": "cls"}},
    }
    assert redact(hyper, secrets) == hyper
    # secrets: by exact key name (any value), and by value under any key, inside longer strings too
    planted = {
        "model": {"kwargs": {"token": "anything", "API-Key": 3, "hf_token": None, "tokenizer": "bytes"}},
        "data": {
            "train": "pipe:curl -H 'Authorization: Bearer hf_fakeFAKEfake123' https://x/a.tar",
            "val": ["ok.json", "s3://bucket/x?sig=aws/fake+secret=42"],
        },
        "run": {"name": "fake0123456789abcdef"},
        "b": [{"password": "z"}],
    }
    assert redact(planted, secrets) == {
        "model": {
            "kwargs": {"token": "<redacted>", "API-Key": "<redacted>", "hf_token": "<redacted>", "tokenizer": "bytes"}
        },
        "data": {"train": "<redacted>", "val": ["ok.json", "<redacted>"]},
        "run": {"name": "<redacted>"},
        "b": [{"password": "<redacted>"}],
    }


def test_checkpoints_as_wandb_artifacts_read_back_from_the_offline_run(tmp_path, data_root):
    """wandb.log_checkpoints: each published checkpoint (its manifest written: complete, checksummed) as a
    version of `checkpoint-<run id>` with aliases latest / best; by reference, file:// URIs and no copy."""
    pytest.importorskip("wandb")
    args = [
        "train",
        f"data.root={data_root}",
        "train.max_steps=6",
        "train.val_every=2",
        "checkpoint.every=3",
        "wandb.enabled=true",
        "log.progress=false",
    ]
    run_ranks(1, args + ["run.name=all", "wandb.log_checkpoints=all"], tmp_path, launcher="single")
    run_dir = tmp_path / "runs" / "all"
    run = read_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    logged = {a["metadata"]["step"]: a for a in run["artifacts"]}
    assert {a["name"] for a in run["artifacts"]} == {f"checkpoint-{run['id']}"} and set(logged) == {2, 3, 4, 6}
    assert all("latest" in a["aliases"] and a["type"] == "model" for a in logged.values())
    assert ["best" in logged[s]["aliases"] for s in (2, 3, 4, 6)] == [
        logged[s]["metadata"]["best"] for s in (2, 3, 4, 6)
    ]
    final = json.loads((run_dir / "checkpoints" / "latest" / "manifest.json").read_text())
    assert set(logged[6]["files"]) == {f"step-00000006/{n}" for n in [*final["files"], "manifest.json"]}

    run_ranks(
        1,
        args + ["run.name=ref", "wandb.log_checkpoints=best", "wandb.checkpoint_references=true"],
        tmp_path,
        launcher="single",
    )
    run_dir = tmp_path / "runs" / "ref"
    run = read_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    assert run["artifacts"] and all("best" in a["aliases"] for a in run["artifacts"])  # W&B adds `latest` itself
    best = (run_dir / "checkpoints" / "best").resolve()
    assert any(ref == (best / "state.pt").as_uri() for a in run["artifacts"] for ref in a["files"].values())


def test_checkpoint_artifact_as_an_s3_reference_records_the_uri_and_reads_nothing(tmp_path, monkeypatch):
    """wandb.checkpoint_references=s3://...: the step directory's URI under the prefix, unchecksummed. W&B's S3
    handler imports boto3 and builds a client even then, but no request may leave: nothing is listed or read."""
    pytest.importorskip("wandb")
    pytest.importorskip("boto3")
    import botocore.httpsession

    sent = []

    def no_network(session, request):
        sent.append(request.url)
        raise AssertionError(f"a request to {request.url}")

    monkeypatch.setattr(botocore.httpsession.URLLib3Session, "send", no_network)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # no credentials at log time
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    # without credentials boto3 would ask the EC2 instance metadata service for some while building the client
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = load_config(
        None,
        [
            "wandb.enabled=true",
            "wandb.log_checkpoints=all",
            "wandb.checkpoint_references=s3://bucket/runs/r/checkpoints/",
        ],
    )
    run = WandbRun(cfg.wandb, tmp_path, {"run": {"name": "r"}}, None)
    checkpointer = Checkpointer(
        tmp_path / "checkpoints",
        2,
        SINGLE,
        "h",  # as the trainer wires it: a callback
        callbacks=Callbacks([Reporter(run.log_checkpoint, print)]),
    )
    checkpointer.save(3, {"w": torch.zeros(4)}, {}, best=True)
    run.close()
    # in this process W&B's service outlives the run, and may write the run's file after finish returns (once,
    # under load, the file had no artifact record yet): read it until it has the one logged
    [artifact] = wait_for(
        lambda: read_run(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))["artifacts"],
        timeout=60,
        interval=0.2,
        what="the artifact's record in the offline run file",
    )
    assert artifact["files"] == {"step-00000003": "s3://bucket/runs/r/checkpoints/step-00000003"} and sent == []
    assert {"step-3", "latest", "best"} <= set(artifact["aliases"]) and artifact["metadata"]["step"] == 3


def test_s3_references_without_boto3_are_one_line_at_start(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed
    cfg = load_config(
        None, ["wandb.enabled=true", "wandb.log_checkpoints=best", "wandb.checkpoint_references=s3://b/c"]
    )
    with pytest.raises(ConfigError, match=r"s3://b/c needs the boto3 package .*pip install 'wandb\[aws\]'$"):
        WandbRun(cfg.wandb, tmp_path, {}, None)
    assert not (tmp_path / "wandb").exists()  # refused before the run started
