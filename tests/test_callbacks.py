"""Callbacks (issue #34.3): each event in order with its arguments, on every rank; a callback's state resumed;
named in the config; a callback's exception ends every rank with its traceback once."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

import dtrain
from conftest import REPO, metrics_of, run_dtrain, run_ranks
from dtrain.checkpoint import verify
from dtrain.config import ConfigError

USERCODE = REPO / "tests" / "usercode"
ARGS = [
    "log.progress=false",
    "train.max_steps=6",
    "train.val_every=3",
    "checkpoint.every=3",
    "train.log_every=1",
    "data.batch_size=32",
    "run.doctor=false",
    "run.name=cb",
]


@pytest.fixture
def here(tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)
    return [f"data.root={data_root}", *ARGS]


class Recorder:
    """Every event, with what it was told; a checkpoint's manifest read when it is announced."""

    def __init__(self):
        self.events = []

    def on_train_start(self, run):
        self.events.append(("on_train_start", run))

    def on_step_end(self, step, loss):
        self.events.append(("on_step_end", step, float(loss)))

    def on_validation_end(self, step, metrics):
        self.events.append(("on_validation_end", step, metrics))

    def on_checkpoint(self, path, step, best):
        self.events.append(("on_checkpoint", path, step, best, verify(path)["step"]))  # complete, as announced

    def on_train_end(self, result):
        self.events.append(("on_train_end", result))

    def on_exception(self, error):
        self.events.append(("on_exception", error))


class Counter:
    """Counts the steps it saw; resumed with the run."""

    made = []

    def __init__(self):
        self.steps = 0
        Counter.made.append(self)

    def on_step_end(self, step, loss):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@pytest.mark.parametrize("async_save", [False, True])
def test_every_event_fires_in_order_with_its_arguments(here, tmp_path, async_save):
    rec = Recorder()
    result = dtrain.fit([*here, f"checkpoint.async_save={str(async_save).lower()}"], callbacks=[rec])
    run_dir, names = tmp_path / "runs" / "cb", [e[0] for e in rec.events]
    assert names[0] == "on_train_start" and names[-1] == "on_train_end" and "on_exception" not in names
    start = rec.events[0][1]
    assert (
        start.global_rank,
        start.world_size,
        start.is_global_zero,
        start.step,
        start.total_steps,
        start.run_dir,
    ) == (0, 1, True, 0, 6, run_dir)
    assert [e[1] for e in rec.events if e[0] == "on_step_end"] == [1, 2, 3, 4, 5, 6]
    logged = {r["step"]: r["loss"] for r in metrics_of(run_dir) if "loss" in r}  # log_every=1: this rank's = the mean
    assert all(e[2] == pytest.approx(logged[e[1]], rel=1e-5) for e in rec.events if e[0] == "on_step_end")
    val = {
        r["step"]: {k: v for k, v in r.items() if k not in ("step", "epoch")}
        for r in metrics_of(run_dir)
        if "val/loss" in r
    }
    assert {e[1]: e[2] for e in rec.events if e[0] == "on_validation_end"} == val and set(val) >= {3, 6}
    published = [e for e in rec.events if e[0] == "on_checkpoint"]
    assert published and all(e[1] == run_dir / "checkpoints" / f"step-{e[2]:08d}" and e[4] == e[2] for e in published)
    assert {e[2] for e in published} >= {3, 6} and any(e[3] for e in published)  # the cadence's, and a best one
    # each at its step: after that step ended, its validation before its checkpoints (published in the
    # background with async_save: maybe after the next step, certainly before the end)
    order = [(e[0], e[1] if e[0] != "on_checkpoint" else e[2]) for e in rec.events[1:-1]]
    assert order.index(("on_step_end", 3)) < order.index(("on_validation_end", 3)) < order.index(("on_checkpoint", 3))
    assert async_save or order.index(("on_checkpoint", 3)) < order.index(("on_step_end", 4))
    assert rec.events[-1][1] == result and result.step == 6


def test_a_stateful_callback_resumes_with_the_count_of_an_uninterrupted_run(here, tmp_path):
    straight = Counter()
    dtrain.fit([*here, "run.name=straight"], callbacks=[straight])
    first = Counter()
    stopped = dtrain.fit([*here, "run.stop_at_step=4"], callbacks=[first])
    assert (stopped.stop_reason, first.steps) == ("stop_at_step", 4)
    resumed = Counter()
    done = dtrain.fit(here, callbacks=[resumed])
    assert done.stop_reason == "completed" and straight.steps == resumed.steps == 6


def test_callbacks_named_in_the_config_are_made_saved_and_recorded(here, tmp_path):
    Counter.made.clear()
    result = dtrain.fit([*here, "run.callbacks=[test_callbacks:Counter]"])
    assert len(Counter.made) == 1 and Counter.made[0].steps == 6 and result.exit_code == 0
    config = yaml.safe_load((tmp_path / "runs" / "cb" / "config.yaml").read_text())
    assert config["run"]["callbacks"] == ["test_callbacks:Counter"]
    import torch

    own = torch.load(tmp_path / "runs" / "cb" / "checkpoints" / "latest" / "rank-00000.pt", weights_only=True)
    assert own["callbacks"] == {"test_callbacks:Counter": {"steps": 6}}


