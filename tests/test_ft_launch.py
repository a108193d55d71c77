"""`dtrain launch --ft` (dtrain/ft_launch.py): replica groups under a real torchft_lighthouse, as real processes
with real signals. tests/ft_fake_worker.py stands in for a replica group (the workers' side of the contract
without training: a group starts in a fraction of a second): the environment each group gets, a lost group
restarted alone while the others run on, --max-restarts across groups, a user error stopping all (exit 2, no
restart), SIGTERM saving every group (exit 75, never a restart), the Lighthouse started and stopped, the run
lock held. tests/test_ft_train.py runs `dtrain train` as replica groups of a real launch (a group killed and
healed, SIGTERM and resume)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import _env, free_port, run_dtrain, wait_for

from dtrain import ft_launch

FAKE = Path(__file__).with_name("ft_fake_worker.py")
needs_torchft = pytest.mark.skipif(
    shutil.which(
        "torchft_lighthouse", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    is None,
    reason="needs pip install 'dtrain[ft]'",
)


# ---- in-process: what --ft refuses, and the command that resumes it -------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ft-timeout", "5"], "launch: --ft-timeout is an option of --ft; add --ft or leave it out"),
        (["--ft", "--nnodes", "2"], "launch: --ft with --nnodes 2 needs --ft-lighthouse HOST:PORT"),
        (["--ft", "--nnodes", "1:2"], "launch: --ft takes --nnodes N, not 1:2"),
        (["--ft", "--rdzv-endpoint", "h:1"], "launch: --ft needs no rendezvous (--rdzv-endpoint, --rdzv-conf)"),
        (["--ft", "--rdzv-conf", "is_host=1"], "launch: --ft needs no rendezvous (--rdzv-endpoint, --rdzv-conf)"),
        (["--ft", "--ft-host-lighthouse"], "launch: --ft-host-lighthouse needs --ft-lighthouse HOST:PORT"),
        (["--ft", "--ft-lighthouse", "nohost"], "launch: --ft-lighthouse 'nohost' is not HOST:PORT"),
        (
            ["--ft", "--nproc-per-node", "2", "--ft-min-replicas", "3"],
            "launch: --ft-timeout must be > 0 and --ft-min-replicas between 1 and the replica groups started (2)",
        ),
        (
            ["--ft", "--nproc-per-node", "4", "--ft-group-size", "3"],
            "launch: --ft-group-size 3 must divide --nproc-per-node 4 (the processes of a replica group are on "
            "one node)",
        ),
        (
            ["--ft", "--nproc-per-node", "4", "--ft-group-size", "2", "--ft-min-replicas", "3"],
            "launch: --ft-timeout must be > 0 and --ft-min-replicas between 1 and the replica groups started (2)",
        ),
    ],
)
def test_what_ft_cannot_do_is_one_line(tmp_path, argv, message):
    proc = run_dtrain(["launch", *argv, "train"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"dtrain: error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists(), proc.stderr


def test_without_torchft_ft_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchft", None)  # as if not installed: find_spec gives None
    proc = run_dtrain(["launch", "--ft", "train"], tmp_path, check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == "dtrain: error: launch: --ft needs torchft, which is not installed; pip install 'dtrain[ft]'"
    )


def test_the_resume_command_keeps_the_ft_options():
    from dtrain.cli import parse_args

    argv = [
        "launch",
        "--nproc-per-node",
        "3",
        "--max-restarts",
        "2",
        "--ft",
        "--ft-lighthouse",
        "h:29510",
        "--ft-host-lighthouse",
        "--ft-timeout",
        "5",
        "--ft-min-replicas",
        "2",
        "--ft-group-size",
        "3",
        "train",
        "run.name=r",
    ]
    command = ft_launch.resume_command(parse_args(argv), 3)
    assert command[:2] == ["dtrain", "launch"]
    assert vars(parse_args(command[1:])) | {"parser": None} == vars(parse_args(argv)) | {"parser": None}
    nodes = ["launch", "--ft", "--nnodes", "2", "--ft-lighthouse", "h:29510", "train", "run.name=r"]
    command = ft_launch.resume_command(parse_args(nodes), 1)  # no rendezvous options of the normal launcher's
    assert command == [
        "dtrain",
        "launch",
        "--ft",
        "--ft-lighthouse",
        "h:29510",
        "--nproc-per-node",
        "1",
        "--nnodes",
        "2",
        "train",
        "run.name=r",
    ]


# ---- real processes ----------------------------------------------------------------------------------------
def launch(tmp_path: Path, nproc: int, *options: str, env: dict | None = None) -> subprocess.Popen:
    (tmp_path / "o").mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "launch",
        "--ft",
        "--nproc-per-node",
        str(nproc),
        *options,
        str(FAKE),
        "--out",
        "o",
        "run.name=fake",
    ]
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def started(tmp_path: Path, group: int) -> list[dict]:
    """Each start of group `group` so far (its environment, pid, ...), oldest first."""
    records = [
        json.loads(p.read_text()) | {"pid": int(p.name.split("-")[2].split(".")[0])}
        for p in (tmp_path / "o").glob(f"env-{group}-*.json")
    ]
    return sorted(records, key=lambda r: os.stat(tmp_path / "o" / f"env-{group}-{r['pid']}.json").st_mtime_ns)


def order(tmp_path: Path, what: str, group: int) -> None:
    (tmp_path / "o" / f"{what}-{group}").touch()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def lighthouses(port: str) -> list[int]:
    """Pids of torchft_lighthouse processes bound to `port`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"torchft_lighthouse") for arg in cmdline) and f"127.0.0.1:{port}".encode() in cmdline:
            found.append(int(pid))
    return found


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.multiproc
@needs_torchft
def test_a_lost_group_is_restarted_alone_within_max_restarts(tmp_path):
    """Group 1 dies three times (SIGKILL, a crash, SIGKILL) with --max-restarts 2: restarted twice, alone (groups
    0 and 2 keep their process), then the others go on without it and finish: exit 0. Each group had the
    contract's environment, a torchelastic parent's variables stripped; the Lighthouse answered, and is gone."""
    inherited = {"TORCHELASTIC_RUN_ID": "parent", "LOCAL_RANK": "5", "GROUP_RANK": "3", "TORCHFT_MANAGER_PORT": "1"}
    proc = launch(tmp_path, 3, "--max-restarts", "2", env=inherited)
    wait_for(lambda: all(started(tmp_path, g) for g in range(3)), 60, what="3 groups")
    first = {g: started(tmp_path, g)[0] for g in range(3)}
    lighthouse = first[0]["env"]["TORCHFT_LIGHTHOUSE"]
    for g, record in first.items():
        env = record["env"]
        assert record["lighthouse_answered"] and env["TORCHFT_LIGHTHOUSE"] == lighthouse
        assert {
            k: env.get(k)
            for k in (
                "DTRAIN_FT",
                "REPLICA_GROUP_ID",
                "DTRAIN_FT_GROUPS",
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "DTRAIN_FT_TIMEOUT_S",
                "DTRAIN_FT_MIN_REPLICAS",
            )
        } == {
            "DTRAIN_FT": "1",
            "REPLICA_GROUP_ID": str(g),
            "DTRAIN_FT_GROUPS": "3",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "DTRAIN_FT_TIMEOUT_S": "10",
            "DTRAIN_FT_MIN_REPLICAS": "1",
        }
        assert not {"TORCHELASTIC_RUN_ID", "GROUP_RANK", "TORCHFT_MANAGER_PORT"} & set(env)
        assert shlex.split(env["DTRAIN_LAUNCH_COMMAND"])[:6] == [
            "dtrain",
            "launch",
            "--ft",
            "--nproc-per-node",
            "3",
            "--max-restarts",
        ]
    assert len({r["env"]["MASTER_PORT"] for r in first.values()}) == 3  # a store of its own each
    port = lighthouse.rsplit(":", 1)[1]
    assert lighthouses(port)

    for n, how in enumerate(["die", "crash", "die"], 1):
        order(tmp_path, how, 1)
        if n <= 2:  # restarted: a new process, on a new store port; the others' processes untouched
            wait_for(lambda: len(started(tmp_path, 1)) == n + 1, 60, what=f"restart {n} of group 1")
            assert started(tmp_path, 1)[-1]["env"]["MASTER_PORT"] != started(tmp_path, 1)[-2]["env"]["MASTER_PORT"]
    wait_for(lambda: not alive(started(tmp_path, 1)[-1]["pid"]), 30, what="group 1's last death")
    for g in (0, 2):
        assert len(started(tmp_path, g)) == 1 and alive(first[g]["pid"]), f"group {g} was restarted or stopped"
        order(tmp_path, "done", g)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith(
        f"launch: --ft, 3 replica group(s) of one process, nodes=1, max_restarts=2, "
        f"lighthouse {lighthouse} (started here"
    )
    assert lines[1].startswith("ft: group 1 died (SIGKILL) at step ~") and lines[1].endswith(
        "; restarting it (1 of 2 restarts); the others train on"
    )
    assert lines[2].startswith("ft: group 1 died (exit code 1; log runs/fake/logs/group-1.log) at step ~") and lines[
        2
    ].endswith("; restarting it (2 of 2 restarts); the others train on")
    assert lines[3].startswith("ft: group 1 died (SIGKILL) at step ~") and lines[3].endswith(
        "; no restarts left (--max-restarts 2); the others train on without it"
    )
    assert lines[4] == "launch: done by 2 of 3 replica groups; lost for good: group 1 (SIGKILL)"
    assert len(lines) == 5, err
    # group 0's output on the terminal, the others' in their logs only; each attempt under a header
    assert "fake group 0 started" in out and "fake group 1" not in out
    logs = tmp_path / "runs" / "fake" / "logs"
    log1 = (logs / "group-1.log").read_text()
    assert log1.count("---- dtrain launch --ft:") == 3 and "RuntimeError: fake crash of group 1" in log1
    assert "fake group 0 started" in (logs / "group-0.log").read_text()
    assert not lighthouses(port)  # stopped at the end


