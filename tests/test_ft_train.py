"""`dtrain train` as replica groups (dtrain.ft_train, issue #36): one real `dtrain launch --ft` of 3 groups
(tests/ft_group.py: dtrain.main with a recording callback), gloo on CPU: a group SIGKILLed mid-step restarted
and healed, a SIGTERM of the launcher, the resume (of the launch and of plain `dtrain train`); and in process,
the refusals, the fault lines, and one group under an in-process Lighthouse resuming a plain run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _env, _run_here, free_port, run_dtrain, wait_for

from dtrain.config import ConfigError, load_config

GROUP = Path(__file__).with_name("ft_group.py")
needs_torchft = pytest.mark.skipif(
    shutil.which("torchft_lighthouse") is None, reason="needs torchft (pip install 'dtrain[ft]')"
)
# digits: 1248 training samples, global batch 64: 19 steps an epoch. "best" is the highest validation loss
# (early_stop.mode=max): the first's, which a group that joins later knows only from its peers
ARGS = [
    "run.name=ft",
    "train.epochs=1",
    "data.batch_size=64",
    "train.log_every=1",
    "train.val_every=5",
    "log.progress=false",
    "log.sample_keys=true",
    "run.doctor=false",
    "checkpoint.every=12",
    "checkpoint.save_best=false",
    "data.shuffle_buffer=200",
    "early_stop.patience=50",
    "early_stop.mode=max",
]
STEPS_PER_EPOCH = STEPS = 19


# ---- in process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.engine=fsdp", r"^ft: train.engine=fsdp can't train as replica groups .*; use train.engine=ddp"),
        ("log.loggers=[jsonl,wandb]", r"^ft: log.loggers wandb is not supported with replica groups yet"),
    ],
)
def test_what_a_replica_group_cannot_honour_is_one_line(override, message):
    from dtrain.ft_train import check

    with pytest.raises(ConfigError, match=message):
        check(load_config(None, [override]), debug=False)
    check(load_config(None, []), debug=False)


def test_a_group_without_the_launchers_variables_is_one_line():
    from dtrain.dist import LaunchError
    from dtrain.ft_train import GroupEnv

    with pytest.raises(LaunchError, match=r"^launcher: DTRAIN_FT=1 but TORCHFT_LIGHTHOUSE, MASTER_PORT not set"):
        GroupEnv.read({"DTRAIN_FT": "1", "REPLICA_GROUP_ID": "0", "DTRAIN_FT_GROUPS": "2", "MASTER_ADDR": "x"})
    env = GroupEnv.read(
        {
            "TORCHFT_LIGHTHOUSE": "http://h:1",
            "REPLICA_GROUP_ID": "1",
            "DTRAIN_FT_GROUPS": "3",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "5",
            "DTRAIN_FT_TIMEOUT_S": "4",
        }
    )
    assert (env.slot, env.store, env.timeout_s, env.min_replicas) == (1, ("127.0.0.1", 5), 4.0, 1)


def test_one_line_per_fault():
    from dtrain.ft_train import Faults

    faults = Faults(3)
    for step in range(1, 31):
        present = [1, 1, 0] if 17 <= step < 23 else [1, 1, 2] if step == 23 else [1, 1, 1]
        faults.observe(step, 3 - present.count(0), present)
    faults.observe(31, 2, [0, 1, 1])
    assert faults.lines(40) == [
        "ft: group 0 lost at step 31, not back by the end (step 40); 10 steps at 2 of 3 groups",
        "ft: group 2 lost at step 17, rejoined (healed) at step 23; 6 steps at 2 of 3 groups",
    ]
    assert Faults(3).lines(9) == []


@needs_torchft
def test_one_group_resumes_a_plain_runs_checkpoint_at_an_epochs_end_and_refuses_one_mid_epoch(tmp_path, data_root):
    """In process: `dtrain train` as the one replica group of a Lighthouse of this test's, after plain `dtrain train`
    runs with 2 DataLoader workers, whose order of an epoch's rest replica groups can't deal."""
    from torchft._torchft import LighthouseServer

    args = [
        "train",
        f"data.root={data_root}",
        "data.batch_size=32",
        "train.epochs=2",
        "log.progress=false",
        "run.doctor=false",
        "data.num_workers=2",
        "data.shuffle_buffer=200",
    ]
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=100)
    group = {
        "DTRAIN_FT": "1",
        "TORCHFT_LIGHTHOUSE": lighthouse.address(),
        "REPLICA_GROUP_ID": "0",
        "DTRAIN_FT_GROUPS": "1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    try:
        run_dtrain([*args, "run.stop_at_step=5"], tmp_path)
        refused = run_dtrain(args, tmp_path, env={**group, "MASTER_PORT": str(free_port())}, check=False)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
            "dtrain: error: checkpoint: step 5 is in the middle of an epoch that a run of 1 rank(s) and data workers "
            "read in its own order; finish the epoch with `dtrain train` (run.stop_at_step=39), then resume with "
            "`dtrain launch --ft`"
        ), refused.stderr[-2000:]
        run_dtrain([*args, "run.stop_at_step=39"], tmp_path)
        done = run_dtrain(args, tmp_path, env={**group, "MASTER_PORT": str(free_port())})
    finally:
        lighthouse.shutdown()
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 78
    assert "resumed from runs/digits/checkpoints/step-00000039 at step 39" in done.stderr


# ---- replica groups of `dtrain launch --ft`, as processes --------------------------------------------------
def records(out: Path, g) -> list[dict]:
    path = out / f"g{g}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def key_log(run_dir: Path, g) -> dict[int, list[str]]:
    """{step: keys} of a group's sample-key log (g="plain": rank 0's of a run without replica groups; "1-rank-0":
    rank 0's of group 1, a group of several processes)."""
    name = "rank-00000.txt" if g == "plain" else f"group-{g}.txt"
    lines = (run_dir / "sample_keys" / name).read_text().splitlines()
    return {int(step): keys.split() for step, _, keys in (line.partition(" ") for line in lines)}


