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


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("trian.epochs=3", "unknown key 'trian'"),
    ("optim.lr=abc", "optim.lr: Input should be a valid number"),
    ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
    ("train.epochs=2.5", "train.epochs: Input should be a valid integer"),
    ("model.hidden=[4]", "'model.hidden' is now an argument of dtrain's model factories: model.kwargs.hidden"),
    ("model.name=cnn", "'model.name' is now model.factory"),
    ("wandb.checkpoint_references=gs://b/c", "wandb.checkpoint_references: must be true, false or an s3:// prefix"),
])
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


@pytest.mark.parametrize("args, needle", [
    (["train", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
    (["train", "--config", "nonexistent.yaml"], "config: file not found"),
    (["train", "data.dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["train", "data.dataset=folder:no/such/dir"], "shard directory no/such/dir does not exist"),
])
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


@pytest.mark.parametrize("overrides, says", [
    (["model.freeze=[body]", "model.unfreeze_at_step=3"],
     "model.unfreeze_at_step is not supported with train.engine=deepspeed"),
    (["deepspeed.offload_param=cpu", "deepspeed.zero_stage=2"],
     "deepspeed.offload_param needs deepspeed.zero_stage=3")])
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
    from dtrain.engine import Engine, SingleEngine, capabilities
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
    engine = SingleEngine(torch.nn.Linear(2, 1), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                          lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), cfg.train, info)
    assert isinstance(engine, Engine)  # instance attributes included
