"""The slurm/ templates on a real SLURM cluster (slurmctld + two slurmd "nodes" n1, n2 on this machine,
started by tests/slurm/cluster.sh, which installs slurm-wlm + munge with apt when they are missing)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, _env, final_params
from test_matrix import CELLS, STEPS, USER_ERRORS, cell_dir, command, matrix_data  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TRAIN = ["train.epochs=2", "log.progress=false"]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A two-node cluster for the whole session, stopped at the end."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    start = subprocess.run(
        ["bash", str(CLUSTER), "start", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if start.returncode != 0:
        pytest.fail(f"tests/slurm/cluster.sh start failed ({start.returncode})\n{start.stdout}\n{start.stderr}")
    yield
    subprocess.run(
        ["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL
    )


def sbatch(cwd: Path, *args: str, env: dict | None = None) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env=_env({"PYTHON": sys.executable, **(env or {})}),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_id: str, cwd: Path, timeout: float = 240) -> tuple[dict, str]:
    """Poll `scontrol show job` (sacct is off) until the job has ended; its fields and its output."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=30)
            pytest.fail(f"job {job_id} still {fields.get('JobState')} after {timeout} s\n{output_of(job_id, cwd)}")
        time.sleep(0.5)
    return fields, output_of(job_id, cwd)


def output_of(job_id: str, cwd: Path) -> str:
    files = list(cwd.glob(f"*-{job_id}.out"))
    return files[0].read_text() if files else "(no output file)"


def summary(out: str) -> dict:
    """Rank 0's JSON result: the last JSON line (stdout and stderr share the job's output file)."""
    return json.loads([line for line in out.splitlines() if line.startswith('{"step"')][-1])


def run_template(cwd: Path, template: str, *sbatch_args: str, train_args=(), env=None) -> tuple[dict, str]:
    job = sbatch(cwd, *sbatch_args, str(REPO / "slurm" / template), *train_args, env=env)
    fields, out = wait_for(job, cwd)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{out}"
    return fields, out


def test_srun_one_task_per_device_two_tasks(slurm_cluster, tmp_path, data_root):
    _, out = run_template(
        tmp_path,
        "multi_node_srun.sbatch",
        "--nodes=1",
        "--ntasks-per-node=2",
        train_args=[f"data.root={data_root}", *TRAIN, "log.all_ranks=true"],
    )
    assert "launch: slurm, world_size=2, backend=gloo, device=cpu, nodes=1, ranks_per_node=2" in out, out
    assert "[rank 0] training" in out and "[rank 1] training" in out  # two processes really trained
    assert summary(out)["stop_reason"] == "completed"
    assert (tmp_path / "runs" / "digits" / "checkpoints" / "latest" / "manifest.json").is_file()


def test_srun_on_two_nodes(slurm_cluster, tmp_path, data_root):
    fields, out = run_template(tmp_path, "multi_node_srun.sbatch", train_args=[f"data.root={data_root}", *TRAIN])
    assert fields["NodeList"] == "n[1-2]"
    port = 20000 + int(fields["JobId"]) % 20000
    assert (
        f"launch: slurm, world_size=2, backend=gloo, device=cpu, nodes=2, ranks_per_node=1, master=n1:{port}" in out
    ), out
    assert summary(out)["stop_reason"] == "completed"


def test_single_node_torchrun(slurm_cluster, tmp_path, data_root):
    _, out = run_template(
        tmp_path, "single_node.sbatch", train_args=[f"data.root={data_root}", *TRAIN], env={"NPROC": "2"}
    )
    assert "--standalone --nnodes 1 --nproc-per-node 2 -m dtrain train" in out  # the command it runs
    assert "launch: torchrun, world_size=2, backend=gloo, device=cpu, nodes=1, ranks_per_node=2" in out, out
    assert summary(out)["stop_reason"] == "completed"


def test_one_torchrun_per_node_on_two_nodes(slurm_cluster, tmp_path, data_root):
    fields, out = run_template(
        tmp_path, "multi_node_torchrun.sbatch", train_args=[f"data.root={data_root}", *TRAIN], env={"NPROC": "1"}
    )
    assert fields["NodeList"] == "n[1-2]"
    assert f"rendezvous at n1:{20000 + int(fields['JobId']) % 20000}" in out
    assert "-m dtrain launch --nnodes" in out and "launch: 1 worker(s) per node, nodes=2" in out, out
    assert (
        "launch: torchrun, world_size=2, backend=gloo, device=cpu, nodes=2, ranks_per_node=1"
        in (tmp_path / "runs" / "digits" / "logs" / "rank-0.log").read_text()
    )  # the workers' line: in their log
    assert summary(out)["stop_reason"] == "completed"


