"""`dtrain train` as replica groups of `dtrain launch --ft` (dtrain.ft_train, issue #36): the launcher's
environment contract set here directly, real processes (tests/ft_group.py: dtrain.main with a recording
callback) under a real torchft_lighthouse, gloo on CPU: a group SIGKILLed mid-epoch and restarted, SIGTERM of
every group, resume; and the refusals, in process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _env, free_port, run_dtrain, wait_for

from dtrain.config import ConfigError, load_config

GROUP = Path(__file__).with_name("ft_group.py")
needs_torchft = pytest.mark.skipif(shutil.which("torchft_lighthouse") is None,
                                   reason="needs torchft (pip install 'dtrain[ft]')")
# digits: 1248 training samples, global batch 32: 39 steps an epoch
ARGS = ["train.epochs=1", "data.batch_size=32", "train.log_every=1", "train.val_every=10", "log.progress=false",
        "log.sample_keys=true", "run.doctor=false", "checkpoint.every=20", "data.shuffle_buffer=200",
        "early_stop.patience=50"]
STEPS_PER_EPOCH = STEPS = 39


# ---- in process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.engine=fsdp", r"^ft: train.engine=fsdp can't train as replica groups .*; use train.engine=ddp"),
    ("data.in_memory=false", r"^ft: replica groups deal .*; set data.in_memory=true"),
    ("log.loggers=[jsonl,wandb]", r"^ft: log.loggers wandb is not supported with replica groups yet"),
])
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
    env = GroupEnv.read({"TORCHFT_LIGHTHOUSE": "http://h:1", "REPLICA_GROUP_ID": "1", "DTRAIN_FT_GROUPS": "3",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "5", "DTRAIN_FT_TIMEOUT_S": "4"})
    assert (env.slot, env.store, env.timeout_s, env.min_replicas) == (1, ("127.0.0.1", 5), 4.0, 1)


def test_one_line_per_fault():
    from dtrain.ft_train import Faults
    faults = Faults(3)
    for step in range(1, 31):
        present = [1, 1, 0] if 17 <= step < 23 else [1, 1, 2] if step == 23 else [1, 1, 1]
        faults.observe(step, 3 - present.count(0), present)
    faults.observe(31, 2, [0, 1, 1])
    assert faults.lines(40) == ["ft: group 0 lost at step 31, not back by the end (step 40); 10 steps at 2 of 3 groups",
                                "ft: group 2 lost at step 17, rejoined (healed) at step 23; 6 steps at 2 of 3 groups"]
    assert Faults(3).lines(9) == []


@needs_torchft
def test_one_group_resumes_a_plain_runs_checkpoint_at_an_epochs_end_and_refuses_one_mid_epoch(tmp_path, data_root):
    """In process: `dtrain train` as the one replica group of a Lighthouse of this test's, after plain `dtrain train`
    runs with 2 DataLoader workers, whose order of an epoch's rest replica groups can't deal."""
    from torchft._torchft import LighthouseServer
    args = ["train", f"data.root={data_root}", "data.batch_size=32", "train.epochs=2", "log.progress=false",
            "run.doctor=false", "data.num_workers=2", "data.shuffle_buffer=200"]
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=100)
    group = {"DTRAIN_FT": "1", "TORCHFT_LIGHTHOUSE": lighthouse.address(), "REPLICA_GROUP_ID": "0",
             "DTRAIN_FT_GROUPS": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    try:
        run_dtrain([*args, "run.stop_at_step=5"], tmp_path)
        refused = run_dtrain(args, tmp_path, env={**group, "MASTER_PORT": str(free_port())}, check=False)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
            "dtrain: error: checkpoint: step 5 is in the middle of an epoch that a run of 1 rank(s) and data workers "
            "read in its own order; finish the epoch with `dtrain train` (run.stop_at_step=39), then resume with "
            "`dtrain launch --ft`"), refused.stderr[-2000:]
        run_dtrain([*args, "run.stop_at_step=39"], tmp_path)
        done = run_dtrain(args, tmp_path, env={**group, "MASTER_PORT": str(free_port())})
    finally:
        lighthouse.shutdown()
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 78
    assert "resumed from runs/digits/checkpoints/step-00000039 at step 39" in done.stderr


# ---- replica groups as processes ---------------------------------------------------------------------------
class Groups:
    """A Lighthouse and replica groups of `python tests/ft_group.py` in `cwd`, as `dtrain launch --ft` starts them."""

    def __init__(self, cwd: Path, n: int, min_replicas: int):
        self.cwd, self.n, self.procs = cwd, n, []
        port = free_port()
        self.lighthouse = subprocess.Popen(
            ["torchft_lighthouse", "--min_replicas", str(min_replicas), "--join_timeout_ms", "1000",
             "--quorum_tick_ms", "50", "--heartbeat_timeout_ms", "1000", "--bind", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(cwd / "lighthouse.log").open("w"))
        self.address = f"http://127.0.0.1:{port}"

    def start(self, g: int, args: list[str], **env: str) -> subprocess.Popen:
        contract = {"DTRAIN_FT": "1", "TORCHFT_LIGHTHOUSE": self.address, "REPLICA_GROUP_ID": str(g),
                    "DTRAIN_FT_GROUPS": str(self.n), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DTRAIN_FT_TIMEOUT_S": "5",
                    "FT_OUT": str(self.cwd), "PYTHONPATH": str(GROUP.parent), **env}
        n = len(self.procs)
        self.procs.append(subprocess.Popen([sys.executable, str(GROUP), *args], cwd=self.cwd, env=_env(contract),
                                           stdout=(self.cwd / f"out{g}-{n}.txt").open("w"),
                                           stderr=(self.cwd / f"err{g}-{n}.txt").open("w")))
        return self.procs[-1]

    def err(self, p: subprocess.Popen) -> str:
        i = self.procs.index(p)
        return next(self.cwd.glob(f"err*-{i}.txt")).read_text()

    def wait(self, p: subprocess.Popen, code: int) -> None:
        assert p.wait(timeout=240) == code, self.err(p)[-3000:]

    def close(self) -> None:
        for p in [*self.procs, self.lighthouse]:
            if p.poll() is None:
                p.kill()
                p.wait()


def records(out: Path, g) -> list[dict]:
    path = out / f"g{g}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def key_log(run_dir: Path, g) -> dict[int, list[str]]:
    """{step: keys} of a group's sample-key log (g="plain": rank 0's of a run without replica groups)."""
    name = "rank-00000.txt" if g == "plain" else f"group-{g}.txt"
    lines = (run_dir / "sample_keys" / name).read_text().splitlines()
    return {int(step): keys.split() for step, _, keys in (line.partition(" ") for line in lines)}


def digits_train_keys(data_root: Path) -> set[str]:
    from dtrain.data import ShardStream, read_index
    stream = ShardStream(read_index(data_root / "digits"), "train", batch_size=64, rank=0, world_size=1,
                         train=False)
    return {k for batch in stream.epoch(0) for k in batch[2]}


@pytest.mark.multiproc
@pytest.mark.slow
@needs_torchft
def test_a_killed_group_heals_and_the_run_trains_every_sample_once(tmp_path, data_root):
    KILL_IN, HOLD_AT = 12, 30
    # "best" the highest validation loss: step 10's, which the replacement knows only from its peers (healed
    # state), no checkpoint being written before the end
    args = [*ARGS, f"data.root={data_root}", "run.name=ft", "early_stop.mode=max", "checkpoint.every=0",
            "checkpoint.save_best=false"]
    groups = Groups(tmp_path, 3, min_replicas=2)
    try:
        hold = {"FT_HOLD_AT": str(HOLD_AT), "FT_HOLD_FOR": "replacement.up", "FT_DELAY": "0.05"}
        survivors = [groups.start(0, args, **hold), groups.start(1, args, **hold)]
        victim = groups.start(2, args, FT_KILL_IN_STEP=str(KILL_IN), FT_DELAY="0.05")
        assert victim.wait(timeout=240) == -signal.SIGKILL, groups.err(victim)[-3000:]
        died = max(r["step"] for r in records(tmp_path, 2) if "step" in r) + 1  # the step it died in

        def steps_alone() -> list[int]:
            return [r["step"] for r in records(tmp_path, 0) if r.get("step", 0) > died]
        wait_for(lambda: len(steps_alone()) >= 3, what="the survivors' steps at 2 replica groups", timeout=120)
        replacement = groups.start(2, args, FT_DELAY="0.05")
        wait_for(lambda: any("start" in r and r["pid"] == replacement.pid for r in records(tmp_path, 2)),
                 what="the replacement up", timeout=120)
        (tmp_path / "replacement.up").touch()
        for p in [*survivors, replacement]:
            groups.wait(p, 0)
    finally:
        groups.close()

    run_dir = tmp_path / "runs" / "ft"
    keys = {g: key_log(run_dir, g) for g in range(3)}
    # the survivors kept training at 2 groups while group 2 was away: consecutive steps from the kill on
    alone = sorted(s for s in keys[0] if s >= died and s not in keys[2])
    assert len(alone) >= 3 and alone == list(range(alone[0], alone[-1] + 1)), alone
    # the replacement healed from a live peer after the kill: its first step's weights are the survivors'
    logs = {g: records(tmp_path, g) for g in range(3)}
    healed = [r for r in logs[2] if r.get("step") and r["pid"] == replacement.pid]
    assert healed[0]["step"] > died + 3
    after = {r["step"]: r["weights"] for r in logs[0] if "step" in r}
    assert all(r["weights"] == after[r["step"]] for r in healed)  # every step after healing, too
    # every group's weights after every step it committed are the same; the final ones torch.equal
    by_step: dict[int, set] = {}
    for g in range(3):
        for r in logs[g]:
            if "step" in r:
                by_step.setdefault(r["step"], set()).add(r["weights"])
    assert sorted(by_step) == list(range(1, STEPS + 1)) and all(len(h) == 1 for h in by_step.values())
    finals = [torch.load(f, weights_only=True) for f in sorted(tmp_path.glob("g*-*.pt"))]
    assert len(finals) == 3 and all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in f)
    # the same validations and the same best/patience in every group, the healed one too (healed state)
    validated: dict[int, list] = {}
    for g in range(3):
        for r in logs[g]:
            if "validated" in r:
                validated.setdefault(r["validated"], []).append(r["metrics"])
    assert sorted(validated) == [10, 20, 30, 39]
    assert all(len(m) >= 2 and all(x == m[0] for x in m) for m in validated.values())
    assert len(validated[39]) == 3 and validated[39][0]["val/best_loss"] == validated[10][0]["val/loss"]
    # sample accounting: the epoch's committed steps train each of its samples exactly once over the groups,
    # though the step the victim died in was tried twice: not committed, then dealt over 2 groups
    assert max(s for s in keys[2] if s <= died + 3) == died - 1
    assert f"ft: step {died - 1} not committed" in groups.err(survivors[0])  # (0-based: the data position)
    everything = digits_train_keys(data_root)
    seen = [k for s in range(1, STEPS + 1) for g in range(3) for k in keys[g].get(s, [])]
    assert len(seen) == len(set(seen)) == STEPS * 32 and set(seen) <= everything
    # one line for the fault, from the group that wrote the end; the run's files are one run's
    back = min(s for s in keys[2] if s > died)
    line = f"ft: group 2 lost at step {died}, rejoined (healed) at step {back}; {back - died} steps at 2 of 3 groups"
    assert line in groups.err(survivors[0]), groups.err(survivors[0])[-2000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, STEPS + 1))
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step-{STEPS:08d}"


@pytest.mark.multiproc
@pytest.mark.slow
@needs_torchft
def test_sigterm_saves_once_every_group_exits_75_and_the_resume_is_exact(tmp_path, data_root):
    """2 groups SIGTERMed at once mid-epoch, then started again, end torch.equal to 2 groups never stopped; the
    checkpoint also resumes under plain `dtrain train`."""
    args = [*ARGS, f"data.root={data_root}", "checkpoint.every=0", "checkpoint.save_best=false", "run.name=ft"]
    straight_dir, stopped_dir, plain_dir = tmp_path / "straight", tmp_path / "stopped", tmp_path / "plain"
    straight_dir.mkdir(), stopped_dir.mkdir(), plain_dir.mkdir()
    straight, stopped = Groups(straight_dir, 2, min_replicas=2), Groups(stopped_dir, 2, min_replicas=2)
    try:
        reference = [straight.start(g, args) for g in range(2)]
        first = [stopped.start(g, args, FT_DELAY="0.05") for g in range(2)]
        wait_for(lambda: any(r.get("step", 0) >= 15 for r in records(stopped_dir, 0)), what="step 15", timeout=180)
        for p in first:  # as the launcher does: every group at once
            p.send_signal(signal.SIGTERM)
        for p in first:
            stopped.wait(p, 75)
        # every group stopped at the same committed step, mid-epoch, and one checkpoint of it was written
        ends = {r["at"] for g in range(2) for r in records(stopped_dir, g) if "end" in r}
        assert len(ends) == 1 and 15 <= (saved := ends.pop()) < STEPS_PER_EPOCH
        checkpoints = sorted((stopped_dir / "runs" / "ft" / "checkpoints").glob("step-*"))
        assert [c.name for c in checkpoints] == [f"step-{saved:08d}"]
        again = [stopped.start(g, args) for g in range(2)]
        # the same checkpoint resumed by one process of plain `dtrain train` (no DTRAIN_FT): a copy of the run
        shutil.copytree(stopped_dir / "runs", plain_dir / "runs", symlinks=True)
        plain = subprocess.run([sys.executable, str(GROUP), *args], cwd=plain_dir, capture_output=True, text=True,
                               timeout=240, env=_env({"FT_OUT": str(plain_dir), "REPLICA_GROUP_ID": "plain",
                                                     "PYTHONPATH": str(GROUP.parent)}))
        assert plain.returncode == 0, plain.stderr[-3000:]
        for p in reference:
            straight.wait(p, 0)
        for p in again:
            stopped.wait(p, 0)
    finally:
        straight.close(), stopped.close()
    # plain `dtrain train` went on at the saved step and read the rest of the epoch: with the groups' steps
    # before it, each of the epoch's samples once
    assert [r["start"] for r in records(plain_dir, "plain") if "start" in r] == [saved]
    ft_keys = [key_log(stopped_dir / "runs" / "ft", g) for g in range(2)]
    plain_keys = key_log(plain_dir / "runs" / "ft", "plain")
    epoch = [k for s in range(1, saved + 1) for g in range(2) for k in ft_keys[g].get(s, [])] + \
        [k for s in range(saved + 1, STEPS_PER_EPOCH + 1) for k in plain_keys[s]]
    assert len(epoch) == len(set(epoch)) == STEPS_PER_EPOCH * 32
    starts = sorted(r["start"] for g in range(2) for r in records(stopped_dir, g) if "start" in r)
    assert starts == [0, 0, saved, saved]
    expected = torch.load(next(straight_dir.glob("g0-*.pt")), weights_only=True)
    for g, p in enumerate(again):
        resumed = torch.load(stopped_dir / f"g{g}-{p.pid}.pt", weights_only=True)
        assert all(torch.equal(expected[k], resumed[k]) for k in expected)
