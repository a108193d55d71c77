"""No secret leaves the machine (#33): secrets planted in the environment, in a config file and in overrides
appear in no byte of any file a run writes or hands to W&B (config.yaml, summary.json, metrics, TensorBoard,
CSV, checkpoints, an exported model, W&B's run files and its artifact staging), nor in what it prints; a
resume still tells an unchanged secret from a changed one (a keyed hash in place of the value).
The rules themselves (which keys and values are secrets) are tested in test_report.py."""

import json
import os
import shlex
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, result_of, run_dtrain, run_ranks
from dtrain import redaction
from dtrain.config import Config, load_config
from dtrain.resume import config_changes
from dtrain.summary import _without_secrets, build_summary

USERCODE = REPO / "tests" / "usercode"


def _fake(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _search(root: Path, secrets: dict[str, str]) -> list[str]:
    """'name in path' for every secret found in every byte of every file under root."""
    return [
        f"{name} in {path}"
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
        for name, value in secrets.items()
        if value.encode() in path.read_bytes()
    ]


def test_no_secret_reaches_any_file_or_wandb_and_resume_tells_a_changed_one(tmp_path, data_root):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    env_secrets = {"WANDB_API_KEY": _fake("wandb"), "HF_TOKEN": _fake("hf")}
    in_file, in_override, rotated = _fake("file-key"), _fake("override-token"), _fake("rotated-token")
    secrets = {**env_secrets, "in_file": in_file, "in_override": in_override, "rotated": rotated}
    (tmp_path / "keyed.yaml").write_text(
        yaml.safe_dump(
            {"model": {"factory": "keyed:build", "kwargs": {"api_key": in_file, "token": "set below", "width": 8}}}
        )
    )
    env = {
        **env_secrets,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(USERCODE)]),
        # W&B's own directories (artifact staging, cache, settings) inside what is searched
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb-artifacts"),
    }
    # the HF token pasted into a URL under a key that is no secret's name: caught by its value
    endpoint = f"https://hub.example/models?auth={env_secrets['HF_TOKEN']}"
    args = [
        "train",
        "--config",
        "keyed.yaml",
        f"data.root={data_root}",
        "train.max_steps=6",
        "train.val_every=2",
        "checkpoint.every=2",
        "log.progress=false",
        "run.name=s",
        "log.loggers=[jsonl,tensorboard,csv]",
        "wandb.enabled=true",
        "wandb.mode=offline",
        "wandb.log_checkpoints=all",
        f"model.kwargs.endpoint={endpoint}",
    ]
    first = run_ranks(
        1, args + [f"model.kwargs.token={in_override}", "run.stop_at_step=2"], tmp_path, env=env, launcher="single"
    )
    # the same secrets again: nothing changed
    same = run_ranks(
        1, args + [f"model.kwargs.token={in_override}", "run.stop_at_step=4"], tmp_path, env=env, launcher="single"
    )
    assert "changed since the checkpoint" in same.stderr  # run.stop_at_step
    assert not [line for line in same.stderr.splitlines() if "changed since" in line and "model.kwargs" in line]
    # a rotated token: said, neither value shown, and the run goes on (a credential shapes no weights)
    changed = run_ranks(1, args + [f"model.kwargs.token={rotated}"], tmp_path, env=env, launcher="single")
    assert "resume: model.kwargs.token changed since the checkpoint: <redacted> -> <redacted>" in changed.stderr
    assert [line for line in changed.stderr.splitlines() if "changed since" in line and "model.kwargs" in line] == [
        "resume: model.kwargs.token changed since the checkpoint: <redacted> -> <redacted>"
    ]
    assert result_of(changed)["stop_reason"] == "completed"
    run_dir = tmp_path / "runs" / "s"
    run_dtrain(["export", "--checkpoint", str(run_dir), "--out", str(run_dir / "exported.pt")], tmp_path, env=env)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and "resume" not in summary  # finished: the resume line was the earlier starts'
    # the evaluate command names each secret the checkpoint holds sealed, to be given again: so given, it runs
    given = {"model.kwargs.api_key": in_file, "model.kwargs.token": rotated, "model.kwargs.endpoint": endpoint}
    evaluate = shlex.split(summary["evaluate"])
    assert {f"{key}=<redacted>" for key in given} <= set(evaluate), evaluate
    assert summary["commands_note"] == "give the secrets shown as <redacted> again"
    evaluate = [f"{a.split('=')[0]}={given[a.split('=')[0]]}" if a.endswith("=<redacted>") else a for a in evaluate]
    assert "test/acc" in run_dtrain(evaluate[1:], tmp_path, env=env).stdout
    assert "'model.kwargs.token=<redacted>'" in first.stderr  # the first start's resume command, a placeholder
    stored = torch.load(run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)["config"]
    assert all(redaction.is_sealed(stored["model"]["kwargs"][k]) for k in ("api_key", "token", "endpoint"))
    assert stored["model"]["kwargs"]["width"] == 8 and stored["run"]["name"] == "s"
    for proc in (first, same, changed):
        assert not [name for name, value in secrets.items() if value in proc.stdout + proc.stderr]
    files = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert {"runs", "wandb-data"} <= files, files  # the run's files, W&B's artifact staging
    assert {
        "config.yaml",
        "summary.json",
        "metrics.jsonl",
        "metrics.csv",
        "tensorboard",
        "checkpoints",
        "wandb",
        "exported.pt",
    } <= {p.name for p in run_dir.iterdir()}
    assert _search(tmp_path, secrets) == [f"in_file in {tmp_path / 'keyed.yaml'}"]  # the user's own file alone


