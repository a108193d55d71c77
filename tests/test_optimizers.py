"""Any optimizer and LR scheduler (#34): torch's or the user's, by import string (optim.name, schedule.name with
their kwargs) or handed to dtrain.fit as a factory; param groups and backbone_lr_ratio hold; the LR logged is
the scheduler's; the state resumes exactly (on another number of ranks too); the engines run them."""

import functools
import importlib.util
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.optim import lr_scheduler

import dtrain
from conftest import final_params, metrics_of, result_of, run_dtrain, run_ranks
from dtrain.config import ConfigError, load_config
from dtrain.models.transfer import lr_scales
from dtrain.optim import build_optimizer, build_scheduler, filled
from dtrain.resume import OWN_SCHEDULER, config_changes

RADAM, ONECYCLE = "optim.name=torch.optim:RAdam", "schedule.name=torch.optim.lr_scheduler:OneCycleLR"
# digits: 1257 training samples, batch 64: 19 steps per epoch, 38 in all; no dropout: runs compare bit for bit
ARGS = [
    "train",
    "train.epochs=2",
    "train.log_every=1",
    "log.progress=false",
    "run.doctor=false",
    "model.kwargs.dropout=0",
    "optim.lr=0.01",
    RADAM,
    "optim.kwargs={eps: 1.0e-7}",
    ONECYCLE,
    "schedule.kwargs={pct_start: 0.25}",
]
TOTAL = 38


def curve(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in metrics_of(run_dir) if "lr" in r]


