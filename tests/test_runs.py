"""Runs that survive their users (issue 15): torn lines in the files a run appends to, resuming with a
changed config, two jobs on one run directory, and paths in the way. The rules are tested in-process;
each case also once with real `dtrain train` processes."""

import errno
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import latest_logged_step, result_of, run_dtrain, start, torchrun_cmd, wait_for, workers
from dtrain.config import Config, load_config
from dtrain.logging import key_log_step, metrics_record
from dtrain.optim import build_optimizer, build_schedule, build_scheduler, config_hyperparameters, set_schedule_length
from dtrain.records import keep_records, read_records
from dtrain.resume import config_changes, fixed_reason
from dtrain.runlock import LOCK, RunDirError, RunLock, check_layout, make_run_dir

FOREIGN = {
    "host": "node-b",
    "pid": 4242,
    "slurm_job": "99",
    "torchelastic_run": None,
    "machine": "another-machine",
    "process_start": "1",
    "started": 0.0,
    "token": "t",
}


def tree(path: Path) -> dict:
    """{relative path: sha256 (or '->target' for a link)} of everything under `path`: byte-identical or not."""
    out = {}
    for p in sorted(path.rglob("*")):
        key = p.relative_to(path).as_posix()
        if p.is_symlink():
            out[key] = "->" + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- 1. torn and malformed lines ----------------------------------------------------------------------
def test_torn_last_line_is_dropped_and_a_malformed_one_reported_with_its_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    data = (
        good[0]
        + "\n"
        + good[1]
        + "\n"
        + '{"step": 2, "lo\n'
        + "\n"
        + "\xff oops\n"
        + good[2]
        + "\n"
        + good[3]
        + "\n"
        + good[3][:-7]
    )
    path.write_bytes(data.encode("latin-1"))
    said = []
    records = read_records(path, metrics_record, said.append)
    assert [r["step"] for _, r in records] == [1, 2, 3, 4]
    assert said == [
        f"{path}: dropped an incomplete last line ({len(good[3]) - 7} bytes, cut off while being written)",
        f"{path}:3: malformed record skipped (Unterminated string starting at: line 1 column 13 (char 12))",
        f"{path}:5: malformed record skipped ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)",
    ]
    assert path.read_bytes() == data.encode("latin-1")  # reading changes nothing

    said.clear()
    keep_records(path, lambda r: r["step"] <= 3, metrics_record, said.append)
    assert path.read_text() == "".join(line + "\n" for line in good[:3]) and len(said) == 3
    assert "malformed record removed" in said[1]
    before = path.stat().st_mtime_ns
    keep_records(path, lambda r: r["step"] <= 3, metrics_record, said.append)
    assert path.stat().st_mtime_ns == before and len(said) == 3  # clean and complete: not rewritten

    keys = tmp_path / "rank-00000.txt"
    keys.write_text("1 a b\n2 c d\nx e f\n3 g h")  # a key log cut inside its last line still "parses": dropped
    keep_records(keys, lambda step: True, key_log_step, said.append)
    assert keys.read_text() == "1 a b\n2 c d\n" and f"{keys}:3: malformed record removed" in said[-1]

    from dtrain.plot import read_metrics

    (tmp_path / "metrics.jsonl").write_text(good[0] + "\n[1, 2]\n" + good[1][:5])
    said.clear()
    assert [r["step"] for r in read_metrics(tmp_path, said.append)] == [1]
    assert said[1].endswith(":2: malformed record skipped (not a JSON object with an integer step)")


