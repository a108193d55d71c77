"""A command line that answers at once (#35.4, #35.5): the commands that need no model (--help, config, its
--describe and --schema, completion) and a config error's line import no torch, under `dtrain launch` too
(a script's misspelled key included, before any worker starts); `dtrain config --schema`; the completion
script; an untested torch under `dtrain launch` said in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, _env, run_dtrain
from dtrain import launcher
from dtrain.cli import parse_args
from dtrain.config import ConfigError
from dtrain.dist import LaunchError

# `python -m dtrain ARGS`, saying at its exit (atexit: after SystemExit too) whether torch was imported
TORCH_PROBE = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
    "sys.argv = ['dtrain', *sys.argv[1:]]\n"
    "runpy.run_module('dtrain', run_name='__main__', alter_sys=True)\n"
)


def run_probed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TORCH_PROBE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def write_script(tmp_path: Path) -> str:
    (tmp_path / "train.py").write_text("import dtrain\n\ndtrain.main()\n")
    return str(tmp_path / "train.py")


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["config"], 0),
        (["config", "--describe"], 0),
        (["config", "--schema"], 0),
        (["completion", "bash"], 0),
        (["train", "optim.lrr=0.1"], 2),  # a config error's line
        (["launch", "--nproc-per-node", "2", "train", "optim.lrr=0.1"], 2),
        (["launch", "--nproc-per-node", "2", "SCRIPT", "optim.lrr=0.1"], 2),
    ],
)
def test_commands_without_a_model_import_no_torch(tmp_path, args, code):
    """Importing torch was 1.5 s of `dtrain --help`'s 1.7 s on an idle machine (and 9 s of 11 on a loaded one)."""
    args = [write_script(tmp_path) if a == "SCRIPT" else a for a in args]
    proc = run_probed(args, tmp_path)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr
    if code == 2:
        assert (
            proc.stderr.splitlines()[0] == "dtrain: error: config: unknown key 'optim.lrr'; did you mean 'optim.lr'?"
        ), proc.stderr


def test_describe_reads_the_factories_as_dtrain_models_describes_them(capsys):
    """`dtrain config --describe` reads the built-in factories' signatures from their source (no torch): the
    same lines as dtrain.models.describe_factories, which imports them."""
    from dtrain.cli import _describe_factories
    from dtrain.models import describe_factories

    assert _describe_factories() == describe_factories()
    assert run_dtrain(["config", "--describe"], REPO).stdout.splitlines()[-3:] == describe_factories()


# ---- dtrain launch of a script: its misspelled keys before any worker starts --------------------------------
def test_a_scripts_misspelled_key_is_one_line_before_any_worker_starts(tmp_path):
    """Its workers said it 10 s later (started, torch imported, the script run) under `--nproc-per-node 2`."""
    script = write_script(tmp_path)
    proc = run_dtrain(
        ["launch", "--nproc-per-node", "2", script, "--config", str(REPO / "configs" / "digits.yaml"), "optim.lrr=0.1"],
        tmp_path,
        check=False,
        process=True,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "dtrain: error: config: unknown key 'optim.lrr'; did you mean 'optim.lr'?"
    ], proc.stderr
    assert not (tmp_path / "runs").exists()  # no worker, no log


def test_a_scripts_own_arguments_are_left_to_it(tmp_path):
    """Only a key under one of dtrain's sections, among arguments that are all dtrain's, is refused: a key
    of the script's own (epochs=3), or arguments dtrain's command line lacks (the script reads them itself),
    go to the workers as before; so do keys inside a dict-valued setting (model.kwargs.*)."""
    script, parser = write_script(tmp_path), parse_args(["config"]).parser  # dtrain's, as `dtrain launch` has it
    for args in (
        ["epochs=3"],
        ["optim.lrr=0.1", "--own-flag"],
        ["model.kwargs.depth=3", "run.name=r"],
        ["optim.lr=fast"],
    ):  # a bad value: the workers say it, with the script's own config= defaults
        launcher._resolve([script, *args], parser)
    for args in (
        ["optim.lrr=0.1"],
        ["--config", "c.yaml", "-q", "data.nosuch=1"],
        ["eval", "--checkpoint", "r", "model.name=mlp"],
    ):
        with pytest.raises(ConfigError, match="^config: "):
            launcher._resolve([script, *args], parser)


