"""`dtrain.fit`: a run from Python that returns its result (issue 22, point 6), in this process, twice."""

import json
import os
import signal

import pytest

import dtrain
from conftest import metrics_of, run_torchrun
from dtrain.config import ConfigError

ARGS = [
    "log.progress=false",
    "train.epochs=2",
    "train.val_every=5",
    "train.log_every=2",
    "data.batch_size=64",
    "run.name=fit",
]


@pytest.fixture
def here(tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)
    return [f"data.root={data_root}", *ARGS]


def test_fit_returns_the_result_of_an_interrupted_run_then_of_its_resume(here, tmp_path):
    steps = []

    def forward(model, batch):  # SIGTERM to this process during step 3 (the start-up probe is the first call)
        steps.append(None)
        if len(steps) == 4:  # the run stops after this step, resumable
            os.kill(os.getpid(), signal.SIGTERM)
        return model(batch[0])

    first = dtrain.fit(here, forward=forward)
    run_dir = tmp_path / "runs" / "fit"
    assert (first.exit_code, first.stop_reason, first.interrupted, first.step) == (75, "signal:SIGTERM", True, 3)
    assert first.run_dir == run_dir and first.latest_checkpoint == run_dir / "checkpoints" / "step-00000003"
    assert first.best_step is None and first.best_metrics == {} and first.best_checkpoint is None
    assert first.metrics["loss"] == metrics_of(run_dir)[-1]["loss"] and "test/loss" not in first.metrics

    second = dtrain.fit(["train", *here], forward=forward)  # the same call again resumes it, to the end and its test
    records = metrics_of(run_dir)
    val = [r for r in records if "val/loss" in r]
    best = min(val, key=lambda r: r["val/loss"])
    assert (second.exit_code, second.stop_reason, second.interrupted) == (0, "completed", False)
    assert second.step == second.total_steps == records[-1]["step"] and second.total_steps > 3
    assert second.best_step == best["step"] and second.best_metrics == {
        k: v for k, v in best.items() if k.startswith("val/") and k != "val/best_loss"
    }
    assert second.best_checkpoint == run_dir / "checkpoints" / f"step-{best['step']:08d}"
    assert second.latest_checkpoint == run_dir / "checkpoints" / f"step-{second.step:08d}"
    assert second.best_checkpoint.is_dir() and second.latest_checkpoint.is_dir()
    assert (
        second.metrics["val/loss"] == val[-1]["val/loss"]
        and second.metrics["loss"] == [r for r in records if "loss" in r][-1]["loss"]
    )
    assert second.metrics["test/acc"] == records[-1]["test/acc"] > 0.5

    third = dtrain.fit(here, forward=forward)  # finished and tested: nothing to train, the same result
    assert third.stop_reason == "already_completed" and third.exit_code == 0
    assert (third.metrics, third.best_metrics, third.best_checkpoint) == (
        second.metrics,
        second.best_metrics,
        second.best_checkpoint,
    )


def test_bad_input_raises_dtrains_one_line_error_where_main_exits_2(here, capsys):
    with pytest.raises(ConfigError, match=r"^config: optim.lr: .*") as e:
        dtrain.fit([*here, "optim.lr=-1"])
    assert "\n" not in str(e.value) and e.value.__traceback__ is not None
    with pytest.raises(ConfigError, match=r"error: unrecognized arguments: --nonsense$"):
        dtrain.fit([*here, "--nonsense"])
    with pytest.raises(ConfigError, match=r"^fit: it trains; `eval` is run by dtrain.main"):
        dtrain.fit(["eval", "--checkpoint", "runs/fit"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dtrain.main([*here, "optim.lr=-1"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("dtrain: error: config: optim.lr: ")
    assert not os.path.exists("runs/fit")  # nothing written


SCRIPT = """
import json, os, sys
import dtrain
result = dtrain.fit(sys.argv[1:])
# a file a rank, not stdout: two ranks' prints share torchrun's pipe, and print's text and newline are two writes
with open(f"result-{os.environ['RANK']}.json", "w") as f:
    json.dump({"rank": int(os.environ["RANK"]), "step": result.step, "stop_reason": result.stop_reason,
               "metrics": result.metrics, "best_step": result.best_step, "best": str(result.best_checkpoint)}, f)
"""


@pytest.mark.multiproc
def test_every_rank_returns_the_same_result_under_torchrun(tmp_path, data_root):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run_torchrun(2, [f"data.root={data_root}", *ARGS, "train.epochs=1"], tmp_path, script=script)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    assert {k: v for k, v in results[0].items() if k != "rank"} == {k: v for k, v in results[1].items() if k != "rank"}
    assert results[0]["stop_reason"] == "completed" and "test/acc" in results[0]["metrics"]
    assert results[0]["best"].endswith(f"step-{results[0]['best_step']:08d}")


def test_in_a_jupyter_kernel_the_arguments_default_to_none(monkeypatch):
    from dtrain.build import Hooks
    from dtrain.cli import parse_args

    monkeypatch.setattr("sys.argv", ["/venv/lib/ipykernel_launcher.py", "-f", "/run/jupyter/kernel-1.json"])
    args = parse_args(None, Hooks())
    assert (args.command, args.overrides, args.config) == ("train", [], None)
    monkeypatch.setattr("sys.argv", ["train.py", "optim.lr=0.5"])  # a script: its own arguments
    assert parse_args(None, Hooks()).overrides == ["optim.lr=0.5"]


def test_the_run_lifecycle_takes_a_config_not_a_command_line(here, tmp_path, capsys):
    """dtrain.run.run(cfg, hooks): the whole run (session, lock, trainer, summary, result, callbacks) from a
    Config; cli.py only parses into one. Its summary names the command it is given to go on with."""
    from dtrain.build import Hooks
    from dtrain.config import load_config
    from dtrain.result import FitResult
    from dtrain.run import run

    told = []

    class Ends:
        def on_train_end(self, result):
            told.append(result)

    result = run(
        load_config(None, [*here, "run.stop_at_step=2"]),
        Hooks(callbacks=[Ends()]),
        command=["my", "command", "run.stop_at_step=2"],
        program=["python", "mine.py"],
    )
    assert isinstance(result, FitResult) and result.stop_reason == "stop_at_step" and told == [result]
    summary = json.loads((tmp_path / "runs" / "fit" / "summary.json").read_text())
    assert summary["resume"] == "my command" and summary["evaluate"].startswith("python mine.py eval ")
    assert capsys.readouterr().out == ""  # no outcome printed: `dtrain train` asks for it