@pytest.mark.multiproc
def test_sigkilled_run_with_cut_files_resumes_and_completes(tmp_path, data_root):
    """A run SIGKILLed mid-training leaves its lock; its metrics and key log are then cut at a random byte
    inside their last line and get a malformed line in the middle. The next start takes the lock over,
    drops and reports those lines, resumes and completes: every line parses, no step is logged twice, in
    metrics.csv and TensorBoard either."""
    for attempt in range(5):  # a kill that lands right after a save, before the next step is logged, is no test
        args = [
            "train",
            f"data.root={data_root}",
            "train.epochs=2",
            "log.progress=false",
            "train.log_every=1",
            "checkpoint.every=10",
            "log.sample_keys=true",
            f"run.name=k{attempt}",
            "log.loggers=[csv,tensorboard]",
        ]
        run = tmp_path / "runs" / f"k{attempt}"
        proc = start([sys.executable, "-m", "dtrain", *args], tmp_path, uuid.uuid4().hex)
        wait_for(lambda: latest_logged_step(run) >= 12, what="step 12")
        pid = proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert json.loads((run / LOCK).read_text())["pid"] == pid  # the killed holder's lock is still there
        saved = json.loads((run / "checkpoints" / "latest" / "manifest.json").read_text())["step"]
        if saved < latest_logged_step(run):  # steps logged past the checkpoint: cutting the last line loses none
            break
    else:
        pytest.fail("every kill landed between a save and the next step's log line")

    rng = random.Random(15)
    for path in (run / "metrics.jsonl", run / "sample_keys" / "rank-00000.txt"):
        data = path.read_bytes()
        last = data.rstrip(b"\n").rfind(b"\n") + 1  # where the last line starts
        cut = rng.randrange(last + 1, len(data) - 1)  # inside it: at least a byte kept, its newline gone
        lines = data[:cut].split(b"\n")
        lines.insert(3, b"not a record")  # line 4: before the checkpoint the run resumes from
        path.write_bytes(b"\n".join(lines))
    resumed = run_dtrain(args, tmp_path)
    err, rel = resumed.stderr, Path("runs") / run.name  # paths as the run names them: relative to its directory
    assert (
        f"run: took over {rel / LOCK} from host {socket.gethostname()}, pid {pid}: its process {pid} is no "
        "longer running" in err
    ), err
    for name in ("metrics.jsonl", "sample_keys/rank-00000.txt"):
        assert (
            f"{rel / name}: dropped an incomplete last line" in err
            and f"{rel / name}:4: malformed record removed" in err
        ), err
    assert result_of(resumed)["stop_reason"] == "completed" and not (run / LOCK).exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # each line parses
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 39)), train_steps  # logged once each, none lost after the resume point
    logged = [int(line.split()[0]) for line in (run / "sample_keys" / "rank-00000.txt").read_text().splitlines()]
    assert logged == list(range(1, 39))
    from test_loggers import read_csv, scalars

    assert [int(r["step"]) for r in read_csv(run / "metrics.csv") if r["loss"]] == list(range(1, 39))
    assert [step for step, _ in scalars(run)["loss"]] == list(range(1, 39))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2


# ---- 2. resuming with a changed config --------------------------------------------------------------------
def test_changed_keys_are_classified_fixed_or_applied():
    saved = load_config(None, ["loss.terms={mse: 1.0}"]).to_dict()
    cfg = load_config(
        None,
        [
            "optim.lr=0.01",
            "train.epochs=30",
            "model.kwargs.hidden=[32]",
            "data.batch_size=32",
            "loss.terms={mse: 1.0, mae: 0.5}",
            "wandb.tags=[a]",
            "run.seed=1",
        ],
    )
    changes = {c.key: c for c in config_changes(saved, cfg)}
    assert set(changes) == {
        "optim.lr",
        "train.epochs",
        "model.kwargs.hidden",
        "data.batch_size",
        "loss.terms.mae",
        "wandb.tags",
        "run.seed",
    }
    assert (changes["optim.lr"].old, changes["optim.lr"].new) == (0.003, 0.01)
    fixed = {k for k, c in changes.items() if c.fixed}
    assert fixed == {"model.kwargs.hidden", "data.batch_size", "loss.terms.mae", "run.seed"}
    assert changes["loss.terms.mae"].old == "(unset)"

    del saved["schedule"]["warmup_steps"]  # a checkpoint older than a setting: it had the default
    assert "schedule.warmup_steps" not in {c.key for c in config_changes(saved, Config())}
    saved["schedule"]["warmup_steps"] = 0
    saved["model"]["retired_setting"] = 1  # a setting the schema dropped is not compared
    assert {c.key for c in config_changes(saved, load_config(None, ["loss.terms={mse: 1.0}"]))} == set()

    assert fixed_reason("model.kwargs.width", 1, 2) and fixed_reason("data.transform", "a", "b")  # sections that grow
    assert fixed_reason("fsdp.reshard_after_forward", True, False)  # unknown: fixed until listed
    assert fixed_reason("model.init_from", None, "runs/x") and fixed_reason("optim.name", "sgd", "adamw")
    assert fixed_reason("optim.backbone_lr_ratio", 1.0, 0.1) and not fixed_reason("optim.backbone_lr_ratio", 0.2, 0.1)
    for key in (
        "schedule.name",
        "train.max_steps",
        "early_stop.patience",
        "checkpoint.keep_last",
        "dist.timeout_s",
        "log.progress",
        "wandb.project",
        "run.stop_at_step",
        "data.num_workers",
        "model.unfreeze_at_step",
    ):
        assert fixed_reason(key, 1, 2) is None, key


