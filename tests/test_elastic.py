"""Resuming on a different number of ranks (issue 8): the global batch is kept, the interrupted epoch's
unread samples are dealt over the new ranks (none twice, none lost), and what can't be kept is refused
with one line naming the switch. Unit tests of the dealing and the replay, then real multi-rank runs (forked
ranks, conftest's run_ranks; the refusal under torchrun)."""

import collections
import itertools
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from conftest import key_log, result_of, run_dtrain, run_ranks, run_torchrun
from dtrain.checkpoint import CheckpointError, verify
from dtrain.data import ShardStream, make_builtin
from dtrain.data.elastic import ElasticError, EpochReplay, Segment, choose_layout, consumed_keys, deal


# ---- dealing and layout: pure Python ---------------------------------------------------------------------
def test_deal_gives_every_unread_sample_once_in_equal_shares():
    rng = random.Random(0)
    for trial in range(300):
        shards = [f"s{i:03d}" for i in range(rng.randint(1, 12))]
        keys = {u: list(range(rng.randint(1, 40))) for u in shards}  # positions in the shard
        old_world, new_world = rng.randint(1, 5), rng.randint(1, 5)
        steps, per_rank_old = rng.randint(2, 10), rng.randint(1, 6) * new_world
        done = rng.randint(1, steps - 1)
        # each old rank: a random walk over its shards' samples, wrapping around when they run out
        streams = []
        for r in range(old_world):
            mine = [(u, k) for u in shards[r::old_world] for k in keys[u]] or [(shards[0], keys[shards[0]][0])]
            rng.shuffle(mine)
            streams.append([mine[i % len(mine)] for i in range(steps * per_rank_old)])
        remaining = [it for s in streams for it in s[done * per_rank_old :]]
        quota = len(remaining) // new_world
        assert quota * new_world == len(remaining)  # per_rank_old is a multiple of new_world
        shard_rank = {u: i for i, u in enumerate(shards)}
        parts = deal(remaining, new_world, quota, shard_rank)
        assert [len(p) for p in parts] == [quota] * new_world  # same steps on every new rank
        assert sum((collections.Counter(p) for p in parts), collections.Counter()) == collections.Counter(remaining)
        # by shard: consecutive runs, so a shard is shared by two ranks only at a boundary
        owners = collections.defaultdict(set)
        for j, p in enumerate(parts):
            for u, _ in p:
                owners[u].add(j)
        assert sum(len(o) - 1 for o in owners.values()) <= new_world - 1, trial


def test_replayed_shuffle_is_webdatasets():
    """The pipeline's buffer shuffle (webdataset's public wds.shuffle) and its replay for in-memory splits draw
    the same order for a seed; and that order is pinned, so a webdataset or Python upgrade that changes it
    (and with it the sample order a resumed run expects) fails here."""
    import webdataset as wds
    from dtrain.data.elastic import shuffled
    from dtrain.data.pipeline import _worker_shuffle

    items = list(range(300))
    for bufsize in (2, 3, 64, 299, 300, 1000):
        ours = shuffled(items, bufsize, random.Random(f"s{bufsize}/worker0"))
        assert ours == list(wds.shuffle(bufsize, bufsize, rng=random.Random(f"s{bufsize}/worker0"))(iter(items)))
        assert ours == list(_worker_shuffle(iter(items), bufsize, f"s{bufsize}"))  # outside a worker: worker 0
        assert sorted(ours) == items and (ours != items)
    assert shuffled(list(range(10)), 4, random.Random("pinned")) == PINNED_ORDER


PINNED_ORDER = [2, 1, 3, 0, 4, 7, 9, 8, 6, 5]  # written down from webdataset 1.0.2, Python 3.11


