"""What a downstream user depends on: the public API, typed and exported; the wheel's contents; the core install."""

import subprocess
import sys
import tomllib
import typing
import zipfile

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
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("dtrain/py.typed", "dtrain/data/digits.csv.gz", "dtrain/data/DIGITS_NOTICE.md"):
        assert member in names, member
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_lint_is_clean():
    """ruff's rule set in pyproject.toml ([tool.ruff.lint]), over the package, tests, benchmarks and examples."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "dtrain", "tests", "benchmarks", "examples", "docs"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