def _optimizer(lr: float, total: int, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    cfg = load_config(None, [f"optim.lr={lr}", "schedule.warmup_steps=3", "optim.weight_decay=0.1"])
    opt = build_optimizer(cfg.optim, model)
    sched = build_scheduler(cfg.schedule, opt, total)
    for _ in range(steps):
        model(torch.ones(2, 4)).sum().backward()
        opt.step(), opt.zero_grad(), sched.step()
    return model, opt, sched


def test_changed_lr_and_schedule_are_applied_after_loading_the_checkpoint():
    _, opt, sched = _optimizer(0.003, 20, 7)
    saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    _, fresh_opt, fresh_sched = _optimizer(0.01, 50, 0)  # resumed with optim.lr=0.01 and a longer run
    with config_hyperparameters(fresh_opt, fresh_sched):
        fresh_opt.load_state_dict(saved["optimizer"]), fresh_sched.load_state_dict(saved["scheduler"])
    want = 0.01 * build_schedule(load_config(None, ["schedule.warmup_steps=3"]).schedule, 50)(7)
    assert fresh_sched.last_epoch == 7 and fresh_sched.lr_lambdas[0].total_steps == 50
    assert all(g["lr"] == want and g["initial_lr"] == 0.01 for g in fresh_opt.param_groups)
    assert fresh_sched.get_last_lr() == [want] * len(fresh_opt.param_groups)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"])
    set_schedule_length(fresh_opt, fresh_sched, 30)  # an elastic resume keeps the checkpoint's epoch length
    want = 0.01 * build_schedule(load_config(None, ["schedule.warmup_steps=3"]).schedule, 30)(7)
    lrs = [g["lr"] for g in fresh_opt.param_groups]
    assert fresh_sched.get_last_lr() == [want] * len(lrs) == lrs

    # unchanged config: the same LR, bit for bit, now and at the next step, as without the block
    model, same_opt, same_sched = _optimizer(0.003, 20, 0)
    with config_hyperparameters(same_opt, same_sched):
        same_opt.load_state_dict(saved["optimizer"]), same_sched.load_state_dict(saved["scheduler"])
    assert same_opt.state_dict()["param_groups"] == saved["optimizer"]["param_groups"]
    same_sched.step(), sched.step()
    assert same_sched.get_last_lr() == sched.get_last_lr()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    """A completed one-epoch run (19 steps), copied by each test that changes it."""
    cwd = tmp_path_factory.mktemp("finished")
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=1",
        "log.progress=false",
        "train.log_every=1",
        "run.name=c",
    ]
    run_dtrain(args, cwd)
    return cwd, args


