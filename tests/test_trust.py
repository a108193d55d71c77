"""A checkpoint, an exported file and a resumed run's checkpoint are data: the code named in their stored
config runs only where the user names it too, or opts in with --trust-checkpoint-code (docs/security.md)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import result_of, run_dtrain
from dtrain.checkpoint import MANIFEST, CheckpointError, _sha256
from dtrain.config import Config, ConfigError, DataConfig, _leaf_fields, load_config
from dtrain.importing import resolve
from dtrain.trust import IMPORT_STRINGS, PERMISSIONS, SHARD_SOURCES, TRUST_FLAG, check_stored, naming

TINY = ["train.max_steps=4", "data.train_subset=128", "log.progress=false", "run.doctor=false"]


def noting_mlp(input_shape, num_outputs, note: str, **kwargs):
    """A harmless factory of this test module: says it ran (writes `note`), then builds dtrain's mlp."""
    from dtrain.models import mlp

    Path(note).write_text("ran")
    return mlp(input_shape, num_outputs, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A tiny digits run (its latest step directory) and its exported file."""
    cwd = tmp_path_factory.mktemp("trusted")
    run_dtrain(["train", f"data.root={data_root}", *TINY, "run.name=d"], cwd)
    run_dtrain(["export", "--checkpoint", "runs/d", "--out", "model.pt"], cwd)
    return cwd / "runs" / "d", cwd / "model.pt"


def with_config(config: dict, **model) -> dict:
    return {**config, "model": {**config["model"], **model}}


def evil_file(exported: Path, out: Path, **model) -> Path:
    state = torch.load(exported, weights_only=True)
    torch.save({**state, "config": with_config(state["config"], **model)}, out)
    return out


def evil_run(run_dir: Path, out: Path, **model) -> Path:
    """A copy of the run whose latest checkpoint's stored config is changed, its manifest re-hashed as
    dtrain's own checkpoint code hashes it: a checkpoint that verifies."""
    shutil.copytree(run_dir, out, symlinks=True)
    step = (out / "checkpoints" / "latest").resolve()
    (out / "checkpoints" / "best").unlink(missing_ok=True)
    state = torch.load(step / "state.pt", weights_only=True)
    torch.save({**state, "config": with_config(state["config"], **model)}, step / "state.pt")
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"]["state.pt"] = {"sha256": _sha256(step / "state.pt"), "bytes": (step / "state.pt").stat().st_size}
    (step / MANIFEST).write_text(json.dumps(manifest))
    return out


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]


def test_eval_refuses_the_code_an_exported_file_or_a_step_directory_names(run, tmp_path):
    """#33.1: factory os:system with a command in model.kwargs ran the command under `dtrain eval`."""
    run_dir, exported = run
    marker = tmp_path / "pwned"
    evil = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
    for target in (evil_file(exported, tmp_path / "evil.pt", **evil), evil_run(run_dir, tmp_path / "evil", **evil)):
        proc = run_dtrain(["eval", "--checkpoint", str(target)], tmp_path, check=False)
        assert proc.returncode == 2 and len(errors(proc)) == 1, proc.stderr[-2000:]
        assert "asks to run model.factory=os:system" in errors(proc)[0] and TRUST_FLAG in errors(proc)[0]
        assert not marker.exists()
    # export rebuilds nothing (it copies the weights and the stored config as data): it imports nothing and
    # the file it writes is refused by eval in turn
    out = tmp_path / "again.pt"
    run_dtrain(["export", "--checkpoint", str(tmp_path / "evil"), "--out", str(out)], tmp_path)
    assert not marker.exists()
    proc = run_dtrain(["eval", "--checkpoint", str(out)], tmp_path, check=False)
    assert proc.returncode == 2 and "asks to run model.factory=os:system" in errors(proc)[0]


