"""`dtrain launch` (dtrain/launcher.py): torch's elastic agent with one line per event and the workers'
exit code, with real processes and real signals; and the one-line errors workers write for any launcher."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import (
    REPO,
    _env,
    free_port,
    latest_logged_step,
    result_of,
    run_dtrain,
    run_ranks,
    run_torchrun,
    start,
    torchrun_cmd,
    wait_for,
    workers,
)
from dtrain import launcher, worker
from test_faults import RESUME_ARGS, assert_same_as_straight


def launch_cmd(nproc: int, args: list[str], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "dtrain", "launch", "--nproc-per-node", str(nproc), *extra, *args]


def launch(nproc: int, args: list[str], cwd, extra: list[str] = (), timeout: float = 300):
    return subprocess.run(
        launch_cmd(nproc, args, extra),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def launched_workers(tag: str) -> dict[int, int]:
    """{rank: pid} of `dtrain launch`'s workers (not the launcher, not rank 0's tee processes)."""
    return workers(tag, needle=b"dtrain.worker")


# ---- in-process: the launcher's own decisions ------------------------------------------------------
def test_bad_config_is_one_line_before_any_worker_starts(tmp_path):
    proc = run_dtrain(["launch", "--nproc-per-node", "2", "train", "optim.lr=fast"], tmp_path, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("dtrain: error: "), proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["launch"], "give a dtrain command or a script"),
        (["launch", "nosuch.py"], "neither a dtrain command"),
        (["launch", "--nnodes", "2:1", "train"], "--nnodes '2:1' is not N or MIN:MAX"),
        (["launch", "--nnodes", "2", "train"], "needs --rdzv-endpoint"),
        (["launch", "--nproc-per-node", "0", "train"], "--nproc-per-node must be >= 1"),
        (["launch", "--rdzv-timeout", "0", "train"], "--rdzv-timeout > 0"),
        (
            ["launch", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1", "--rdzv-conf", "join_timeout=soon", "train"],
            "--rdzv-conf join_timeout=soon is not a whole number of seconds",
        ),
    ],
)
def test_bad_launch_arguments_are_one_line(tmp_path, argv, message):
    proc = run_dtrain(argv, tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def failure(exitcode, message="", error_file="/e.json"):
    return SimpleNamespace(exitcode=exitcode, message=message, error_file=error_file, timestamp=1)


def test_failure_lines_and_exit_codes(tmp_path, capsys):
    logs = tmp_path / "logs"
    # the first failure the agent saw is the cause, whatever the ranks it stopped afterwards wrote
    code = launcher._report_failure(
        {1: failure(2, "dtrain: error: data: no shards"), 0: failure(-15, "dtrain: error: data: no shards")}, logs, 0
    )
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        f"dtrain: error: data: no shards (rank 1 on {os.uname().nodename}, log {logs}/rank-1.log)"
    ]
    crash = {
        "message": "RuntimeError: boom",
        "extraInfo": {"py_callstack": "Traceback (most recent call last):\nRuntimeError: boom\n", "timestamp": "1"},
    }
    assert launcher._report_failure({1: failure(1, crash)}, logs, 1) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and err.count("RuntimeError: boom") == 1  # printed once
    assert err[-1].startswith("dtrain: error: launch: worker failed after 1 restart(s): RuntimeError: boom (rank 1")
    assert launcher._report_failure({0: failure(-9, "", "<N/A>")}, logs, 0) == 1
    assert "worker failed: killed by SIGKILL (rank 0" in capsys.readouterr().err
    assert launcher._report_failure({0: failure(75, "")}, logs, 0) == 75
    handled = {
        "message": "dtrain: error: dist: gradient all-reduce failed",
        "extraInfo": {"py_callstack": "dtrain: error: dist: gradient all-reduce failed", "timestamp": "1"},
    }
    capsys.readouterr()
    assert launcher._report_failure({1: failure(1, handled)}, logs, 0) == 1
    assert capsys.readouterr().err.count("gradient all-reduce failed") == 1  # its line, once, no traceback


def test_a_crash_every_rank_meets_is_printed_once(tmp_path, capsys):
    """Rank 0's traceback is on the terminal already (its output is): the cause's, rank 1's, is printed only
    when it is another crash (seen: a model that fails on every rank, its traceback twice, 95 lines)."""

    def crash(rank, where="c.py", line=7):
        stack = (
            f'Traceback (most recent call last):\n  File "{where}", line {line}, in model\n    raise ValueError\n'
            f"ValueError: boom on rank {rank}\n"
        )
        return {"message": f"ValueError: boom on rank {rank}", "extraInfo": {"py_callstack": stack, "timestamp": "1"}}

    logs = tmp_path / "logs"
    assert launcher._report_failure({1: failure(1, crash(1)), 0: failure(1, crash(0))}, logs, 0) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines() == [
        (
            f"dtrain: error: launch: worker failed: ValueError: boom on rank 1 (rank 1 on {os.uname().nodename}, "
            f"log {logs}/rank-1.log)"
        )
    ]
    # rank 0 failed elsewhere (its peer's loss, seen in a collective): the cause's traceback is news
    assert launcher._report_failure({1: failure(1, crash(1)), 0: failure(1, crash(0, "dist.py", 9))}, logs, 0) == 1
    assert capsys.readouterr().err.count("Traceback") == 1


def test_the_resume_command_of_a_node_is_its_own_launch_command():
    """The summary's command that goes on (DTRAIN_LAUNCH_COMMAND) keeps every option that changes how the node
    joins: without --rdzv-conf is_host=1 the node that hosts the store would not host it again."""
    from dtrain.cli import parse_args

    argv = [
        "launch",
        "--nproc-per-node",
        "1",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        "127.0.0.1:29400",
        "--rdzv-conf",
        "is_host=1,last_call_timeout=5",
        "--rdzv-timeout",
        "60",
        "--max-restarts",
        "1",
        "--stop-timeout",
        "30",
        "train",
        "run.name=r",
    ]
    command = launcher._command(parse_args(argv), 1)
    assert command[:2] == ["dtrain", "launch"] and "--rdzv-conf" in command
    again = parse_args(command[1:])
    assert vars(again) | {"parser": None} == vars(parse_args(argv)) | {"parser": None}


def test_a_script_whose_config_fails_keeps_its_logs_under_its_run_name(tmp_path):
    """A script's arguments with a mistake in them (its workers say it, exit 2) still name the run: the launcher
    puts the logs, and its error line names them, under runs/<run.name>/logs, not runs/<script>/logs."""
    from dtrain.cli import build_parser

    script = tmp_path / "train.py"
    script.write_text("import dtrain\ndtrain.main()\n")
    for mistake in ("optim.lr=fast", "nosuch=1"):  # (optim.nosuch=1 is the launcher's own line: test_cli_fast)
        _, run_dir, note = launcher._resolve([str(script), "run.name=mine", mistake], build_parser())
        assert run_dir == Path("runs") / "mine" and "no run directory" not in note, (mistake, run_dir, note)
    _, run_dir, note = launcher._resolve([str(script), "optim.lr=fast", "--own-flag"], build_parser())
    assert run_dir == Path("runs") / "train" and "name no run directory" in note  # none named: the script's


def test_commands_that_read_a_checkpoint_log_outside_any_run():
    """`dtrain launch ... eval|predict|export --checkpoint runs/x`: their overrides name no run of theirs; the
    launcher put their rank logs in the default run name's runs/digits/logs (found walking the docs)."""
    from dtrain.cli import build_parser

    for command in (
        ["eval", "--checkpoint", "runs/x"],
        ["export", "--checkpoint", "runs/x", "--out", "m.pt"],
        ["predict", "--checkpoint", "runs/x", "--data", "d.json", "--out", "p", "data.root=r"],
    ):
        _, run_dir, note = launcher._resolve(command, build_parser())
        assert run_dir == Path("runs") / "launch" and "no run directory" in note, command
    _, run_dir, _ = launcher._resolve(["train", "run.name=mine"], build_parser())
    assert run_dir == Path("runs") / "mine"


