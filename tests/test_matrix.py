"""The paths users take, walked end to end: entry {config file, script with hooks} x launcher {one process,
torchrun, dtrain launch, srun} x data {dtrain's built-in shards, jpg shards written by webdataset's TarWriter
with a user transform, text with string fields and a collate, dict batches for a Hugging Face model} x
outcome {trains and tests, SIGTERM then resume with identical test metrics, a user error: one line and its
exit code}. Each value of each axis appears in at least two cells, a few steps each (a README promise that
holds on one path only fails here). The srun cells run in tests/test_slurm.py, on its cluster.

A resume cell sends its SIGTERM to the real launcher at whatever moment training has reached (the launcher's exit
code, a checkpoint of every rank), then runs the same arguments again on ranks forked from the warm rank server
(run_ranks, with torchrun's variables: the same bits as a launcher's workers), and compares with an uninterrupted
run forked likewise: a new launcher and two new pythons for each were ~10 s apiece and checked nothing more. That
the same `dtrain launch` command resumes, launched again: tests/test_hooks_launch.py (the summary's command);
the same torchrun command: tests/test_hooks.py's GPT-2 script and test_faults' torchrun restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from dtrain.cli import main
from conftest import (
    REPO,
    _env,
    final_params,
    latest_logged_step,
    result_of,
    run_ranks,
    start,
    torchrun_cmd,
    wait_for,
)

USERCODE = REPO / "tests" / "usercode"
EXAMPLES = REPO / "examples"
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(USERCODE), str(EXAMPLES)])}

CELLS = [  # (entry, launcher, data, outcome)
    ("config", "single", "digits", "error"),
    ("script", "single", "tokens", "trains"),
    ("config", "torchrun", "jpg", "trains"),
    ("script", "torchrun", "text", "resume"),  # the text example's script route (README), SIGTERM, resume
    ("config", "launch", "text", "resume"),
    ("script", "launch", "digits", "error"),
    ("config", "srun", "tokens", "trains"),  # tests/test_slurm.py
    ("script", "srun", "jpg", "error"),  # tests/test_slurm.py
]
STEPS = ["train.max_steps=10", "train.val_every=5", "log.progress=false", "train.log_every=1"]
# the config route names the user's functions by import string; the script route hands the same objects in
CONFIG_ROUTE = {
    "digits": ["train", "data.root=data"],
    "jpg": [
        "train",
        "data.train=jpg/train.json",
        "data.val=jpg/val.json",
        "data.test=jpg/test.json",
        "data.sample={x: jpg, y: cls}",
        "data.image=l",
        "data.num_classes=10",
        "data.transform=matrix_user:jitter",
        "model.factory=mynet:build",
        "model.kwargs={num_classes: 10, width: 16}",
        "model.head=fc",
    ],
    "text": ["train", "--config", str(REPO / "configs" / "snippets.yaml")],
    "tokens": [
        "train",
        "data.train=tokens/train.json",
        "data.val=tokens/val.json",
        "data.test=tokens/test.json",
        "data.sample=matrix_user:to_fields",
        "data.num_classes=4",
        "model.factory=matrix_user:bert",
        "model.kwargs={num_labels: 4}",
        "model.head=classifier",
        "loss.fn=matrix_user:hf_loss",
        "metrics.fn=matrix_user:hf_metrics",
        "metrics.builtin=false",
    ],
}
SCRIPTS = {"text": EXAMPLES / "snippets_script.py"}  # the example as shipped; the rest: matrix_script.py
USER_ERRORS = {  # a mistake a user makes on that path, and the start of its one line
    "config": (["data.sample={x: png, y: cls}"], "dtrain: error: data: "),
    "script": (["data.batch_size=0"], "dtrain: error: config: "),
}
SIGTERM_EXIT = {"single": 75, "launch": 75, "torchrun": 1, "srun": 75}  # README: what each launcher returns


@pytest.fixture(scope="session")
def matrix_data(tmp_path_factory, data_root) -> Path:
    """Every cell's data, written once: the shards dtrain did not write are counted by `dtrain index`."""
    sys.path[:0] = [str(USERCODE), str(EXAMPLES)]
    import matrix_user
    import snippets

    root = tmp_path_factory.mktemp("matrix")
    (root / "data").symlink_to(data_root)
    snippets.write_shards(root / "snippets", per_class=80)
    for name, write in (("jpg", matrix_user.write_jpg_shards), ("tokens", matrix_user.write_token_shards)):
        shards = write(root / name)
        for split in ("train", "val", "test"):  # `dtrain index`, in this process (a python each: ~4 s of imports)
            assert (
                main(
                    [
                        "index",
                        *[str(p) for p in shards if p.name.startswith(split)],
                        "--out",
                        str(root / name / f"{split}.json"),
                    ]
                )
                == 0
            )
    return root


def cell_dir(matrix_data: Path, tmp_path: Path) -> Path:
    """A working directory holding the data where the configs and scripts look for it (relative paths)."""
    for name in ("jpg", "tokens"):
        (tmp_path / name).symlink_to(matrix_data / name)
    (tmp_path / "data").mkdir()
    for item in (matrix_data / "data").iterdir():
        (tmp_path / "data" / item.name).symlink_to(item)
    (tmp_path / "data" / "snippets").symlink_to(matrix_data / "snippets")
    return tmp_path