def test_stored_code_runs_when_the_user_names_it_or_trusts_the_file(run, tmp_path):
    run_dir, exported = run
    note = tmp_path / "ran"
    stored = {"factory": "test_trust:noting_mlp", "kwargs": {"note": str(note)}}
    for target in (
        evil_file(exported, tmp_path / "other.pt", **stored),
        evil_run(run_dir, tmp_path / "other", **stored),
    ):
        proc = run_dtrain(["eval", "--checkpoint", str(target)], tmp_path, check=False)
        assert proc.returncode == 2 and "asks to run model.factory=test_trust:noting_mlp" in errors(proc)[0]
        assert not note.exists()
        (tmp_path / "mine.yaml").write_text("model:\n  factory: test_trust:noting_mlp\n")
        for allow in ([TRUST_FLAG], ["model.factory=test_trust:noting_mlp"], ["--config", str(tmp_path / "mine.yaml")]):
            proc = run_dtrain(["eval", "--checkpoint", str(target), *allow], tmp_path)
            assert "test/acc" in proc.stdout and note.read_text() == "ran", allow
            note.unlink()


def test_eval_overrides_apply_over_the_stored_config(run, tmp_path, data_root):
    """#34.7: eval takes key=value overrides (and --config) over the checkpoint's config, as train does."""
    run_dir, _ = run
    val = run_dtrain(["eval", "--checkpoint", str(run_dir), "--split", "val"], tmp_path).stdout
    shards = data_root / "digits"
    proc = run_dtrain(
        [
            "eval",
            "--checkpoint",
            str(run_dir),
            f"data.train={shards}/train.json",
            f"data.val={shards}/val.json",
            f"data.test={shards}/val.json",
        ],
        tmp_path,
    )
    assert proc.stdout.splitlines()[1:3] == val.replace("val/", "test/").splitlines()[1:3]  # loss, acc


def test_every_code_setting_of_a_stored_config_is_checked():
    """Import strings of every kind, `_target_` anywhere, dtrain's own modules, pipe: shards and the
    permission for descriptors' pipe: URLs; the built-in factory aliases and a script's callables pass."""
    user = Config()
    cases = {
        "model.factory": "dtrain.cli:main",
        "model.forward": "os:system",
        "loss.fn": "os:system",
        "metrics.fn": "os:system",
        "data.sample": "os:system",
        "data.transform": "os:system",
        "data.collate": "os:system",
        "model.kwargs": {"block": [{"_target_": "os:system"}]},
        "metrics.torchmetrics": {"f1": {"_target_": "os:system"}},
        "loss.kwargs": {"x": {"_target_": "os:system"}},
        "data.test": ["a.tar", "pipe:touch /tmp/x"],
        "data.counts": "pipe:cat x.json",
        "data.trust_descriptor_pipes": True,
    }
    for key, value in cases.items():
        cfg = load_config(None, [], {key: value})
        with pytest.raises(CheckpointError, match=r"^checkpoint: model.pt asks to run ") as e:
            check_stored(cfg, user, "model.pt", trusted=False)
        assert str(e.value).startswith(f"checkpoint: model.pt asks to run {key}"), key
        check_stored(cfg, cfg, "model.pt", trusted=False)  # the user names the same
        check_stored(cfg, user, "model.pt", trusted=True)
    check_stored(
        load_config(None, [], {"data.test": "pipe:cat x"}), user, "model.pt", trusted=False, reads_data=False
    )  # a command that reads no data
    for safe in (
        {"model.factory": "gpt"},
        {"model.factory": "cnn"},
        {"loss.fn": "__main__:loss"},
        {"data.sample": {"x": "npy", "y": "cls"}},
        {"data.test": "shards/test-{0..3}.tar"},
    ):
        check_stored(load_config(None, [], safe), user, "model.pt", trusted=False)
    several = load_config(
        None, [], {"model.factory": "os:system", "loss.fn": "a:b", "model.kwargs": {"c": {"_target_": "x:y"}}}
    )
    with pytest.raises(CheckpointError, match=r"model.factory=os:system \(and loss.fn, model.kwargs.c._target_\), "):
        check_stored(several, user, "model.pt", trusted=False)


