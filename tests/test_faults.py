"""Fault injection with real processes and real signals: kills during saves, killed and signalled
ranks, stalled ranks, corrupt and malicious checkpoints, a full disk, NaNs, and secrets."""

import contextlib
import json
import os
import pickle
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO,
    _env,
    final_params,
    key_log,
    latest_logged_step,
    metrics_of,
    result_of,
    run_dtrain,
    run_ranks,
    start,
    torchrun_cmd,
    wait_for,
    workers,
)
from dtrain.checkpoint import CheckpointError, Checkpointer, Snapshot, safe_load, verify
from dtrain.dist import ROLL_CALL_S, DistInfo

SINGLE = DistInfo("single", 0, 0, 1, torch.device("cpu"), None)


# ---- kill during save ------------------------------------------------------------------------
def kill_during_save_trials(tmp_path: Path, trials: int) -> dict:
    """SIGKILL a process that does nothing but save checkpoints, at a random moment, `trials` times; each
    new process resumes from the newest complete checkpoint. The processes are forked by one server
    (tests/save_loop.py --fork-server) so that a trial does not pay for an interpreter and torch import."""
    root = tmp_path / "ckpts"
    counts = {
        "trials": 0,
        "killed_mid_write": 0,
        "resumed_ok": 0,
        "killed_by_another_signal": 0,
        "stopped_by_another_test": 0,
    }
    expected_min = 0
    rng = random.Random(0)
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "save_loop.py"), "--fork-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # no OpenMP pool across forks

    received: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: [received.put(l) for l in iter(server.stdout.readline, "")] + [received.put("")], daemon=True
    ).start()

    def read_until(*wanted: str, pid: str | None = None) -> dict:  # the server's and the saver's lines
        lines: dict = {}
        while not all(any(w in lines for w in alternatives.split("|")) for alternatives in wanted):
            try:
                line = received.get(timeout=90)
            except queue.Empty:
                # A saver silent for 90 s: once in some CI runs one hung here for the test's whole 600 s. A
                # saver another test SIGSTOPped (its pid reused: those tests signal their own dead worker's pid
                # again in `finally`) is one more random kill; any other state fails, naming it.
                pid = lines.get("pid", pid)
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if pid else "?"
                assert state == "T", (
                    f"the saver {pid} hung in state {state} "
                    f"({Path(f'/proc/{pid}/wchan').read_text() if pid else ''}): {lines}"
                )
                counts["stopped_by_another_test"] += 1
                os.kill(int(pid), signal.SIGKILL)
                continue
            key, _, value = line.strip().partition(" ")
            assert key, f"the fork server ended: {lines}"
            lines[key] = value
        assert "error" not in lines, f"the saver failed: {lines['error']}"  # its exception, before `reaped`
        return lines

    try:
        for _ in range(trials):
            server.stdin.write(f"{root}\n")
            server.stdin.flush()
            lines = read_until("pid", "ready|reaped")
            if "ready" in lines:
                assert int(lines["ready"]) >= expected_min  # resumed from the newest complete checkpoint, not older
                if not (root / "latest").exists():  # the first save first: on a slow disk one takes longer than
                    wait_for(lambda: (root / "latest").exists(), timeout=60, what="the first checkpoint")  # a sleep
                time.sleep(rng.uniform(0.02, 0.3))  # the loop does nothing but save: this lands inside a save
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(lines["pid"]), signal.SIGKILL)
                lines.update(read_until("reaped", pid=lines["pid"]))
            # A saver killed by a signal this test did not send (once in a few CI runs one died before `ready`,
            # while other tests' processes start and end on a machine whose pids wrap at 32768) is one more
            # kill at a random moment: the same checks hold. An exit of its own (an exception) is a failure.
            code = int(lines["reaped"])
            assert code < 0, f"the saver exited with {code}, not killed by a signal: {lines}"
            counts["killed_by_another_signal"] += code != -signal.SIGKILL or "ready" not in lines
            counts["trials"] += 1
            counts["killed_mid_write"] += any(root.glob(".tmp-step-*"))
            found = Checkpointer(root, 2, SINGLE, "test").load_latest(lambda m: None)
            if found is None:  # killed before the very first save completed
                continue
            path, state, _ = found
            step = state["step"]
            assert torch.equal(state["weights"], torch.full((1_000_000,), float(step)))
            assert verify(path)["step"] == step and step >= expected_min
            expected_min = step
            counts["resumed_ok"] += 1
    finally:
        server.kill()
        server.wait()
    return counts