@pytest.mark.multiproc
@needs_torchft
def test_a_user_error_stops_every_group_and_is_one_line(tmp_path):
    """A group's exit 2 is never retried: the others get SIGTERM (they save), and the launch ends with that
    group's one line, exit 2, as the normal launcher's; one that fails on its way out is not restarted.
    Group 0's own line goes to its log only, though its output is on the terminal (it was there twice)."""
    proc = launch(tmp_path, 3, "--max-restarts", "3")
    wait_for(lambda: all(started(tmp_path, g) for g in range(3)), 60, what="3 groups")
    order(tmp_path, "crashonstop", 2)
    order(tmp_path, "usererror", 0)
    out, err = finish(proc)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[1:] == [
        f"dtrain: error: config: fake mistake in group 0 (group 0 on "
        f"{os.uname().nodename}, log runs/fake/logs/group-0.log)"
    ]
    assert "dtrain: error: config: fake mistake" in (tmp_path / "runs" / "fake" / "logs" / "group-0.log").read_text()
    assert [len(started(tmp_path, g)) for g in range(3)] == [1, 1, 1]  # none restarted
    assert (tmp_path / "o" / f"saved-1-{started(tmp_path, 1)[0]['pid']}").read_text() == "SIGTERM"


@needs_torchft
def test_a_run_directory_another_job_holds_is_refused_in_one_line(tmp_path):
    """In process: this test holds the run lock, as a running `dtrain train` would; the launch starts no group
    (each would exit 0 at once: the launch passing would be the failure)."""
    from dtrain.runlock import RunLock

    (tmp_path / "runs" / "fake").mkdir(parents=True)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "done-0").touch()
    lock = RunLock(tmp_path / "runs" / "fake")
    lock.acquire(print)
    try:
        proc = run_dtrain(
            ["launch", "--ft", "--nproc-per-node", "1", str(FAKE), "--out", "o", "run.name=fake"], tmp_path, check=False
        )
    finally:
        lock.release()
    assert proc.returncode == 2 and re.fullmatch(
        rf"dtrain: error: run: runs/fake is in use by host {os.uname().nodename}, pid {os.getpid()} \(heartbeat \d+ s "
        r"ago\); wait for it to end or use another run.name",
        proc.stderr.strip(),
    ), proc.stderr
    assert not list(tmp_path.glob("o/env-*"))