# ---- an untested torch under dtrain launch ------------------------------------------------------------------
def test_torch_tested_range():
    assert launcher.TORCH_TESTED == ">=2.13,<2.14"
    assert [
        launcher.torch_tested(v)
        for v in ("2.13.0", "2.13.1+cu128", "2.13.0a0+git1234", "2.12.1", "2.14.0.dev20270101", "3.0.0")
    ] == [True, True, True, False, False, False]


def test_an_untested_torch_is_one_warning_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.15.0")
    launcher._agent_class()
    assert capsys.readouterr().err.splitlines() == [
        "launch: warning: torch 2.15.0 is not among the releases dtrain launch is tested with (torch>=2.13,<2.14); "
        "if its agent fails, install a tested torch or use torchrun"
    ]
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    launcher._agent_class()
    assert capsys.readouterr().err == ""


def test_an_agent_without_the_private_methods_is_one_line(monkeypatch):
    """torch's agent without a method dtrain's overrides: an AttributeError inside the agent once the workers
    ran (super()._monitor_workers), now a LaunchError line (exit 2) before any starts."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    monkeypatch.delattr(SimpleElasticAgent, "_monitor_workers", raising=False)
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monkeypatch.delattr(LocalElasticAgent, "_monitor_workers", raising=False)
    with pytest.raises(
        LaunchError,
        match=r"^launch: torch \S+'s elastic agent has no _monitor_workers, which dtrain "
        r"launch builds on \(tested with torch>=2.13,<2.14\): install a tested "
        r"torch \(pip install 'torch>=2.13,<2.14'\), or start the workers with "
        r"torchrun$",
    ):
        launcher._agent_class()
    with pytest.raises(LaunchError, match="has no _pcontext, _shutdown_timeout, which"):
        launcher._check_agent(type("Agent", (), {"_remaining_restarts": 0})(), launcher.AGENT_ATTRIBUTES)


# ---- dtrain config --schema -----------------------------------------------------------------------------
def _unknown_keys(value, schema: dict, defs: dict, path: str = "") -> list[str]:
    """Keys of `value` the schema does not allow (its own additionalProperties: false), through its $refs."""
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    if not isinstance(value, dict) or "properties" not in schema:
        return []
    found = []
    for key, inner in value.items():
        if key not in schema["properties"]:
            found += [] if schema.get("additionalProperties", True) is not False else [f"{path}{key}"]
        else:
            found += _unknown_keys(inner, schema["properties"][key], defs, f"{path}{key}.")
    return found


def test_schema_is_the_configs_json_schema(tmp_path):
    out = run_dtrain(["config", "--schema"], tmp_path).stdout
    schema = json.loads(out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema" and schema["type"] == "object"
    assert {"run", "data", "model", "optim", "train", "wandb"} <= set(schema["properties"])
    assert "Peak learning rate" in schema["$defs"]["OptimConfig"]["properties"]["lr"]["description"]
    assert run_dtrain(["config", "--schema", "--out", "s.json"], tmp_path).stdout == "wrote s.json\n"
    assert json.loads((tmp_path / "s.json").read_text()) == schema
    for name in ("digits", "gpt", "photos", "snippets"):
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert _unknown_keys(config, schema, schema["$defs"]) == [], name
    assert _unknown_keys({"optim": {"lrr": 1}}, schema, schema["$defs"]) == ["optim.lrr"]
    try:
        import jsonschema
    except ImportError:
        return
    for name in ("digits", "gpt", "photos", "snippets"):
        jsonschema.validate(yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"optim": {"lrr": 1}}, schema)


def test_out_without_schema_is_one_line(tmp_path):
    proc = run_dtrain(["config", "--out", "s.json"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == "dtrain: error: config: --out FILE goes with --schema\n"


# ---- shell completion -------------------------------------------------------------------------------------
def complete(script: Path, words: list[str]) -> list[str]:
    """What the completion function offers for `words` (the last being completed), in bash."""
    line = " ".join(f"'{w}'" for w in words)
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            'COMPREPLY=(); _dtrain; printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion(tmp_path):
    text = run_dtrain(["completion", "bash"], tmp_path).stdout
    script = tmp_path / "dtrain.bash"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    assert "train shard index eval export plot augment-preview doctor bench config predict completion launch" in text
    assert "optim.lr=" in text and "data.batch_size=" in text and "complete -o default -F _dtrain dtrain" in text
    assert complete(script, ["dtrain", "tr"]) == ["train"]
    assert complete(script, ["dtrain", "train", "--con"]) == ["--config"]
    assert complete(script, ["dtrain", "train", "optim.l"]) == ["optim.lr="]
    assert complete(script, ["dtrain", "launch", "--nproc-per-node", "2", "ev"]) == ["eval"]
    assert complete(script, ["dtrain", "launch", "--nproc-per-node", "2", "train", "run.na"]) == ["run.name="]
    assert complete(script, ["dtrain", "eval", "--split", ""]) == ["train", "val", "test"]
    assert complete(script, ["dtrain", "completion", ""]) == ["bash", "zsh"]
    assert complete(script, ["dtrain", "eval", "--checkpoint", "r"]) == []  # a path: the shell's file names


def test_zsh_completion_loads_bashs_through_bashcompinit(tmp_path):
    text = run_dtrain(["completion", "zsh"], tmp_path).stdout
    assert text.startswith("autoload -U +X compinit") and "bashcompinit" in text and "optim.lr=" in text
    if shutil.which("zsh"):
        (tmp_path / "dtrain.zsh").write_text(text)
        assert subprocess.run(["zsh", "-n", str(tmp_path / "dtrain.zsh")]).returncode == 0


# ---- main tells dtrain's errors without importing their modules ------------------------------------------
def test_an_error_of_dtrains_is_told_by_its_class_wherever_it_is_defined(monkeypatch, capsys):
    """main() no longer imports dist and checkpoint (torch) to tell a user error: it reads the class's name and
    module, so a class that moves between dtrain's modules (CheckpointError into checkpoint_files) is still one
    line, exit 2, even where the module it used to live in was never imported; anything else keeps its
    traceback."""
    from dtrain import cli

    moved = type("CheckpointError", (RuntimeError,), {"__module__": "dtrain.checkpoint_files"})

    def fail(args):
        raise moved("checkpoint: runs/x holds no checkpoint; train first")

    monkeypatch.setattr(cli, "_config", fail)
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err == "dtrain: error: checkpoint: runs/x holds no checkpoint; train first\n"

    def bug(args):
        raise type("CheckpointError", (RuntimeError,), {"__module__": "mypkg.errors"})("the user's own")

    monkeypatch.setattr(cli, "_config", bug)
    with pytest.raises(RuntimeError, match="the user's own"):
        cli.main(["config"])


# ---- a data.sample field the shards lack: the workers' line before any worker starts (#35.5) ----------------
def write_shard(path: Path, samples: int = 3, json_member: str = "json") -> str:
    """A shard of another tool's layout (KEY.png + KEY.json {"count": n}) and its descriptor, as `dtrain index`
    writes it. -> the descriptor."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for ext, data in (("png", PNG), (json_member, json.dumps({"count": i}).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run_dtrain(["index", str(path), "--out", str(path.with_suffix(".json"))], path.parent)
    return str(path.with_suffix(".json"))


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (2, 2)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()