@pytest.mark.slow
def test_kill_during_save(tmp_path, capsys):
    """100 SIGKILLs at random moments of back-to-back saves (CI runs slow tests too; the issue asks for
    at least 20 there and 100 in a slow run: one test serves both)."""
    counts = kill_during_save_trials(tmp_path, 100)
    with capsys.disabled():
        print(f"\nkill-during-save: {counts}")
    assert counts["resumed_ok"] >= 95 and counts["killed_mid_write"] >= 20 and counts["killed_by_another_signal"] <= 3


# ---- corrupt and malicious checkpoints ----------------------------------------------------------
@pytest.fixture
def one_checkpoint(tmp_path) -> Path:
    ckpt = Checkpointer(tmp_path / "c", 3, SINGLE, "h")
    ckpt.save(1, {"w": torch.ones(1000)}, {"rng": torch.zeros(3)})
    ckpt.save(2, {"w": torch.ones(1000) * 2}, {"rng": torch.zeros(3)})
    return tmp_path / "c"


def test_truncated_flipped_and_malicious_checkpoints_are_refused(one_checkpoint, tmp_path):
    root = one_checkpoint
    newest = root / "step-00000002" / "state.pt"
    original = newest.read_bytes()
    log = []

    newest.write_bytes(original[:-100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        verify(newest.parent)
    path, state, _ = Checkpointer(root, 3, SINGLE, "h").load_latest(log.append)
    assert path.name == "step-00000001" and torch.equal(state["w"], torch.ones(1000))
    assert any("truncated" in m for m in log) and any("step-00000001" in m for m in log)

    flipped = bytearray(original)
    flipped[len(flipped) // 3] ^= 0x01  # one flipped bit, same size
    newest.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify(newest.parent)

    # A pickle that would run code, with a manifest rewritten to match it: weights_only refuses it.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = root / "step-00000002" / "state.pt"
    evil.write_bytes(pickle.dumps({"w": Evil()}))
    manifest = json.loads((evil.parent / "manifest.json").read_text())
    from dtrain.checkpoint import _sha256

    manifest["files"]["state.pt"] = {"sha256": _sha256(evil), "bytes": evil.stat().st_size}
    (evil.parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_load(evil)
    log.clear()
    path, _, _ = Checkpointer(root, 3, SINGLE, "h").load_latest(log.append)
    assert not marker.exists()
    assert path.name == "step-00000001" and "refusing to load" in log[0]  # fell back, ran nothing

    shutil.rmtree(root / "step-00000001")  # nothing usable left: an error, never a silent fresh start
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Checkpointer(root, 3, SINGLE, "h").load_latest(log.append)


def test_malicious_checkpoint_fails_training_with_one_line(tmp_path, data_root):
    args = ["train", f"data.root={data_root}", "train.epochs=1", "run.name=m"]
    run_dtrain(args + ["run.stop_at_step=5"], tmp_path)
    ckpt = next((tmp_path / "runs" / "m" / "checkpoints").glob("step-*"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "state.pt").write_bytes(pickle.dumps({"engine": Evil()}))
    from dtrain.checkpoint import _sha256

    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"sha256": _sha256(ckpt / "state.pt"), "bytes": (ckpt / "state.pt").stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = run_dtrain(args, tmp_path, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "no usable checkpoint" in last and "not a plain tensor file" in last, last
    assert "weights_only` set to `False`" not in proc.stderr
    assert not marker.exists()


# ---- exact resume after SIGKILL / SIGTERM on 2 ranks ------------------------------------------------
RESUME_ARGS = [
    "train",
    "train.epochs=3",
    "data.batch_size=32",
    "model.kwargs.dropout=0.3",
    "log.progress=false",
    "log.sample_keys=true",
    "train.log_every=1",
    "checkpoint.every=4",
    "data.shuffle_buffer=200",
]


@pytest.fixture(scope="module")
def straight_run(resume_reference):
    return resume_reference[0]


def assert_same_as_straight(run: Path, straight: Path):
    a, b = final_params(straight), final_params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    want, got = key_log(straight), key_log(run)
    for rank in (0, 1):
        steps = [s for s, _ in got[rank]]
        assert steps == list(range(1, len(steps) + 1)), "a step logged twice or missing"
        assert got[rank] == want[rank]  # the same samples at every step, so none twice, none skipped
        per_epoch = len(steps) // 3
        for e in range(3):
            epoch_keys = [k for s, keys in got[rank][e * per_epoch : (e + 1) * per_epoch] for k in keys]
            assert len(epoch_keys) == len(set(epoch_keys)), f"rank {rank} saw a sample twice in epoch {e}"


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_two_rank_resume_after_kill_is_bit_identical(tmp_path, data_root, straight_run, sig):
    tag = uuid.uuid4().hex
    run = tmp_path / "runs" / "r"
    proc = start(torchrun_cmd(2, RESUME_ARGS + ["run.name=r"]), tmp_path, tag)
    wait_for(lambda: latest_logged_step(run) >= 22, what="step 22")  # epoch 2 of 3 (19 steps per epoch)
    os.kill(workers(tag)[1], sig)  # rank 1 only
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode != 0 and "stopped at step" in err and "signal:SIGTERM" in err
        interrupted = json.loads(out.strip().splitlines()[-1])
        assert interrupted["stop_reason"] == "signal:SIGTERM"  # every rank stopped and saved
        assert (run / "checkpoints" / f"step-{interrupted['step']:08d}").is_dir()
    else:
        assert proc.returncode != 0 and "SIGKILL" in err and "local_rank: 1" in err  # torchrun's error record
    # the same arguments again, on 2 ranks forked with torchrun's variables (run_ranks): a second torchrun (its
    # agent, two new pythons: ~8 s) would resume the same bits; the same torchrun command after a kill:
    # test_torchrun_restart_resumes_automatically (its agent's restart) and tests/test_hooks.py's GPT-2 script
    resumed = run_ranks(2, RESUME_ARGS + ["run.name=r"], tmp_path)
    assert "resumed from" in resumed.stderr
    assert_same_as_straight(run, straight_run)


@pytest.mark.multiproc
def test_torchrun_restart_resumes_automatically(tmp_path, straight_run):
    tag = uuid.uuid4().hex
    run = tmp_path / "runs" / "r"
    proc = start(torchrun_cmd(2, RESUME_ARGS + ["run.name=r"], extra=["--max-restarts", "1"]), tmp_path, tag)
    wait_for(lambda: latest_logged_step(run) >= 13, what="step 13")
    os.kill(workers(tag)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err and json.loads(out.strip().splitlines()[-1])["stop_reason"] == "completed"
    assert_same_as_straight(run, straight_run)


def _stop_control_rank(rank: int, port: int, out) -> None:
    import torch.distributed as td
    from dtrain.signals import StopControl

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    control = StopControl(td.new_group(backend="gloo"))
    calls = []
    original = td.all_reduce
    td.all_reduce = lambda *a, **k: calls.append(1) or original(*a, **k)  # count the checks
    stopped = None
    for step in range(1, 2001):
        time.sleep(0.001)  # a 1 ms step
        if rank == 1 and step == 300:
            os.kill(os.getpid(), signal.SIGUSR1)
        if control.should_stop():
            stopped = step
            break
    control.close()
    out.put((rank, stopped, len(calls)))
    td.destroy_process_group()


@pytest.mark.multiproc
def test_ranks_with_short_steps_check_for_signals_less_often_and_stop_at_the_same_step():
    """Millisecond steps: the flags are compared about every 50 ms, not every step; a signal on rank 1
    still stops both ranks at the same step, within a few checks."""
    import multiprocessing
    from conftest import free_port

    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_stop_control_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (_, stop0, checks0), (_, stop1, checks1) = results
    assert stop0 == stop1 and 300 < stop0 < 300 + 250, results
    assert checks0 == checks1 and checks0 < stop0 / 3, results  # ~11 checks in 350 steps here


# ---- signals on one process -----------------------------------------------------------------------
def test_sigint_stops_cleanly_and_second_sigint_aborts(tmp_path, data_root):
    args = ["train", f"data.root={data_root}", "train.epochs=200", "log.progress=false", "train.log_every=1"]
    tag = uuid.uuid4().hex
    proc = start([sys.executable, "-m", "dtrain", *args, "run.name=a"], tmp_path, tag)
    wait_for(lambda: latest_logged_step(tmp_path / "runs" / "a") >= 5, what="step 5")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    step = json.loads(out.strip().splitlines()[-1])["step"]
    assert (tmp_path / "runs" / "a" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()

    # a ~200 MB model: the checkpoint written after the first SIGINT takes long enough for the second
    proc = start(
        [
            sys.executable,
            "-m",
            "dtrain",
            *args,
            "run.name=b",
            "model.kwargs.hidden=[4096,4096]",
            "checkpoint.save_best=false",
        ],
        tmp_path,
        tag,
    )
    wait_for(lambda: latest_logged_step(tmp_path / "runs" / "b") >= 2, what="step 2")
    proc.send_signal(signal.SIGINT)
    seen = []
    while not any("SIGINT received" in l for l in seen):  # the first one was handled: now the second
        seen.append(proc.stderr.readline())
        assert seen[-1], "".join(seen)
    proc.send_signal(signal.SIGINT)  # lands during the ~200 MB checkpoint save
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "second interrupt" in err, "".join(seen) + err


def preempted_at_step_5(data_root):
    """dtrain.fit in this process, with a loss that raises SIGUSR1 (what SLURM sends before preempting) in
    step 5 -> the FitResult."""
    import dtrain

    calls = []

    def loss(output, batch):
        calls.append(1)
        if len(calls) == 6:  # the start-up probe's call, then training steps
            signal.raise_signal(signal.SIGUSR1)
        return torch.nn.functional.cross_entropy(output, batch[1])

    return dtrain.fit([f"data.root={data_root}", "train.epochs=3", "log.progress=false", "run.name=p"], loss=loss)


def test_preempted_run_requeues_its_slurm_job_last_of_all(tmp_path, data_root, monkeypatch, capfd):
    """SIGUSR1 (what `#SBATCH --signal=USR1@T` sends): rank 0 runs `scontrol requeue` after the checkpoint,
    the summary and the result line, since SLURM ends the job's steps as soon as the job is requeued (a rank 0
    that requeued first was killed printing its summary; a "requeued" line printed after scontrol returned was
    lost the same way). In this process: a loss that raises the signal."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    summary = tmp_path / "runs" / "p" / "summary.json"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$* summary=$(test -f {summary} && echo yes)" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the batch script's own process: one rank
    monkeypatch.chdir(tmp_path)
    said_before, run = [], subprocess.run

    def run_noting_stderr(cmd, **kwargs):  # what this process had said when it ran scontrol
        if cmd[0] == "scontrol":
            said_before.append(capfd.readouterr().err)
        return run(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "run", run_noting_stderr)

    result = preempted_at_step_5(data_root)
    assert result.stop_reason == "signal:SIGUSR1" and result.exit_code == 75 and result.step < result.total_steps
    assert calls.read_text() == "requeue 4242 summary=yes\n"
    assert len(said_before) == 1 and "slurm: requeueing job 4242" in said_before[0], said_before  # said first


def test_preempted_run_without_scontrol_says_so_in_one_line(tmp_path, data_root, monkeypatch, capfd):
    """SLURM_JOB_ID set but no scontrol to run (a container without SLURM's tools): the run still ends as a
    preempted one, exit 75 and its checkpoint, with one line saying to resubmit, not a traceback."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.chdir(tmp_path)
    result = preempted_at_step_5(data_root)
    assert result.exit_code == 75 and result.latest_checkpoint is not None
    err = capfd.readouterr().err
    assert "slurm: `scontrol requeue 4242` failed" in err and "resubmit by hand" in err, err


@pytest.mark.multiproc
def test_preempted_rank_0_requeues_while_its_peers_wait(tmp_path, data_root):
    """Under srun --kill-on-bad-exit, a rank that left first (exit 75) gets srun to end every other task: rank 0
    must run `scontrol requeue` while its peers still wait in the session's closing barrier, not after they
    left. Two ranks with srun's variables; a fake scontrol takes 2 s and notes whether rank 1 had left."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\ncase "$1" in\n  show) echo "$3" ;;\n'  # `show hostnames 127.0.0.1`, for dtrain.dist
        f"  requeue) sleep 2; test -e {tmp_path}/rank1.left && echo left >> {calls} || echo waiting >> {calls} ;;\n"
        "esac\n"
    )
    (bin_dir / "scontrol").chmod(0o755)
    script = tmp_path / "preempted.py"
    script.write_text(
        "import atexit, os, signal, pathlib, torch, dtrain\n"
        "calls = []\n"
        "def loss(output, batch):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 6:  # both ranks: SIGUSR1 is sent to every task\n"
        "        signal.raise_signal(signal.SIGUSR1)\n"
        "    return torch.nn.functional.cross_entropy(output, batch[1])\n"
        "if os.environ['SLURM_PROCID'] == '1':\n"
        "    atexit.register(pathlib.Path('rank1.left').touch)\n"
        "dtrain.main(loss=loss)\n"
    )
    # long enough that the ranks' agreement on the signal (compared every ~CHECK_EVERY_S of training, up to
    # MAX_STEPS_BETWEEN_CHECKS steps apart) lands before the plan's end: in 27 steps of ~6 ms a loaded CI machine
    # once finished the run first (a signal the run outlives is a completed run, exit 0)
    proc = run_ranks(
        2,
        [f"data.root={data_root}", "train.epochs=30", "log.progress=false", "run.name=p"],
        tmp_path,
        script=script,
        launcher="srun",
        check=False,
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 75 and result_of(proc)["stop_reason"] == "signal:SIGUSR1", proc.stderr[-3000:]
    assert (tmp_path / "rank1.left").exists() and calls.read_text() == "waiting\n", proc.stderr[-3000:]


# ---- a stalled rank --------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_stalled_rank_ends_the_job_within_the_timeout(tmp_path, data_root):
    """Rank 1 is frozen with SIGSTOP (a real stall: it can run no code at all). Rank 0, waiting for it in
    a collective, must give up after dist.timeout_s with one line naming the operation and, after a roll call
    on the store (ROLL_CALL_S), the rank that did not answer. torchrun then
    ends the job; for a worker that cannot honour SIGTERM (a stopped process) torch 2.13's agent waits a
    fixed 30 s before SIGKILL, whatever --shutdown-timeout says (that flag applies to signals sent to
    torchrun itself). That wait is torch's, and the same agent's under `dtrain launch`, whose stall test
    (tests/test_launcher.py) sits through it: here the stopped rank is killed once rank 0 has reported, and
    the job must then end at once."""
    timeout_s = 5
    tag = uuid.uuid4().hex
    run = tmp_path / "runs" / "s"
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=100",
        "log.progress=false",
        "train.log_every=1",
        f"dist.timeout_s={timeout_s}",
        "run.name=s",
    ]
    proc = start(torchrun_cmd(2, args), tmp_path, tag)
    wait_for(lambda: latest_logged_step(run) >= 5, what="step 5")
    stalled = workers(tag)[1]
    os.kill(stalled, signal.SIGSTOP)
    t0 = time.monotonic()
    reported = None
    try:
        for line in proc.stderr:  # read as it comes, to time rank 0's report
            if line.startswith("dtrain: error: dist:") and reported is None:
                reported = (time.monotonic() - t0, line)
                os.kill(stalled, signal.SIGKILL)  # spare the agent's fixed 30 s grace (see above)
        proc.wait(timeout=timeout_s + 60)
    finally:  # only if it is still this test's worker: a pid reused since may be another test's process
        with contextlib.suppress(ProcessLookupError):
            if stalled in workers(tag).values():
                os.kill(stalled, signal.SIGKILL)
    ended = time.monotonic() - t0
    assert proc.returncode != 0 and reported is not None
    elapsed, line = reported
    # the operation rank 0 was waiting in when rank 1 froze: a gradient, loss or stop-flag all-reduce in
    # most steps, but the stall can land just before an end-of-epoch evaluation or best-checkpoint save
    ops = ("gradient all-reduce", "stop-flag all-reduce", "loss all-reduce", "metrics all-reduce", "checkpoint save")
    assert any(f"dist: {op}" in line for op in ops) and "failed on rank 0: rank 1 is gone or stuck" in line, line
    assert "Timed out" in line, line
    # after the timeout, the roll call: rank 0 waits ROLL_CALL_S for rank 1's answer, which never comes
    assert timeout_s - 1 < elapsed < timeout_s + ROLL_CALL_S + 5, f"rank 0 reported the stall after {elapsed:.1f} s"
    assert ended < elapsed + 15, f"the job took {ended - elapsed:.1f} s to end after the report"


@pytest.mark.multiproc
def test_rank_sleeping_in_a_step_ends_the_job_within_the_timeout(tmp_path, data_root):
    """Rank 1 sleeps inside step 4 (alive, but never reaching the all-reduce). Rank 0 gives up after
    dist.timeout_s naming the operation; torchrun then sends SIGTERM to rank 1, which has been inside one
    step for longer than the timeout, so it exits at once instead of finishing the step: the job ends
    a few seconds after rank 0's report. (dist.timeout_s 5, as the stalled-rank tests': 10 waited 5 s more for
    nothing.)"""
    timeout_s = 5
    args = ["train", f"data.root={data_root}", "train.epochs=100", "log.progress=false", f"dist.timeout_s={timeout_s}"]
    cmd = torchrun_cmd(2, args)
    cmd[cmd.index("-m", 2) : cmd.index("dtrain") + 1] = [str(REPO / "tests" / "sleepy_rank.py")]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env({"SLEEPY_RANK": "1", "SLEEPY_STEP": "4"}),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    reported, lines = None, []
    try:
        for line in proc.stderr:  # timed from rank 0's report, so that start-up under load does not count
            lines.append(line)
            if line.startswith("dtrain: error: dist:") and reported is None:
                reported = time.monotonic()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    ended, stderr = time.monotonic() - (reported or 0), "".join(lines)
    assert proc.returncode != 0
    assert (
        "dtrain: error: dist: gradient all-reduce (train step) failed on rank 0: rank 1 is gone or stuck" in stderr
    ), stderr[-3000:]
    assert "this rank is stuck; exiting now" in stderr, stderr[-3000:]
    assert ended < 10, f"the job took {ended:.1f} s to end after rank 0 reported the timeout"


# ---- non-finite losses ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """Digits with one training shard poisoned by a NaN image: only the rank reading it sees a NaN."""
    import numpy as np
    from dtrain.data.datasets import digits
    from dtrain.data.shards import write_shards

    splits, meta = digits()
    x, y = splits["train"]
    x = x.astype(np.float32)
    x[5] = np.nan
    root = tmp_path_factory.mktemp("nan") / "d"
    write_shards(root, {"train": (x, y), "val": splits["val"], "test": splits["test"]}, meta, shard_size=250)
    return root


@pytest.mark.multiproc
def test_nan_on_one_rank_is_skipped_on_all(tmp_path, nan_data):
    args = ["train", f"data.dataset=folder:{nan_data}", "train.epochs=3", "log.progress=false", "log.all_ranks=true"]
    proc = run_ranks(2, args, tmp_path)
    skips = [l for l in proc.stderr.splitlines() if "non-finite gradient norm" in l]
    assert any(l.startswith("[rank 0]") for l in skips) and any(l.startswith("[rank 1]") for l in skips)
    params = final_params(tmp_path / "runs" / "digits")
    assert all(torch.isfinite(v).all() for v in params.values())
    assert result_of(proc)["test/acc"] > 0.5  # it learned (27 steps; chance is 0.1) and nothing blew up


@pytest.mark.parametrize("fused", [True, False])
def test_nan_skip_on_the_device_with_fused_adamw(tmp_path, nan_data, fused):
    """optim.fused=true: the fused AdamW kernel skips the update on the device (no host sync per step)
    and the skip is counted at the next log line; the host-checked path skips the same steps."""
    args = [
        "train",
        f"data.dataset=folder:{nan_data}",
        "train.epochs=2",
        "log.progress=false",
        f"optim.fused={str(fused).lower()}",
        "train.log_every=5",
        "checkpoint.every=0",
    ]
    proc = run_dtrain(args, tmp_path)
    skips = [l for l in proc.stderr.splitlines() if "non-finite gradient norm" in l]
    assert len(skips) == 2, proc.stderr  # the poisoned sample is in one batch per epoch
    assert all(torch.isfinite(v).all() for v in final_params(tmp_path / "runs" / "digits").values())
    assert ("steps " in skips[0]) == fused and "1 update skipped (1 so far" in skips[0], skips
    assert "1 update skipped (2 so far" in skips[1], skips
    assert result_of(proc)["test/acc"] > 0.5


def test_nan_stop_policy_keeps_the_last_good_checkpoint(tmp_path, nan_data):
    args = [
        "train",
        f"data.dataset=folder:{nan_data}",
        "train.epochs=2",
        "log.progress=false",
        "train.nonfinite=stop",
        "checkpoint.every=2",
    ]
    proc = run_dtrain(args, tmp_path, check=False)
    result = result_of(proc)
    assert result["stop_reason"] == "nonfinite" and proc.returncode == 2  # not done: the same run diverges again
    latest = tmp_path / "runs" / "digits" / "checkpoints" / "latest"
    assert verify(latest)["step"] < result["step"]
    assert all(torch.isfinite(v).all() for v in final_params(tmp_path / "runs" / "digits").values())


# ---- full disk, unwritable directory ---------------------------------------------------------------
def test_full_disk_is_a_clear_error_and_keeps_previous_checkpoints(tmp_path, data_root):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = [
            "train",
            f"data.root={data_root}",
            "train.epochs=3",
            "run.dir=" + str(mnt),
            "run.name=f",
            "checkpoint.every=5",
            "checkpoint.keep_last=20",
            "checkpoint.save_best=false",
            "log.progress=false",
        ]
        run_dtrain(args + ["run.stop_at_step=5"], tmp_path)
        ckpts = mnt / "f" / "checkpoints"
        assert verify(ckpts / "step-00000005")
        proc = run_dtrain(args, tmp_path, check=False)  # each checkpoint is ~0.2 MB: the disk fills up
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "No space left on device" in last and "previous checkpoints are intact" in last
        assert not list(ckpts.glob(".tmp-*"))
        for path in ckpts.glob("step-*"):
            verify(path)  # every published checkpoint is still complete
        assert Checkpointer(ckpts, 2, SINGLE, "x").load_latest(print) is not None
    finally:
        subprocess.run(["umount", str(mnt)])


def test_unwritable_checkpoint_dir(tmp_path, data_root):
    (tmp_path / "runs" / "u").mkdir(parents=True)
    (tmp_path / "runs" / "u" / "checkpoints").write_text("not a directory")
    proc = run_dtrain(["train", f"data.root={data_root}", "train.epochs=1", "run.name=u"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("dtrain: error: checkpoint:")


# ---- async save -------------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_two_rank_resume_after_stop_at_step_with_async_saves_is_bit_identical(tmp_path, straight_run):
    """A planned stop (run.stop_at_step, mid-epoch) saves on every rank and the same command goes on, with
    the periodic checkpoints written in the background. (The synchronous save on a stop: the SIGTERM case of
    test_two_rank_resume_after_kill_is_bit_identical, the same stop path.)"""
    args = RESUME_ARGS + ["run.name=r", "checkpoint.async_save=true"]
    run_ranks(2, args + ["run.stop_at_step=25"], tmp_path)
    proc = run_ranks(2, args, tmp_path)
    assert "at step 25" in proc.stderr
    assert_same_as_straight(tmp_path / "runs" / "r", straight_run)
    for path in (tmp_path / "runs" / "r" / "checkpoints").glob("step-*"):
        verify(path)


def test_async_snapshot_is_a_frozen_copy_in_reused_buffers(tmp_path):
    model = torch.nn.Linear(4, 4)
    tied = {"a": model.weight, "b": model.weight, "opt": {0: {"step": torch.tensor(3.0)}}, "rng": (3, (1, 2), None)}
    snap = Snapshot()
    first = snap(tied)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the copy is written
    assert not torch.equal(first["a"], model.weight) and first["a"] is first["b"]  # tied: one copy, still shared
    assert first["rng"] == (3, (1, 2), None) and first["opt"][0]["step"].item() == 3.0
    second = snap(tied)  # the next save refills the same buffers (the last save has finished by then)
    assert second["a"].data_ptr() == first["a"].data_ptr() and torch.equal(second["a"], model.weight)
    ckpt = Checkpointer(tmp_path, 2, SINGLE, "test", async_save=True)
    ckpt.save(1, {"w": model.weight}, {"rng": torch.zeros(2)})
    with torch.no_grad():
        model.weight.zero_()
    ckpt.wait()
    assert torch.equal(safe_load(tmp_path / "step-00000001" / "state.pt")["w"], second["a"])


def test_keep_last_and_best(tmp_path, data_root):
    run_dtrain(
        [
            "train",
            f"data.root={data_root}",
            "train.epochs=6",
            "checkpoint.every=3",
            "checkpoint.keep_last=2",
            "checkpoint.keep_best=2",
            "train.val_every=3",
        ],
        tmp_path,
    )
    ckpts = tmp_path / "runs" / "digits" / "checkpoints"
    kept = {int(p.name[5:]) for p in ckpts.glob("step-*")}
    best = [
        r["step"]
        for r in metrics_of(tmp_path / "runs" / "digits")
        if "val/loss" in r and r["val/loss"] == r["val/best_loss"]
    ]  # steps where validation improved (each saved)
    total = 6 * (1257 // 64)
    saved = set(range(3, total + 1, 3)) | set(best) | {total}
    assert kept == set(sorted(saved)[-2:]) | set(best[-2:])
    assert os.readlink(ckpts / "best") == f"step-{best[-1]:08d}"


# ---- secrets ----------------------------------------------------------------------------------------
def test_no_secret_is_written_anywhere(tmp_path, data_root):
    secret = "sk-test-" + uuid.uuid4().hex
    run_ranks(
        1,
        ["train", f"data.root={data_root}", "train.epochs=1"],
        tmp_path,
        launcher="single",
        env={"WANDB_API_KEY": secret, "HF_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret},
    )
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