def test_choose_layout():
    assert choose_layout(96, 3, 48) == (32, 1) and choose_layout(96, 1, 48) == (48, 2)
    assert choose_layout(96, 4, 48) == (24, 1) and choose_layout(128, 1, 64, "approximate") == (64, 2)
    with pytest.raises(ElasticError, match=r"global batch 128 .* over 3 ranks.*checkpoint.elastic=approximate.*43"):
        choose_layout(128, 3, 64)
    assert choose_layout(128, 3, 64, "approximate") == (43, 1)  # 129: the nearest per-rank batch
    assert choose_layout(45, 2, 45, "approximate") == (23, 1)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_builtin("digits", tmp_path_factory.mktemp("elastic") / "d", 100)  # 13 uneven-ish shards


@pytest.mark.parametrize("workers", [0, 2])
def test_replay_matches_the_real_streams(small_shards, workers):
    """The replay from sample counts alone (no data read) must equal what the pipelines yield: normal
    streams of other world sizes, wrapping around included, and the dealt streams of two resumes in one
    epoch. (The built-in shards' keys are f"train-{i:07d}" in shard order: position -> key is known.)"""
    base = ShardStream(
        small_shards, "train", batch_size=30, rank=0, world_size=2, seed=5, shuffle_buffer=50, train=True
    )
    first = dict(zip(base.urls, itertools.accumulate([0] + base.index.counts("train"))))

    def keys(items):
        return [f"train-{first[u] + i:07d}" for u, i in items]

    segs = [Segment(2, 30, 1, workers, 0), Segment(3, 10, 2, workers, 5), Segment(1, 30, 2, 0, 9)]
    for n in (1, 2, 3):
        *_, (streams, dealt) = EpochReplay(base, 1, segs[:n]).segment_streams()
        seg = segs[n - 1]
        for r in range(seg.world_size):
            s = base.relayout(
                rank=r,
                world_size=seg.world_size,
                batch_size=seg.batch_size,
                grad_accum=seg.grad_accum,
                num_workers=seg.num_workers,
                steps_per_epoch=base.steps_per_epoch,
            )
            real = s.epoch(1) if n == 1 else s.dealt_epoch(1, n - 1, dealt[r])
            assert [k for b in real for k in b[2]] == keys(streams[r]), (n, r)
    # over the whole epoch, resumed twice: the same samples as the uninterrupted 2-rank epoch
    read = collections.Counter(k for seg in consumed_keys(base, 1, segs, base.steps_per_epoch) for s in seg for k in s)
    straight = collections.Counter(
        k for seg in consumed_keys(base, 1, segs[:1], base.steps_per_epoch) for s in seg for k in s
    )
    assert read == straight


def test_zero_refuses_another_world_size_in_one_line(tmp_path):
    from dtrain.engine.deepspeed import check_same_world_size

    (tmp_path / "manifest.json").write_text(json.dumps({"world_size": 2, "files": {}}))
    check_same_world_size(tmp_path, 2)
    with pytest.raises(CheckpointError) as e:
        check_same_world_size(tmp_path, 3)
    msg = str(e.value)
    assert "\n" not in msg and "ZeRO shards of 2 ranks" in msg and "with 2 ranks" in msg and "dtrain export" in msg


# ---- real runs: 2 ranks stopped mid-epoch, resumed on 1 and on 3 ------------------------------------------
# global batch 96 = 48 x 2 ranks: 13 steps per epoch on digits; stopped at step 5 of epoch 0
ARGS = [
    "train",
    "train.epochs=2",
    "data.batch_size=48",
    "model.kwargs.dropout=0.1",
    "data.shuffle_buffer=200",
    "log.progress=false",
    "log.sample_keys=true",
    "run.doctor=false",
    "train.log_every=1",
]
STEPS_PER_EPOCH, STOP = 13, 5
TEST_LOSS_TOLERANCE = 0.03  # measured: |difference| 0.004 (3 ranks) and 0.008 (1 rank), see README


