import pytest
import yaml

from dtrain.config import ConfigError, load_config
from conftest import run_dtrain


def test_defaults_file_and_override_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.5, "name": "sgd"}, "model": {"kwargs": {"hidden": [8]}}}))
    cfg = load_config(path, ["optim.lr=0.25", "model.kwargs.hidden=[4, 2]", "train.clip_grad_norm=null"])
    assert cfg.optim.lr == 0.25 and cfg.optim.name == "sgd"  # override > file
    assert cfg.model.kwargs == {"hidden": [4, 2]} and cfg.train.clip_grad_norm is None
    assert cfg.train.epochs == 20  # default kept


def test_two_config_files_compose_in_order_the_later_one_wins(tmp_path):
    """`--config a.yaml --config b.yaml`: a's settings stay unless b sets them (only b was kept before)."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"optim": {"lr": 0.5, "name": "sgd"}, "train": {"epochs": 3}}))
    b.write_text(yaml.safe_dump({"optim": {"lr": 0.25}, "run": {"name": "composed"}}))
    cfg = load_config([a, b], ["train.epochs=4"])
    assert (cfg.optim.lr, cfg.optim.name, cfg.run.name, cfg.train.epochs) == (0.25, "sgd", "composed", 4)
    out = run_dtrain(["config", "--config", str(a), "--config", str(b)], tmp_path).stdout
    assert yaml.safe_load(out)["optim"] == {**yaml.safe_load(out)["optim"], "lr": 0.25, "name": "sgd"}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("trian.epochs=3", "unknown key 'trian'"),
        ("optim.lr=abc", "optim.lr: Input should be a valid number"),
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
        ("train.epochs=2.5", "train.epochs: Input should be a valid integer"),
        ("model.hidden=[4]", "'model.hidden' is now an argument of dtrain's model factories: model.kwargs.hidden"),
        ("model.name=cnn", "'model.name' is now model.factory"),
        ("wandb.checkpoint_references=gs://b/c", "wandb.checkpoint_references: must be true, false or an s3:// prefix"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0


def test_config_is_saved_resolved_and_hash_is_stable():
    a, b = load_config(None, ["optim.lr=0.1"]), load_config(None, ["optim.lr=0.1"])
    assert a.hash() == b.hash() != load_config().hash()
    assert yaml.safe_load(a.to_yaml())["optim"]["lr"] == 0.1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
        (["train", "--config", "nonexistent.yaml"], "config: file not found"),
        (["train", "data.dataset=imagenet"], "unknown dataset 'imagenet'"),
        (["train", "data.dataset=folder:no/such/dir"], "shard directory no/such/dir does not exist"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, needle):
    proc = run_dtrain(args, tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert needle in lines[-1] and lines[-1].startswith("dtrain: error:")
    assert "Traceback" not in proc.stderr


def test_train_help_points_at_the_config_keys_and_the_docs_at_what_exists(capsys):
    import dtrain.config
    from dtrain.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "`dtrain config --describe` lists every key" in " ".join(capsys.readouterr().out.split())
    assert "`dtrain config --describe` prints them" in dtrain.config.__doc__
    assert main(["config", "--describe"]) == 0 and "optim.lr" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ["model.freeze=[body]", "model.unfreeze_at_step=3"],
            "model.unfreeze_at_step is not supported with train.engine=deepspeed",
        ),
        (
            ["deepspeed.offload_param=cpu", "deepspeed.zero_stage=2"],
            "deepspeed.offload_param needs deepspeed.zero_stage=3",
        ),
    ],
)
def test_what_deepspeed_cannot_do_is_refused_before_anything_starts(overrides, says):
    # declared by DeepSpeedEngine.unsupported: refused at config time, not at the unfreeze step or in the engine
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.engine=deepspeed", *overrides])
    assert str(e.value).startswith(f"config: {says}") and "\n" not in str(e.value)
    load_config(None, overrides)  # fine with ddp


def test_every_engine_declares_what_it_cannot_do_and_keeps_the_contract():
    import typing

    import torch

    from dtrain.config import TrainConfig
    from dtrain import capabilities
    from dtrain.engine import Engine, SingleEngine
    from dtrain.engine.ddp import DDPEngine
    from dtrain.engine.deepspeed import DeepSpeedEngine
    from dtrain.engine.fsdp import FSDPEngine

    names = set(typing.get_args(TrainConfig.model_fields["engine"].annotation))
    assert set(capabilities.UNSUPPORTED) == names  # config validation can ask every engine a config can name
    declared = {"ddp": [SingleEngine, DDPEngine], "fsdp": [FSDPEngine], "deepspeed": [DeepSpeedEngine]}
    # methods and properties: on the class (the instance attributes are checked on an instance below)
    methods = {m for m in typing._get_protocol_attrs(Engine) if hasattr(Engine, m)}
    assert {"step", "lr", "load_from", "trainable_changed"} <= methods
    for name, classes in declared.items():
        for cls in classes:
            assert cls.unsupported is capabilities.UNSUPPORTED[name], cls  # the class owns the declaration
            assert [m for m in methods if not hasattr(cls, m)] == [], cls
    cfg = load_config(None, [])
    info = type("Info", (), {"device": torch.device("cpu"), "distributed": False, "local_rank": 0, "world_size": 1})()
    engine = SingleEngine(
        torch.nn.Linear(2, 1),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
        cfg.train,
        info,
    )
    assert isinstance(engine, Engine)  # instance attributes included


# ---- nonsense values and hostile files (#32.5, #33) --------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=.inf", "optim.lr: Input should be a finite number (got inf)"),  # trained to NaN, said "completed"
        ("optim.lr=nan", "optim.lr: Input should be a finite number"),
        ("optim.lr=1e999", "optim.lr: Input should be a finite number"),  # a string YAML leaves, float() makes inf
        ("optim.betas=[0.9, .nan]", "optim.betas.1: Input should be a finite number"),
        ("optim.betas=[0.9, 1.0]", "optim.betas.1: Input should be less than 1"),
        ("loss.terms={mse: .inf}", "loss.terms.mse: Input should be a finite number"),
        ("loss.terms={mse: -1}", "loss.terms.mse: Input should be greater than or equal to 0"),
        ("schedule.gamma=.nan", "schedule.gamma: Input should be a finite number"),
        ("train.clip_grad_norm=.inf", "train.clip_grad_norm: Input should be a finite number"),
        ("dist.timeout_s=.inf", "dist.timeout_s: Input should be a finite number"),
        ("augment.noise.std=.inf", "augment.noise.std: Input should be a finite number"),
        ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),  # NumPy's seeding raised
        ("run.seed=5000000", "run.seed: Input should be less than or equal to 4294966"),
    ],
)
def test_nonfinite_and_out_of_range_values_are_refused(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"config: {expected}") and "\n" not in str(err.value)


def _bomb(levels: int = 9) -> str:
    """A "billion laughs" YAML: each level an anchored list of 9 aliases of the one before (9**9 values)."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines)


