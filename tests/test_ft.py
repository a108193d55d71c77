"""Per-step fault tolerance on torchft (dtrain.ft, issue #36): how a step's global batch is dealt over the
quorum, and replica groups (tests/ft_worker.py's model and data) as threads of this process under a Lighthouse:
one process's steps, votes, every sample of every epoch once, and an exact resume. A group killed mid-step and
restarted, the survivors training on meanwhile and the replacement healing from a live peer, is
tests/test_ft_train.py's `dtrain launch --ft` run, through the same StepRunner."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dtrain.data import ShardStream, read_index
from dtrain.config import ConfigError
from dtrain.ft import deal_step, global_order, memory_fetch  # imports no torchft: only building a Manager does
from test_tar_index import shifted  # a transform of (sample, key, epoch, pass), as data.augment's

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
        (u, i) for u in two.urls for i in range(two.shard_counts[u])
    }


def test_without_torchft_building_a_group_is_one_line(monkeypatch):
    from dtrain.ft import build_manager

    monkeypatch.setitem(sys.modules, "torchft", None)  # as if not installed: import raises ImportError
    with pytest.raises(ConfigError, match=r"^ft: torchft is not installed \(.*\); pip install 'dtrain\[ft\]'$"):
        build_manager("0", "http://127.0.0.1:1")


def test_the_global_order_is_what_one_rank_reads_and_memory_fetch_reads_it(data_root):
    index = read_index(data_root / "digits")
    stream = ShardStream(
        index, "train", batch_size=25, rank=0, world_size=1, seed=5, shuffle_buffer=100, train=True, in_memory=True
    )
    fetch = memory_fetch(stream)
    order = global_order(stream, 1, 25)
    for step, (x, y, keys) in enumerate(stream.epoch(1)):
        fx, fy, fkeys = fetch(order[step * 25 : (step + 1) * 25])
        assert fkeys == keys and torch.equal(fx, x) and torch.equal(fy, y)
    assert step == stream.steps_per_epoch - 1 > 0
    # data.augment: a transform of (sample, key, epoch, pass), applied with the step's epoch as the stream does
    augmented = ShardStream(
        index,
        "train",
        batch_size=25,
        rank=0,
        world_size=1,
        seed=5,
        shuffle_buffer=100,
        train=True,
        in_memory=True,
        transform=shifted,
    )
    fetch = memory_fetch(augmented)
    for step, (x, y, keys) in enumerate(augmented.epoch(1)):
        fx, fy, fkeys = fetch(order[step * 25 : (step + 1) * 25], epoch=1)
        assert fkeys == keys and torch.equal(fx, x) and torch.equal(fy, y)
        assert not torch.equal(fetch(order[step * 25 : (step + 1) * 25], epoch=2)[0], x)


# ---- replica groups under a Lighthouse ---------------------------------------------------------------------
# (a group killed, restarted and healed: tests/test_ft_train.py's `dtrain launch --ft`, through this StepRunner)
STEPS, GLOBAL_BATCH, MICRO_BATCH, VOTE_AT = 12, 16, 4, 7


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
        keys = w.order(epoch)[done * GLOBAL_BATCH : (done + 1) * GLOBAL_BATCH]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[keys]), y[keys])
        loss.backward()
        losses.append(loss.item())
        opt.step()
        sched.step()
    return model.state_dict(), losses


@pytest.mark.skipif(shutil.which("torchft_lighthouse") is None, reason="needs torchft (pip install 'dtrain[ft]')")
def test_three_groups_take_one_processs_steps_and_share_a_vote():
    """3 replica groups as threads of this process under a Lighthouse of its own: uneven shares (5, 5, 6) in
    micro-batches of 4 give each step the loss and the update of one process taking the whole global batch (up to
    the order of float sums), the same weights in every group; a vote of one group reaches every group at that
    step only; each step's shares are the quorum's ranks once, each epoch's samples once."""
    from concurrent.futures import ThreadPoolExecutor

    from torchft._torchft import LighthouseServer

    from dtrain.ft import StepRunner, build_manager

    sys.path.insert(0, str(WORKER.parent))
    import ft_worker as w

    x, y = w.data()
    built = [(model := w.build_model(), *w.build_optim(model)) for _ in range(3)]  # here: build_model seeds
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=3, join_timeout_ms=100)

    def group(g: int) -> list:
        model, opt, sched = built[g]
        manager = build_manager(str(g), lighthouse.address(), timeout_s=10)
        try:
            runner = StepRunner(
                manager,
                model,
                opt,
                torch.nn.functional.mse_loss,
                w.order,
                lambda keys: (x[keys], y[keys]),
                GLOBAL_BATCH,
                w.N // GLOBAL_BATCH,
                scheduler=sched,
                micro_batch=MICRO_BATCH,
            )
            results = []
            while manager.current_step() < STEPS:
                results.append(runner.step(votes=[float(g == 1 and manager.current_step() == VOTE_AT)]))
            return results
        finally:
            manager.shutdown(wait=False)

    try:
        with ThreadPoolExecutor(3) as pool:
            results = [r for rs in pool.map(group, range(3)) for r in rs]
    finally:
        lighthouse.shutdown()
    assert all(r.committed and r.participants == 3 and r.micro_batches == 2 for r in results)
    assert sorted(r.step for r in results) == sorted(list(range(STEPS)) * 3)
    assert all(r.votes == [float(r.step == VOTE_AT)] for r in results)
    per_epoch = w.N // GLOBAL_BATCH
    for epoch in range(STEPS // per_epoch):
        keys = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            rs = sorted((r for r in results if r.step == step), key=lambda r: r.replica_rank)
            assert [r.replica_rank for r in rs] == [0, 1, 2] and sorted(len(r.keys) for r in rs) == [5, 5, 6]
            keys += [k for r in rs for k in r.keys]
        assert sorted(keys) == list(range(w.N))
    finals = [model.state_dict() for model, _, _ in built]
    assert all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in f)
    reference, losses = _reference()
    assert all(torch.allclose(finals[0][k], reference[k], rtol=1e-4, atol=1e-6) for k in reference)
    assert all(abs(r.loss - losses[r.step]) <= 1e-4 * losses[r.step] for r in results)


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
        runner = StepRunner(
            manager,
            model,
            opt,
            torch.nn.functional.mse_loss,
            w.order,
            lambda keys: (x[keys], y[keys]),
            GLOBAL_BATCH,
            w.N // GLOBAL_BATCH,
            scheduler=sched,
        )
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