def test_resume_with_changed_config_refuses_fixed_keys_skips_a_finished_run_and_applies_the_rest(
    tmp_path, finished_run
):
    import shutil

    cwd, args = finished_run
    shutil.copytree(cwd / "runs", tmp_path / "runs", symlinks=True)
    run = tmp_path / "runs" / "c"
    before = tree(run)

    refused = run_dtrain(
        args + ["model.kwargs.hidden=[32]", "data.batch_size=32", "optim.lr=0.01"], tmp_path, check=False
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and [l for l in lines if "changed since the checkpoint" in l] == [
        "resume: data.batch_size changed since the checkpoint: 64 -> 32",
        "resume: model.kwargs.hidden changed since the checkpoint: (unset) -> [32]",
        "resume: optim.lr changed since the checkpoint: 0.003 -> 0.01",
    ], refused.stderr
    assert lines[-1] == (
        "dtrain: error: config: data.batch_size cannot change when a run resumes: it decides the "
        "training samples, their order and the steps per epoch (so did model.kwargs.hidden); to start "
        f"afresh use another run.name (with model.init_from={Path('runs') / 'c'} to start from "
        "this run's weights)"
    )
    assert tree(run) == before  # nothing written: checkpoints, metrics, config.yaml byte-identical, no lock left

    again = run_dtrain(args + ["optim.lr=0.01"], tmp_path)  # finished and tested: said, not trained or tested again
    assert "resume: optim.lr changed since the checkpoint: 0.003 -> 0.01" in again.stderr
    assert "this run already finished at step 19 (completed) and was tested; nothing to do" in again.stderr
    assert result_of(again)["stop_reason"] == "already_completed" and "test/acc" in result_of(again)
    assert tree(run) == before

    longer = run_dtrain(args + ["optim.lr=0.01", "train.epochs=2"], tmp_path)  # extended: trains on, new LR
    assert [l for l in longer.stderr.splitlines() if "changed since the checkpoint" in l] == [
        "resume: optim.lr changed since the checkpoint: 0.003 -> 0.01",
        "resume: train.epochs changed since the checkpoint: 1 -> 2",
    ]
    assert result_of(longer)["stop_reason"] == "completed" and result_of(longer)["step"] == 38
    schedule = build_schedule(load_config(None).schedule, 38)
    before_schedule = build_schedule(load_config(None).schedule, 19)
    logged = {
        r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r
    }
    assert all(logged[s] == pytest.approx(0.003 * before_schedule(s)) for s in range(1, 20))
    assert all(logged[s] == pytest.approx(0.01 * schedule(s), rel=1e-12) for s in range(20, 39))
    assert "optim:\n  name: adamw\n  lr: 0.01" in (run / "config.yaml").read_text()


# ---- 3. one job per run directory -------------------------------------------------------------------------
def _foreign_lock(run: Path, age_s: float, **fields) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK
    lock.write_text(json.dumps({**FOREIGN, **fields}))
    os.utime(lock, (time.time() - age_s,) * 2)
    return lock


def test_lock_from_another_host_blocks_while_its_heartbeat_is_fresh(tmp_path):
    lock = _foreign_lock(tmp_path, age_s=5)
    content = lock.read_bytes()
    with pytest.raises(RunDirError) as e:
        RunLock(tmp_path, stale_after_s=60).acquire(print)
    assert str(e.value) == (
        f"run: {tmp_path} is in use by host node-b, pid 4242, SLURM job 99 (heartbeat 5 s ago); "
        "wait for it to end or use another run.name (a lock from another host is taken over once "
        "its heartbeat is 60 s old)"
    )
    assert lock.read_bytes() == content and sorted(os.listdir(tmp_path)) == [LOCK]

    os.utime(lock, (time.time() - 61,) * 2)
    said = []
    mine = RunLock(tmp_path, stale_after_s=60)
    mine.acquire(said.append)
    try:
        assert said == [
            f"run: took over {lock} from host node-b, pid 4242, SLURM job 99: its heartbeat is 61 s old "
            "(a lock is stale after 60 s)"
        ]
        assert json.loads(lock.read_text())["token"] == mine.me["token"] and sorted(os.listdir(tmp_path)) == [LOCK]
    finally:
        mine.release()
    assert not lock.exists()


def test_lock_of_a_dead_process_on_this_machine_is_taken_over_at_once_a_live_one_never(tmp_path):
    here = RunLock(tmp_path).me
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        from dtrain.runlock import _process_start

        live = {"machine": here["machine"], "pid": sleeper.pid, "process_start": _process_start(sleeper.pid)}
        _foreign_lock(tmp_path, age_s=3600, **live)  # alive here: however old its heartbeat (it may be stopped)
        with pytest.raises(RunDirError, match=f"in use by host node-b, pid {sleeper.pid}, SLURM job 99"):
            RunLock(tmp_path, stale_after_s=1).acquire(print)
        sleeper.kill()
        sleeper.wait()
        said = []
        lock = RunLock(tmp_path)
        lock.acquire(said.append)
        lock.release()
        assert said == [
            f"run: took over {tmp_path / LOCK} from host node-b, pid {sleeper.pid}, SLURM job 99: its "
            f"process {sleeper.pid} is no longer running"
        ]
        _foreign_lock(tmp_path, age_s=0, **{**live, "process_start": "1"})  # its pid, now another process's
        lock = RunLock(tmp_path)
        lock.acquire(said.append)
        lock.release()
        assert "is no longer running" in said[-1]
    finally:
        sleeper.kill()


def test_of_several_takeovers_at_once_exactly_one_wins(tmp_path, monkeypatch):
    judge = RunLock._gone
    monkeypatch.setattr(RunLock, "_gone", lambda self, seen: time.sleep(0.02) or judge(self, seen))  # all judge first
    for trial in range(5):
        run = tmp_path / str(trial)
        _foreign_lock(run, age_s=3600)
        locks = [RunLock(run, heartbeat_s=3600, stale_after_s=60) for _ in range(6)]
        outcome = {}
        barrier = threading.Barrier(len(locks))

        def take(lock):
            barrier.wait()
            try:
                lock.acquire(lambda line: None)
                outcome[lock.me["token"]] = "held"
            except RunDirError as e:
                outcome[lock.me["token"]] = str(e)

        threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
        [t.start() for t in threads]
        [t.join() for t in threads]
        winners = [token for token, result in outcome.items() if result == "held"]
        assert len(winners) == 1, outcome
        assert json.loads((run / LOCK).read_text())["token"] == winners[0]
        refused = [r for r in outcome.values() if r != "held"]
        assert all(f"in use by host {socket.gethostname()}, pid {os.getpid()}" in r for r in refused)
        assert sorted(os.listdir(run)) == [LOCK]  # no claim or temporary file left behind
        next(lock for lock in locks if lock.me["token"] == winners[0]).release()


def test_heartbeat_and_an_earlier_attempt_of_the_same_job(tmp_path, monkeypatch):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire(print)
    os.utime(tmp_path / LOCK, (0, 0))
    wait_for(lambda: (tmp_path / LOCK).stat().st_mtime > time.time() - 5, timeout=5, what="a heartbeat")
    lock.release()
    assert not (tmp_path / LOCK).exists()

    # rank 0 of the restarted job on another node: its previous attempt's lock is waited for, not refused
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    _foreign_lock(tmp_path, age_s=0)
    t0 = time.monotonic()
    said = []
    RunLock(tmp_path, heartbeat_s=0.05, stale_after_s=1.0).acquire(said.append)
    assert 0.9 < time.monotonic() - t0 < 5 and "its heartbeat is 1 s old" in said[0]


def test_lock_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # some FUSE mounts
    lock = RunLock(tmp_path)
    lock.acquire(print)
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.me["token"]
    with pytest.raises(RunDirError, match="is in use by"):
        RunLock(tmp_path).acquire(print)
    lock.release()
    assert os.listdir(tmp_path) == []


def test_a_holder_whose_lock_was_taken_over_stops_without_writing_more(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from dtrain.runlock import RunLock; "
        "RunLock(Path(sys.argv[1]), heartbeat_s=0.05).acquire(print); print('held', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    _foreign_lock(tmp_path, age_s=0)  # what a taker's os.replace leaves
    assert proc.wait(timeout=20) == 2
    assert proc.stderr.read() == (
        f"dtrain: error: run: {tmp_path / LOCK} was taken over by host node-b, pid 4242, "
        "SLURM job 99 (this job's heartbeat stopped for over 120 s); stopping without "
        "writing more\n"
    )


def _two_starts(cmds: list[list[str]], cwd: Path, run: Path, ranks: int) -> None:
    """Start both commands at once: one refuses, naming the other, which trains on (then is stopped)."""
    tags = [uuid.uuid4().hex for _ in cmds]
    procs = [start(cmd, cwd, tag) for cmd, tag in zip(cmds, tags)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), timeout=180, what="one start to refuse")
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        _, err = procs[loser].communicate()
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == workers(tags[1 - loser])[0] and winner.poll() is None
        refusals = [line for line in err.splitlines() if line.startswith("dtrain: error:")]
        assert len(refusals) == ranks and all(
            line.startswith(  # every rank, with rank 0's verdict
                f"dtrain: error: run: {Path('runs') / run.name} is in use by host {socket.gethostname()}, pid "
                f"{holder['pid']} ("
            )
            for line in refusals
        ), err
        step = latest_logged_step(run)
        wait_for(lambda: latest_logged_step(run) > step + 2, what="the winner to train on")
        winner.send_signal(signal.SIGTERM)  # torchrun passes it on: every rank checkpoints and stops
        out, err = winner.communicate(timeout=120)
        assert json.loads(out.strip().splitlines()[-1])["stop_reason"] == "signal:SIGTERM", err
    finally:
        for p in procs:
            p.kill()
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)), steps  # one writer


