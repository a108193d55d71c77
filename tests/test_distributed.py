"""Multi-process behaviour on real ranks (gloo on CPU), forked with torchrun's variables (conftest's run_ranks):
what the ranks compute together; the launchers have their own tests (test_launcher, test_matrix, test_slurm)."""

import numpy as np
import pytest
import torch

from conftest import final_params, metrics_of, result_of, run_dtrain, run_ranks
from dtrain.data.datasets import digits
from dtrain.data.shards import write_shards

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def full_batch_data(tmp_path_factory):
    """256 training samples in 4 equal shards: one global batch of 256 is the whole epoch, so every
    step sees the same samples whatever the rank count, and the runs must agree numerically."""
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


COMMON = [
    "train.epochs=12",
    "data.shuffle_buffer=0",
    "model.kwargs.dropout=0",
    "optim.lr=0.01",
    "log.progress=false",
    "schedule.warmup_steps=3",
    "train.log_every=2",
]


def close(a: dict, b: dict, atol=1e-5) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4) for k in a)


def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path, full_batch_data):
    data = f"data.dataset=folder:{full_batch_data}"
    run_dtrain(["train", data, "data.batch_size=256", "run.name=one", *COMMON], tmp_path)
    two = run_ranks(2, ["train", data, "data.batch_size=128", "run.name=two", *COMMON], tmp_path)
    assert "launch: torchrun, world_size=2, backend=gloo" in two.stderr
    a, b = final_params(tmp_path / "runs" / "one"), final_params(tmp_path / "runs" / "two")
    assert close(a, b), max((a[k] - b[k]).abs().max().item() for k in a)
    loss_one = [r["loss"] for r in metrics_of(tmp_path / "runs" / "one") if "loss" in r]
    loss_two = [r["loss"] for r in metrics_of(tmp_path / "runs" / "two") if "loss" in r]
    assert np.allclose(loss_one, loss_two, atol=1e-5)
    assert loss_one[-1] < loss_one[0] * 0.5  # they trained: not two untouched initialisations compared


def test_grad_accumulation_matches_one_big_batch(tmp_path, full_batch_data):
    data = f"data.dataset=folder:{full_batch_data}"
    run_dtrain(["train", data, "data.batch_size=256", "run.name=big", *COMMON], tmp_path)
    run_dtrain(["train", data, "data.batch_size=64", "train.grad_accum=4", "run.name=accum", *COMMON], tmp_path)
    a, b = final_params(tmp_path / "runs" / "big"), final_params(tmp_path / "runs" / "accum")
    assert close(a, b), max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_ranks_with_accumulation_match_one_rank(tmp_path, full_batch_data):
    # DDP no_sync on the first micro-step, all-reduce on the second: still the same update
    data = f"data.dataset=folder:{full_batch_data}"
    run_dtrain(["train", data, "data.batch_size=256", "run.name=one", *COMMON], tmp_path)
    run_ranks(2, ["train", data, "data.batch_size=64", "train.grad_accum=2", "run.name=two", *COMMON], tmp_path)
    a, b = final_params(tmp_path / "runs" / "one"), final_params(tmp_path / "runs" / "two")
    assert close(a, b)