@pytest.mark.skipif(shutil.which("torchft_lighthouse") is None, reason="needs torchft (pip install 'dtrain[ft]')")
def test_a_group_out_of_a_failed_all_reduce_lets_the_others_fail_at_once():
    """3 replica groups' gloo connections (torchft's ProcessGroupGloo, as build_manager makes it; threads
    here): groups 0 and 2 in an all-reduce that group 1 has left, as a group whose own all-reduce failed when
    its peer died has. Once group 1 closes its connections (StepRunner does after a failed all-reduce), the
    others' all-reduce fails at once on the closed connection; before, group 0 waited for group 1's data until
    the collective timeout ('Timed out waiting 60000ms for recv operation'; in `dtrain launch --ft`: every
    SIGKILL of one of 4 groups that broke an all-reduce, about one in 8 of 3 groups)."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta
    from types import SimpleNamespace

    from torch.distributed import AllreduceOptions, TCPStore
    from torchft import ProcessGroupGloo

    from dtrain.ft import _close_connections

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pgs = [ProcessGroupGloo(timeout=timedelta(seconds=60)) for _ in range(3)]

    def all_reduce(rank: int) -> str:
        try:
            pgs[rank].allreduce([torch.ones(100_000)], AllreduceOptions()).wait()
            return "done"
        except RuntimeError as e:  # as StepRunner: a group whose all-reduce failed closes its connections, so
            _close_connections(SimpleNamespace(dtrain_pg=pgs[rank]))  # one that waits on it fails too
            return str(e)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda r: pgs[r].configure(f"127.0.0.1:{store.port}/t", str(r), r, 3), range(3)))
        assert list(pool.map(all_reduce, range(3))) == ["done"] * 3
        waiting = [pool.submit(all_reduce, r) for r in (0, 2)]
        _close_connections(SimpleNamespace(dtrain_pg=pgs[1]))
        errors = [w.result() for w in waiting]
    assert all("closed by peer" in e or "reset by peer" in e for e in errors), errors


def test_a_group_of_two_resumes_a_checkpoint_of_groups_of_one_as_one_process(data_root):
    """docs/fault-tolerance.md's two launches on one run: groups of one process stop at step 3 of 19 (global
    batch 64), groups of two processes resume it. A group reads as one process of its group's batch
    (TrainFeed.read_as_one), so it keeps the checkpoint's global batch and its one-process order; it was taken
    for a resume on 2 ranks mid-epoch (a 2-rank segment) and refused."""
    from dtrain.config import load_config
    from dtrain.data.feed import TrainFeed

    index, train_cfg = read_index(data_root / "digits"), load_config(None, []).train
    one = TrainFeed(ShardStream(index, "train", batch_size=64, rank=0, world_size=1, train=True), 0, 1, train_cfg)
    one.read_as_one(64)
    saved = {**one.state_dict(), "step": 3}
    said: list[str] = []
    two = TrainFeed(
        ShardStream(index, "train", batch_size=64, rank=1, world_size=2, train=True), 1, 2, train_cfg, log=said.append
    )
    two.read_as_one(64 * 2)
    two.load_state_dict(saved)
    assert [(s.world_size, s.num_workers) for s in two.position.segments] == [(1, 0)], said
    assert (two.samples_per_step, two.steps_per_epoch, two.step) == (64, one.steps_per_epoch, 3)