def test_two_concurrent_starts_one_trains(tmp_path, data_root):
    args = [
        "-m",
        "dtrain",
        "train",
        f"data.root={data_root}",
        "train.epochs=100",
        "log.progress=false",
        "train.log_every=1",
        "run.name=two",
    ]
    _two_starts([[sys.executable, *args]] * 2, tmp_path, tmp_path / "runs" / "two", ranks=1)


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_concurrent_starts_on_two_ranks_one_trains(tmp_path, data_root):
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=100",
        "log.progress=false",
        "train.log_every=1",
        "run.name=two",
    ]
    _two_starts([torchrun_cmd(2, args), torchrun_cmd(2, args)], tmp_path, tmp_path / "runs" / "two", ranks=2)


def test_lock_from_another_host_real_processes(tmp_path, data_root):
    run = tmp_path / "runs" / "h"
    lock = _foreign_lock(run, age_s=10)
    args = ["train", f"data.root={data_root}", "train.max_steps=2", "log.progress=false", "run.name=h"]
    refused = run_dtrain(args, tmp_path, check=False, process=True)
    assert refused.returncode == 2 and re.fullmatch(
        rf"dtrain: error: run: {Path('runs') / 'h'} is in use by host node-b, pid 4242, SLURM job 99 \(heartbeat "
        r"\d+ s ago\); wait for it to end or use another run.name \(a lock from another host is taken over once its "
        r"heartbeat is 120 s old\)",
        refused.stderr.strip().splitlines()[-1],
    ), refused.stderr
    assert sorted(os.listdir(run)) == [LOCK] and json.loads(lock.read_text()) == FOREIGN
    os.utime(lock, (time.time() - 3600,) * 2)
    taken = run_dtrain(args, tmp_path, process=True)
    assert re.search(
        r"took over \S+ from host node-b, pid 4242, SLURM job 99: its heartbeat is 36\d\d s old", taken.stderr
    ), taken.stderr
    assert result_of(taken)["step"] == 2 and not lock.exists()