@pytest.mark.parametrize(
    "pattern",
    [
        "{pipe:touch /tmp/x; cat a.tar,b.tar}",
        "{a.tar,pipe:touch /tmp/x}",
        "PIPE:touch /tmp/x",
        " pipe:touch /tmp/x",
        ["a.tar", "{b.tar,Pipe:ls}"],
    ],
)
def test_a_pipe_in_a_brace_pattern_or_another_spelling_is_a_stored_command(pattern):
    """Found walking as a stranger: a stored data.val of `{pipe:touch X; cat a.tar,b.tar}` (with a data.counts
    listing the expanded URL) ran the command on a plain `dtrain eval`, predict and load_model: the check
    tested the unexpanded string's prefix. The shard patterns are judged as the reader expands them."""
    cfg = load_config(None, [], {"data.val": pattern})
    with pytest.raises(CheckpointError, match=r"^checkpoint: model.pt asks to run data.val="):
        check_stored(cfg, Config(), "model.pt", trusted=False)


def test_a_pipe_typed_in_another_spelling_is_one_line(tmp_path):
    """webdataset's gopen runs 'PIPE:...' (urlparse's scheme) but then asserts on the prefix: a traceback."""
    from dtrain.data import DataError
    from dtrain.data.sources import resolve_split

    with pytest.raises(DataError, match=r"^data: data.train: 'PIPE:cat a.tar' is a pipe: command spelled otherwise"):
        resolve_split("PIPE:cat a.tar", "data.train")


def test_the_overrides_the_summary_names_allow_the_runs_own_code():
    """The summary's evaluate command carries `naming`'s overrides: with them, eval accepts exactly the run's code."""
    cfg = load_config(
        None,
        [],
        {
            "model.factory": "mynet:build",
            "loss.fn": "__main__:loss",
            "model.kwargs": {"cfg": {"_target_": "x:y", "n": 2}, "blocks": [{"_target_": "a:b"}]},
            "data.test": ["pipe:cat a.tar", "b.tar"],
            "data.trust_descriptor_pipes": True,
            "data.sample": {"x": "npy"},
        },
    )
    named = naming(cfg)
    assert named == [
        "model.factory=mynet:build",
        "model.kwargs.cfg._target_=x:y",
        'model.kwargs.blocks=[{"_target_": "a:b"}]',
        'data.test=["pipe:cat a.tar", "b.tar"]',
        "data.trust_descriptor_pipes=true",
    ]  # not a script's own callable, nor plain data
    check_stored(cfg, load_config(None, named), "model.pt", trusted=False)
    assert naming(Config()) == []


def test_the_list_of_code_settings_covers_the_config_schema():
    """A new setting documented as an import string (or a `_target_` mapping, or shards) is checked too."""
    documented = {key for key, field in _leaf_fields(Config) if "import string" in (field.description or "").lower()}
    targets = {key for key, field in _leaf_fields(Config) if "_target_" in (field.description or "")}
    assert documented - targets == set(IMPORT_STRINGS)  # `_target_` mappings are found wherever they are
    shard_type = DataConfig.model_fields["train"].annotation  # shards: a URL, a pattern, a descriptor, or a list
    assert {key for key, field in _leaf_fields(Config) if field.annotation == shard_type} == set(SHARD_SOURCES)
    assert all(key.split(".")[-1].startswith("trust_") for key in PERMISSIONS)
    assert {key for key, _ in _leaf_fields(Config) if key.split(".")[-1].startswith("trust_")} == set(PERMISSIONS)