def test_callbacks_handed_in_replace_the_configs_and_are_recorded(here, tmp_path):
    Counter.made.clear()
    rec = Recorder()
    dtrain.fit([*here, "run.callbacks=[test_callbacks:Counter]"], callbacks=[rec])
    assert not Counter.made and rec.events  # the config's is never made
    config = yaml.safe_load((tmp_path / "runs" / "cb" / "config.yaml").read_text())
    assert config["run"]["callbacks"] == ["test_callbacks:Recorder"]


def test_a_checkpoints_callbacks_are_code_that_eval_never_imports(here, tmp_path):
    """run.callbacks in a stored config are import strings (dtrain.trust): evaluation runs no callbacks, so eval
    empties them (it refused them unnamed before), as load_model does; the summary's evaluate command still runs."""
    dtrain.fit([*here, "run.callbacks=[test_callbacks:Counter]"])
    proc = run_dtrain(["eval", "--checkpoint", "runs/cb"], tmp_path, check=False)
    assert proc.returncode == 0 and "asks to run" not in proc.stderr, proc.stderr[-2000:]
    printed = shlex.split(json.loads((tmp_path / "runs" / "cb" / "summary.json").read_text())["evaluate"])
    assert 'run.callbacks=["test_callbacks:Counter"]' in printed
    run_dtrain(printed[printed.index("eval") :], tmp_path)


def test_a_callback_with_no_events_and_a_bad_import_string_are_one_line(here):
    with pytest.raises(ConfigError, match=r"^config: run.callbacks: builtins:object has none of the callback "):
        dtrain.fit(here, callbacks=[object()])
    with pytest.raises(ConfigError, match=r"^config: run.callbacks\[0\]: cannot import module 'nosuch'"):
        dtrain.fit([*here, "run.callbacks=[nosuch:Printer]"])
    assert not Path("runs/cb").exists()


def test_an_exception_in_a_callback_is_told_and_raised_as_the_users(here, tmp_path):
    class Failing(Recorder):
        def on_step_end(self, step, loss):
            if step == 2:
                raise ValueError("a bug in my callback")

    rec = Failing()
    with pytest.raises(ValueError, match="a bug in my callback"):
        dtrain.fit(here, callbacks=[rec])
    assert rec.events[-1][0] == "on_exception" and str(rec.events[-1][1]) == "a bug in my callback"
    assert "on_train_end" not in [e[0] for e in rec.events]


@pytest.mark.multiproc
def test_a_callback_raising_on_rank_1_of_2_ends_both_ranks_with_its_traceback_once(tmp_path, data_root):
    proc = run_ranks(
        2,
        [
            "train",
            f"data.root={data_root}",
            *ARGS,
            "dist.timeout_s=30",
            "run.callbacks=[callbacks_user:FailAtStep3OnRank1]",
        ],
        tmp_path,
        check=False,
        env={"PYTHONPATH": str(USERCODE)},
    )
    assert proc.returncode != 0
    assert proc.stderr.count("ValueError: a bug in callbacks_user.FailAtStep3OnRank1") == 1, proc.stderr
    assert proc.stderr.count("Traceback") == 1 and "callbacks_user.py" in proc.stderr
    assert "failed on rank 0" in proc.stderr  # rank 0: one line, the peer lost in its next collective


@pytest.mark.multiproc
def test_callbacks_run_on_every_rank_and_resume_each_ranks_state(tmp_path, data_root):
    args = ["train", f"data.root={data_root}", *ARGS, "run.callbacks=[callbacks_user:StepCounter]"]
    env = {"PYTHONPATH": str(USERCODE)}
    run_ranks(2, [*args, "run.stop_at_step=4"], tmp_path, env=env)
    run_ranks(2, args, tmp_path, env=env)
    counts = [json.loads((tmp_path / "runs" / "cb" / f"steps-{r}.json").read_text()) for r in (0, 1)]
    assert [c["steps"] for c in counts] == [6, 6] and [c["result_step"] for c in counts] == [6, 6]
    assert counts[0]["pid"] != counts[1]["pid"]  # each rank its own


def test_a_failing_report_of_dtrains_own_is_a_warning_not_the_runs_end(tmp_path):
    """W&B's checkpoint artifacts are a callback (callbacks.Reporter) whose failure leaves the checkpoint be."""
    import torch

    from dtrain.callbacks import Callbacks, Reporter
    from dtrain.checkpoint import Checkpointer
    from dtrain.dist import setup

    def unreachable(path, step, best):
        raise ConnectionError("W&B is unreachable")

    warned, seen = [], []
    checkpointer = Checkpointer(
        tmp_path / "checkpoints",
        2,
        setup(force_single=True),
        "h",
        callbacks=Callbacks(
            [Reporter(unreachable, warned.append), Reporter(lambda *told: seen.append(told), warned.append)]
        ),
    )
    checkpointer.save(3, {"w": torch.zeros(2)}, {}, best=True)
    assert warned == ["checkpoint: step-00000003 saved, but reporting it failed (ConnectionError: W&B is unreachable)"]
    assert seen == [((tmp_path / "checkpoints" / "step-00000003").absolute(), 3, True)] and verify(seen[0][0])
