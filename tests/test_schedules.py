"""LR schedules: closed-form values, agreement with torch's own schedulers, the plot drawn before training."""

import json
import math

import pytest
import torch

from conftest import CONFIGS
from dtrain.cli import main
from dtrain.config import load_config
from dtrain.optim import Schedule, build_schedule, build_scheduler


def cosine(progress, lo=0.0):
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def test_linear_warmup_comes_before_every_schedule():
    for name in ("constant", "step", "exponential", "cosine", "cosine_restarts"):
        s = Schedule(name, total_steps=200, warmup_steps=10, every=7, gamma=0.3, restart_every=15)
        assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)]), name
        assert s(10) == 1.0, name  # the schedule proper starts at its peak


@pytest.mark.parametrize("step, expected", [(0, 1.0), (29, 1.0), (30, 0.1), (59, 0.1), (60, 0.01), (95, 0.001)])
def test_step_decay(step, expected):
    s = Schedule("step", total_steps=1000, warmup_steps=5, every=30, gamma=0.1)
    assert s(5 + step) == pytest.approx(expected)  # t = step after the 5 warmup steps


@pytest.mark.parametrize("t", [0, 1, 15, 30, 45, 100])
def test_exponential_decay(t):
    s = Schedule("exponential", total_steps=1000, warmup_steps=5, every=30, gamma=0.5)
    assert s(5 + t) == pytest.approx(0.5 ** (t / 30))


@pytest.mark.parametrize("t", [0, 25, 50, 75, 100, 120])
def test_cosine_half_cycle(t):
    s = Schedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert s(10 + t) == pytest.approx(cosine(min(t, 100) / 100, 0.1))


def test_cosine_warm_restarts_restart_at_the_right_steps():
    periodic = Schedule("cosine_restarts", total_steps=500, warmup_steps=10, restart_every=40, min_lr_ratio=0.05)
    for t in (0, 10, 20, 39, 40, 65, 80, 399):
        assert periodic(10 + t) == pytest.approx(cosine((t % 40) / 40, 0.05)), t
    jumps = [step for step in range(11, 500) if periodic(step) > periodic(step - 1)]
    assert jumps == list(range(50, 500, 40))  # warmup + k * period

    growing = Schedule("cosine_restarts", total_steps=400, restart_every=20, restart_mult=2)
    assert [step for step in range(1, 400) if growing(step) > growing(step - 1)] == [20, 60, 140, 300]
    assert growing(20 + 20) == pytest.approx(cosine(20 / 40))  # halfway through the 40-step cycle
    assert growing(60 + 20) == pytest.approx(cosine(20 / 80))  # a quarter into the 80-step cycle


def _torch_lrs(scheduler_cls, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler_cls(opt, **kw)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "schedule, torch_cls, kw",
    [
        (Schedule("step", 300, every=25, gamma=0.3), torch.optim.lr_scheduler.StepLR, {"step_size": 25, "gamma": 0.3}),
        (Schedule("exponential", 300, every=1, gamma=0.97), torch.optim.lr_scheduler.ExponentialLR, {"gamma": 0.97}),
        (
            Schedule("cosine", 300, min_lr_ratio=0.1),
            torch.optim.lr_scheduler.CosineAnnealingLR,
            {"T_max": 300, "eta_min": 0.1},
        ),
        (
            Schedule("cosine_restarts", 300, restart_every=30, restart_mult=2, min_lr_ratio=0.1),
            torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
            {"T_0": 30, "T_mult": 2, "eta_min": 0.1},
        ),
    ],
)
def test_schedules_agree_with_torch_schedulers(schedule, torch_cls, kw):
    assert [schedule(s) for s in range(300)] == pytest.approx(_torch_lrs(torch_cls, 300, **kw), abs=1e-9)


def test_config_drives_the_lambda_scheduler():
    cfg = load_config(
        None,
        ["schedule.name=step", "schedule.every=3", "schedule.gamma=0.5", "schedule.warmup_steps=2", "optim.lr=0.2"],
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(cfg.schedule, opt, total_steps=20)
    expected = build_schedule(cfg.schedule, 20)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * expected(step))
        opt.step()
        sched.step()
    assert [expected(s) for s in (0, 1, 2, 4, 5, 8)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.25])


def test_plot_lr_draws_the_schedule_before_training(tmp_path, data_root, capsys):
    out = tmp_path / "lr.png"
    code = main(
        [
            "plot",
            "--lr",
            "--out",
            str(out),
            str(CONFIGS / "digits.yaml"),
            f"data.root={data_root}",
            "schedule.name=cosine_restarts",
            "schedule.restart_every=50",
            "schedule.restart_mult=2",
            "schedule.warmup_steps=20",
            "optim.lr=0.01",
            "train.epochs=10",
        ]
    )
    assert code == 0 and out.is_file() and out.stat().st_size > 10_000
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["total_steps"] == 190 and data["steps_per_epoch"] == 19  # 1257 // 64 per epoch, 10 epochs
    expected = Schedule("cosine_restarts", 190, warmup_steps=20, restart_every=50, restart_mult=2)
    assert data["lr"] == pytest.approx([0.01 * expected(s) for s in range(190)])
    assert data["restarts"] == [70, 170] and data["warmup_steps"] == 20  # cycles: 20..69, 70..169, 170..
    assert "cosine_restarts schedule over 190 steps" in capsys.readouterr().out


def test_fused_adamw_is_the_default_on_cpu_too_and_steps_as_the_loop_does():
    """optim.fused=auto takes torch's fused AdamW wherever it has the kernel (CPU included: the loop over
    tensors is the slower default there); it steps the parameters as the per-tensor loop does, to rounding."""
    from dtrain.optim import build_optimizer

    def trained(fused: str):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = build_optimizer(load_config(None, [f"optim.fused={fused}", "optim.weight_decay=0.01"]).optim, model)
        for i in range(20):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(i))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return opt, torch.nn.utils.parameters_to_vector(model.parameters())

    auto, looped = trained("auto"), trained("false")
    assert auto[0].defaults["fused"] is True and looped[0].defaults["fused"] is None
    assert [g["weight_decay"] for g in auto[0].param_groups] == [0.01, 0.0]  # decay on matrices only
    assert torch.allclose(auto[1], looped[1], rtol=1e-5, atol=1e-6) and not torch.equal(auto[1], looped[1])


def test_plot_lr_of_a_torch_scheduler_is_refused_in_one_line(data_root, capsys):
    """Only dtrain's own schedules are pure functions of the step drawn before training (a torch scheduler's
    max_lr or lengths may be its own): one line, exit 2, rather than a wrong curve."""
    code = main(
        [
            "plot",
            "--lr",
            str(CONFIGS / "digits.yaml"),
            f"data.root={data_root}",
            "schedule.name=torch.optim.lr_scheduler:OneCycleLR",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "dtrain: error: config: schedule.name: torch.optim.lr_scheduler:OneCycleLR is not "
        "one of dtrain's schedules, which alone are drawn before training; its LR is logged "
        "as it trains (dtrain plot RUN_DIR)"
    )
