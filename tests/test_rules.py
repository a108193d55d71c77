"""Every rule of the loop, in this process, in seconds: when to validate, to save (cadence, best, final,
retention), to log, and to stop (signal, non-finite, max steps, early stop, run.stop_at_step), patience
across a resume.

Two levels. The owners' rules are tested on the owners themselves (Evaluator, Checkpointer on real files,
StopControl, resume.finished). The rules the loop applies are tested on the real Trainer (its fit, after_step,
validate, save, resume, finish) over fake parts: a feed of tiny batches, an engine whose step does nothing,
scripted validation losses, a logger that keeps its records. The real evaluator, checkpointer (real files
under tmp_path), stop control and throughput meter are used. What needs processes (signals from outside,
ranks, kills, SLURM) stays in the process tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import types
from pathlib import Path

import pytest
import torch

from dtrain import dist, trainer as trainer_module
from dtrain.checkpoint import Checkpointer
from dtrain.config import EarlyStopConfig, load_config
from dtrain.evaluate import Evaluator
from dtrain.signals import StopControl, StopReason
from dtrain.steplog import SkippedUpdates, StepLog
from dtrain.summary import Stopwatch
from dtrain.throughput import Throughput
from dtrain.trainer import Trainer

SINGLE = dist.DistInfo("single", 0, 0, 1, torch.device("cpu"), None)


def _evaluator(val_every: int = 0, patience=None, min_delta: float = 0.0) -> Evaluator:
    return Evaluator(None, None, None, None, None, val_every, EarlyStopConfig(patience=patience, min_delta=min_delta))


# ---- validation cadence -----------------------------------------------------------------------------------


def test_validation_every_epoch_when_val_every_is_0():
    ev = _evaluator(val_every=0)
    assert [s for s in range(1, 13) if ev.should_validate(s, steps_per_epoch=5, last=s == 12)] == [5, 10, 12]


def test_validation_every_val_every_steps_and_at_epoch_ends():
    ev = _evaluator(val_every=3)
    assert [s for s in range(1, 12) if ev.should_validate(s, steps_per_epoch=5, last=s == 11)] == [3, 5, 6, 9, 10, 11]


# ---- best and patience ------------------------------------------------------------------------------------


def test_observe_keeps_the_best_and_counts_validations_without_improvement():
    ev = _evaluator(patience=2, min_delta=0.1)
    seen = [ev.observe(loss, step) for step, loss in [(1, 1.0), (2, 0.95), (3, 0.5), (4, 0.45), (5, 0.6)]]
    # 0.95 and 0.45 improve by less than min_delta: not an improvement
    assert seen == [(True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (ev.best_val, ev.best_step, ev.bad_validations) == (0.5, 3, 2)


def test_no_patience_never_stops_early():
    ev = _evaluator(patience=None)
    assert not any(stop for _, stop in (ev.observe(1.0 + i, i) for i in range(1, 20)))
    assert ev.bad_validations == 18


def test_patience_counts_on_after_a_resume():
    ev = _evaluator(patience=3)
    for step, loss in [(1, 1.0), (2, 1.1), (3, 1.2)]:
        ev.observe(loss, step)
    resumed = _evaluator(patience=3)
    resumed.load_state_dict(json.loads(json.dumps(ev.state_dict())))  # as a checkpoint keeps it
    assert resumed.observe(1.3, 4) == (False, True)  # the third bad validation in a row, two before the resume
    assert (resumed.best_val, resumed.best_step) == (1.0, 1)


def finished(step: int, total_steps: int, bad_validations: int, patience) -> str | None:
    """What a run resumed at `step` stops for at once: the evaluator's patience, the stop control's verdict."""
    ev = _evaluator(patience=patience)
    ev.bad_validations = bad_validations
    stop = StopControl(None)
    stop.resumed(step, total_steps, ev.patience_used_up)
    stop.close()
    return stop.reason.value if stop.reason else None


def test_resume_finds_a_run_finished_by_length_or_patience():
    assert finished(10, 10, 0, None) == "completed"
    assert finished(10, 10, 3, 2) == "completed"  # both: the training length is said first
    assert finished(10, 12, 2, 2) == "early_stop"  # early_stop.patience lowered to what was already used up
    assert finished(10, 12, 1, 2) is None
    assert finished(10, 12, 5, None) is None  # patience removed: trains on


# ---- checkpoint cadence, best, retention (real files) -----------------------------------------------------


def test_checkpoint_cadence():
    assert not any(Checkpointer("unused", 2, SINGLE, "h", every=0).should_save(s) for s in range(1, 50))
    assert [s for s in range(1, 13) if Checkpointer("unused", 2, SINGLE, "h", every=4).should_save(s)] == [4, 8, 12]


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*"))


def _save(ckpt: Checkpointer, step: int, best: bool = False) -> None:
    ckpt.save(step, {"step": step}, {"rng": torch.zeros(1)}, best=best)


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_last_k_and_the_best(tmp_path, async_save):
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep_last=2, dist_info=SINGLE, config_hash="h", keep_best=1, async_save=async_save)
    for step in (1, 2, 3, 4):
        _save(ckpt, step, best=step == 2)
    ckpt.wait()
    assert _steps(root) == [2, 3, 4]  # the last two and the best
    assert ckpt.pointer("latest").name == "step-00000004" and ckpt.pointer("best").name == "step-00000002"
    _save(ckpt, 5, best=True)
    _save(ckpt, 6)
    ckpt.wait()
    assert _steps(root) == [5, 6]  # step 2 is no longer the best
    assert ckpt.pointer("best").name == "step-00000005"
    assert not list(root.glob(".tmp-*"))


def test_keep_best_m_survives_a_resume(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep_last=1, dist_info=SINGLE, config_hash="h", keep_best=2)
    for step, best in [(1, True), (2, False), (3, True), (4, False)]:
        _save(ckpt, step, best)
    assert _steps(root) == [1, 3, 4]
    path, state, rank_state = Checkpointer(root, 1, SINGLE, "h").load_latest(lambda msg: None)
    assert path.name == "step-00000004" and state["checkpointer"] == {"best_steps": [1, 3]}
    resumed = Checkpointer(root, keep_last=1, dist_info=SINGLE, config_hash="h", keep_best=2)
    resumed.load_state_dict(state["checkpointer"])
    _save(resumed, 5)
    assert _steps(root) == [1, 3, 5]  # the two best of before the resume kept
    _save(resumed, 6, best=True)
    assert _steps(root) == [3, 6]


def test_keep_best_0_keeps_only_the_best_pointers_target(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep_last=1, dist_info=SINGLE, config_hash="h", keep_best=0)
    for step in (1, 2, 3):
        _save(ckpt, step, best=step == 1)
    assert _steps(root) == [1, 3]  # the `best` pointer's target is never pruned from under it


# ---- stop control -----------------------------------------------------------------------------------------


@pytest.fixture
def stop():
    control = StopControl(None, stop_at_step=None)
    yield control
    control.close()


def test_stop_at_the_end_of_the_plan(stop):
    assert stop.check(5, last=False) is None
    assert stop.check(6, last=True) == StopReason.COMPLETED and StopReason.COMPLETED.finished


def test_stop_at_step_is_resumable():
    control = StopControl(None, stop_at_step=4)
    try:
        assert [control.check(s, last=False) for s in (2, 3)] == [None, None]
        assert control.check(4, last=False) == StopReason.STOP_AT_STEP and not StopReason.STOP_AT_STEP.finished
    finally:
        control.close()


@pytest.mark.parametrize(
    "signum, reason",
    [(signal.SIGTERM, StopReason.SIGTERM), (signal.SIGUSR1, StopReason.SIGUSR1), (signal.SIGINT, StopReason.SIGINT)],
)
def test_a_signal_stops_after_this_step(stop, signum, reason):
    assert signal.getsignal(signum) == stop._handle  # else raising it would end pytest
    signal.raise_signal(signum)
    assert stop.check(3, last=False) == reason and reason.is_signal and not reason.finished


def test_the_last_step_completes_whatever_signal_came(stop):
    signal.raise_signal(signal.SIGTERM)
    assert stop.check(6, last=True) == StopReason.COMPLETED


def test_preemption_wins_over_other_signals(stop):
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGUSR1)
    assert stop.check(1, last=False) == StopReason.SIGUSR1  # the one that requeues the job


def test_the_first_reason_given_wins(stop):
    stop.request(StopReason.NONFINITE)
    stop.request(StopReason.EARLY_STOP)
    assert stop.check(6, last=True) == StopReason.NONFINITE


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    StopControl(None).close()
    assert signal.getsignal(signal.SIGTERM) == before


# ---- the loop's rules, on the real Trainer over fake parts ------------------------------------------------


class FakeFeed:
    """`total_steps` steps of one micro-batch each, `steps_per_epoch` to an epoch; a batch is {"x": [step]}."""

    def __init__(self, total_steps: int, steps_per_epoch: int):
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.grad_accum, self.samples_per_step, self.step = 1, 1, 0

    def batches(self, step: int):
        end = min((step // self.steps_per_epoch + 1) * self.steps_per_epoch, self.total_steps)
        for s in range(step, end):
            self.step = s + 1
            yield {"x": torch.tensor([float(s + 1)])}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state) -> None:
        self.step = state["step"]


class FakeEngine:
    """A step that does nothing; `skip_at` steps report a non-finite gradient norm (update skipped), as a
    bool (decided on the host) or, `on_device`, as a tensor (decided by the optimizer on the device)."""

    def __init__(self, skip_at=(), on_device: bool = False):
        self.model, self.lr, self.skip_at, self.steps = torch.nn.Linear(1, 1), 0.1, set(skip_at), 0
        self.module = self.model  # the weights (trainer.check_weights reads them)
        self.on_device = on_device
        self.loaded = self.tested = None
        self.to_device = lambda t: t
        self.save_to = None  # no files of its own (as DDP)

    def no_backward_sync(self, last):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        pass

    def step(self):
        self.steps += 1
        skipped = self.steps in self.skip_at
        return torch.tensor(math.nan if skipped else 1.0), torch.tensor(int(skipped)) if self.on_device else skipped

    def trainable_changed(self):
        pass

    def state_dict(self) -> dict:
        return {"model": {"steps": torch.tensor(self.steps)}}

    def load_from(self, path, state):
        self.steps, self.loaded = int(state["model"]["steps"]), path

    def load_weights(self, path, state):
        self.tested = int(state["model"]["steps"])  # the step whose weights the test saw


class FakeLoss:
    names = ["loss"]

    def __call__(self, output, batch):
        return {"loss": output.sum() * 0 + 0.5}


class ScriptedEvaluator(Evaluator):
    """The real evaluator (cadence, best, patience) whose validation losses are given per step."""

    def __init__(self, cfg, val_losses: dict):
        super().__init__(
            None,
            lambda model, batch: batch["x"],
            FakeLoss(),
            None,
            "classification",
            cfg.train.val_every,
            cfg.early_stop,
        )
        self.val_losses, self.step_of = val_losses, None

    def evaluate(self, stream, prefix, log_local=None, progress=False):
        return {f"{prefix}/loss": self.val_losses.get(self.step_of(), 1.0) if prefix == "val" else 0.25}


class FakeLogger:
    wandb = None  # no W&B run: no checkpoint artifacts
    show_progress = False

    def __init__(self, run_dir: Path):
        self.run_dir, self.records, self.lines, self.total_steps = run_dir, [], [], None

    def start(self, step, total_steps):
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def info(self, line):
        self.lines.append(line)

    warning = info  # skipped updates and the non-finite stop are warnings

    def metrics(self, record):
        self.records.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:  # what a resume of a finished run reads back
            f.write(json.dumps(record) + "\n")

    def progress(self, step, **values):
        pass

    def advance(self, step):
        pass

    def close(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def make_trainer(
    tmp_path: Path,
    monkeypatch,
    overrides: list[str] = (),
    val_losses: dict | None = None,
    steps_per_epoch: int = 100,
    skip_at=(),
    on_device: bool = False,
    debug: bool = False,
    test: bool = True,
) -> Trainer:
    """The real Trainer on fake parts: build_components is the one seam (the refactor moving a rule to its
    owner changes what this builds, not what the tests below assert)."""
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=r", "log.progress=false", *overrides])
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    run_dir = tmp_path / "r"
    evaluator = ScriptedEvaluator(cfg, val_losses or {})
    log = FakeLogger(run_dir)
    data = types.SimpleNamespace(
        facts=types.SimpleNamespace(task="classification"),
        feed=FakeFeed(total, steps_per_epoch),
        val=object(),
        test=object() if test else None,
    )
    evaluator.engine = FakeEngine(skip_at, on_device)
    core = types.SimpleNamespace(
        data=data,
        engine=evaluator.engine,
        evaluator=evaluator,
        freezer=types.SimpleNamespace(apply=lambda step: False, frozen=set()),
    )
    meter, stop, clock = (
        Throughput(1, 1, None, None, 1, torch.device("cpu")),
        StopControl(None, stop_at_step=cfg.run.stop_at_step),
        Stopwatch(),
    )
    ck = cfg.checkpoint
    make_checkpointer = functools.partial(
        Checkpointer,
        run_dir / "checkpoints",
        ck.keep_last,
        SINGLE,
        cfg.hash(),
        keep_best=ck.keep_best,
        every=ck.every,
        save_best=ck.save_best,
        enabled=not debug,
        halted=lambda: stop.reason == StopReason.NONFINITE,
        clock=clock.part,
    )
    skipped = SkippedUpdates(cfg.train.nonfinite, torch.device("cpu"), stop, log.warning, lambda: data.feed.step)
    components = types.SimpleNamespace(
        run_dir=run_dir,
        core=core,
        log=log,
        key_log=None,
        meter=meter,
        make_checkpointer=make_checkpointer,
        stop=stop,
        clock=clock,
        skipped=skipped,
        step_log=StepLog(log, meter, ["loss"], cfg.train.log_every, False, lambda: 0.1, skipped, torch.device("cpu")),
    )
    monkeypatch.setattr(trainer_module, "build_components", lambda *args: components)
    trainer = Trainer(cfg, SINGLE, debug=debug)
    evaluator.step_of = lambda: trainer.step
    return trainer


def _logged(trainer: Trainer, key: str) -> list[int]:
    return [r["step"] for r in trainer.log.records if key in r]


def _saved(trainer: Trainer) -> list[int]:
    return _steps(trainer.run_dir / "checkpoints")


def test_log_every_n_steps_and_the_last(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=10", "train.log_every=4"])
    assert t.fit()["stop_reason"] == "completed"
    assert _logged(t, "lr") == [4, 8, 10]
    assert [r["loss"] for r in t.log.records if "lr" in r] == [0.5, 0.5, 0.5]  # the mean over the steps since the last


def test_validation_in_the_loop(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=12", "train.val_every=0"], steps_per_epoch=5)
    t.fit()
    assert _logged(t, "val/loss") == [5, 10, 12]  # every epoch (5 steps) and the last step
    assert _logged(t, "test/loss") == [12]


def test_checkpoint_cadence_and_the_final_save(tmp_path, monkeypatch):
    t = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=10", "checkpoint.every=4", "checkpoint.keep_last=10", "checkpoint.save_best=false"],
    )
    t.fit()
    assert _saved(t) == [4, 8, 10]  # every 4 steps, and the final step once
    assert t.checkpointer.pointer("best") is None


def test_save_best_on_improvement_and_test_on_the_best(tmp_path, monkeypatch):
    t = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=15", "train.val_every=5", "checkpoint.keep_last=1"],
        val_losses={5: 1.0, 10: 0.5, 15: 0.7},
    )
    t.fit()
    assert t.checkpointer.pointer("best").name == "step-00000010"
    assert _saved(t) == [10, 15]  # the best, and the final (keep_last=1)
    assert [r["test/weights_step"] for r in t.log.records if "test/loss" in r] == [10]
    assert t.engine.tested == 10  # the test ran on the best weights, not the last


def test_debug_saves_nothing(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=10", "checkpoint.every=2"], debug=True, test=False)
    assert t.fit()["stop_reason"] == "completed"
    assert not (t.run_dir / "checkpoints").exists()


def test_stops_at_max_steps(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.epochs=5", "train.max_steps=7"])
    assert t.fit()["step"] == 7 and t.engine.steps == 7


def test_stop_at_step_saves_and_does_not_test(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=10", "run.stop_at_step=6"])
    assert t.fit() == {"step": 6, "stop_reason": "stop_at_step"}
    assert _saved(t) == [6] and _logged(t, "test/loss") == []


def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=10"])
    engine_step = t.engine.step

    def step_then_sigterm():
        out = engine_step()
        if t.engine.steps == 3:
            assert signal.getsignal(signal.SIGTERM) == t.stop._handle
            signal.raise_signal(signal.SIGTERM)
        return out

    t.engine.step = step_then_sigterm
    assert t.fit() == {"step": 3, "stop_reason": "signal:SIGTERM"}
    assert _saved(t) == [3] and _logged(t, "test/loss") == []
    assert any("run the same command again" in line for line in t.log.lines)


@pytest.mark.parametrize("on_device", [False, True])
def test_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, on_device):
    t = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=10", "train.nonfinite=stop", "checkpoint.every=2"],
        skip_at={5},
        on_device=on_device,
    )
    assert t.fit() == {"step": 5, "stop_reason": "nonfinite"}
    assert _saved(t) == [2, 4]  # nothing of the bad step
    assert t.skipped.total == 1


def test_nonfinite_stop_even_at_a_checkpoint_step(tmp_path, monkeypatch):
    t = make_trainer(
        tmp_path, monkeypatch, ["train.max_steps=10", "train.nonfinite=stop", "checkpoint.every=2"], skip_at={4}
    )
    assert t.fit() == {"step": 4, "stop_reason": "nonfinite"}
    assert _saved(t) == [2]


def _weights_turn_nan_at(t: Trainer, step: int) -> None:
    engine_step = t.engine.step

    def step_then_nan():
        out = engine_step()
        if t.engine.steps == step:  # a finite gradient, an update that overflows (optim.lr=1e30)
            with torch.no_grad():
                t.engine.module.weight.fill_(math.inf)
        return out

    t.engine.step = step_then_nan


def test_nonfinite_weights_stop_before_any_save_and_never_complete(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=10", "checkpoint.every=2"])
    _weights_turn_nan_at(t, 5)
    assert t.fit() == {"step": 6, "stop_reason": "nonfinite"}  # found at the next save: not saved, not tested
    assert _saved(t) == [2, 4] and _logged(t, "test/loss") == []
    assert t.log.lines[-1] == (
        f"stopped at step 6: the weights are non-finite (NaN/inf): the run diverged; the "
        f"newest checkpoint is {t.run_dir / 'checkpoints' / 'step-00000004'}; lower optim.lr "
        "and run again, or start afresh under another run.name"
    )


@pytest.mark.parametrize("overrides", [["run.stop_at_step=3"], []])
def test_nonfinite_weights_at_the_end_are_not_saved(tmp_path, monkeypatch, overrides):
    """The last step (or run.stop_at_step's) is checked before its final save, whatever the reason to stop."""
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=3", *overrides])
    _weights_turn_nan_at(t, 3)
    assert t.fit() == {"step": 3, "stop_reason": "nonfinite"}
    assert _saved(t) == [] and "no checkpoint was kept" in t.log.lines[-1]


@pytest.mark.parametrize("skip_at, reason", [({9, 10}, "nonfinite"), ({10}, "completed"), ({2, 3}, "completed")])
def test_a_run_that_ends_in_skipped_updates_does_not_complete(tmp_path, monkeypatch, skip_at, reason):
    """train.nonfinite=skip with optim.lr=1e30: finite weights of 1e29, every update after the first skipped,
    'completed' with a NaN test loss. Two skipped in a row at the end: the same weights failed on two batches.
    One at the end is a bad batch; a run of them mid-run was recovered from."""
    t = make_trainer(tmp_path, monkeypatch, ["train.max_steps=10"], skip_at=skip_at, on_device=True)
    assert t.fit()["stop_reason"] == reason
    if reason == "nonfinite":
        assert "stopped at step 10: the last 2 updates were skipped" in t.log.lines[-1]


@pytest.mark.parametrize(
    "on_device, said", [(False, ["step 2", "step 3", "step 7"]), (True, ["steps 1-5", "steps 6-10"])]
)  # no sync: at the log lines
def test_nonfinite_skip_trains_on_and_counts(tmp_path, monkeypatch, on_device, said):
    t = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=10", "train.nonfinite=skip", "train.log_every=5"],
        skip_at={2, 3, 7},
        on_device=on_device,
    )
    assert t.fit()["stop_reason"] == "completed"
    assert t.skipped.total == 3
    assert [line.split(":")[0] for line in t.log.lines if "non-finite" in line] == said


