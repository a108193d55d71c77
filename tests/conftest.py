"""Shared helpers: run dtrain as a real process (one, or several under torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # this checkout's dtrain, not whichever one `pip install -e` last pointed at (tests run with cwd=tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run_dtrain(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python -m dtrain ARGS` in `cwd`; fails the test with the output when the exit code isn't 0."""
    proc = subprocess.run([sys.executable, "-m", "dtrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env(env), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"dtrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 300, check: bool = True,
                 extra: list[str] = ()) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m dtrain ARGS` on loopback (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *extra, "-m", "dtrain", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
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


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), *extra, "-m", "dtrain", *args]


def start(cmd: list[str], cwd: Path, tag: str) -> subprocess.Popen:
    """Start a command in the background; its processes (and torchrun's workers) carry DTRAIN_TEST_TAG."""
    return subprocess.Popen(cmd, cwd=cwd, env=_env({"DTRAIN_TEST_TAG": tag}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def workers(tag: str, program: bytes = b"dtrain") -> dict[int, int]:
    """{global rank: pid} of dtrain worker processes (or of the `program` script torchrun ran) started with
    DTRAIN_TEST_TAG=tag (read from /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if env.get("DTRAIN_TEST_TAG") == tag and program in cmdline and b"torch.distributed.run" not in cmdline:
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
