"""The docs are tested: the README is short and starts with its two commands, the generated pages are current,
the site builds with `mkdocs build --strict`, and the README's script trains as shown."""

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO, _run_here, result_of

README = (REPO / "README.md").read_text()


def _gen():
    spec = importlib.util.spec_from_file_location("docs_gen", REPO / "docs" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_and_starts_with_install_and_test_commands():
    assert len(README.splitlines()) <= 200
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("pip install torch==2.13.0 -e . && dtrain train")
    assert first_block[1].startswith("pip install torch==2.13.0 -e '.[dev]' && python -m pytest")


@pytest.mark.parametrize("page", ["configuration.md", "index.md"])
def test_generated_pages_are_current(page):
    gen = _gen()
    assert (REPO / "docs" / page).read_text() == gen.PAGES[page](), f"docs/{page} is stale: run python docs/gen.py"


def test_every_config_key_is_in_the_reference():
    from dtrain.config import Config, _valid_keys

    page = (REPO / "docs" / "configuration.md").read_text()
    assert [k for k in _valid_keys(Config) if f"| `{k}` |" not in page] == []


def test_the_readme_links_to_pages_that_exist():
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / target).is_file(), target


def test_the_site_builds_strictly(tmp_path):
    """Broken links, missing pages and docstrings that don't render fail the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("FitResult") > 0


def test_the_readmes_script_trains_as_shown(tmp_path, data_root):
    """The script under 'A script of your own', as printed, run as python runs it."""
    script = README.split("## A script of your own", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "train.py"
    path.write_text(script)
    proc = _run_here([f"data.root={data_root}", "log.progress=false"], tmp_path, None, script=path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["stop_reason"] == "completed" and result["test/acc"] > 0.5, result


def test_the_digits_config_is_the_run_dtrain_train_runs(tmp_path, data_root):
    """configs/digits.yaml says `dtrain train` with no --config runs its values: the docs run one after the other
    (getting-started.md, README.md), and the second resumed nothing: 'model.kwargs.activation cannot change when
    a run resumes', the factory's defaults spelled out against the checkpoint's unset kwargs."""
    from conftest import CONFIGS, run_dtrain

    common = ["train.max_steps=2", f"data.root={data_root}", "log.progress=false"]
    run_dtrain(["train", *common], tmp_path)
    proc = run_dtrain(["train", "--config", str(CONFIGS / "digits.yaml"), *common], tmp_path, check=False)
    assert proc.returncode == 0 and "changed since the checkpoint" not in proc.stderr, proc.stderr[-2000:]