def test_early_stop(tmp_path, monkeypatch):
    t = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=20", "train.val_every=2", "early_stop.patience=2"],
        val_losses={2: 1.0, 4: 0.8, 6: 0.9, 8: 0.85, 10: 0.1},
    )
    result = t.fit()
    assert (result["step"], result["stop_reason"]) == (8, "early_stop")  # 6 and 8 no better than 4
    assert _logged(t, "test/loss") == [8] and t.log.records[-1]["test/weights_step"] == 4
    assert [r["best_step"] for r in t.log.records if r.get("event") == "early_stop"] == [4]


def test_patience_across_a_resume(tmp_path, monkeypatch):
    losses = {2: 1.0, 4: 0.8, 6: 0.9, 8: 0.85, 10: 0.95, 12: 0.1}
    first = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=20", "train.val_every=2", "early_stop.patience=3", "run.stop_at_step=7"],
        val_losses=losses,
    )
    assert first.fit() == {"step": 7, "stop_reason": "stop_at_step"}
    assert first.evaluator.bad_validations == 1
    second = make_trainer(
        tmp_path, monkeypatch, ["train.max_steps=20", "train.val_every=2", "early_stop.patience=3"], val_losses=losses
    )
    result = second.fit()
    assert second.engine.loaded.name == "step-00000007"
    # 6 before the resume, 8 and 10 after: three validations without improvement
    assert (result["step"], result["stop_reason"]) == (10, "early_stop")