def test_a_stall_is_blamed_only_for_a_rank_that_gave_up_waiting():
    """A peer stalled (SIGSTOP, stuck I/O) >= 1 s is named when the failed rank exited 1 (its collective timed
    out); a rank that died itself is the cause even while a peer sits in a slow disk write (seen under load:
    a SIGKILLed rank 1 was reported as rank 0 "stuck in uninterruptible I/O")."""
    host = os.uname().nodename
    stalls = {0: (100.0, "D", 16), 2: (101.0, "T", None), 3: (104.5, "T", 17)}
    assert (
        launcher.stall_to_blame(stalls, 1, 1, 105.0)
        == f"rank 0 on {host} stalled: stuck in uninterruptible I/O for 5 s, since step 16"
    )  # the longest
    assert (
        launcher.stall_to_blame({2: (101.0, "T", None)}, 1, 1, 105.0)
        == f"rank 2 on {host} stalled: stopped (SIGSTOP or a debugger) for 4 s, since step ?"
    )
    for exitcode in (-9, 2, 75, 0):  # killed, a user error, interrupted: the failed rank is the cause
        assert launcher.stall_to_blame(stalls, 1, exitcode, 105.0) is None
    assert launcher.stall_to_blame({1: (100.0, "T", 3)}, 1, 1, 105.0) is None  # not itself
    assert launcher.stall_to_blame({3: (104.5, "T", 17)}, 1, 1, 105.0) is None  # 0.5 s: a passing disk wait