def epoch_keys(run: Path, epoch: int) -> collections.Counter:
    lo, hi = epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH
    return collections.Counter(k for rows in key_log(run).values() for s, keys in rows if lo <= s <= hi for k in keys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root, elastic_reference):
    """A 2-rank run stopped at step 5 (copied by each test), and the uninterrupted one (conftest's)."""
    cwd = tmp_path_factory.mktemp("elastic-runs")
    args = ARGS + [f"data.root={data_root}"]
    run_ranks(2, args + ["run.name=stopped", f"run.stop_at_step={STOP}"], cwd)
    return cwd, args, elastic_reference


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_number_of_ranks(tmp_path, runs, world):
    cwd, args, (reference, straight) = runs
    shutil.copytree(cwd / "runs" / "stopped", tmp_path / "runs" / "r", symlinks=True)
    args = args + ["run.name=r"]
    proc = run_dtrain(args, tmp_path) if world == 1 else run_ranks(world, args, tmp_path)
    change = "grad_accum 1 -> 2" if world == 1 else "per-rank batch 48 -> 32"
    assert f"resume: 2 -> {world} ranks; {change} to keep the global batch 96" in proc.stderr, proc.stderr
    assert f"dealt over {world} rank" in proc.stderr and "continue" in proc.stderr

    run = tmp_path / "runs" / "r"
    assert epoch_keys(run, 0) == epoch_keys(reference, 0)  # the interrupted epoch: no sample twice, none lost
    assert sum(epoch_keys(run, 1).values()) == 96 * STEPS_PER_EPOCH  # the next one: a full normal epoch
    logged = key_log(run)
    assert sorted(logged) == list(range(max(world, 2)))
    for rank in range(world):  # every new rank took every step after the checkpoint, in lock step
        steps = [s for s, _ in logged[rank] if s > STOP]
        assert steps == list(range(STOP + 1, 2 * STEPS_PER_EPOCH + 1))
    if world == 1:  # the rank that is gone keeps only its steps up to the checkpoint
        assert [s for s, _ in logged[1]] == list(range(1, STOP + 1))
    result = result_of(proc)
    assert result["step"] == 2 * STEPS_PER_EPOCH  # same schedule length
    assert abs(result["test/loss"] - straight["test/loss"]) < TEST_LOSS_TOLERANCE, (result, straight)


@pytest.mark.multiproc
def test_global_batch_that_does_not_divide_needs_the_switch(tmp_path, data_root):
    """45 samples per step on one process can't be split over 2 ranks: one line naming
    checkpoint.elastic, exit 2 (of each worker), checkpoint untouched; with checkpoint.elastic=approximate
    it resumes."""
    args = [
        "train",
        f"data.root={data_root}",
        "train.max_steps=8",
        "data.batch_size=45",
        "run.doctor=false",
        "log.progress=false",
        "log.sample_keys=true",
        "run.name=a",
    ]
    run_dtrain(args + ["run.stop_at_step=3"], tmp_path)
    ckpts = tmp_path / "runs" / "a" / "checkpoints"
    before = {p.name: verify(p) for p in ckpts.glob("step-*")}
    proc = run_torchrun(2, args, tmp_path, check=False)
    # each worker prints one line and exits 2; torchrun itself reports any failed worker with exit code 1
    assert proc.returncode != 0 and re.search(r"exitcode\s*: 2 ", proc.stderr), proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dtrain: error:")]
    assert errors and all(e == errors[0] for e in errors), proc.stderr[-3000:]
    assert "global batch 45 can't be split evenly over 2 ranks" in errors[0]
    assert "checkpoint.elastic=approximate" in errors[0]
    assert {p.name: verify(p) for p in ckpts.glob("step-*")} == before  # intact, nothing new

    proc = run_ranks(2, args + ["checkpoint.elastic=approximate"], tmp_path)
    assert (
        "resume: 1 -> 2 ranks; per-rank batch 45 -> 23: global batch 46 instead of 45 "
        "(checkpoint.elastic=approximate; LR schedule unchanged, 27 steps per epoch kept)"
    ) in proc.stderr
    assert result_of(proc)["step"] == 8
    logged = key_log(tmp_path / "runs" / "a")
    for rank in (0, 1):
        assert [s for s, _ in logged[rank] if s > 3] == list(range(4, 9))
    before = {k for rows in logged.values() for s, keys in rows if s <= 3 for k in keys}
    after = [k for rows in logged.values() for s, keys in rows if s > 3 for k in keys]
    assert len(before) == 3 * 45 and len(after) == 5 * 46 and not before & set(after)  # nothing read twice