def digits_train_keys(data_root: Path) -> set[str]:
    from dtrain.data import ShardStream, read_index

    stream = ShardStream(read_index(data_root / "digits"), "train", batch_size=64, rank=0, world_size=1, train=False)
    return {k for batch in stream.epoch(0) for k in batch[2]}


def launch(cwd: Path, data_root: Path, *options: str, args=ARGS, **env: str) -> subprocess.Popen:
    """`dtrain launch --ft --nproc-per-node 3 OPTIONS tests/ft_group.py ARGS` in `cwd`, its output to files
    (a --nproc-per-node in OPTIONS comes later, and counts)."""
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "launch",
        "--ft",
        "--nproc-per-node",
        "3",
        "--ft-timeout",
        "5",
        *options,
        str(GROUP),
        *args,
        f"data.root={data_root}",
    ]
    path = os.pathsep.join([str(GROUP.parent), str(GROUP.parent.parent)])  # this checkout's dtrain, ft_group
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env({"FT_OUT": str(cwd), "PYTHONPATH": path, **env}),
        stdin=subprocess.DEVNULL,
        stdout=(cwd / "out.txt").open("a"),
        stderr=(cwd / "err.txt").open("a"),
    )


def last_attempt(run_dir: Path, g: int) -> str:
    return (run_dir / "logs" / f"group-{g}.log").read_text().split("---- dtrain launch --ft:")[-1]


# torchft's and torch's lines that dtrain silences (a gloo error: dtrain's own 'not committed' line alone)
NOISE = ("GET /checkpoint", "flight recorder", "buffer is not writable", "got exception")