def test_handled_errors_go_into_torchs_error_file_as_their_line(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(worker.LOG_DIR_ENV, raising=False)
    worker.report_error("config: bad", quiet=True)  # plain torchrun, rank 1, an error every rank meets: quiet
    assert capsys.readouterr().err == ""
    written = json.loads(error_file.read_text())["message"]  # torch's layout, the line for a traceback
    assert written["message"] == written["extraInfo"]["py_callstack"] == "dtrain: error: config: bad"
    worker.report_error("launcher: rank 1 cannot reach the master")  # its own: said
    assert capsys.readouterr().err == "dtrain: error: launcher: rank 1 cannot reach the master\n"
    monkeypatch.setenv(worker.LOG_DIR_ENV, str(tmp_path / "logs"))
    (tmp_path / "logs").mkdir()
    worker.report_error("config: bad", quiet=True)  # under dtrain launch: in the rank's log, not the terminal
    assert (
        capsys.readouterr().err == ""
        and (tmp_path / "logs" / "rank-1.log").read_text() == "dtrain: error: config: bad\n"
    )


# ---- real processes ------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_user_error_on_two_ranks_is_one_line_and_exit_2(tmp_path, data_root):
    """An error only the workers can see (a model factory's import: a wrong data.sample field is now the
    launcher's own line before any worker, tests/test_cli_fast.py)."""
    proc = launch(
        2, ["train", f"data.root={data_root}", "model.factory=nosuch:Net", "log.progress=false", "run.name=u"], tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("launch: 2 worker(s) per node"), proc.stderr
    assert lines[1].startswith("dtrain: error: config: model.factory: cannot import module 'nosuch'"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    logs = tmp_path / "runs" / "u" / "logs"
    assert f"log {logs.relative_to(tmp_path)}/rank-" in lines[1]
    for rank in (0, 1):  # each rank's full output, its error line included
        assert "cannot import module 'nosuch'" in (logs / f"rank-{rank}.log").read_text()


@pytest.fixture(scope="module")
def straight(resume_reference):
    """test_faults' uninterrupted run (under torchrun: dtrain launch trains the same weights to the bit)."""
    return resume_reference


# SIGTERM to `dtrain launch` of 2 ranks, exit 75, no worker left, the summary's command (the launcher's) resumes
# bit-identically into the same rank logs: tests/test_hooks_launch.py's
# test_monitor_optimizer_json_labels_and_a_callback_resume_through_a_sigterm (a SIGTERM at a step the ranks wait
# at); one that lands at any moment of training: test_matrix's config-launch-text-resume cell. (Two launches
# here walked the same path again: 22-44 s.)


@pytest.mark.multiproc
def test_killed_worker_restarts_from_the_newest_checkpoint(tmp_path, straight):
    tag = uuid.uuid4().hex
    run = tmp_path / "runs" / "r"
    proc = start(launch_cmd(2, RESUME_ARGS + ["run.name=r"], ["--max-restarts", "2"]), tmp_path, tag)
    wait_for(lambda: latest_logged_step(run) >= 13, what="step 13")
    os.kill(launched_workers(tag)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    restarts = [l for l in err.splitlines() if "restart 1 of 2" in l]
    assert len(restarts) == 1 and "rank 1 on" in restarts[0] and "killed by SIGKILL" in restarts[0], err
    assert "all workers resume from step 12" in restarts[0] or "all workers resume from step 16" in restarts[0], err
    got, want = result_of(subprocess.CompletedProcess([], 0, out, "")), straight[1]
    assert {k: v for k, v in got.items() if k.startswith("test/")} == {
        k: v for k, v in want.items() if k.startswith("test/")
    }
    assert_same_as_straight(run, straight[0])


@pytest.mark.multiproc
@pytest.mark.parametrize("via", ["dtrain launch", "torchrun"])
def test_killed_launcher_takes_its_workers_along(tmp_path, data_root, via):
    """torch's agent starts workers in sessions of their own: without PR_SET_PDEATHSIG they would train on
    as orphans after a SIGKILL of the launcher. They get SIGTERM instead, save and end."""
    tag = uuid.uuid4().hex
    run = tmp_path / "runs" / "o"
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=50",
        "log.progress=false",
        "train.log_every=1",
        "run.name=o",
    ]
    proc = start(launch_cmd(2, args) if via == "dtrain launch" else torchrun_cmd(2, args), tmp_path, tag)
    find = launched_workers if via == "dtrain launch" else workers
    wait_for(lambda: latest_logged_step(run) >= 3, what="step 3")
    assert len(find(tag)) == 2
    proc.kill()
    _, err = proc.communicate(timeout=120)  # rank 0 (its tee) holds the pipe until the worker is gone
    wait_for(lambda: not find(tag), timeout=120, what="the workers to end")
    said = (run / "logs" / "rank-0.log").read_text() if via == "dtrain launch" else err
    assert "SIGTERM received" in said and "checkpoint saved" in said, said[-2000:]


@pytest.mark.multiproc
def test_under_torchrun_an_error_every_rank_meets_is_one_line_and_names_itself_in_the_summary(tmp_path, data_root):
    proc = run_torchrun(
        2,
        ["train", f"data.root={data_root}", "data.sample.input=nosuch.png", "log.progress=false"],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0  # torchrun's own: 1
    said = [l for l in proc.stderr.splitlines() if l.startswith("dtrain: error:")]
    assert len(said) == 1 and "no .nosuch.png member" in said[0], proc.stderr
    # torchrun's failure record: dtrain's line for a traceback, not "no error file" nor a stack
    assert "traceback : dtrain: error: data: " in proc.stderr and 'File "' not in proc.stderr.split("dtrain FAILED")[1]


def elastic_node(
    cwd,
    target: list[str],
    endpoint: str,
    is_host: bool,
    extra: list[str] = (),
    env: dict | None = None,
    last_call_s: int = 5,
) -> subprocess.Popen:
    """One "node": `dtrain launch --nnodes 1:2` with one worker, on the c10d rendezvous at `endpoint` (this
    machine, 127.0.0.1), in a process group of its own (a node lost: os.killpg)."""
    rdzv = [
        "--nnodes",
        "1:2",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        "e",
        "--rdzv-conf",
        f"is_host={int(is_host)},last_call_timeout={last_call_s}",
    ]
    return subprocess.Popen(
        launch_cmd(1, target, [*rdzv, *extra]),
        cwd=cwd,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def elastic_args(data_root, batch_size: int = 48) -> list[str]:
    """test_elastic's run (13 steps of a global batch 96 per epoch, 2 epochs, sample keys logged), checkpoints
    every 3 steps; `batch_size` per rank."""
    from test_elastic import ARGS

    return [a for a in ARGS if not a.startswith("data.batch_size=")] + [
        f"data.batch_size={batch_size}",
        f"data.root={data_root}",
        "checkpoint.every=3",
    ]


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_two_nodes_lose_one_and_finish_on_the_other(tmp_path, data_root, elastic_reference):
    """Two `dtrain launch --nnodes 1:2` processes on this machine as two nodes (c10d on 127.0.0.1, one
    worker each). Node B is lost mid-run (its launcher's process group and its worker SIGKILLed); node A's
    agent re-forms alone and resumes on 1 rank through dtrain's elastic resume: the interrupted epoch reads
    every sample of the uninterrupted 2-rank run's epoch once, the next epoch is a full one."""
    from test_elastic import STEPS_PER_EPOCH, epoch_keys

    args = elastic_args(data_root)  # the reference's run, checkpointing every 3 steps (the same samples)
    endpoint = f"127.0.0.1:{free_port()}"
    run = tmp_path / "runs" / "e"
    tags = {node: uuid.uuid4().hex for node in "AB"}
    nodes = {
        node: elastic_node(
            tmp_path,
            args + ["run.name=e"],
            endpoint,
            node == "A",
            ["--max-restarts", "2"],
            {"DTRAIN_TEST_TAG": tags[node]},
        )
        for node in "AB"
    }
    try:
        wait_for(
            lambda: latest_logged_step(run) >= 7 and launcher.newest_checkpoint_step(run),
            timeout=240,
            what="step 7 on two nodes",
        )
        assert "world_size=2" in (run / "logs" / "rank-0.log").read_text()
        lost = launched_workers(tags["B"])
        os.killpg(nodes["B"].pid, signal.SIGKILL)
        for pid in lost.values():  # a lost node takes its workers along
            os.kill(pid, signal.SIGKILL)
        out, err = nodes["A"].communicate(timeout=300)
    finally:
        for p in nodes.values():
            if p.poll() is None:
                p.kill()
    assert nodes["A"].returncode == 0, err[-3000:]
    assert "restart 1 of 2" in err, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["stop_reason"] == "completed"
    log = (run / "logs" / "rank-0.log").read_text()
    assert "resume: 2 -> 1 ranks" in log, log[-3000:]
    assert epoch_keys(run, 0) == epoch_keys(elastic_reference[0], 0)  # none twice, none lost
    assert sum(epoch_keys(run, 1).values()) == 96 * STEPS_PER_EPOCH


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_node_that_joins_is_taken_in_at_the_next_re_formation(tmp_path, data_root):
    """Node A (`dtrain launch --nnodes 1:2`, one worker) trains alone, a second per step (tests/sleepy_rank.py:
    slow enough for node B to arrive mid-epoch). torch's agent on A sees B waiting and stops A's worker
    (SIGTERM: it saves), and the two re-form as 2 ranks, which is no restart (--max-restarts 0), resuming
    through dtrain's elastic resume: the interrupted epoch reads the 1-rank run's samples once each, the next
    is a full 2-rank epoch. (Joins need a store per re-formation: see _run_agent.)"""
    from test_elastic import STEPS_PER_EPOCH, epoch_keys

    args = elastic_args(data_root, batch_size=96)  # 1 rank, then 2 of 48: the same global batch throughout
    run_dtrain(args + ["run.name=straight"], tmp_path)  # the 1-rank reference, in this process
    endpoint = f"127.0.0.1:{free_port()}"
    run = tmp_path / "runs" / "j"
    target = [str(REPO / "tests" / "sleepy_rank.py"), *args, "run.name=j"]
    nodes = {"A": elastic_node(tmp_path, target, endpoint, True, env={"SLOW_ALONE_S": "1"}, last_call_s=1)}
    try:
        wait_for(lambda: latest_logged_step(run) >= 2, timeout=120, what="step 2 on node A alone")
        nodes["B"] = elastic_node(tmp_path, target, endpoint, False, env={"SLOW_ALONE_S": "1"}, last_call_s=1)
        (_, err), (_, err_b) = nodes["A"].communicate(timeout=240), nodes["B"].communicate(timeout=60)
    finally:
        for p in nodes.values():
            if p.poll() is None:
                p.kill()
    assert nodes["A"].returncode == nodes["B"].returncode == 0, err[-3000:] + err_b[-3000:]
    joined = [l for l in err.splitlines() if l.startswith("launch: a node is waiting to join")]
    assert len(joined) == 1 and "restart 1 of" not in err, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "completed"
    logs = "".join(p.read_text() for p in (run / "logs").glob("rank-*.log"))
    assert "world_size=1" in logs and "world_size=2" in logs and "resume: 1 -> 2 ranks" in logs, logs[-3000:]
    assert epoch_keys(run, 0) == epoch_keys(tmp_path / "runs" / "straight", 0)  # none twice, none lost
    assert sum(epoch_keys(run, 1).values()) == 96 * STEPS_PER_EPOCH


DIES_AT_START_UP = """
import os
import torch.nn as nn
import dtrain

def model(input_shape, num_outputs):
    if os.environ["RANK"] == os.environ["DIES"]:
        os._exit(9)  # lost before the engine's set-up, which the other rank is about to enter
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs))

dtrain.main(model=model)
"""


@pytest.mark.multiproc
@pytest.mark.parametrize("engine, dies", [("ddp", 1), ("fsdp", 1), ("ddp", 0)])
def test_rank_lost_during_start_up_is_one_line_on_its_peer_naming_it(tmp_path, data_root, engine, dies):
    """A rank lost just before the engine's set-up (DDP's constructor broadcasts the weights; FSDP2's says
    nothing to the other ranks, DeepSpeed's first makes groups: a barrier on each side) ends the other in
    dtrain's one line, not in gloo's traceback, and that line names the lost rank (a roll call on the
    store), not only the rank that saw it; rank 0 hosts the store, and its loss is said as such. Two ranks
    forked from the rank server with torchrun's variables, no agent that would stop the other first (the
    server gives the survivor 10 s; two new pythons here cost ~5 s more each time)."""
    script = tmp_path / "dies.py"
    script.write_text(DIES_AT_START_UP)
    env = {"MASTER_PORT": str(free_port()), "DIES": str(dies)}
    args = [
        f"data.root={data_root}",
        "train.max_steps=2",
        f"train.engine={engine}",
        "log.progress=false",
        "run.doctor=false",
    ]
    proc = run_ranks(2, args, tmp_path, env=env, script=script, check=False)
    survivor = 1 - dies
    err = proc.stderr  # every rank's: the lost one said nothing
    assert proc.codes[dies] == 9 and proc.codes[survivor] == 1 and "Traceback" not in err, (proc.codes, err)
    lost = (
        "rank 1 is gone or stuck (no answer within 3 s of the failure); "
        if dies
        else f"rank 0 (the rendezvous store, 127.0.0.1:{env['MASTER_PORT']}) is gone; "
    )
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"dtrain: error: dist: {engine} set-up (the first collective with every rank) failed on rank {survivor}: {lost}"
    ), err


@pytest.mark.slow
@pytest.mark.multiproc
def test_stalled_rank_is_named_not_the_one_that_waited(tmp_path, data_root):
    """Rank 1 frozen by SIGSTOP: rank 0 gives up after dist.timeout_s with its own line, but the cause is
    rank 1; the launcher names it, with its state and the step it stalled at, and SIGKILLs it once rank 0 has
    failed (torch's agent would wait its fixed 30 s for a stopped worker to honour SIGTERM)."""
    tag = uuid.uuid4().hex
    run = tmp_path / "runs" / "s"
    proc = start(
        launch_cmd(
            2,
            [
                "train",
                f"data.root={data_root}",
                "train.epochs=100",
                "log.progress=false",
                "train.log_every=1",
                "dist.timeout_s=5",
                "run.name=s",
            ],
        ),
        tmp_path,
        tag,
    )
    wait_for(lambda: latest_logged_step(run) >= 5, what="step 5")
    stalled = launched_workers(tag)[1]
    os.kill(stalled, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    finally:  # only if it is still this test's worker: a pid reused since may be another test's process
        with contextlib.suppress(ProcessLookupError):
            if stalled in launched_workers(tag).values():
                os.kill(stalled, signal.SIGKILL)
    assert proc.returncode == 1, err
    ended = time.monotonic() - t0  # dist.timeout_s 5 and the roll call's 3, without a 30 s grace
    assert ended < 25, f"the job took {ended:.1f} s to end after the stall"
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("dtrain: error: launch: rank 1 on ") and "stalled: stopped (SIGSTOP or a debugger) for " in last
    )
    assert "since step " in last and "; rank 0 gave up waiting: dist: " in last and "Timed out" in last, last


CRASHES_EVERYWHERE = """
import os
import time
import dtrain

def loss(output, batch):
    if os.environ["RANK"] == "0":
        time.sleep(3)  # rank 1 fails first and is named; rank 0 (dtrain handles SIGTERM) fails alike after
    raise ValueError(f"no loss on rank {os.environ['RANK']}")

dtrain.main(loss=loss)
"""


@pytest.mark.multiproc
def test_a_crash_in_the_users_code_on_every_rank_is_one_traceback(tmp_path, data_root):
    script = tmp_path / "crashes.py"
    script.write_text(CRASHES_EVERYWHERE)
    proc = launch(2, [str(script), f"data.root={data_root}", "run.doctor=false", "log.progress=false"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # rank 1, unless a loaded machine started it 3 s late
    assert re.match(r"dtrain: error: launch: worker failed: ValueError: no loss on rank (\d) \(rank \1 on ", last), last


# ---- several nodes whose rendezvous fails: launchers on 127.0.0.1, a short --rdzv-timeout ----------
def rdzv_node(
    cwd, name: str, port: int, nnodes: str, conf: str, timeout_s: int | None
) -> tuple[subprocess.Popen, Path]:
    """A `dtrain launch --nnodes N` node (one worker, never started) whose stderr goes to NAME.err."""
    err = cwd / f"{name}.err"
    timeout = ["--rdzv-timeout", str(timeout_s)] if timeout_s else []
    with open(err, "w") as f:
        proc = subprocess.Popen(
            launch_cmd(
                1,
                ["train", "run.name=n"],
                ["--nnodes", nnodes, "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", conf, *timeout],
            ),
            cwd=cwd,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
            stdin=subprocess.DEVNULL,
        )
    return proc, err


def said(proc: subprocess.Popen, err: Path, words: str) -> None:
    """Wait until the node says `words`: it is in the rendezvous (or it ended, which fails the test)."""
    wait_for(lambda: words in err.read_text() or proc.poll() is not None, what=words)
    assert words in err.read_text(), err.read_text()


def ended(proc: subprocess.Popen, err: Path) -> list[str]:
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = err.read_text()
    assert "frame #" not in said and "Traceback" not in said, said  # no C++ stack dump, no traceback
    return said.strip().splitlines()


@pytest.mark.multiproc
def test_nodes_given_different_ports_say_what_they_wait_for_and_why_they_stop(tmp_path):
    """Each node hosts a rendezvous of its own: each says within seconds that 1 of 2 nodes joined, where, and
    how long it waits, then ends in one line with the likely cause (was: 600 s of silence, then
    `rendezvous failed (RendezvousTimeoutError: )`). The second node's wait comes from torch's own setting."""
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    nodes = [
        rdzv_node(tmp_path, "n0", ports[0], "2", "is_host=1", 8),
        rdzv_node(tmp_path, "n1", ports[1], "2", "is_host=1,join_timeout=8", None),
    ]
    for (proc, err), port in zip(nodes, ports):
        lines = ended(proc, err)
        assert proc.returncode == 2, lines
        assert any(
            l.startswith(
                f"launch: waiting for the other nodes: 1 of 2 nodes joined the rendezvous at "
                f"127.0.0.1:{port} (id dtrain); "
            )
            and l.endswith(" of 8 (--rdzv-timeout)")
            for l in lines
        ), lines
        assert lines[-1].startswith(
            f"dtrain: error: launch: no other node joined the rendezvous at 127.0.0.1:{port} "
            f"(id dtrain) within 8 s: start the others with --rdzv-endpoint 127.0.0.1:{port} "
            f"--rdzv-id dtrain"
        ), lines


@pytest.mark.multiproc
def test_nodes_given_different_nnodes_name_it(tmp_path):
    """A (--nnodes 2, hosts the store) joins first, B (--nnodes 3) last: no node completes the rendezvous (torch
    completes it at the count of the node that joins last). A ends naming --nnodes, and B, whose store A
    closes, says so in one line (was: 600 s, then `RendezvousTimeoutError: `, and C++ stack dumps on B)."""
    # A's wait, all of which the test sits through: B joins ~5 s into it at load 5 (A says it waits 3 s after it
    # joined, B's launcher joins ~2 s after it starts); 30 s was 10 s more of nothing
    port, wait_s = free_port(), 20
    a, a_err = rdzv_node(tmp_path, "a", port, "2", "is_host=1", wait_s)
    said(a, a_err, "waiting for the other nodes: 1 of 2")
    b, b_err = rdzv_node(tmp_path, "b", port, "3", "is_host=0", 120)
    a_lines, b_lines = ended(a, a_err), ended(b, b_err)
    assert a.returncode == 2 and a_lines[-1].startswith(
        f"dtrain: error: launch: the rendezvous at 127.0.0.1:{port} (id dtrain) never completed within {wait_s} s though "
        f"2 of 2 nodes joined: another node was started with a larger --nnodes (this one: 2)"
    ), a_lines
    assert b.returncode == 2 and b_lines[-1].startswith(
        f"dtrain: error: launch: another node ended the rendezvous at 127.0.0.1:{port} (id dtrain) after 2 of 3 "
        f"nodes had joined"
    ), b_lines


@pytest.mark.multiproc
def test_a_node_outnumbered_by_a_smaller_nnodes_says_so(tmp_path):
    """B (--nnodes 3) joins first, A (--nnodes 2) last and completes the rendezvous with 2 nodes: B refuses to
    train on fewer nodes than it was told, in one line (was: it trained on 2)."""
    port = free_port()
    b, b_err = rdzv_node(tmp_path, "b", port, "3", "is_host=1", 120)
    said(b, b_err, "waiting for the other nodes: 1 of 3")
    a, _ = rdzv_node(tmp_path, "a", port, "2", "is_host=0", 120)
    try:
        b_lines = ended(b, b_err)
    finally:
        a.kill()  # its worker waits for B's, which never start
        a.wait(timeout=60)
    assert b.returncode == 2 and b_lines[-1] == (
        f"dtrain: error: launch: the rendezvous at 127.0.0.1:{port} (id dtrain) completed with 2 nodes, but this "
        f"node has --nnodes 3: another node was started with a smaller --nnodes; give every node the same "
        f"--nnodes"
    ), b_lines


@pytest.mark.multiproc
def test_sigterm_during_the_rendezvous_says_no_worker_started(tmp_path):
    """Nothing ran, nothing was saved: the line says so (was: 'the workers saved and stopped'). Exit 75 still:
    the same command starts the run, as after a SIGTERM one step later, and a preemptible job requeues."""
    proc, err = rdzv_node(tmp_path, "alone", free_port(), "2", "is_host=1", 120)
    said(proc, err, "waiting for the other nodes: 1 of 2")
    proc.send_signal(signal.SIGTERM)
    lines = ended(proc, err)
    assert proc.returncode == 75, lines
    assert (
        lines[-1].startswith("launch: SIGTERM received during the rendezvous (1 of 2 nodes had joined at 127.0.0.1:")
        and "no worker had started" in lines[-1]
    ), lines
    assert "saved" not in "\n".join(lines)
