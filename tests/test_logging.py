"""dtrain's lines through Python's `logging`: the `dtrain` logger, its bare-message stderr handler, -q / -v."""

import contextlib
import io
import logging
import os
import subprocess
import sys

import pytest

from conftest import _env, run_dtrain


class Seen(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=logging.DEBUG) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= level)


@pytest.fixture
def seen():
    handler = Seen()
    logging.getLogger("dtrain").addHandler(handler)
    yield handler
    logging.getLogger("dtrain").removeHandler(handler)


def train_args(tmp_path, data_root, *extra):
    return [
        "train",
        f"data.root={data_root}",
        f"run.dir={tmp_path}",
        "log.progress=false",
        "train.max_steps=4",
        "train.val_every=2",
        *extra,
    ]


def test_a_users_handler_sees_the_lines_and_quiet_hides_info_but_not_errors(tmp_path, data_root, seen):
    done = run_dtrain(train_args(tmp_path, data_root), tmp_path)
    # the same lines as before, bare, on stderr; and the same lines in the user's handler, with their levels
    assert done.stderr.startswith("launch: single") and "training 4 steps" in done.stderr
    assert "step 2: val/loss" in done.stderr and "\nsummary\n" in done.stderr
    assert seen.lines() in done.stderr and "training 4 steps" in seen.lines()
    assert {r.name for r in seen.records} >= {"dtrain", "dtrain.dist"}
    assert logging.getLogger("dtrain").level == logging.INFO

    seen.records.clear()
    again = run_dtrain(train_args(tmp_path, data_root, "train.max_steps=6", "-q"), tmp_path)
    assert again.stderr == "" and result_of_json(again)["step"] == 6  # the result on stdout all the same
    assert seen.records == []  # -q sets the logger's level: no handler gets the info lines
    assert logging.getLogger("dtrain").level == logging.INFO  # -q held for that command only

    bad = run_dtrain(["-q", *train_args(tmp_path, data_root, "optim.lr=-1")], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("dtrain: error: config: optim.lr")
    assert len(bad.stderr.strip().splitlines()) == 1  # the one-line error, -q or not
    assert seen.records[-1].levelno == logging.ERROR


def result_of_json(proc):
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_verbose_and_a_level_set_by_a_script(tmp_path, data_root, seen):
    logger = logging.getLogger("dtrain")
    logger.debug("hidden")
    assert seen.records == []  # INFO by default
    logger.setLevel(logging.WARNING)  # a script's choice holds through dtrain.main...
    try:
        quiet = run_dtrain(train_args(tmp_path, data_root, "train.max_steps=2", "run.name=s"), tmp_path)
        assert quiet.stderr == ""
        loud = run_dtrain(
            train_args(tmp_path, data_root, "train.max_steps=2", "run.name=v", "--verbose"), tmp_path
        )  # ...unless the command line says otherwise
        assert "training 2 steps" in loud.stderr and "checkpoint: step-00000002 published" in loud.stderr
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(logging.INFO)


def test_quiet_before_the_command_and_in_a_real_process(tmp_path, data_root):
    """-q before the command reaches the command (argparse would let the command's default undo it)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "-q",
            *train_args(tmp_path, data_root)[0:1],
            *train_args(tmp_path, data_root)[1:],
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and result_of_json(proc)["step"] == 4


class Terminal(io.StringIO):
    def isatty(self):
        return True


def dtrain_on(stderr: io.StringIO, args: list[str], cwd) -> tuple[int, str, str]:
    """`dtrain ARGS` in this process with `stderr` as its stderr (a terminal or a log file). -> (code, out, err)"""
    from dtrain.cli import main

    out, saved = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(stderr):
            code = main(args)
    finally:
        os.chdir(saved)
    return code, out.getvalue(), stderr.getvalue()


def test_progress_bars_on_rank_0s_terminal_and_never_in_a_log_file(tmp_path, data_root):
    """Shard, index, validation and test, eval and export draw a bar on a terminal (tqdm's `\\r` updates)
    that goes when done; into a file (not a terminal) and under log.progress=false nothing but the lines."""
    shard = ["shard", "--dataset", "digits", "--out", str(tmp_path / "d"), "--shard-size", "100"]
    code, out, err = dtrain_on(Terminal(), shard, tmp_path)
    assert code == 0 and "wrote" in out and "train:" in err and "sample/s" in err and "\r" in err
    shards = sorted(str(p) for p in (tmp_path / "d").glob("train-*.tar"))
    index = ["index", *shards, "--out", str(tmp_path / "train.json")]
    code, out, err = dtrain_on(Terminal(), index, tmp_path)
    assert code == 0 and f"{len(shards)} shards" in out and "index:" in err and "shard" in err

    # the built-in data set under a root of its own: `shard --out d` again below replaces only dtrain's shards
    train = ["train", f"data.root={tmp_path / 'root'}", f"run.dir={tmp_path}", "train.max_steps=4", "train.val_every=2"]
    code, out, err = dtrain_on(Terminal(), train, tmp_path)
    assert code == 0 and "val:" in err and "test:" in err and "batch/s" in err
    assert "step 2: val/loss" in err  # the line the bar ends with, as ever
    run = tmp_path / "digits"
    code, out, err = dtrain_on(Terminal(), ["eval", "--checkpoint", str(run)], tmp_path)
    assert code == 0 and "test/loss" in out and "test:" in err and "confusion matrix:" in err
    code, out, err = dtrain_on(Terminal(), ["export", "--checkpoint", str(run), "--out", "m.pt"], tmp_path)
    assert code == 0 and "wrote m.pt" in out and "export:" in err and "B/s" in err

    # the same commands into a log file: their lines, no bar
    for args in (
        shard,
        index,
        [*train, "run.name=file"],
        ["eval", "--checkpoint", str(run)],
        ["export", "--checkpoint", str(run), "--out", "m.pt"],
    ):
        code, out, err = dtrain_on(io.StringIO(), args, tmp_path)
        assert code == 0 and "\r" not in err and "/s]" not in err, (args, err)
    code, out, err = dtrain_on(Terminal(), [*train, "run.name=nobar", "log.progress=false"], tmp_path)
    assert code == 0 and "\r" not in err and "step 2: val/loss" in err


def test_other_ranks_draw_no_bar():
    from dtrain.logging import NullLogger

    assert NullLogger().show_progress is False  # the trainer's evaluation bar follows it
