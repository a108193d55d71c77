"""Launching: environment detection, one-line launcher errors that come quickly, launch/ scripts,
and two "nodes" on loopback training exactly like one node with the same world size."""

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_dtrain_process, _env, final_params, free_port, metrics_of, result_of, run_ranks
from dtrain import dist
from dtrain.data.datasets import digits
from dtrain.data.shards import write_shards
from dtrain.dist import Launch, LaunchError, detect, parse_nodelist

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
}
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def without(env: dict, *names: str) -> dict:
    return {k: v for k, v in env.items() if k not in names}


# ---- detect() with plain dicts ------------------------------------------------------------------
def test_nothing_set_is_single():
    assert detect({}) == Launch("single")
    assert detect({"MASTER_ADDR": "x", "MASTER_PORT": "1"}).mode == "single"  # rendezvous vars alone: no ranks


def test_torchrun_variables():
    assert detect(TORCHRUN) == Launch(
        "torchrun", 3, 1, 4, node_rank=1, num_nodes=2, local_world_size=2, master_addr="node01", master_port=29500
    )


def test_hand_set_variables_without_local_rank():
    got = detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (got.mode, got.global_rank, got.local_rank, got.world_size) == ("torchrun", 1, 1, 2)
    assert got.num_nodes is None  # layout unknown; the launch line leaves it out


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE set but RANK, MASTER_ADDR, MASTER_PORT missing"),
        (without(TORCHRUN, "MASTER_PORT"), "MASTER_PORT missing"),
        ({**TORCHRUN, "RANK": "4"}, "RANK=4 is outside WORLD_SIZE=4"),
        ({**TORCHRUN, "RANK": "-1"}, "RANK=-1 is outside WORLD_SIZE=4"),
        ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({**TORCHRUN, "RANK": "two"}, "RANK='two' is not an integer"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a TCP port"),
        ({**SRUN, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside the step's 4 tasks"),
        (without(SRUN, "SLURM_LOCALID"), "start tasks with srun"),
        (without(SRUN, "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"), "SLURM batch script with SLURM_NTASKS=4"),
    ],
)
def test_wrong_variables_are_one_line_errors(env, message):
    with pytest.raises(LaunchError, match="^launcher: ") as e:
        detect(env, expand=parse_nodelist)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_srun_one_task_per_device():
    got = detect(SRUN, expand=parse_nodelist)
    assert got == Launch(
        "slurm",
        3,
        1,
        4,
        node_rank=1,
        num_nodes=2,
        local_world_size=2,
        master_addr="gpu07",
        master_port=20000 + 123456 % 20000,
    )
    # exported MASTER_ADDR / MASTER_PORT win over the node list and the job id
    got = detect({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}, expand=parse_nodelist)
    assert (got.master_addr, got.master_port) == ("10.0.0.1", 29501)


def test_srun_inside_torchrun_is_torchrun():
    # srun + torchrun: the workers see both; torchrun's variables describe them
    assert detect({**SRUN, **TORCHRUN}).mode == "torchrun"


def test_single_slurm_task_and_one_task_batch_script_are_single():
    one = {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    assert detect(one).mode == "single"
    batch = without(one, "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")
    assert detect(batch).mode == "single"


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("gpu[03-05,07],cpu1", ["gpu03", "gpu04", "gpu05", "gpu07", "cpu1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("rack[1-2]-node[1,3]", ["rack1-node1", "rack1-node3", "rack2-node1", "rack2-node3"]),
        ("a-b.c,d[1]", ["a-b.c", "d1"]),
    ],
)
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "n[1-", "n[a-b]", "n[5-3]"])
def test_parse_nodelist_rejects_garbage(bad):
    with pytest.raises(LaunchError, match="cannot parse SLURM node list"):
        parse_nodelist(bad)


def test_hostnames_falls_back_to_the_parser_without_scontrol(monkeypatch):
    monkeypatch.setattr(dist.environment.shutil, "which", lambda name: None)
    assert dist.hostnames("gpu[03-04]") == ["gpu03", "gpu04"]


@pytest.mark.skipif(not shutil.which("scontrol"), reason="scontrol not installed")
def test_hostnames_agrees_with_scontrol():
    for nodelist in ("gpu[03-05,07],cpu1", "n[08-10]", "rack[1-2]-node[1,3]"):
        assert dist.hostnames(nodelist) == parse_nodelist(nodelist)


# ---- the CLI: one line, exit 2, within seconds ---------------------------------------------------
def run_timed(env: dict, *overrides: str, cwd):
    t0 = time.monotonic()
    proc = run_dtrain_process(["train", "log.progress=false", *overrides], cwd, timeout=60, env=env, check=False)
    return proc, time.monotonic() - t0