def mapped_config(tmp_path: Path, sample: dict, **data) -> str:
    config = {
        "run": {"name": "mapped", "dir": str(tmp_path / "runs")},
        "data": {
            "train": write_shard(tmp_path / "train-000000.tar"),
            "sample": sample,
            "task": "regression",
            "batch_size": 2,
            "num_workers": 0,
            **data,
        },
        "model": {"factory": "mlp", "kwargs": {"hidden": [4]}},
        "train": {"epochs": 1},
    }
    (tmp_path / "mapped.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "mapped.yaml")


@pytest.mark.parametrize(
    "sample",
    [
        {"x": "jpg;webp", "y": "json#/count"},  # no member for x
        {"x": "png", "y": "json#/cuont"},  # a pointer its JSON lacks
        {"x": "png", "y": "cls"},
    ],
)
def test_a_field_the_first_sample_lacks_is_the_workers_line_before_they_start(tmp_path, monkeypatch, sample):
    """`dtrain train` says it from the shard's tar headers, before run() (torch, the streams): the line the
    workers' decoding gives once they read the sample, the same. (It came 8.5 s after `dtrain train` started,
    17.5 s after `dtrain launch --nproc-per-node 2`, at load ~16 on 2 cores.)"""
    import dtrain.data
    import dtrain.run

    config = mapped_config(tmp_path, sample)
    with monkeypatch.context() as patch:
        patch.setattr(dtrain.run, "run", lambda *a, **k: pytest.fail("the workers' start-up was reached"))
        said = run_dtrain(["train", "--config", config], tmp_path, check=False)
    monkeypatch.setattr(dtrain.data, "check_first_sample", lambda cfg: None)  # as before: the workers say it
    workers = run_dtrain(["train", "--config", config], tmp_path, check=False)
    assert said.returncode == workers.returncode == 2
    line = said.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("dtrain: error: data: sample 's000' of "), said.stderr
    assert line[0] == workers.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_sample_said_is_the_one_the_workers_decode_first(tmp_path, monkeypatch, split):
    """train: no data.task and no descriptor's task, so the workers read it from the first training labels
    (infer_task); val: dtrain's own shards (their descriptor says task and input shape), where the model's
    probe on the first validation batch decodes first. With a task given, a val split and no input shape in
    the descriptor, which comes first depends on the model's factory: the workers say it."""
    import dtrain.data
    import dtrain.run
    from dtrain.config import load_config

    if split == "val":
        run_dtrain(["shard", "--dataset", "digits", "--out", str(tmp_path / "digits")], tmp_path)
        overrides = [
            "data.dataset=folder:digits",
            "data.sample={x: nosuch.npy, y: cls}",
            "data.num_workers=0",
            f"run.dir={tmp_path / 'runs'}",
        ]
    else:
        overrides = [f"data.val={write_shard(tmp_path / 'val-000000.tar')}", "data.task=null", "data.sample.x=jpg"]
        config = mapped_config(tmp_path, {"x": "png", "y": "json#/count"})
        overrides = ["--config", config, *overrides]
        ambiguous = load_config([config], [f"data.val={tmp_path / 'val-000000.json'}"]).data
        dtrain.data.check_first_sample(ambiguous)  # task regression, a val split, no input shape: nothing said
    with monkeypatch.context() as patch:
        patch.setattr(dtrain.run, "run", lambda *a, **k: pytest.fail("the workers' start-up was reached"))
        said = run_dtrain(["train", *overrides], tmp_path, check=False)
    monkeypatch.setattr(dtrain.data, "check_first_sample", lambda cfg: None)
    workers = run_dtrain(["train", *overrides], tmp_path, check=False)
    assert said.stderr.strip().splitlines() == [workers.stderr.strip().splitlines()[-1]], said.stderr
    assert f"of {tmp_path / 'digits' if split == 'val' else tmp_path}/{split}-000000.tar" in said.stderr


def test_a_field_no_member_has_under_launch_imports_no_torch_and_starts_no_worker(tmp_path):
    config = mapped_config(tmp_path, {"x": "jpg", "y": "json#/count"})
    proc = run_probed(["launch", "--nproc-per-node", "2", "train", "--config", config], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"dtrain: error: data: sample 's000' of {tmp_path / 'train-000000.tar'} has no .jpg member for "
        "data.sample.x (it has json, png)",
        "torch imported: False",
    ]
    assert not list(tmp_path.glob("runs/**/rank-*.log")) and not (tmp_path / "runs").exists()


def test_shards_it_cannot_read_cheaply_are_left_to_the_workers(tmp_path):
    """A pipe: shard (or a URL) is never run or fetched before the workers, nor is a shard it cannot read as
    tario.py would (here, a member with a '..' name) judged: check_first_sample says nothing; the workers do."""
    import tarfile

    from dtrain.config import load_config
    from dtrain.data import check_first_sample

    shard = tmp_path / "train-000000.tar"
    config = mapped_config(tmp_path, {"x": "jpg", "y": "json#/count"})
    piped = {"url": f"pipe:cat {shard}", "nsamples": 3}
    (tmp_path / "piped.json").write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": [piped]}))
    for overrides in (
        [f"data.train={tmp_path / 'piped.json'}", "data.trust_descriptor_pipes=true"],
        ["data.train=https://example.invalid/train.json"],
    ):
        check_first_sample(load_config([config], overrides).data)
    proc = run_dtrain(
        ["train", "--config", config, f"data.train={tmp_path / 'piped.json'}", "data.trust_descriptor_pipes=true"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith(
        "has no .jpg member for data.sample.x (it has json, png)"
    ), proc.stderr  # the workers'
    shard.rename(tmp_path / "good.tar")  # the local shard, now one tario.py refuses: a member's name climbs out
    with tarfile.open(tmp_path / "good.tar") as good, tarfile.open(shard, "w") as tar:
        tar.addfile(tarfile.TarInfo("../s000.txt"))
        for info in good:
            tar.addfile(info, good.extractfile(info))
    check_first_sample(load_config([config]).data)  # its refusal is the workers' line
