"""Shared helpers: run dtrain in this process, as a real process, as ranks forked from a warm server
(run_ranks), or under torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _env(extra: dict | None = None) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))
    }
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # this checkout's dtrain, not whichever one `pip install -e` last pointed at (tests run with cwd=tmp_path)
    # after the test's own variables: a test's PYTHONPATH (its user modules) goes after it, not in its place
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def pytest_collection_modifyitems(items):
    """Files with the most multi-process tests first (the order within a file kept): the xdist workers
    (pyproject's addopts, a file per worker at a time) then start on the long files and end on short ones,
    instead of one worker running the SLURM file alone at the end."""
    heavy = {}
    for item in items:
        path = str(item.path)
        heavy[path] = heavy.get(path, 0) + any(item.get_closest_marker(m) for m in ("multiproc", "slow", "slurm"))
    items.sort(key=lambda item: -heavy[str(item.path)])  # stable: files keep their own order


def run_dtrain(
    args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None, check: bool = True, process: bool = False
) -> subprocess.CompletedProcess:
    """`dtrain ARGS` in `cwd`; fails the test with the output when the exit code isn't 0. In this process (the
    command line's own `main`, stdout and stderr captured, one torch thread as the subprocesses have):
    a new python costs ~4 s of imports (torch, and torch._dynamo at the first optimizer), which over the
    suite's runs was minutes. `process=True` where the test needs a new python (its environment at import
    time, its start-up time); a process of its own with torch already imported (W&B's service, a run that
    initialises torch.distributed): run_ranks(1, ..., launcher="single")."""
    if process:
        proc = subprocess.run(
            [sys.executable, "-m", "dtrain", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(env),
            stdin=subprocess.DEVNULL,
        )
    else:
        proc = _run_here(args, cwd, env)
    if check and proc.returncode != 0:
        pytest.fail(f"dtrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_dtrain_process(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_dtrain(args, cwd, process=True, **kwargs)


def _run_here(args: list[str], cwd: Path, env: dict | None, script: Path | None = None) -> subprocess.CompletedProcess:
    """`dtrain ARGS`, or `python SCRIPT ARGS` (run as __main__, as python runs it), in this process."""
    import contextlib
    import io

    from rank_server import run_as_python

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_path, saved_cwd, threads = dict(os.environ), list(sys.path), os.getcwd(), torch.get_num_threads()
    saved_argv = list(sys.argv)
    try:
        extra = dict(env or {})
        sys.path[:0] = [p for p in extra.pop("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ.update(extra)
        os.chdir(cwd)
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if script is not None:
                sys.path.insert(0, str(Path(script).parent))
            code = run_as_python(list(args), script)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["dtrain", *args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    nproc: int,
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    check: bool = True,
    extra: list[str] = (),
    env: dict | None = None,
    script: Path | None = None,
) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m dtrain ARGS` (or `... SCRIPT ARGS`) on loopback (gloo on CPU)."""
    proc = subprocess.run(
        torchrun_cmd(nproc, args, extra, script),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(env),
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


_RANK_SERVER: subprocess.Popen | None = None


def run_ranks(
    nproc: int,
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    script: Path | None = None,
    preload: tuple[str, ...] = (),
    launcher: str = "torchrun",
) -> subprocess.CompletedProcess:
    """`dtrain ARGS` (or `python SCRIPT ARGS`) on `nproc` ranks forked from tests/rank_server.py, a python of
    this test worker's with torch and dtrain imported: for runs whose subject is what the ranks compute, not
    how a launcher starts them (run_torchrun and `start` for that). A 2-rank digits run costs ~0.7 s of CPU
    here, ~11 s under torchrun (its agent and two new pythons importing torch). Each rank has the variables
    `launcher` gives its workers: "torchrun" (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*, ...; no agent, so rank 0
    hosts the store), "srun" (SLURM_* only, from which dtrain.dist derives the rest) or "single" (none: one
    process, as `python -m dtrain`). `preload`: modules imported once in the server (DeepSpeed is, for
    train.engine=deepspeed). stdout and stderr are every rank's, as torchrun's are; the exit code is that of
    the rank that failed first (`.codes`: each rank's; a rank that failed gives the others 10 s to end). The
    store's port is the env's MASTER_PORT where a test gives one (its lines name it), else a free one."""
    import tempfile

    global _RANK_SERVER
    if _RANK_SERVER is None or _RANK_SERVER.poll() is not None:
        _RANK_SERVER = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "rank_server.py")],
            cwd=REPO,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # its process group: it and its ranks
    port, n = int((env or {}).get("MASTER_PORT") or free_port()), str(nproc)
    if launcher == "torchrun":
        ranks = [
            dict(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=n,
                LOCAL_WORLD_SIZE=n,
                GROUP_RANK="0",
                GROUP_WORLD_SIZE="1",
                ROLE_RANK=str(r),
                ROLE_WORLD_SIZE=n,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            for r in range(nproc)
        ]
    elif launcher == "single":
        assert nproc == 1, launcher
        ranks = [{}]
    else:  # a task of an srun step (SLURM_STEP_ID), not the batch script
        ranks = [
            dict(
                SLURM_PROCID=str(r),
                SLURM_LOCALID=str(r),
                SLURM_NTASKS=n,
                SLURM_STEP_ID="0",
                SLURM_NODELIST="127.0.0.1",
                SLURM_JOB_ID=str(40000 + port % 20000),
            )
            for r in range(nproc)
        ]
    preload = (*preload, *(["deepspeed"] if "train.engine=deepspeed" in args else []))
    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        out.touch(), err.touch()
        request = dict(
            args=[str(a) for a in args],
            cwd=str(cwd),
            env=[_env({**(env or {}), **r}) for r in ranks],
            script=str(script) if script else None,
            stdout=str(out),
            stderr=str(err),
            timeout=timeout,
            preload=list(preload),
        )
        try:
            _RANK_SERVER.stdin.write(json.dumps(request) + "\n")
            _RANK_SERVER.stdin.flush()
            reply = _RANK_SERVER.stdout.readline()
        except BaseException:  # a test's timeout, ^C: end the server and these ranks (a later run starts anew)
            os.killpg(_RANK_SERVER.pid, signal.SIGKILL)
            _RANK_SERVER.wait()
            raise
        assert reply, "tests/rank_server.py ended"
        reply = json.loads(reply)
        proc = subprocess.CompletedProcess(
            ["ranks", *map(str, args)], reply["failed"], out.read_text(), err.read_text()
        )
        proc.codes = reply["codes"]
    what = f"{nproc} ranks ({launcher}) of {' '.join(map(str, args))}"
    if reply["timed_out"]:
        pytest.fail(f"{what} ran past {timeout} s\n{proc.stdout}\n{proc.stderr}")
    if check and proc.returncode != 0:
        pytest.fail(f"{what} exited {reply['codes']}\n{proc.stdout}\n{proc.stderr}")
    return proc


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The JSON summary rank 0 prints last on stdout."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)
    return state["engine"]["model"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Built-in shards written once per session (`data.root=` this)."""
    root = tmp_path_factory.mktemp("data")
    from dtrain.data import make_builtin

    make_builtin("digits", root / "digits", 250)
    return root


@pytest.fixture(scope="session")
def resume_reference(tmp_path_factory) -> tuple[Path, dict]:
    """(run dir, result) of test_faults' RESUME_ARGS run uninterrupted on 2 ranks (run_ranks): the reference
    of the resume tests in test_faults and test_launcher (once per xdist worker that runs either)."""
    from test_faults import RESUME_ARGS

    cwd = tmp_path_factory.mktemp("straight")
    return cwd / "runs" / "r", result_of(run_ranks(2, RESUME_ARGS + ["run.name=r"], cwd))


@pytest.fixture(scope="session")
def elastic_reference(tmp_path_factory, data_root) -> tuple[Path, dict]:
    """(run dir, result) of test_elastic's ARGS run uninterrupted on 2 ranks (run_ranks): the samples of each
    epoch that test_elastic's resumes on 1 and 3 ranks and test_launcher's lost-node run compare with."""
    from test_elastic import ARGS

    cwd = tmp_path_factory.mktemp("elastic-straight")
    return cwd / "runs" / "straight", result_of(
        run_ranks(2, ARGS + [f"data.root={data_root}", "run.name=straight"], cwd)
    )


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] = (), script: Path | None = None) -> list[str]:
    target = [str(script)] if script else ["-m", "dtrain"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *extra,
        *target,
        *args,
    ]


def start(cmd: list[str], cwd: Path, tag: str, env: dict | None = None) -> subprocess.Popen:
    """Start a command in the background; its processes (and torchrun's workers) carry DTRAIN_TEST_TAG."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env({"DTRAIN_TEST_TAG": tag, **(env or {})}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def workers(tag: str, needle: bytes = b"dtrain") -> dict[int, int]:
    """{global rank: pid} of dtrain worker processes started with DTRAIN_TEST_TAG=tag (read from /proc): those
    whose command line has `needle` (`-m dtrain`, or a user's script name), not torchrun's agent nor the
    helpers a worker starts (W&B's service inherits the environment too)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = dict(
                kv.split("=", 1)
                for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            env.get("DTRAIN_TEST_TAG") == tag
            and any(needle in arg for arg in cmdline)
            and b"torch.distributed.run" not in cmdline
        ):
            found[int(env.get("RANK", 0))] = int(pid)
    return found


def wait_for(predicate, timeout: float = 120, interval: float = 0.05, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def latest_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(l).get("step", 0) for l in path.read_text().splitlines() if l.strip().endswith("}")]
    return max(steps, default=0)


def key_log(run_dir: Path) -> dict[int, list[tuple[int, list[str]]]]:
    """{rank: [(step, keys)]} from log.sample_keys files."""
    out = {}
    for path in sorted((run_dir / "sample_keys").glob("rank-*.txt")):
        rank = int(path.stem.split("-")[1])
        out[rank] = [(int(l.split()[0]), l.split()[1:]) for l in path.read_text().splitlines() if l]
    return out