def assert_one_line_error(proc, message: str):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: launcher: ") and message in lines[0], proc.stderr


def test_roll_call_names_the_ranks_that_do_not_answer_or_the_stores_host():
    """After a failed collective each rank answers on the shared store: the silent ones are named; a store
    nobody answers at names its host; all present, or nothing learned, is no answer (the guard's old text)."""
    import datetime

    store = torch.distributed.TCPStore(
        "127.0.0.1", 0, 1, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5)
    )
    store.set("dtrain/alive/a/2", "1")  # rank 2 already answered
    store.add("dtrain/alive/a/count", 1)
    call = dist.RollCall()
    call.keep(store, "a", "127.0.0.1", store.port, "rank 0", hosted_here=False)
    assert call.lost(0, 4, wait_s=0.3) == "ranks 1, 3 are gone or stuck (no answer within 0.3 s of the failure)"
    assert call.lost(0, 4, wait_s=0.3) == call.answer  # asked once
    call.keep(store, "b", "127.0.0.1", store.port, "rank 0", hosted_here=False)
    store.set("dtrain/alive/b/1", "1")
    store.add("dtrain/alive/b/count", 1)
    assert call.lost(0, 2, wait_s=5) is None  # everybody is here, at once: not a lost rank
    gone = free_port()  # nothing listens there
    call.keep(store, "c", "127.0.0.1", gone, "node 0's launcher", hosted_here=False)
    assert call.lost(1, 2) == f"node 0's launcher (the rendezvous store, 127.0.0.1:{gone}) is gone"
    assert dist.RollCall().lost(0, 2) is None  # no store kept (single process)


def test_world_size_without_rank_fails_at_once(tmp_path):
    proc, took = run_timed({"WORLD_SIZE": "2"}, cwd=tmp_path)
    assert_one_line_error(proc, "WORLD_SIZE set but RANK, MASTER_ADDR, MASTER_PORT missing")
    assert took < 20


