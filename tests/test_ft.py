"""Per-step fault tolerance on torchft (dtrain.ft, issue #36): how a step's global batch is dealt over the
quorum (in process), and replica groups as real processes under a real Lighthouse: one SIGKILLed mid-step
and restarted, the survivors training on meanwhile, the replacement healing from a live peer, every sample of
every epoch trained once (tests/ft_worker.py is one replica group)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _env, free_port, wait_for

from dtrain.data import ShardStream, read_index
from dtrain.config import ConfigError
from dtrain.ft import deal_step, global_order, memory_fetch  # imports no torchft: only building a Manager does

WORKER = Path(__file__).with_name("ft_worker.py")


@pytest.mark.parametrize("batch", [1, 7, 16])
def test_a_step_is_dealt_over_any_quorum_exactly_once(batch):
    keys = list(range(100, 100 + batch))
    for n in range(1, 6):
        shares = [deal_step(keys, r, n) for r in range(n)]
        assert [k for s in shares for k in s] == keys  # in rank order, nothing twice, nothing left out
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_the_global_order_is_the_epochs_samples_once_whatever_the_ranks(data_root):
    index = read_index(data_root / "digits")
    kw = {"seed": 3, "shuffle_buffer": 100, "train": True}
    two = ShardStream(index, "train", batch_size=10, rank=1, world_size=2, num_workers=2, **kw)
    one = ShardStream(index, "train", batch_size=20, rank=0, world_size=1, **kw)
    order = global_order(two, 0, 20)
    assert len(order) == len(set(order)) == two.steps_per_epoch * 20
    assert order == global_order(one, 0, 20)  # (seed, epoch) alone: not the rank, layout or workers asking
    assert global_order(two, 1, 20) != order and set(global_order(two, 1, 20)) <= {
        (u, i) for u in two.urls for i in range(two.shard_counts[u])}


def test_without_torchft_building_a_group_is_one_line(monkeypatch):
    from dtrain.ft import build_manager
    monkeypatch.setitem(sys.modules, "torchft", None)  # as if not installed: import raises ImportError
    with pytest.raises(ConfigError, match=r"^ft: torchft is not installed \(.*\); pip install 'dtrain\[ft\]'$"):
        build_manager("0", "http://127.0.0.1:1")


def test_the_global_order_is_what_one_rank_reads_and_memory_fetch_reads_it(data_root):
    index = read_index(data_root / "digits")
    stream = ShardStream(index, "train", batch_size=25, rank=0, world_size=1, seed=5, shuffle_buffer=100,
                         train=True, in_memory=True)
    fetch = memory_fetch(stream)
    order = global_order(stream, 1, 25)
    for step, (x, y, keys) in enumerate(stream.epoch(1)):
        fx, fy, fkeys = fetch(order[step * 25:(step + 1) * 25])
        assert fkeys == keys and torch.equal(fx, x) and torch.equal(fy, y)
    assert step == stream.steps_per_epoch - 1 > 0
    augmented = ShardStream(index, "train", batch_size=25, rank=0, world_size=1, train=True, in_memory=True,
                            transform=lambda x, **kw: x)
    with pytest.raises(ConfigError, match="^ft: data.augment and a data transform are not supported"):
        memory_fetch(augmented)


# ---- replica groups as processes ---------------------------------------------------------------------------
STEPS, GLOBAL_BATCH, MICRO_BATCH, KILL_AT, VOTE_AT = 48, 16, 6, 14, 30


def _records(out: Path, group: int) -> list[dict]:
    path = out / f"g{group}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _reference() -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same run on one process without torchft, each step the mean gradient of its whole global batch:
    (final weights, each step's loss)."""
    sys.path.insert(0, str(WORKER.parent))
    import ft_worker as w
    x, y = w.data()
    model = w.build_model()
    opt, sched = w.build_optim(model)
    per_epoch, losses = w.N // GLOBAL_BATCH, []
    for step in range(STEPS):
        epoch, done = divmod(step, per_epoch)
        keys = w.order(epoch)[done * GLOBAL_BATCH:(done + 1) * GLOBAL_BATCH]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[keys]), y[keys])
        loss.backward()
        losses.append(loss.item())
        opt.step()
        sched.step()
    return model.state_dict(), losses