def test_a_python_script_of_your_own_under_srun(slurm_cluster, tmp_path):
    """`sbatch slurm/multi_node_srun.sbatch train.py ARGS`: srun runs the script on every task, and a script
    calling dtrain.main() is one worker, as `dtrain train` is."""
    script = REPO / "examples" / "hf_gpt2.py"
    fields, out = run_template(
        tmp_path,
        "multi_node_srun.sbatch",
        "--nodes=1",
        "--ntasks-per-node=2",
        train_args=[
            str(script),
            f"data.root={tmp_path / 'data'}",
            "data.text_bytes=40000",
            "data.text_context=32",
            "data.batch_size=8",
            "train.max_steps=6",
            "log.progress=false",
        ],
    )
    assert f"{script} data.root=" in out and "-m dtrain" not in out, out  # the template's `+ srun ...` line
    assert "launch: slurm, world_size=2, backend=gloo" in out and "test/token_acc" in out, out
    assert summary(out)["step"] == 6


TORCHRUN = "-m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2"
LAUNCH = (
    "-m dtrain launch --nnodes 1 --nproc-per-node 2 --rdzv-endpoint n1:20007 --rdzv-id 7 --rdzv-conf is_host=1 "
    "--max-restarts 2"
)


@pytest.mark.parametrize(
    "template, as_train, as_script",
    [
        (
            "single_node.sbatch",
            f"{TORCHRUN} -m dtrain train --config c.yaml lr=1",
            f"{TORCHRUN} train.py lr=1 --config c.yaml",
        ),
        ("multi_node_srun.sbatch", "-m dtrain train --config c.yaml lr=1", "train.py lr=1 --config c.yaml"),
        (
            "multi_node_torchrun.sbatch",
            f"{LAUNCH} train --config c.yaml lr=1",
            f"{LAUNCH} train.py lr=1 --config c.yaml",
        ),
        (
            "preemptible.sbatch",
            "-m dtrain train run.name=dtrain-7 --config c.yaml lr=1",
            "train.py run.name=dtrain-7 lr=1 --config c.yaml",
        ),
    ],
    ids=lambda v: v if v.endswith(".sbatch") else "",
)
def test_each_template_runs_dtrain_train_or_a_script_of_your_own(tmp_path, template, as_train, as_script):
    """What each template ends up running, without a cluster: its arguments go to `dtrain train`, or, when
    the first is a .py file, that script gets the rest (fake srun/scontrol; PYTHON=echo prints the command)."""
    (tmp_path / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho n1\n")
    for fake in ("srun", "scontrol"):
        (tmp_path / fake).chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": "echo",
        "NPROC": "2",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "dtrain",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "n1",
        "SLURMD_NODENAME": "n1",
        "SLURM_NODEID": "0",
    }

    def run(*args):
        proc = subprocess.run(
            ["bash", str(REPO / "slurm" / template), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]  # what PYTHON=echo printed: the command each rank runs

    assert run("--config", "c.yaml", "lr=1") == as_train
    assert run("train.py", "lr=1", "--config", "c.yaml") == as_script


@pytest.mark.parametrize(
    "entry, launcher, data, outcome",
    [c for c in CELLS if c[1] == "srun"],
    ids=["-".join(c) for c in CELLS if c[1] == "srun"],
)
def test_user_path_under_srun(slurm_cluster, matrix_data, tmp_path, entry, launcher, data, outcome):  # noqa: F811
    """tests/test_matrix.py's srun cells: `srun --ntasks 2` of the same command a single process runs."""
    import shlex

    cwd = cell_dir(matrix_data, tmp_path)
    extra = USER_ERRORS[entry][0] if outcome == "error" else []
    cmd, env = command(entry, "single", data, STEPS + extra + ["run.name=cell"])
    job = sbatch(
        cwd,
        "--nodes=1",
        "--ntasks=2",
        "--output=%x-%j.out",
        "--job-name=cell",
        f"--wrap=srun --kill-on-bad-exit=1 {shlex.join(cmd)}",
        env=env,
    )
    fields, out = wait_for(job, cwd)
    assert "Traceback" not in out, out
    if outcome == "error":
        errors = [line for line in out.splitlines() if line.startswith("dtrain: error")]
        assert fields["ExitCode"] == "2:0" and len(errors) == 1, f"{fields}\n{out}"
        assert errors[0].startswith(USER_ERRORS[entry][1]), out
        return
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{out}"
    assert "launch: slurm, world_size=2" in out, out
    result = summary(out)
    assert result["step"] == 10 and any(k.startswith("test/") for k in result), result


def test_dtrain_in_the_batch_script_without_srun_is_an_error(slurm_cluster, tmp_path):
    # the batch script has SLURM_PROCID=0 and SLURM_NTASKS=2: without the check it waited for a rank 1
    job = sbatch(
        tmp_path, "--ntasks=2", "--output=%x-%j.out", "--job-name=nosrun", f"--wrap={sys.executable} -m dtrain train"
    )
    fields, out = wait_for(job, tmp_path, timeout=120)
    assert fields["ExitCode"] == "2:0", f"{fields}\n{out}"
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("dtrain: error: launcher: this is a SLURM batch script with SLURM_NTASKS=2, not one of its tasks")
    ), out