def test_init_from_takes_an_exported_file(tmp_path):
    """What the ZeRO refusal suggests: `dtrain export` a checkpoint, then model.init_from=model.pt."""
    import torch
    from dtrain.config import ModelConfig
    from dtrain.models import build_model
    from dtrain.models.transfer import load_pretrained

    facts = {"input_shape": (1, 8, 8), "num_outputs": 10}
    source, target = (build_model(ModelConfig(), facts, seed) for seed in (1, 2))
    torch.save({"model": source.state_dict(), "config": {}, "step": 7}, tmp_path / "model.pt")  # export's format
    load_pretrained(target, tmp_path / "model.pt", log=lambda m: None)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_resume_with_more_data_workers_finishes_the_epoch_in_its_order(tmp_path, data_root):
    """The DataLoader workers split the shards, so data.num_workers is part of the sample order: a run
    resumed with another count finishes the interrupted epoch in the old order (no sample twice, none
    skipped: the same keys at the same steps as the uninterrupted run) and uses the new one after it."""
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=2",
        "data.shuffle_buffer=200",
        "log.progress=false",
        "log.sample_keys=true",
        "train.log_every=1",
    ]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    run_dtrain(args + ["run.name=r", "run.stop_at_step=4"], tmp_path)
    proc = run_dtrain(args + ["run.name=r", "data.num_workers=2"], tmp_path)
    assert "resume: data.num_workers 0 -> 2 from epoch 1" in proc.stderr, proc.stderr
    steps = len(key_log(tmp_path / "runs" / "straight")[0]) // 2
    straight, resumed = key_log(tmp_path / "runs" / "straight")[0], key_log(tmp_path / "runs" / "r")[0]
    assert resumed[:steps] == straight[:steps]  # epoch 0: step by step the same samples
    epoch1 = [k for _, keys in resumed[steps:] for k in keys]
    assert len(epoch1) == len(set(epoch1)) == sum(len(keys) for _, keys in straight[steps:])
    assert resumed[steps:] != straight[steps:]  # epoch 1 is read by 2 workers: another order


def test_a_checkpoint_of_the_whole_shard_dealing_resumes_at_an_epoch_end_and_is_refused_mid_epoch(small_shards):
    """Checkpoints written before #32.2 (whole shards dealt per rank) have no `dealing` in their data position:
    the rest of an epoch they stopped in can't be replayed in that order, so mid-epoch they are refused in one
    line naming the way on; at an epoch's end nothing of the old order is left, and they resume."""
    from dtrain.config import load_config
    from dtrain.data.feed import TrainFeed

    stream = ShardStream(small_shards, "train", batch_size=16, rank=0, world_size=2, train=True)
    steps = stream.steps_per_epoch

    def resumed(step):
        feed = TrainFeed(stream, 0, 2, load_config(None, []).train, log=lambda msg: None)
        saved = {**feed.state_dict(), "step": step, "epoch": step // steps}
        del saved["dealing"]
        feed.load_state_dict(saved)
        return feed

    assert resumed(2 * steps).step == 2 * steps
    with pytest.raises(CheckpointError) as e:
        resumed(steps + 3)
    assert str(e.value) == (
        f"checkpoint: it stopped at step 3 of epoch 1, written by a dtrain that dealt whole shards "
        f"to ranks, whose order this one (each sample once an epoch) can't replay; resume it with "
        f"the dtrain that wrote it to the epoch's end (run.stop_at_step={2 * steps}), then with "
        f"this one"
    )