@pytest.mark.multiproc
@needs_torchft
def test_sigterm_saves_every_group_exits_75_and_restarts_none(tmp_path):
    """And the launch holds the run lock meanwhile: a plain `dtrain train` of the same run is refused."""
    proc = launch(tmp_path, 2, "--max-restarts", "3")
    wait_for(lambda: all(started(tmp_path, g) for g in range(2)), 60, what="2 groups")
    port = started(tmp_path, 0)[0]["env"]["TORCHFT_LIGHTHOUSE"].rsplit(":", 1)[1]
    plain = run_dtrain(["train", "run.name=fake"], tmp_path, check=False)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines()[-1].startswith(
        f"dtrain: error: run: runs/fake is in use by host {os.uname().nodename}, pid {proc.pid} "
    ), plain.stderr
    proc.send_signal(signal.SIGTERM)  # the launcher only: it forwards to every group
    out, err = finish(proc)
    assert proc.returncode == 75, err
    assert err.strip().splitlines()[1:] == [
        "launch: SIGTERM received: the replica groups saved and stopped; run the same command again to resume"
    ]
    for g in (0, 1):
        assert len(started(tmp_path, g)) == 1
        assert (tmp_path / "o" / f"saved-{g}-{started(tmp_path, g)[0]['pid']}").read_text() == "SIGTERM"
    assert not lighthouses(port)
    assert not (tmp_path / "runs" / "fake" / "run.lock").exists()  # released