def test_preemptible_job_requeued_from_outside_resumes_into_the_same_log(slurm_cluster, tmp_path, data_root):
    """What the template alone promises: after a requeue the job keeps its id, run name and output file,
    and dtrain resumes the same run from its newest checkpoint (here the requeue comes from outside)."""
    job = sbatch(
        tmp_path,
        str(REPO / "slurm" / "preemptible.sbatch"),
        f"data.root={data_root}",
        "train.epochs=6",
        "log.progress=false",
        "checkpoint.every=5",
    )
    latest = tmp_path / "runs" / f"dtrain-{job}" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists():
        assert time.monotonic() < deadline and job_fields(job)["JobState"] in ("PENDING", "RUNNING"), output_of(
            job, tmp_path
        )
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while job_fields(job).get("Restarts") != "1" or job_fields(job)["JobState"] != "PENDING":
        assert time.monotonic() < deadline, f"{job_fields(job)}\n{output_of(job, tmp_path)}"
        time.sleep(0.2)
    # No `scontrol update StartTime=now`: starting again within the second of the requeue meets the revoked
    # credential ("Killing non-startable batch job: Job credential revoked"); cred_expire=10 keeps the wait short.
    fields, out = wait_for(job, tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{out}"
    assert f"run dtrain-{job}: start 1" in out and f"run dtrain-{job}: start 2" in out, out  # appended, not truncated
    assert "resumed from" in out, out
    assert summary(out) == {**summary(out), "stop_reason": "completed", "step": 6 * 9}


def test_preemptible_job_checkpoints_requeues_itself_and_resumes(slurm_cluster, tmp_path, data_root):
    """USR1 to every task (what --signal=USR1@N sends before the time limit): the ranks agree to stop,
    checkpoint at a step boundary, rank 0 requeues the job once, and the requeued job resumes the same
    run into the same log, and ends with the same parameters as the same job never preempted."""
    args = (
        str(REPO / "slurm" / "preemptible.sbatch"),
        f"data.root={data_root}",
        "train.epochs=10",
        "log.progress=false",
        "train.log_every=1",
    )
    straight = sbatch(tmp_path, *args, env={"RUN_NAME": "straight"})  # on the other node, meanwhile
    job = sbatch(tmp_path, *args)
    metrics = tmp_path / "runs" / f"dtrain-{job}" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and job_fields(job)["JobState"] in ("PENDING", "RUNNING"), output_of(
            job, tmp_path
        )
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)  # to the job steps, like --signal
    deadline = time.monotonic() + 120
    while job_fields(job).get("Restarts") != "1" or job_fields(job)["JobState"] != "PENDING":
        assert time.monotonic() < deadline, f"{job_fields(job)}\n{output_of(job, tmp_path)}"
        time.sleep(0.2)
    first = output_of(job, tmp_path)
    assert "SIGUSR1 received" in first and f"slurm: requeueing job {job}" in first, first
    stopped = summary(first)
    assert stopped["stop_reason"] == "signal:SIGUSR1" and 0 < stopped["step"] < 10 * 9, first
    # No `scontrol update StartTime=now`: starting again within the second of the requeue meets the revoked
    # credential ("Killing non-startable batch job: Job credential revoked"); cred_expire=10 keeps the wait short.
    fields, out = wait_for(job, tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{out}"
    assert f"run dtrain-{job}: start 1" in out and f"run dtrain-{job}: start 2" in out, out  # one appended log
    assert f"checkpoints/step-{stopped['step']:08d} at step {stopped['step']}" in out, out  # resumed right there
    result = summary(out)
    assert result["stop_reason"] == "completed" and result["step"] == 10 * 9
    fields, out = wait_for(straight, tmp_path)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", f"{fields}\n{out}"
    assert summary(out)["step"] == 10 * 9
    want, got = final_params(tmp_path / "runs" / "straight"), final_params(tmp_path / "runs" / f"dtrain-{job}")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # bit for bit
