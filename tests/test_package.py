"""What a downstream user depends on: the public API, typed and exported; the wheel's contents; the core install."""

import subprocess
import sys
import tomllib
import typing
import zipfile

import pytest

import dtrain
from conftest import REPO


def test_the_public_api_is_exported_and_light():
    for name in dtrain.__all__:
        assert getattr(dtrain, name) is not None, name
    assert issubclass(dtrain.ConfigError, ValueError) and issubclass(dtrain.DataError, RuntimeError)
    # `import dtrain` (and its error classes' names) costs no torch import: a CLI's --help and a script's import
    check = "import sys, dtrain; dtrain.__all__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_fit_is_typed_to_return_a_fit_result():
    """As a type checker reads them (FitResult is imported under TYPE_CHECKING: no torch at import)."""
    from dtrain.result import FitResult

    hints = typing.get_type_hints(dtrain.fit, globalns={**vars(dtrain), "FitResult": FitResult})
    assert hints["return"] is FitResult and dtrain.fit.__annotations__["return"] == "FitResult"
    assert typing.get_type_hints(dtrain.main)["return"] is typing.NoReturn


def test_the_core_install_leaves_out_scikit_learn_and_the_floors_are_the_tested_ones():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = " ".join(meta["dependencies"])
    assert "scikit-learn" not in deps and "scipy" not in deps
    assert meta["requires-python"] == ">=3.11"  # BaseException.add_note is used
    assert "torch>=2.13" in deps


def test_the_wheel_ships_the_digits_data_the_license_and_py_typed(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("dtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("dtrain/py.typed", "dtrain/data/digits.csv.gz", "dtrain/data/DIGITS_NOTICE.md"):
        assert member in names, member
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_lint_is_clean():
    """ruff's rule set in pyproject.toml ([tool.ruff.lint]) and its formatter, over the package, tests, benchmarks
    and examples (`ruff format` writes what this checks)."""
    paths = ["dtrain", "tests", "benchmarks", "examples", "docs", "README.md"]
    for command in (["check"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *paths], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


# A user's script as a type checker reads it: what dtrain.fit returns, a callback's arguments, the error
# classes. Each `type: ignore` must be needed (warn_unused_ignores): a misuse mypy no longer sees fails the test.
USER_SCRIPT = """
from pathlib import Path

import torch

import dtrain
from dtrain.callbacks import Callback, RunStart


class Printer(Callback):
    def on_train_start(self, run: RunStart) -> None:
        print(run.global_rank, run.total_steps)

    def on_validation_end(self, step: int, metrics: dict[str, float]) -> None:
        print(step, metrics["val/loss"])

    def on_step_end(self, step: int, loss: float) -> None:  # type: ignore[override]  # a 0-d tensor
        print(step, loss)


def build_model(input_shape: tuple[int, ...], num_outputs: int) -> torch.nn.Module:
    return torch.nn.Linear(input_shape[0], num_outputs)


try:
    result = dtrain.fit(["train.epochs=1"], config={"data.dataset": "digits"}, model=build_model,
                        callbacks=[Printer()])
except (dtrain.ConfigError, dtrain.DataError, dtrain.LaunchError, dtrain.CheckpointError) as e:
    raise SystemExit(f"{type(e).__name__}: {e}")
reveal_type(dtrain.fit())
best: float = result.best_metrics["val/loss"]
steps: int = result.step + result.total_steps
run_dir: Path = result.run_dir
if result.best_checkpoint is not None and not result.interrupted:
    reveal_type(dtrain.load_model(result.best_checkpoint, model=build_model))
    reveal_type(result.load_model(model=build_model))
after_best = result.best_step + 1  # type: ignore[operator]  # None before any validation
result.step = 0  # type: ignore[misc]  # frozen
dtrain.fit(epochs=3)  # type: ignore[call-arg]  # settings go in argv or config
reveal_type(dtrain.main())  # it exits: nothing after it is checked
"""


def test_types_are_clean_and_a_users_script_reads_fit_as_returning_a_fit_result(tmp_path):
    """mypy over the public modules ([tool.mypy] in pyproject.toml), then over a user's script. The cache is the
    repository's .mypy_cache (mypy's default): a fresh clone, as in CI, starts cold (~7 s of CPU, 46 s on 2 busy
    cores), a rerun takes a few seconds."""
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("mypy") for d in dev), "mypy must be in the dev extra, or CI skips this test"
    pytest.importorskip("mypy")
    mypy = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")]
    # cwd: mypy finds dtrain there (it can't follow the import hook of an editable install)
    proc = subprocess.run(mypy, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-1000:]
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    proc = subprocess.run([*mypy, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-1000:]
    revealed = [line.split("Revealed type is ")[1] for line in proc.stdout.splitlines() if "Revealed type" in line]
    assert revealed == [
        '"dtrain.result.FitResult"',
        '"torch.nn.modules.module.Module"',
        '"torch.nn.modules.module.Module"',
        '"Never"',
    ], proc.stdout