@pytest.mark.multiproc
@needs_torchft
def test_when_every_group_is_lost_the_launch_fails_naming_the_first(tmp_path):
    proc = launch(tmp_path, 2)  # --max-restarts 0
    wait_for(lambda: all(started(tmp_path, g) for g in range(2)), 60, what="2 groups")
    order(tmp_path, "crash", 1)
    lines = [proc.stderr.readline(), proc.stderr.readline()]  # the launch line, then the launcher saw it
    assert lines[1].endswith("; no restarts left (--max-restarts 0); the others train on without it\n"), lines
    assert alive(started(tmp_path, 0)[0]["pid"])  # the other trains on
    order(tmp_path, "die", 0)
    out, err = finish(proc)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("ft: group 0 died (SIGKILL)") and lines[0].endswith(
        "no restarts left (--max-restarts 0); no group left"
    )
    assert lines[1:] == [
        f"dtrain: error: launch: replica group failed: exit code 1 (group 1 on "
        f"{os.uname().nodename}, log runs/fake/logs/group-1.log)"
    ]


def test_a_signal_while_waiting_for_a_given_lighthouse_exits_75(tmp_path):
    """In this process: a SIGTERM (from a thread, once the launcher handles it) while no Lighthouse answers at
    --ft-lighthouse; no group started."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there

    def terminate():
        deadline = time.monotonic() + 60
        while getattr(signal.getsignal(signal.SIGTERM), "__self__", None).__class__ is not ft_launch.Stop:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=terminate)
    thread.start()
    proc = run_dtrain(
        ["launch", "--ft", "--ft-lighthouse", address, str(FAKE), "--out", "o", "run.name=f"], tmp_path, check=False
    )
    thread.join()
    assert proc.returncode == 75 and proc.stderr.strip().splitlines() == [
        f"launch: waiting for the Lighthouse at {address} to answer",
        "launch: SIGTERM received before any replica group started: nothing to save; run the same command again "
        "to start",
    ]
    assert not list(tmp_path.glob("o/env-*"))


def test_a_given_lighthouse_that_never_answers_is_one_line(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    proc = run_dtrain(
        ["launch", "--ft", "--ft-lighthouse", address, "--rdzv-timeout", "1", str(FAKE), "run.name=f"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"launch: waiting for the Lighthouse at {address} to answer",
        f"dtrain: error: launch: no Lighthouse answered at {address} within 1 s (--rdzv-timeout): start the node "
        f"given --ft-host-lighthouse, or `torchft_lighthouse --min_replicas 1 --quorum_tick_ms 50 --join_timeout_ms "
        f"10000 --heartbeat_timeout_ms 1000 --bind 0.0.0.0:{address.rsplit(':', 1)[1]}`",
    ]


@pytest.mark.multiproc
@needs_torchft
def test_a_group_of_two_processes_is_lost_and_restarted_as_one(tmp_path):
    """--nproc-per-node 4 --ft-group-size 2: 2 groups of 2 processes, each process told its rank in its group
    and the group's own store; rank 1 of group 1 SIGKILLed: the launcher stops its rank 0 too and starts both
    again on a new store port, while group 0's two processes run on; then all finish: exit 0."""
    proc = launch(tmp_path, 4, "--ft-group-size", "2", "--max-restarts", "1")
    wait_for(lambda: all(len(started(tmp_path, g)) == 2 for g in range(2)), 60, what="2 groups of 2")
    first = {g: started(tmp_path, g) for g in range(2)}
    for g, records in first.items():
        envs = sorted((r["env"] for r in records), key=lambda e: e["RANK"])
        assert [
            {
                k: e[k]
                for k in (
                    "REPLICA_GROUP_ID",
                    "DTRAIN_FT_GROUPS",
                    "RANK",
                    "WORLD_SIZE",
                    "LOCAL_RANK",
                    "LOCAL_WORLD_SIZE",
                )
            }
            for e in envs
        ] == [
            {
                "REPLICA_GROUP_ID": str(g),
                "DTRAIN_FT_GROUPS": "2",
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": "2",
            }
            for r in range(2)
        ]
        assert len({e["MASTER_PORT"] for e in envs}) == 1  # the group's one store
    assert first[0][0]["env"]["MASTER_PORT"] != first[1][0]["env"]["MASTER_PORT"]
    (tmp_path / "o" / "die-1-r1").touch()
    wait_for(lambda: len(started(tmp_path, 1)) == 4, 60, what="group 1 restarted")
    assert not any(alive(r["pid"]) for r in first[1])  # its rank 0 was stopped with it
    assert all(alive(r["pid"]) for r in first[0]) and len(started(tmp_path, 0)) == 2
    again = started(tmp_path, 1)[2:]
    assert sorted(r["env"]["RANK"] for r in again) == ["0", "1"]
    assert {r["env"]["MASTER_PORT"] for r in again} != {first[1][0]["env"]["MASTER_PORT"]}
    for g in range(2):
        for r in range(2):
            (tmp_path / "o" / f"done-{g}-r{r}").touch()
    out, err = finish(proc)
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("launch: --ft, 2 replica group(s) of 2 processes, nodes=1, max_restarts=1")
    assert lines[1].startswith("ft: group 1 died (SIGKILL) at step ~") and lines[1].endswith(
        "; restarting it (1 of 1 restarts); the others train on"
    )
    assert len(lines) == 2, err


@pytest.mark.multiproc
@needs_torchft
def test_with_group_0_lost_for_good_the_writers_end_is_on_the_terminal(tmp_path):
    """Group 0's output is the terminal's; lost for good, the run's end (its summary) comes from the group that
    wrote it, the lowest id left, echoed from its log."""
    proc = launch(tmp_path, 3)
    wait_for(lambda: all(started(tmp_path, g) for g in range(3)), 60, what="3 groups")
    order(tmp_path, "die", 0)
    wait_for(lambda: not alive(started(tmp_path, 0)[0]["pid"]), 30, what="group 0's death")
    for g in (1, 2):
        order(tmp_path, "done", g)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    assert lines[-3:] == [
        "summary",
        "run  fake end of group 1",
        "launch: done by 2 of 3 replica groups; lost for good: group 0 (SIGKILL)",
    ], err