# ---- 4. a path in the way ----------------------------------------------------------------------------------
def test_paths_in_the_way(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(RunDirError, match=f"^run: {tmp_path / 'runs'} is a file, not a directory; move it away"):
        make_run_dir(tmp_path / "runs" / "x" / "y")
    cases = [
        ("checkpoints", lambda p: p.write_text(""), "checkpoint: {} is a file where dtrain keeps a directory"),
        ("checkpoints/latest", Path.mkdir, "checkpoint: {} is a directory where dtrain keeps a symbolic link"),
        ("metrics.jsonl", Path.mkdir, "log: {} is a directory where dtrain keeps a file"),
        ("sample_keys", lambda p: p.symlink_to("gone"), "log: {} is a broken symbolic link where dtrain keeps"),
    ]
    for i, (name, make, said) in enumerate(cases):
        run = tmp_path / str(i)
        (run / "checkpoints").mkdir(parents=True)
        check_layout(run)
        if name == "checkpoints":
            (run / name).rmdir()
        make(run / name)
        with pytest.raises(RunDirError, match="^" + said.format(run / name)):
            check_layout(run)


@pytest.mark.parametrize("in_the_way", ["runs/w", "runs/w/metrics.jsonl"])  # checkpoints/: test_faults.py
def test_path_in_the_way_ends_a_run_in_one_line(tmp_path, in_the_way):
    path = tmp_path / in_the_way
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if in_the_way.endswith(".jsonl") else path.write_text("mine")
    proc = run_dtrain(["train", "train.max_steps=1", "run.name=w"], tmp_path, check=False)
    kind = "a directory where dtrain keeps a file" if path.is_dir() else "a file"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("dtrain: error: ")
        and f"{Path(in_the_way)} is {kind}" in proc.stderr.strip().splitlines()[-1]
    ), proc.stderr
    assert (path.read_text() == "mine") if path.is_file() else not any(path.iterdir())


def test_a_finished_run_without_a_test_split_is_not_trained_or_summarised_again(tmp_path, data_root):
    """Found walking the docs: run again, a finished run on shards with train and val only said 'resumed ...
    training 108 steps' and rewrote summary.json with this start's 0.1 s: 'nothing to do' needed test metrics."""
    from dtrain.data import make_builtin

    make_builtin("digits", tmp_path / "d", 250)
    args = [
        "train",
        f"data.train={tmp_path / 'd' / 'train.json'}",
        f"data.val={tmp_path / 'd' / 'val.json'}",
        "train.max_steps=4",
        "log.progress=false",
        "run.doctor=false",
        "run.name=notest",
    ]
    first = run_dtrain(args, tmp_path)
    assert result_of(first)["stop_reason"] == "completed"
    run = tmp_path / "runs" / "notest"
    before = tree(run)
    again = run_dtrain(args, tmp_path)
    assert (
        "this run already finished at step 4 (completed) and its data has no test split; nothing to do" in again.stderr
    ), again.stderr
    assert result_of(again)["stop_reason"] == "already_completed" and tree(run) == before