def test_early_stop_is_decided_for_all_ranks(tmp_path):
    """Rank 1 validates on samples whose labels are noise: its own validation loss alone would stop
    it early, rank 0's alone would not. Both must stop at the same step and exit (no hang)."""
    splits, meta = digits()
    x, y = splits["train"]
    vx, vy = splits["val"]
    val_y = vy[:200].copy()
    val_y[1::2] = np.random.default_rng(0).integers(0, 10, 100)  # in memory, rank 1 evaluates every second sample
    root = tmp_path / "d"
    write_shards(
        root, {"train": (x[:1200], y[:1200]), "val": (vx[:200], val_y), "test": splits["test"]}, meta, shard_size=100
    )
    args = [
        "train",
        f"data.dataset=folder:{root}",
        "train.epochs=40",
        "train.val_every=5",
        "early_stop.patience=3",
        "log.all_ranks=true",
        "log.progress=false",
    ]
    proc = run_ranks(2, args, tmp_path, timeout=240)
    stops = sorted(
        l.split("early stop at step ")[1].split(":")[0] for l in proc.stderr.splitlines() if "early stop at step" in l
    )
    assert len(stops) == 2 and stops[0] == stops[1], proc.stderr[-3000:]
    assert "[rank 0] early stop" in proc.stderr and "[rank 1] early stop" in proc.stderr
    assert result_of(proc)["stop_reason"] == "early_stop"
    assert int(stops[0]) < 40 * (1200 // 128)

    # The premise: replaying early stopping on each rank's *local* validation losses, the ranks
    # would have stopped at different steps; a rank-local decision would have hung the other rank.
    def local_stop(rank):
        best, bad = float("inf"), 0
        for line in proc.stderr.splitlines():
            if line.startswith(f"[rank {rank}] local val/loss"):
                step, loss = line.split(" at step ")[1].split(": ")
                if float(loss) < best:
                    best, bad = float(loss), 0
                else:
                    bad += 1
                    if bad >= 3:
                        return int(step)
        return None

    assert local_stop(0) != local_stop(1), (local_stop(0), local_stop(1))


def test_every_rank_validates_a_split_of_one_shard(tmp_path, monkeypatch):
    """A validation split of one shard, streamed, on 2 ranks: both ranks evaluate (51 and 50 of its 101
    samples; dealt by shard, rank 1 had none and logged a local loss of 0), and the metrics reduced over
    them are `dtrain eval`'s one-rank evaluation of the same checkpoint."""
    splits, meta = digits()
    x, y = splits["train"]
    vx, vy = splits["val"]
    root = tmp_path / "d"
    write_shards(root, {"train": (x[:512], y[:512]), "val": (vx[:101], vy[:101])}, meta, shard_size=128)
    assert len(list(root.glob("val-*.tar"))) == 1
    proc = run_ranks(
        2,
        [
            "train",
            f"data.dataset=folder:{root}",
            "data.in_memory=false",
            "train.epochs=1",
            "run.name=onevalshard",
            "checkpoint.save_best=false",
            "log.all_ranks=true",
            "log.progress=false",
        ],
        tmp_path,
        timeout=240,
    )
    local = {
        rank: [
            float(l.rsplit(": ", 1)[1])
            for l in proc.stderr.splitlines()
            if l.startswith(f"[rank {rank}] local val/loss at step 4: ")
        ]
        for rank in (0, 1)
    }
    assert all(len(v) == 1 and v[0] > 0 for v in local.values()), (local, proc.stderr[-3000:])
    logged = next(r for r in metrics_of(tmp_path / "runs" / "onevalshard") if "val/loss" in r)
    assert logged["step"] == 4

    from dtrain.evaluate import Evaluator

    evaluations = []
    real = Evaluator.evaluate

    def recorded(self, *args, **kwargs):  # `dtrain eval` prints 6 digits; its numbers unrounded
        evaluations.append(real(self, *args, **kwargs))
        return evaluations[-1]

    monkeypatch.setattr(Evaluator, "evaluate", recorded)
    run_dtrain(["eval", "--checkpoint", "runs/onevalshard", "--split", "val"], tmp_path)
    one_rank = evaluations[-1]
    assert one_rank.keys() == {k for k in logged if k.startswith("val/") and k != "val/best_loss"}
    assert all(abs(one_rank[k] - logged[k]) < 1e-6 for k in one_rank), (one_rank, logged)


def test_validation_on_two_ranks_uses_the_batch_norm_statistics_the_checkpoint_keeps(tmp_path, data_root):
    """Each rank updates its own batch-norm running statistics in its last forward (DDP broadcasts rank 0's at
    the start of each forward, not after), and the checkpoint keeps rank 0's: validation on 2 ranks averaged
    over statistics no single model has, and `dtrain eval` of the checkpoint it picked gave another val/loss
    (found walking the docs: an HF ResNet's 0.17600 at training vs 0.17311 from eval). Every rank evaluates with
    rank 0's statistics now: validation equals one process evaluating the saved weights."""
    args = [
        "train",
        f"data.root={data_root}",
        "model.factory=cnn",
        "model.kwargs.channels=[8, 16]",
        "train.max_steps=6",
        "train.val_every=6",
        "data.batch_size=16",
        "log.progress=false",
        "run.doctor=false",
    ]
    run_ranks(2, args, tmp_path)
    logged = [r for r in metrics_of(tmp_path / "runs" / "digits") if "val/loss" in r][-1]
    proc = run_dtrain(["eval", "--checkpoint", "runs/digits/checkpoints/step-00000006", "--split", "val"], tmp_path)
    evaluated = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.split()[:1] == ["val/loss"]))
    assert abs(evaluated - logged["val/loss"]) < 1e-5 * max(1.0, abs(evaluated)), (evaluated, logged["val/loss"])