def test_a_resume_with_patience_already_used_up_stops_at_once(tmp_path, monkeypatch):
    losses = {2: 1.0, 4: 1.1, 6: 1.2}
    first = make_trainer(
        tmp_path,
        monkeypatch,
        ["train.max_steps=20", "train.val_every=2", "early_stop.patience=5", "run.stop_at_step=6"],
        val_losses=losses,
    )
    first.fit()
    second = make_trainer(
        tmp_path, monkeypatch, ["train.max_steps=20", "train.val_every=2", "early_stop.patience=2"], val_losses=losses
    )
    result = second.fit()
    assert (result["step"], result["stop_reason"]) == (6, "early_stop")
    assert second.engine.steps == 6  # not one more step
    assert _logged(second, "test/loss") == [6]
    third = make_trainer(
        tmp_path, monkeypatch, ["train.max_steps=20", "train.val_every=2", "early_stop.patience=2"], val_losses=losses
    )
    assert third.fit()["stop_reason"] == "already_completed"  # finished and tested: nothing to do


def test_preemption_wins_over_the_other_signals_in_one_place():
    """One order for every path that turns flags into a stop (StopControl across ranks, the replica groups'
    vote of dtrain.ft_train): SIGUSR1 (preemption: it requeues the job), then SIGTERM, then SIGINT."""
    from dtrain.signals import HANDLED, first_signal

    def flags(*names):
        out = [0.0] * len(HANDLED)
        for n in names:
            out[HANDLED[getattr(signal, n)]] = 1.0
        return out

    assert first_signal(flags()) is None
    assert first_signal(flags("SIGINT", "SIGTERM")) == "SIGTERM"
    assert first_signal(flags("SIGINT", "SIGTERM", "SIGUSR1")) == "SIGUSR1"
    assert first_signal(flags("SIGINT")) == "SIGINT"