@pytest.mark.multiproc
@pytest.mark.slow
@needs_torchft
def test_a_killed_group_heals_and_a_sigterm_resumes_exactly(tmp_path, data_root):
    """`dtrain launch --ft --nproc-per-node 3 --ft-min-replicas 2 --max-restarts 1`: group 2 SIGKILLed mid-step
    (its 5th) is restarted alone and heals from a live peer while groups 0 and 1 train on; a SIGTERM of the
    launcher stops every group at one committed step with one checkpoint (exit 75). That checkpoint, resumed by
    the same launch, ends torch.equal to the run resumed from the checkpoint before (the run from there on
    never stopped), and resumes under plain `dtrain train` too. The launch holds the run lock meanwhile."""
    KILL_IN, HEALED_BY, C, SIGTERM_AT = 5, 9, 12, 14
    run_a, run_b, plain_dir = tmp_path / "a", tmp_path / "b", tmp_path / "plain"
    for d in (run_a, plain_dir):
        d.mkdir()
    run_dir = run_a / "runs" / "ft"
    proc = launch(
        run_a,
        data_root,
        "--ft-min-replicas",
        "2",
        "--max-restarts",
        "1",
        FT_WAIT_ALL="3",
        FT_REJOIN_AFTER=str(HEALED_BY),
        FT_KILL_GROUP="2",
        FT_KILL_IN_STEP=str(KILL_IN),
        FT_DELAY="0.05",
        FT_HOLDS=f"{HEALED_BY}=replacement.up,{SIGTERM_AT}=go",
    )
    try:
        wait_for(
            lambda: all(any(r.get("step") == SIGTERM_AT for r in records(run_a, g)) for g in range(3)),
            timeout=240,
            what=f"every group at step {SIGTERM_AT}",
        )
        refused = run_dtrain(["train", "run.name=ft"], run_a, check=False)  # the launch holds the run lock
        assert (
            refused.returncode == 2
            and f"runs/ft is in use by host {os.uname().nodename}, pid {proc.pid} " in refused.stderr
        ), refused.stderr
        proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: all("SIGTERM received: stopping" in last_attempt(run_dir, g) for g in range(3)),
            timeout=60,
            what="the SIGTERM in every group",
        )
        (run_a / "go").touch()
        assert proc.wait(timeout=120) == 75, (run_a / "err.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    said = (run_a / "err.txt").read_text()  # the launcher's lines and group 0's output
    logs = {g: records(run_a, g) for g in range(3)}
    keys = {g: key_log(run_dir, g) for g in range(3)}
    victim = next(r["pid"] for r in logs[2] if "start" in r)
    died = max(r["step"] for r in logs[2] if r["pid"] == victim and "step" in r) + 1  # the step it died in
    assert died == KILL_IN  # the first quorum had every group (FT_WAIT_ALL)
    assert re.search(
        r"^ft: group 2 died \(SIGKILL\) at step ~\d+; restarting it \(1 of 1 restarts\); the others "
        r"train on$",
        said,
        re.M,
    ), said[-3000:]
    assert len({r["pid"] for g in (0, 1) for r in logs[g]}) == 2  # groups 0 and 1 untouched
    assert (
        said.count("restarting it") == 1
        and ("launch: SIGTERM received: the replica groups saved and stopped; run the same command again to resume")
        in said
    )  # no restart
    # the survivors' step was not committed and was dealt again over 2 groups, which trained on meanwhile
    assert f"ft: step {died - 1} not committed" in said  # (0-based: the data position)
    alone = sorted(s for s in keys[0] if s >= died and s not in keys[2])
    assert alone == list(range(died, HEALED_BY + 1)), alone
    # the replacement healed from a live peer: its weights are the survivors' at every step it took
    healed = [r for r in logs[2] if r.get("step") and r["pid"] != victim]
    assert healed[0]["step"] == HEALED_BY + 1 and "healed from a live peer at step" in last_attempt(run_dir, 2)
    by_step: dict[int, set] = {}
    for g in range(3):
        for r in logs[g]:
            if "step" in r:
                by_step.setdefault(r["step"], set()).add(r["weights"])
    assert all(len(h) == 1 for h in by_step.values())
    # one SIGTERM: every group stopped at the same committed step, one checkpoint of it
    ends = {r["at"] for g in range(3) for r in logs[g] if "end" in r}
    assert len(ends) == 1 and SIGTERM_AT < (saved := ends.pop()) < STEPS_PER_EPOCH
    assert [c.name for c in sorted((run_dir / "checkpoints").glob("step-*"))] == [f"step-{C:08d}", f"step-{saved:08d}"]
    # the same validations and best in every group, the healed one too (healed state: the best, "max" here,
    # is step 5's, which the replacement knows only from its peers, no checkpoint being written before 12)
    validated: dict[int, list] = {}
    for g in range(3):
        for r in logs[g]:
            if "validated" in r:
                validated.setdefault(r["validated"], []).append(r["metrics"])
    assert set(validated) - {15} == {5, 10}
    assert len(validated[5]) == 2 and len(validated[10]) == 3
    assert all(m == ms[0] for ms in validated.values() for m in ms)
    assert validated[10][0]["val/best_loss"] == validated[5][0]["val/loss"]
    # one line for the fault, from the group that wrote the end; no line of torchft's or torch's own
    assert (
        f"ft: group 2 lost at step {died}, rejoined (healed) at step {HEALED_BY + 1}; "
        f"{HEALED_BY + 1 - died} steps at 2 of 3 groups"
    ) in said, said[-3000:]
    for g in range(3):
        noise = [
            line
            for line in (run_dir / "logs" / f"group-{g}.log").read_text().splitlines()
            if any(n in line for n in NOISE) or ("pair.cc" in line and "not committed" not in line)
        ]
        assert not noise, noise

    # the run from checkpoint C on, never stopped (b), and the run resumed at the SIGTERM (a): 3 groups each,
    # all up before the first step (min replicas 3: no group heals); and plain `dtrain train` of a's checkpoint
    shutil.copytree(run_a / "runs", run_b / "runs", symlinks=True)
    shutil.copytree(run_a / "runs", plain_dir / "runs", symlinks=True)
    shutil.rmtree(run_b / "runs" / "ft" / "checkpoints" / f"step-{saved:08d}")
    (run_b / "runs" / "ft" / "checkpoints" / "latest").unlink()
    resumed, reference = (
        launch(run_a, data_root, "--ft-min-replicas", "3"),
        launch(run_b, data_root, "--ft-min-replicas", "3"),
    )
    try:
        plain = _run_here(
            [*ARGS, f"data.root={data_root}"],
            plain_dir,
            {"FT_OUT": str(plain_dir), "REPLICA_GROUP_ID": "plain"},
            script=GROUP,
        )
        assert plain.returncode == 0, plain.stderr[-3000:]
        for p, d in ((resumed, run_a), (reference, run_b)):
            assert p.wait(timeout=240) == 0, (d / "err.txt").read_text()[-3000:]
    finally:
        for p in (resumed, reference):
            if p.poll() is None:
                p.kill()
    starts = {
        d.name: sorted(
            {r["start"] for g in range(3) for r in records(d, g)[len(logs[g]) if d == run_a else 0 :] if "start" in r}
        )
        for d in (run_a, run_b)
    }
    assert starts == {"a": [saved], "b": [C]}, starts
    finals = [torch.load(f, weights_only=True) for d in (run_a, run_b) for f in sorted(d.glob("g*-*.pt"))]
    assert len(finals) == 6 and all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in f)
    # the whole epoch's samples once over the groups' steps, the killed step's included; and once with plain
    # `dtrain train`'s steps after the checkpoint
    keys = {g: key_log(run_dir, g) for g in range(3)}
    everything = digits_train_keys(data_root)
    seen = [k for s in range(1, STEPS + 1) for g in range(3) for k in keys[g].get(s, [])]
    assert len(seen) == len(set(seen)) == STEPS * 64 and set(seen) <= everything
    assert [r["start"] for r in records(plain_dir, "plain") if "start" in r] == [saved]
    plain_keys = key_log(plain_dir / "runs" / "ft", "plain")
    epoch = [k for s in range(1, saved + 1) for g in range(3) for k in keys[g].get(s, [])] + [
        k for s in range(saved + 1, STEPS + 1) for k in plain_keys[s]
    ]
    assert sorted(epoch) == sorted(seen)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step-{STEPS:08d}"