def test_rank_outside_world_size_fails_at_once(tmp_path):
    env = {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc, took = run_timed(env, cwd=tmp_path)
    assert_one_line_error(proc, "RANK=2 is outside WORLD_SIZE=2")
    assert took < 20


def test_unreachable_master_fails_after_the_connect_timeout(tmp_path):
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc, took = run_timed(env, "dist.connect_timeout_s=3", cwd=tmp_path)
    assert_one_line_error(proc, f"rank 1 cannot reach the master at 127.0.0.1:{env['MASTER_PORT']} within 3 s")
    assert 3 <= took < 25


def test_missing_rank_fails_after_the_connect_timeout(tmp_path):
    # rank 0 alone: it hosts the store, nobody else arrives
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc, took = run_timed(env, "dist.connect_timeout_s=3", cwd=tmp_path)
    assert_one_line_error(proc, "only 1 of 2 ranks joined")
    assert 3 <= took < 25


def test_debug_under_a_launcher_is_refused(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run_dtrain_process(["train", "--debug"], tmp_path, env=env, check=False)
    assert_one_line_error(proc, "--debug runs one process")


# ---- launch/ scripts -----------------------------------------------------------------------------
def script(name: str, *args: str, cwd, env: dict | None = None, timeout: float = 180, background=False):
    cmd = ["bash", str(REPO / "launch" / name), *args]
    env = _env({"PYTHON": sys.executable, **(env or {})})
    if background:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_single_node_script_starts_n_cpu_ranks(tmp_path, data_root):
    proc = script(
        "single_node.sh",
        "2",
        "--",
        "train",
        f"data.root={data_root}",
        "train.epochs=1",
        "log.progress=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "+ " in proc.stderr and "-m dtrain launch --nproc-per-node 2 --max-restarts 0 train" in proc.stderr
    assert "launch: 2 worker(s) per node" in proc.stderr  # dtrain launch's line; the workers' in their logs
    assert (
        "launch: torchrun, world_size=2, backend=gloo, device=cpu, nodes=1, ranks_per_node=2"
        in (tmp_path / "runs" / "digits" / "logs" / "rank-0.log").read_text()
    )
    assert result_of(proc)["stop_reason"] == "completed"


def test_scripts_run_dtrain_train_or_a_script_of_your_own(tmp_path):
    """Arguments after `--` go to `dtrain train`, or, when the first is a .py file, to that script through
    `dtrain launch` (PYTHON=echo prints the command the script would run)."""

    def ran(*args):
        proc = script(*args, cwd=tmp_path, env={"PYTHON": "echo"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    single = "-m dtrain launch --nproc-per-node 2 --max-restarts 0"
    assert ran("single_node.sh", "2", "--", "lr=1") == f"{single} train lr=1"
    assert ran("single_node.sh", "2", "--", "train", "lr=1") == f"{single} train lr=1"
    assert ran("single_node.sh", "2", "--", "train.py", "lr=1") == f"{single} train.py lr=1"
    multi = ("multi_node.sh", "--nnodes", "2", "--node-rank", "1", "--head", "h:1", "--nproc", "1", "--")
    assert ran(*multi, "lr=1").endswith("--max-restarts 0 train lr=1")
    assert "--rdzv-conf is_host=0 --rdzv-timeout 300 " in ran(*multi, "lr=1")  # the launcher's own bound, said
    assert ran(*multi, "train.py", "lr=1").endswith("--max-restarts 0 train.py lr=1")


def test_debug_script_runs_one_process_even_under_launcher_variables(tmp_path, data_root):
    proc = script(
        "debug.sh",
        "--",
        f"data.root={data_root}",
        "train.debug_steps=2",
        cwd=tmp_path,
        env={"RANK": "1", "WORLD_SIZE": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "-m dtrain train --debug" in proc.stderr.splitlines()[0]
    assert "launch: single" in proc.stderr and result_of(proc)["step"] == 2


def test_scripts_reject_bad_arguments(tmp_path):
    proc = script("single_node.sh", "two", cwd=tmp_path)
    assert proc.returncode == 2 and "NPROC must be a positive integer" in proc.stderr
    proc = script("multi_node.sh", "--nnodes", "2", "--node-rank", "2", "--head", "h:1", cwd=tmp_path)
    assert proc.returncode == 2 and "--node-rank (or NODE_RANK) must be in 0..1" in proc.stderr
    proc = script("multi_node.sh", "--nnodes", "2", "--node-rank", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "no head address" in proc.stderr


# ---- two nodes on loopback = one node, same world size ----------------------------------------
@pytest.fixture(scope="module")
def full_batch_data(tmp_path_factory):
    """256 samples in 4 shards, global batch 256: every step sees every sample whichever rank reads
    which shard, so the c10d rendezvous's rank order can't change the result."""
    splits, meta = digits()
    x, y = splits["train"]
    root = tmp_path_factory.mktemp("fullbatch") / "d"
    write_shards(
        root,
        {"train": (x[:256], y[:256]), "val": (x[256:384], y[256:384]), "test": (x[384:512], y[384:512])},
        meta,
        shard_size=64,
    )
    return root


@pytest.mark.multiproc
def test_two_nodes_on_loopback_match_one_node(tmp_path, full_batch_data):
    args = [
        f"data.dataset=folder:{full_batch_data}",
        "data.batch_size=128",
        "data.shuffle_buffer=0",
        "train.epochs=8",
        "optim.lr=0.01",
        "model.kwargs.dropout=0",
        "log.progress=false",
        "train.log_every=1",
    ]
    one = run_ranks(2, ["train", *args, "run.name=one"], tmp_path)  # ranks as torchrun's on one node
    assert "launch: torchrun, world_size=2, backend=gloo, device=cpu, nodes=1, ranks_per_node=2" in one.stderr

    head = f"127.0.0.1:{free_port()}"
    nodes = [
        script(
            "multi_node.sh",
            "--nnodes",
            "2",
            "--node-rank",
            str(r),
            "--head",
            head,
            "--nproc",
            "1",
            "--run-id",
            "loopback",
            "--",
            *args,
            "run.name=two",
            cwd=tmp_path,
            background=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, err
        assert "-m dtrain launch --nnodes 2 --nproc-per-node 1 --rdzv-endpoint " + head in err
    assert (
        "launch: torchrun, world_size=2, backend=gloo, device=cpu, nodes=2, ranks_per_node=1"
        in (tmp_path / "runs" / "two" / "logs" / "rank-0.log").read_text()
    )

    a, b = final_params(tmp_path / "runs" / "one"), final_params(tmp_path / "runs" / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), max(
        (a[k] - b[k]).abs().max().item() for k in a
    )
    loss_one = [r["loss"] for r in metrics_of(tmp_path / "runs" / "one") if "loss" in r]
    loss_two = [r["loss"] for r in metrics_of(tmp_path / "runs" / "two") if "loss" in r]
    assert np.allclose(loss_one, loss_two, atol=1e-5) and loss_one[-1] < loss_one[0]
