"""`dtrain doctor` on real ranks: healthy, an unreadable shard on one rank, a read-only checkpoint
directory, and ranks started with different configs."""

import shutil
import subprocess
import sys

import pytest

from conftest import _env, free_port, run_ranks
from dtrain.data import ShardStream, read_index

pytestmark = pytest.mark.multiproc


def failing_line(proc) -> str:
    return next(l for l in proc.stderr.splitlines() if l.startswith("dtrain: error: doctor:"))


def test_healthy_two_ranks_pass(tmp_path, data_root):
    proc = run_ranks(2, ["doctor", f"data.root={data_root}"], tmp_path)
    for name in ("versions", "config", "all-reduce", "shards", "checkpoint dir"):
        assert any(l.strip().startswith(f"ok    {name}") for l in proc.stderr.splitlines()), (name, proc.stderr)
    assert "bus bandwidth" in proc.stderr


def test_train_runs_a_brief_doctor_first(tmp_path, data_root):
    proc = run_ranks(2, ["train", f"data.root={data_root}", "train.epochs=1", "log.progress=false"], tmp_path)
    assert "doctor (brief" in proc.stderr and "FAIL" not in proc.stderr


def test_unreadable_shard_on_one_rank(tmp_path, data_root):
    shutil.copytree(data_root / "digits", tmp_path / "d" / "digits")
    index = read_index(tmp_path / "d" / "digits")
    order = ShardStream(index, "train", batch_size=1, rank=0, world_size=1, seed=0, train=True).shard_order(0)
    victim = order[1::2][0]  # a shard that rank 1, and only rank 1, reads in epoch 0
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[:512] + b"\xff" * 1024 + data[1536:])  # garbage in the middle
    proc = run_ranks(2, ["doctor", "data.root=d"], tmp_path, check=False)
    assert proc.returncode != 0
    line = failing_line(proc)
    assert "shards check failed" in line and "rank 1" in line and "rank 0" not in line, line


def test_read_only_checkpoint_dir(tmp_path, data_root):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = run_ranks(2, ["doctor", f"data.root={data_root}", f"run.dir={ro}"], tmp_path, check=False)
    finally:
        subprocess.run(["umount", str(ro)])
    assert proc.returncode != 0
    line = failing_line(proc)
    assert "checkpoint dir check failed" in line and "Read-only file system" in line, line


def test_mismatched_config_between_ranks(tmp_path, data_root):
    """Two ranks started by hand (as two nodes would be) with different overrides."""
    port = str(free_port())
    procs = []
    for rank, lr in ((0, "0.003"), (1, "0.1")):
        env = _env(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank),
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dtrain", "doctor", f"data.root={data_root}", f"optim.lr={lr}"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                stdin=subprocess.DEVNULL,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 2 for p in procs)
    line = next(l for l in outs[0][1].splitlines() if l.startswith("dtrain: error: doctor:"))
    assert "config check failed" in line and "rank 1 has optim.lr=0.1, rank 0 has 0.003" in line, line