def onecycle_lrs(total: int, max_lr: float = 0.01, **kwargs) -> list[float]:
    """The LR torch's OneCycleLR gives after each of `total` optimizer steps, built by hand."""
    opt = torch.optim.RAdam([nn.Parameter(torch.zeros(1))], lr=max_lr)
    scheduler = lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, **kwargs)
    lrs = []
    for _ in range(total):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_radam_and_onecycle_by_import_string_log_its_lr_and_resume_bit_identical(tmp_path, data_root):
    args = ARGS + [f"data.root={data_root}"]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    run_dtrain(args + ["run.name=resumed", "run.stop_at_step=15"], tmp_path)
    assert "at step 15" in run_dtrain(args + ["run.name=resumed"], tmp_path).stderr

    straight, resumed = curve(tmp_path / "runs/straight"), curve(tmp_path / "runs/resumed")
    assert [s for s, _, _ in straight] == list(range(1, TOTAL + 1))
    # dtrain filled total_steps (the run's optimizer steps) and max_lr (optim.lr): the LR OneCycleLR computes
    assert [lr for _, _, lr in straight] == onecycle_lrs(TOTAL, pct_start=0.25)
    assert straight == resumed  # losses and LRs, bit for bit
    a, b = final_params(tmp_path / "runs/straight"), final_params(tmp_path / "runs/resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "runs/straight/checkpoints/latest/state.pt", weights_only=True)["engine"]
    assert state["scheduler"]["total_steps"] == TOTAL
    # evaluation builds no optimizer or schedule of the run's: their import strings need not be named again
    out = run_dtrain(["eval", "--checkpoint", str(tmp_path / "runs/straight"), "log.progress=false"], tmp_path)
    assert "test/loss" in out.stdout and "asks to run" not in out.stderr
    assert "decoupled_weight_decay" in state["optimizer"]["param_groups"][0]  # RAdam's
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-7  # optim.kwargs reached RAdam


@pytest.mark.parametrize(
    "schedule", [["schedule.warmup_steps=4"], ["schedule.name=torch.optim.lr_scheduler:CosineAnnealingLR"]]
)
def test_a_torch_optimizer_resumes_bit_identical_under_dtrains_schedule_and_a_recursive_one(
    tmp_path, data_root, schedule
):
    """dtrain's schedule puts the config's hyperparameters back into the param groups at resume (RAdam's eps from
    optim.kwargs, its flags); CosineAnnealingLR computes each LR from the last one (a recursion), which resumes
    from the checkpoint's param groups."""
    args = [
        "train",
        f"data.root={data_root}",
        "train.max_steps=20",
        "train.log_every=1",
        "log.progress=false",
        "run.doctor=false",
        "model.kwargs.dropout=0",
        RADAM,
        "optim.kwargs={eps: 1.0e-7}",
        *schedule,
    ]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    run_dtrain(args + ["run.name=resumed", "run.stop_at_step=9"], tmp_path)
    run_dtrain(args + ["run.name=resumed"], tmp_path)
    assert curve(tmp_path / "runs/straight") == curve(tmp_path / "runs/resumed")
    assert curve(tmp_path / "runs/straight")[-1][2] == pytest.approx(0.0, abs=1e-12)  # both decay to 0 at step 20
    a, b = final_params(tmp_path / "runs/straight"), final_params(tmp_path / "runs/resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_and_scheduler_factories_handed_to_fit(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    groups_seen = []

    def radam(groups):
        groups_seen.append([(g["lr"], g["weight_decay"]) for g in groups])
        return torch.optim.RAdam(groups)

    result = dtrain.fit(
        [
            f"data.root={data_root}",
            "train.max_steps=12",
            "train.log_every=1",
            "log.progress=false",
            "run.doctor=false",
            "optim.weight_decay=0.01",
        ],
        optimizer=radam,
        scheduler=lambda opt: lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
    )
    assert result.exit_code == 0 and result.step == 12
    assert groups_seen == [[(3e-3, 0.01), (3e-3, 0.0)]]  # dtrain's groups: decay on matrices only
    lrs = [r["lr"] for r in metrics_of(result.run_dir) if "lr" in r]
    assert lrs == pytest.approx([3e-3 * 0.5 ** (step // 4) for step in range(1, 13)], rel=1e-12)
    recorded = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert recorded["optim"]["name"].endswith(".radam") and "<lambda>" in recorded["schedule"]["name"]
    # a class is a factory too, and gets the arguments dtrain fills (T_max: the run's length)
    result = dtrain.fit(
        [
            f"data.root={data_root}",
            "train.max_steps=6",
            "train.log_every=1",
            "log.progress=false",
            "run.doctor=false",
            "run.name=cls",
        ],
        optimizer=functools.partial(torch.optim.RAdam, eps=1e-6),
        scheduler=lr_scheduler.CosineAnnealingLR,
    )
    assert result.exit_code == 0
    assert [r["lr"] for r in metrics_of(result.run_dir) if "lr" in r][-1] == pytest.approx(0.0, abs=1e-12)


def test_backbone_lr_ratio_and_param_groups_hold_with_a_torch_optimizer_and_onecycle():
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 4), head=nn.Linear(4, 2)))
    cfg = load_config(None, [RADAM, ONECYCLE, "optim.weight_decay=0.1", "optim.backbone_lr_ratio=0.1"])
    opt = build_optimizer(cfg.optim, model, lr_scales("head", 0.1))
    assert type(opt) is torch.optim.RAdam
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (3e-3, 0.1),
        (3e-3, 0.0),
        (pytest.approx(3e-4), 0.1),
        (pytest.approx(3e-4), 0.0),
    ]
    scheduler = build_scheduler(cfg.schedule, opt, total_steps=20)
    assert scheduler.total_steps == 20
    peaks = np.zeros(4)
    for _ in range(20):
        opt.step()
        scheduler.step()
        peaks = np.maximum(peaks, [g["lr"] for g in opt.param_groups])
    assert peaks == pytest.approx([3e-3, 3e-3, 3e-4, 3e-4])  # each group's OneCycle peaks at its own LR

    groups = build_optimizer(
        load_config(None, [RADAM]).optim,
        model,
        param_groups=lambda m: [{"params": m.body.parameters(), "lr": 0.5}, {"params": m.head.parameters()}],
    )
    assert type(groups) is torch.optim.RAdam and [g["lr"] for g in groups.param_groups] == [0.5, 3e-3]


def test_dtrain_fills_a_schedulers_length_and_peak_only_where_its_signature_names_them():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert filled(lr_scheduler.OneCycleLR, {}, opt, 50) == {"total_steps": 50, "max_lr": [0.1]}
    assert filled(lr_scheduler.OneCycleLR, {"epochs": 2, "steps_per_epoch": 9}, opt, 50) == {"max_lr": [0.1]}
    assert filled(lr_scheduler.CosineAnnealingLR, {}, opt, 50) == {"T_max": 50}
    assert filled(lr_scheduler.CosineAnnealingLR, {"T_max": 7}, opt, 50) == {}
    assert filled(lr_scheduler.StepLR, {"step_size": 3}, opt, 50) == {}


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["optim.name=adam"], "config: optim.name: 'adam' is not sgd, adamw or an import string"),
        (
            ["optim.kwargs={eps: 1.0e-6}"],
            ("config: optim.kwargs applies to an optimizer named by an import string, not to adamw"),
        ),
        ([RADAM, "optim.kwargs={lr: 0.1}"], "config: optim.kwargs.lr: set optim.lr instead"),
        (
            [ONECYCLE, "schedule.warmup_steps=5"],
            (
                "config: schedule.warmup_steps applies to dtrain's own schedules, "
                "not to torch.optim.lr_scheduler:OneCycleLR"
            ),
        ),
        (
            ["schedule.kwargs={pct_start: 0.1}"],
            "config: schedule.kwargs applies to a scheduler named by an import string",
        ),
        (
            [RADAM, "optim.betas=[0.9, 0.95]"],
            (
                "config: optim.betas applies to sgd and adamw, not to torch.optim:RAdam; "
                "put that optimizer's arguments in optim.kwargs (e.g. {betas: ...})"
            ),
        ),
    ],
)
def test_settings_that_would_be_ignored_are_refused_in_one_line(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_a_scheduler_stepped_by_a_metric_or_a_built_object_is_refused_in_one_line():
    model = nn.Linear(2, 2)
    cfg = load_config(None, ["schedule.name=torch.optim.lr_scheduler:ReduceLROnPlateau"])
    opt = build_optimizer(cfg.optim, model)
    with pytest.raises(
        ConfigError,
        match=r"^config: schedule.name: ReduceLROnPlateau.step\(\) needs an argument "
        r"\(a metric\)",
    ):
        build_scheduler(cfg.schedule, opt, 10)
    with pytest.raises(ConfigError, match="^config: optimizer: hand in a factory, not a built SGD"):
        build_optimizer(cfg.optim, model, factory=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="^config: scheduler: hand in a factory, not a built StepLR"):
        build_scheduler(load_config(None, []).schedule, opt, 10, factory=lr_scheduler.StepLR(opt, 3))
    with pytest.raises(
        ConfigError,
        match="^config: schedule.warmup_steps applies to dtrain's own schedules, not to the scheduler handed in",
    ):
        build_scheduler(
            load_config(None, ["schedule.warmup_steps=3"]).schedule,
            opt,
            10,
            factory=lambda o: lr_scheduler.StepLR(o, 3),
        )
    with pytest.raises(
        ConfigError,
        match=r"^config: optim.momentum applies to sgd and adamw, not to the optimizer "
        "handed in",
    ):
        build_optimizer(load_config(None, ["optim.momentum=0.5"]).optim, model, factory=torch.optim.SGD)
    with pytest.raises(
        ConfigError,
        match=r"^config: optim.kwargs is for optim.name, which the .* handed in from "
        r"Python replaces; bind its arguments in Python \(functools.partial\)",
    ):
        build_optimizer(load_config(None, [RADAM, "optim.kwargs={eps: 0.1}"]).optim, model, factory=torch.optim.SGD)
    with pytest.raises(ConfigError, match=r"^config: optimizer: .*<lambda> returned a list, not a torch.optim"):
        build_optimizer(load_config(None, []).optim, model, factory=lambda groups: groups)
    with pytest.raises(ConfigError, match=r"^config: scheduler: .*<lambda> returned a object, not an LR scheduler"):
        build_scheduler(load_config(None, []).schedule, opt, 10, factory=lambda o: object())


@pytest.mark.parametrize(
    "key, value",
    [("optim.lr", 0.01), ("schedule.kwargs", {"pct_start": 0.5}), ("train.epochs", 3), ("train.max_steps", 30)],
)
def test_with_a_torch_scheduler_what_its_saved_state_holds_cannot_change_at_resume(key, value):
    """Its state (LRs, arguments, length) is the checkpoint's whole: a new value would be silently ignored, or
    step OneCycleLR past its end. dtrain's own schedule takes them (a pure function of the step)."""
    section = key.split(".")[0]
    saved = load_config(None, [RADAM, ONECYCLE]).to_dict()
    new = load_config(None, [RADAM, ONECYCLE, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    changed = [c for c in config_changes(saved, new) if c.key.startswith(key)]
    assert changed and all(c.fixed == OWN_SCHEDULER for c in changed)
    own = load_config(None, [RADAM]).to_dict()
    if section != "schedule":
        assert [c.fixed for c in config_changes(own, load_config(None, [RADAM, f"{key}={value}"]))] == [None]
    switched = config_changes(own, load_config(None, [RADAM, ONECYCLE]))
    assert [(c.key, c.fixed) for c in switched] == [("schedule.name", OWN_SCHEDULER)]


@pytest.mark.multiproc
def test_fsdp_with_radam_and_onecycle_resumes_on_another_number_of_ranks(tmp_path, data_root):
    """2 FSDP ranks stopped at step 5, resumed on 1 (global batch kept: the same 38 steps): OneCycleLR's length,
    fixed when it was built, is the run's, and every LR is the uninterrupted run's."""
    args = ARGS + [f"data.root={data_root}", "data.batch_size=32", "train.engine=fsdp"]
    straight = run_ranks(2, args + ["run.name=straight"], tmp_path)
    run_ranks(2, args + ["run.name=r", "run.stop_at_step=5"], tmp_path)
    proc = run_dtrain(args + ["run.name=r"], tmp_path)
    assert "resume: 2 -> 1 ranks" in proc.stderr and result_of(proc)["step"] == TOTAL
    a, b = curve(tmp_path / "runs/straight"), curve(tmp_path / "runs/r")
    assert [lr for _, _, lr in a] == [lr for _, _, lr in b] == onecycle_lrs(TOTAL, pct_start=0.25)
    # the rest of the interrupted epoch is dealt over 1 rank in another order: the same samples, other steps
    straight, resumed = result_of(straight), result_of(proc)
    assert straight["test/acc"] > 0.3 and abs(straight["test/loss"] - resumed["test/loss"]) < 0.03  # test_elastic's


@pytest.mark.multiproc
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_runs_radam_and_onecycle_and_resumes_them_exactly(tmp_path, data_root, monkeypatch):
    """DeepSpeed gets the client optimizer and scheduler (ZeRO wraps the optimizer, steps the scheduler)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    args = ARGS + [f"data.root={data_root}", "train.engine=deepspeed", "train.max_steps=12"]
    run_ranks(2, args + ["run.name=straight"], tmp_path, preload=("deepspeed",))
    run_ranks(2, args + ["run.name=r", "run.stop_at_step=5"], tmp_path, preload=("deepspeed",))
    run_ranks(2, args + ["run.name=r"], tmp_path, preload=("deepspeed",))
    a, b = curve(tmp_path / "runs/straight"), curve(tmp_path / "runs/r")
    assert [lr for _, _, lr in a] == onecycle_lrs(12, pct_start=0.25) and a == b