def test_a_sealed_secret_compares_by_its_keyed_hash_and_validates_where_the_value_did():
    kwargs = "width: 8, token: null, use_auth_token: true"  # null and true: no secret, kept as they are
    cfg = load_config(None, [f"model.kwargs={{api_key: correct-horse-battery, {kwargs}}}"])
    sealed = redaction.redact(cfg.to_dict(), set(), keyed=True)
    value = sealed["model"]["kwargs"]["api_key"]
    assert sealed["model"]["kwargs"]["token"] is None and sealed["model"]["kwargs"]["use_auth_token"] is True
    assert redaction.is_sealed(value) and "correct-horse-battery" not in value
    assert sealed["model"]["kwargs"]["width"] == 8
    assert Config.from_saved(sealed).model.kwargs["api_key"] == value  # a checkpoint's config still loads
    # a secret by its value, in settings of their own types: still a valid config once sealed
    token = "hf_" + uuid.uuid4().hex
    pasted = load_config(
        None,
        [
            f"data.train=https://hub.example/{{000..009}}.tar?auth={token}",
            f"data.root=/mnt/{token}",
            f"wandb.entity=team-{token}",
            f"wandb.tags=[a, {token}]",
        ],
    )
    stored = redaction.redact(pasted.to_dict(), {token}, keyed=True)
    assert token not in json.dumps(stored) and Config.from_saved(stored).data.root == stored["data"]["root"]
    assert config_changes(sealed, cfg) == []
    other = load_config(None, [f"model.kwargs={{api_key: correct-horse-staple, {kwargs}}}"])
    assert [(c.key, c.old, c.new) for c in config_changes(sealed, other)] == [
        ("model.kwargs.api_key", "<redacted>", "<redacted>")
    ]
    # a fresh salt per process: the same secret sealed elsewhere gives another string, equal by its hash
    resealed = redaction.seal("correct-horse-battery", salt="00" * 8)
    assert resealed != value and redaction.same_secret(resealed, "correct-horse-battery")
    assert not redaction.same_secret(resealed, "correct-horse-staple")