def route(entry: str, data: str, extra: list[str]) -> tuple[Path | None, list[str], dict]:
    """(the script, None for `dtrain`; its arguments; the environment) of a cell's entry and data."""
    env = dict(ENV)
    if entry == "config":
        return None, CONFIG_ROUTE[data] + extra, env
    env["MATRIX_DATA"] = {"digits": "digits", "jpg": "jpg", "tokens": "tokens"}.get(data, "")
    return SCRIPTS.get(data, USERCODE / "matrix_script.py"), extra, env


def command(entry: str, launcher: str, data: str, extra: list[str]) -> tuple[list[str], dict]:
    target, args, env = route(entry, data, extra)
    if launcher == "single":
        return [sys.executable, *([str(target)] if target else ["-m", "dtrain"]), *args], env
    if launcher == "torchrun":
        return torchrun_cmd(2, args, script=target), env
    if launcher == "launch":
        return [
            sys.executable,
            "-m",
            "dtrain",
            "launch",
            "--nproc-per-node",
            "2",
            *([str(target)] if target else []),
            *args,
        ], env
    raise ValueError(launcher)


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(env), stdin=subprocess.DEVNULL
    )


def test_every_value_of_every_axis_is_in_two_cells():
    for axis, values in enumerate(
        [
            ("config", "script"),
            ("single", "torchrun", "launch", "srun"),
            ("digits", "jpg", "text", "tokens"),
            ("trains", "resume", "error"),
        ]
    ):
        for value in values:
            assert sum(cell[axis] == value for cell in CELLS) >= 2, (axis, value)


def check_trains(proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result = result_of(proc)
    assert result["stop_reason"] == "completed" and result["step"] == 10, result
    assert any(k.startswith("test/") for k in result), result
    assert (run_dir / "checkpoints" / "latest" / "manifest.json").is_file()
    assert "Traceback" not in proc.stderr
    return result


def check_user_error(proc: subprocess.CompletedProcess, code: int, start_of_line: str) -> None:
    """One line names the problem, the documented exit code; no traceback, no line per rank."""
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == code and len(errors) == 1 and errors[0].startswith(start_of_line), (
        f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def uninterrupted(matrix_data, tmp_path_factory) -> tuple[dict, Path]:
    """(result, run dir) of the text data's config route uninterrupted on 2 forked ranks: both text resume cells
    compare with it, so the script route's (under torchrun) also checks that the two routes train the same
    weights to the bit."""
    cwd = cell_dir(matrix_data, tmp_path_factory.mktemp("straight"))
    _, args, env = route("config", "text", STEPS + ["run.name=straight"])
    proc = run_ranks(2, args, cwd, env=env, check=False, preload=("transformers",))
    return check_trains(proc, cwd / "runs" / "straight"), cwd / "runs" / "straight"


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "entry, launcher, data, outcome",
    [c for c in CELLS if c[1] != "srun"],
    ids=["-".join(c) for c in CELLS if c[1] != "srun"],
)
def test_user_path(matrix_data, tmp_path, entry, launcher, data, outcome, request):
    cwd = cell_dir(matrix_data, tmp_path)
    if outcome == "error":
        extra, start_of_line = USER_ERRORS[entry]
        cmd, env = command(entry, launcher, data, STEPS + extra + ["run.name=mistake"])
        check_user_error(run(cmd, cwd, env), 2, start_of_line)
        assert not (cwd / "runs" / "mistake" / "checkpoints").exists()
        return
    if outcome == "trains":
        cmd, env = command(entry, launcher, data, STEPS + ["run.name=cell"])
        check_trains(run(cmd, cwd, env), cwd / "runs" / "cell")
        return
    # resume: interrupted by SIGTERM to the launcher, run again (on forked ranks), compared with an uninterrupted run
    assert data == "text", "the uninterrupted run is the text data's"
    straight, straight_dir = request.getfixturevalue("uninterrupted")
    cmd, env = command(entry, launcher, data, STEPS + ["run.name=cut"])
    proc = start(cmd, cwd, uuid.uuid4().hex, env=env)
    wait_for(lambda: latest_logged_step(cwd / "runs" / "cut") >= 3 or proc.poll() is not None, what="step 3")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == SIGTERM_EXIT[launcher], f"exit {proc.returncode}\n{out}\n{err}"
    assert latest_logged_step(cwd / "runs" / "cut") < 10
    script, args, env = route(entry, data, STEPS + ["run.name=cut"])
    resumed = run_ranks(2, args, cwd, env=env, script=script, check=False, preload=("transformers",))
    assert "resumed from" in resumed.stderr, resumed.stderr
    result = check_trains(resumed, cwd / "runs" / "cut")
    assert {k: v for k, v in result.items() if k.startswith("test/")} == {
        k: v for k, v in straight.items() if k.startswith("test/")
    }  # loss, accuracy, a torchmetric: to the bit
    a, b = final_params(straight_dir), final_params(cwd / "runs" / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