@pytest.mark.multiproc
@pytest.mark.skipif(shutil.which("torchft_lighthouse") is None, reason="needs torchft (pip install 'dtrain[ft]')")
def test_a_killed_replica_group_heals_and_every_sample_is_trained_once(tmp_path):
    port = free_port()
    lighthouse = subprocess.Popen(
        ["torchft_lighthouse", "--min_replicas", "2", "--join_timeout_ms", "1000", "--quorum_tick_ms", "50",
         "--heartbeat_timeout_ms", "1000", "--bind", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "lighthouse.log").open("w"))
    procs = []

    def group(g: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, str(WORKER), "--replica-id", str(g), "--lighthouse", f"http://127.0.0.1:{port}",
               "--out", str(tmp_path), "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
               "--micro-batch", str(MICRO_BATCH), "--step-delay", "0.05", "--timeout", "5", *extra]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, text=True,
                                      stderr=(tmp_path / f"w{g}-{len(procs)}.err").open("w")))
        return procs[-1]

    try:
        survivors = [group(0, "--hold-at", str(STEPS - 6), "--hold-for", "2"),
                     group(1, "--hold-at", str(STEPS - 6), "--hold-for", "2", "--vote-at", str(VOTE_AT))]
        victim = group(2, "--kill-at", str(KILL_AT))
        assert victim.wait(timeout=120) == -9  # SIGKILLed mid-step by itself
        (tmp_path / "g2.up").unlink()
        # the replacement starts now and waits (torch imported) until the survivors were seen training alone
        replacement = group(2, "--wait-for", str(tmp_path / "go"))

        def steps_alone() -> list[int]:
            return [r["step"] for r in _records(tmp_path, 0) if r.get("committed") and r.get("participants") == 2
                    and r["step"] > KILL_AT]
        wait_for(lambda: len(steps_alone()) >= 3, what="the survivors' steps at 2 replica groups")
        (tmp_path / "go").touch()
        for p in [*survivors, replacement]:
            assert p.wait(timeout=120) == 0, next(tmp_path.glob(f"w*-{procs.index(p)}.err")).read_text()[-3000:]
    finally:
        for p in [*procs, lighthouse]:
            if p.poll() is None:
                p.kill()

    logs = {g: _records(tmp_path, g) for g in range(3)}
    alone = sorted(r["step"] for r in logs[0] if r.get("committed") and r["participants"] == 2 and r["step"] >= KILL_AT)
    assert len(alone) >= 3 and alone == list(range(alone[0], alone[-1] + 1))  # kept rising during the outage
    # shares of 8 at 2 groups, trained as micro-batches of 6 and 2; of 5 or 6 at 3 groups, in one
    assert {r["micro_batches"] for r in logs[0] if r.get("committed")} == {1, 2}

    # the replacement healed from a live peer past the kill, holding exactly the weights a survivor committed
    healed = [r for r in logs[2] if "healed" in r and r["pid"] == replacement.pid]
    assert healed and healed[0]["healed"] > KILL_AT
    after = {r["step"]: r["weights"] for r in logs[0] if r.get("committed")}
    assert healed[0]["weights"] == after[healed[0]["healed"] - 1]
    # every step that several groups committed left them all with the same weights; and the final weights
    by_step: dict[int, set] = {}
    for g in range(3):
        for r in logs[g]:
            if r.get("committed"):
                by_step.setdefault(r["step"], set()).add(r["weights"])
    assert sorted(by_step) == list(range(STEPS)) and all(len(h) == 1 for h in by_step.values())
    finals = [torch.load(tmp_path / f"g{g}.pt") for g in range(3)]
    assert all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in f)

    # a vote of one group (group 1's at step 30, as a signal's "save now") reached every group of that step
    assert all(r["votes"] == [float(r["step"] == VOTE_AT)] for g in range(3) for r in logs[g] if r.get("committed"))
    # sample accounting: each committed step's shares are its quorum's ranks once each, and the committed
    # steps of an epoch train each of its samples exactly once, though the kill's step was tried twice
    committed = [r for g in range(3) for r in logs[g] if r.get("committed")]
    tries = [r for g in range(3) for r in logs[g] if "step" in r and not r["committed"]]
    assert any(r["step"] == KILL_AT for r in tries)  # the step the victim died in failed, and was replayed
    per_epoch = 96 // GLOBAL_BATCH
    for epoch in range(STEPS // per_epoch):
        keys = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            rs = [r for r in committed if r["step"] == step]
            n = {r["participants"] for r in rs}
            assert len(n) == 1 and sorted(r["rank"] for r in rs) == list(range(n.pop())), rs
            keys += [k for r in sorted(rs, key=lambda r: r["rank"]) for k in r["keys"]]
        assert sorted(keys) == list(range(96))
    # the same updates as one process taking each step's whole global batch (up to the order of float sums)
    reference, losses = _reference()
    assert all(torch.allclose(finals[0][k], reference[k], rtol=1e-4, atol=1e-6) for k in reference)
    assert all(abs(r["loss"] - losses[r["step"]]) <= 1e-4 * losses[r["step"]] for r in committed)
    # one line for the fault, from each survivor
    for g in (0, 1):
        err = (tmp_path / f"w{g}-{g}.err").read_text()
        assert "quorum 3 -> 2 replica groups" in err and f"ft: step {KILL_AT} not committed" in err


def _one_group_run(steps: int, start_from: dict | None = None, save_at: int = -1):
    """One replica group in this process under a Lighthouse of its own: (final weights, the checkpoint state
    taken after `save_at` committed steps, the first step trained)."""
    from torchft._torchft import LighthouseServer
    sys.path.insert(0, str(WORKER.parent))
    import ft_worker as w
    from dtrain.ft import StepRunner, build_manager
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=100)
    manager = build_manager("0", lighthouse.address(), timeout_s=10)
    try:
        x, y = w.data()
        model = w.build_model()
        opt, sched = w.build_optim(model)
        runner = StepRunner(manager, model, opt, torch.nn.functional.mse_loss, w.order,
                            lambda keys: (x[keys], y[keys]), GLOBAL_BATCH, w.N // GLOBAL_BATCH, scheduler=sched)
        if start_from is not None:
            runner.load_checkpoint_state(start_from)
        first, saved = manager.current_step(), None
        while manager.current_step() < steps:
            assert runner.step().committed
            if manager.current_step() == save_at:
                saved = copy.deepcopy(runner.checkpoint_state())
        return model.state_dict(), saved, first
    finally:
        manager.shutdown(wait=False)
        lighthouse.shutdown()


def test_a_checkpoint_of_a_replica_group_resumes_exactly():
    straight, saved, _ = _one_group_run(10, save_at=4)
    resumed, _, first = _one_group_run(10, start_from=saved)
    assert first == 4 and saved["torchft"]["step"] == 4
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # weights, momentum, LR and data position