def test_printed_commands_hold_no_secret(monkeypatch):
    token = "hf_" + uuid.uuid4().hex
    monkeypatch.setenv("HF_TOKEN", token)
    command = [
        "dtrain",
        "train",
        "--config",
        "c.yaml",
        "model.kwargs.api_key=hunter2-long",
        "optim.lr=0.1",
        f"data.train=https://x/{{000..009}}.tar?auth={token}",
        "model.kwargs={token: abc12345, width: 8}",
    ]
    summary = build_summary([], {"step": 3, "stop_reason": "signal:SIGTERM"}, None, {"total": 1.0}, None, command)
    resume = summary["resume"]
    assert "hunter2-long" not in resume and token not in resume and "abc12345" not in resume
    assert "'model.kwargs.api_key=<redacted>'" in resume and "optim.lr=0.1" in resume
    assert "'model.kwargs={token: <redacted>, width: 8}'" in resume
    assert summary["commands_note"] == "give the secrets shown as <redacted> again"
    # the evaluate command repeats overrides too (those naming the run's code)
    evaluate = _without_secrets(
        {
            "evaluate": shlex.join(
                [
                    "dtrain",
                    "eval",
                    "--checkpoint",
                    "c",
                    "model.kwargs=" + json.dumps({"_target_": "m:C", "hf_token": "abc12345"}),
                ]
            )
        }
    )
    assert "abc12345" not in evaluate["evaluate"] and "hf_token: <redacted>" in evaluate["evaluate"]


def test_doctor_names_a_secret_that_differs_between_ranks_without_its_values(tmp_path, data_root, monkeypatch):
    from dtrain import dist, doctor

    cfg = load_config(None, [f"data.root={data_root}", "model.kwargs={hidden: 16, api_key: rank0-secret-value}"])
    gather = doctor._gather

    def two_ranks(me):  # rank 1 was started with another key
        (rank0,) = gather(me)
        model = {**rank0["config"]["model"], "kwargs": {"hidden": 16, "api_key": "rank1-secret-value"}}
        return [rank0, {**rank0, "config": {**rank0["config"], "model": model}}]

    monkeypatch.setattr(doctor, "_gather", two_ranks)
    single = dist.DistInfo("single", 0, 0, 1, torch.device("cpu"), None)
    check = next(c for c in doctor.run(cfg, single, tmp_path, brief=True) if c.name == "config")
    assert not check.ok and check.detail == "rank 1 has model.kwargs.api_key=<redacted>, rank 0 has <redacted>"


def test_a_sealed_secret_fed_back_is_one_line_naming_the_setting(tmp_path, data_root):
    """A run's config.yaml given as --config, or `dtrain eval` of its checkpoint without the secret given
    again: the factory would get the sealed string in its place (keyed.build raised ValueError, a traceback)."""
    key = _fake("file-key")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(USERCODE)])}
    common = [f"data.root={data_root}", "log.progress=false", "run.doctor=false"]
    run_dtrain(
        [
            "train",
            "model.factory=keyed:build",
            f"model.kwargs.api_key={key}",
            "model.kwargs.token=t0k3n-value",
            "train.max_steps=2",
            "run.name=k",
            *common,
        ],
        tmp_path,
        env=env,
    )
    stored = tmp_path / "runs" / "k" / "config.yaml"
    assert redaction.is_sealed(yaml.safe_load(stored.read_text())["model"]["kwargs"]["api_key"])
    for args in (
        ["train", "--config", str(stored), "run.name=k2", *common],
        ["eval", "--checkpoint", "runs/k", "--trust-checkpoint-code"],
    ):
        proc = run_dtrain(args, tmp_path, env=env, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert (
            proc.stderr.strip()
            .splitlines()[-1]
            .startswith("dtrain: error: config: model.kwargs.api_key holds a sealed secret")
        ), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    # a setting that builds nothing (W&B's entity holding an environment secret) needs no giving back
    from dtrain.build import _refuse_sealed
    from dtrain.config import ConfigError

    _refuse_sealed(load_config(None, [], {"wandb.entity": redaction.seal("team-secret-value")}))
    with pytest.raises(ConfigError, match=r"^config: model.kwargs.api_key holds a sealed secret"):
        _refuse_sealed(load_config(None, [], {"model.kwargs": {"api_key": redaction.seal("k")}}))
    given = run_dtrain(
        [
            "eval",
            "--checkpoint",
            "runs/k",
            "--trust-checkpoint-code",
            f"model.kwargs.api_key={key}",
            "model.kwargs.token=t0k3n-value",
        ],
        tmp_path,
        env=env,
    )
    assert "test/" in given.stdout or "val/" in given.stdout