def test_resume_builds_from_the_users_config_and_refuses_a_changed_factory(run, tmp_path, data_root):
    """Resume builds the model from the config it is started with; the checkpoint's is only compared with it."""
    run_dir, _ = run
    marker = tmp_path / "pwned"
    evil_run(run_dir, tmp_path / "runs" / "d", factory="os:system", kwargs={"command": f"touch {marker}"})
    proc = run_dtrain(
        ["train", f"data.root={data_root}", *TINY, "train.max_steps=8", "run.name=d"], tmp_path, check=False
    )
    assert proc.returncode == 2 and "config: model.factory cannot change when a run resumes" in errors(proc)[0]
    assert not marker.exists()


def test_init_from_reads_only_weights(run, tmp_path, data_root):
    """model.init_from takes the weights of an exported file or a step directory, never its stored config."""
    run_dir, exported = run
    marker = tmp_path / "pwned"
    evil = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
    for name, source in (
        ("f", evil_file(exported, tmp_path / "evil.pt", **evil)),
        ("s", evil_run(run_dir, tmp_path / "evil", **evil)),
    ):
        proc = run_dtrain(
            ["train", f"data.root={data_root}", *TINY, f"run.name={name}", f"model.init_from={source}"], tmp_path
        )
        assert result_of(proc)["stop_reason"] == "completed" and "initialised from" in proc.stderr
    assert not marker.exists()


def test_a_module_that_exits_when_imported_is_one_line(tmp_path, monkeypatch, data_root):
    """Issue #32: sys.exit(3) at import ended dtrain with exit 3 and no line at all."""
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\ndef build(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        resolve("exits_at_import:build", "model.factory")
    assert str(e.value).startswith("config: model.factory: importing 'exits_at_import' called sys.exit(3)")
    proc = run_dtrain(
        ["train", f"data.root={data_root}", "model.factory=exits_at_import:build"],
        tmp_path,
        check=False,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 2 and "called sys.exit(3)" in errors(proc)[0], proc.stderr[-2000:]


def test_a_script_evaluates_its_run_with_its_own_callables(tmp_path, data_root):
    """`python train.py eval ...` (the command its summary gives) rebuilds with the callables the script hands
    in: they are the user's code, whatever names the checkpoint stores; a stored setting the script doesn't
    hand in is still checked."""
    import shlex

    from conftest import _run_here

    script = Path(__file__).parent / "usercode" / "script_hooks.py"
    proc = _run_here([f"data.root={data_root}", "run.doctor=false"], tmp_path, None, script=script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluate = shlex.split(json.loads((tmp_path / "runs" / "script-hooks" / "summary.json").read_text())["evaluate"])
    assert evaluate[:3] == ["python", str(script), "eval"], evaluate
    proc = _run_here(evaluate[2:], tmp_path, None, script=script)
    assert proc.returncode == 0 and "test/acc" in proc.stdout, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "script-hooks"
    evil_run(run_dir, tmp_path / "evil", forward="os:system")
    proc = _run_here(["eval", "--checkpoint", str(tmp_path / "evil")], tmp_path, None, script=script)
    assert proc.returncode == 2 and "asks to run model.forward=os:system" in errors(proc)[0], proc.stderr[-2000:]


def test_a_file_that_is_not_an_export_or_holds_an_unreadable_config_is_one_line(run, tmp_path):
    run_dir, exported = run
    state = torch.load(exported, weights_only=True)
    not_export = "is not a file written by `dtrain export` (a dict of model, config and step)"
    cases = {
        "list.pt": ([1, 2], not_export),
        "noconfig.pt": ({**state, "config": 5}, not_export),
        "badconfig.pt": (
            {**state, "config": with_config(state["config"], factory=5)},
            "holds a config this dtrain can't read (model.factory: Input should be a valid string)",
        ),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        proc = run_dtrain(["eval", "--checkpoint", name], tmp_path, check=False)
        assert proc.returncode == 2 and errors(proc) == [
            f"dtrain: error: checkpoint: {name} {message}"
            + ("; give one, a run directory or checkpoints/step-N" if "export" in message else "")
        ], proc.stderr[-2000:]