@pytest.mark.multiproc
@pytest.mark.slow
@needs_torchft
def test_groups_of_two_processes_lose_one_heal_as_a_group_and_see_each_sample_once(tmp_path, data_root):
    """`dtrain launch --ft --nproc-per-node 4 --ft-group-size 2`: 2 replica groups of 2 DDP processes each.
    Rank 1 of group 0, the writing group, SIGKILLed mid-step (its 4th): the launcher stops its rank 0 too and
    restarts the group (both processes) while group 1 trains on alone (its 2 processes untouched) and writes;
    the replacement heals with both ranks at once and writes again. Every process's weights are the same at
    every step and at the end, and the epoch's samples are trained exactly once over the 4 processes'
    committed steps (global batch 32 x 2 processes). The shards are read a sample at a time from disk
    (data.in_memory=false) and augmented; metrics.jsonl and TensorBoard have each step once, across the
    writers."""
    KILL_IN, HEALED_BY, V, S = 4, 8, 0, 1  # the victim group, the survivor
    args = [a for a in ARGS if not a.startswith(("data.batch_size", "checkpoint.every"))]
    # the shards read by offset, not held in memory (dtrain.data.tar_index), and augmented
    args += ["data.batch_size=32", "checkpoint.every=100", "data.in_memory=false", "augment.hflip.p=0.5"]
    args += ["log.loggers=[jsonl,tensorboard]"]
    run_dir = tmp_path / "runs" / "ft"
    proc = launch(
        tmp_path,
        data_root,
        "--nproc-per-node",
        "4",
        "--ft-group-size",
        "2",
        "--max-restarts",
        "1",
        args=args,
        FT_WAIT_ALL="2",
        FT_REJOIN_AFTER=str(HEALED_BY),
        FT_KILL_GROUP=str(V),
        FT_KILL_RANK="1",
        FT_KILL_IN_STEP=str(KILL_IN),
        FT_HOLDS=f"{HEALED_BY}=replacement.up",
    )
    try:
        assert proc.wait(timeout=240) == 0, (tmp_path / "err.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    said = (tmp_path / "err.txt").read_text()  # the launcher's lines and group 0's (its rank 0's) output
    assert said.startswith("launch: --ft, 2 replica group(s) of 2 processes, nodes=1, max_restarts=1"), said
    assert re.search(rf"^ft: group {V} died \(SIGKILL\) at step ~\d+; restarting it \(1 of 1 restarts\)", said, re.M)
    logs = {g: records(tmp_path, g) for g in range(2)}
    assert len({r["pid"] for r in logs[S]}) == 2  # the survivor's processes untouched
    # the first attempt's two processes (the replacement starts after they died), then the replacement's two
    starts = [(r["rank"], r["pid"]) for r in logs[V] if "start" in r]
    assert [sorted(rank for rank, _ in starts[i : i + 2]) for i in (0, 2)] == [[0, 1], [0, 1]], starts
    assert len({pid for _, pid in starts}) == 4, starts
    victims = {pid for _, pid in starts[:2]}
    died = max(r["step"] for r in logs[V] if r["pid"] in victims and "step" in r) + 1
    assert died == KILL_IN and f"ft: step {died - 1} not committed" in last_attempt(run_dir, S)
    # the replacement's two ranks healed at the same step, from a live peer, and trained on with the survivor
    healed = [r for r in logs[V] if r.get("step") and r["pid"] not in victims]
    assert {r["step"] for r in healed if r["step"] == min(h["step"] for h in healed)} == {HEALED_BY + 1}
    assert sorted({r["rank"] for r in healed}) == [0, 1]
    assert "healed from a live peer at step" in last_attempt(run_dir, V)
    by_step: dict[int, set] = {}
    for g in range(2):
        for r in logs[g]:
            if "step" in r:
                by_step.setdefault(r["step"], set()).add(r["weights"])
    assert sorted(by_step) == list(range(1, STEPS + 1)) and all(len(h) == 1 for h in by_step.values())
    finals = [torch.load(f, weights_only=True) for f in sorted(tmp_path.glob("g*-*.pt"))]
    assert len(finals) == 4 and all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in f)
    # each sample once: the survivor alone (its 2 ranks) from the killed step until the replacement joined
    keys = {(g, r): key_log(run_dir, f"{g}-rank-{r}") for g in range(2) for r in range(2)}
    seen = [k for s in range(1, STEPS + 1) for gr in keys for k in keys[gr].get(s, [])]
    assert len(seen) == len(set(seen)) == STEPS * 64 and set(seen) <= digits_train_keys(data_root)
    alone = sorted(s for s in keys[S, 0] if s >= died and s not in keys[V, 0])
    assert alone == list(range(died, HEALED_BY + 1)), alone
    assert all(len(keys[S, r][s]) == 32 for r in range(2) for s in alone)  # the global batch, over 2 processes
    assert all(len(keys[g, r][s]) == 16 for g in range(2) for r in range(2) for s in keys[g, r] if s > HEALED_BY)
    assert (
        f"ft: group {V} lost at step {died}, rejoined (healed) at step {HEALED_BY + 1}; "
        f"{HEALED_BY + 1 - died} steps at 1 of 2 groups"
    ) in said, said[-3000:]
    # the writer changed twice (0 -> 1 at the kill, 1 -> 0 at the rejoin): each step's record once, in the
    # jsonl and in TensorBoard (the new writer's purge marker hides what the lost one logged after its step)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, STEPS + 1))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, STEPS + 1))
    assert all(abs(e.value - losses[e.step]) <= 1e-6 * abs(losses[e.step]) for e in scalars)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 3  # one per turn