HOSTILE = {  # file content -> what the one line says
    "latin1": ("run:\n  name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 16)"),
    "binary": (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128)"),
    "control": (b"run: {name: \x00}\n", "is not valid YAML: control characters are not allowed"),
    "flow_deep": (b"run: " + b"[" * 50_000 + b"]" * 50_000, "is not valid YAML: exceeded maximum nesting depth"),
    "block_deep": ("".join(" " * i + f"k{i}:\n" for i in range(1000)).encode(), "nests deeper than 100 levels"),
    "bomb": (_bomb().encode(), "holds more than 1,000,000 values once its aliases are expanded (line 9)"),
    "tag": (
        b"run:\n  name: !!python/object/apply:os.system [touch pwned]\n",
        "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_config_files_are_one_line(tmp_path, name):
    """A binary or Latin-1 file (UnicodeDecodeError), 50,000 levels of nesting (RecursionError), aliases that
    expand to 387 million values (loaded, then the config's hash ran for minutes), a tag that would run a
    command: each a ConfigError naming the file, at once."""
    content, says = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config: {path}") and says in str(err.value), err.value
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()


def test_a_few_aliases_are_fine_and_override_values_are_held_to_the_same_limits(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("model:\n  kwargs: {hidden: &w [16, 16]}\nmetrics:\n  kwargs: {widths: *w}\n")
    assert load_config(path).metrics.kwargs == {"widths": [16, 16]}
    bomb = "{" + ", ".join(line.strip() for line in _bomb().splitlines()[2:]) + "}"
    with pytest.raises(ConfigError, match=r"^config: override 'model.kwargs' holds more than 1,000,000 values once"):
        load_config(None, [f"model.kwargs={bomb}"])
    deep = "[" * 50_000 + "]" * 50_000  # not YAML to libyaml: the text itself, as any value that isn't YAML
    assert load_config(None, [f"wandb.project={deep}"]).wandb.project == deep
    tag = "!!python/object/apply:os.system [touch pwned]"  # not constructed: the text itself
    assert load_config(None, [f"wandb.project={tag}"]).wandb.project == tag


def test_cli_hostile_config_file_exits_2_in_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    proc = run_dtrain(["train", "--config", "c.yaml"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "dtrain: error: config: c.yaml is not UTF-8 text (byte 0xe9 at offset 16); a config file is YAML saved as UTF-8"
    )
