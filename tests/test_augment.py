"""Augmentation: changes training samples only, a pure function of (seed, epoch, key), resumable, previewable."""

import pytest
import torch

from conftest import metrics_of, result_of, run_dtrain
from dtrain import dist
from dtrain.cli import main
from dtrain.config import load_config
from dtrain.data import ShardStream, read_index
from dtrain.data.augment import OPS, Augment
from dtrain.plot import augment_preview
from dtrain.trainer import Trainer


def by_key(batches) -> dict:
    return {k: x for xb, _, kb in batches for x, k in zip(xb, kb)}


def trainer(tmp_path, data_root, *overrides) -> Trainer:
    cfg = load_config(None, [f"data.root={data_root}", f"run.dir={tmp_path}", "log.progress=false", *overrides])
    return Trainer(cfg, dist.setup(force_single=True))


@pytest.mark.parametrize("op", OPS)
def test_each_augmentation_changes_train_samples_and_never_val_or_test(tmp_path, data_root, op):
    t = trainer(tmp_path, data_root, f"augment.{op}.p=1.0", "data.shuffle_buffer=0")
    raw = {
        split: ShardStream(
            t.feed.stream.index, split, batch_size=64, rank=0, world_size=1, train=split == "train", seed=0
        )
        for split in ("train", "val", "test")
    }
    got, want = by_key(t.feed.stream.epoch(0)), by_key(raw["train"].epoch(0))
    assert got.keys() == want.keys()
    changed = sum(not torch.equal(got[k], want[k]) for k in got) / len(got)
    assert changed > 0.6, f"{op} changed only {changed:.0%} of the training samples"
    assert all(0 <= v.min() and v.max() <= 1 for v in got.values())
    for split, stream in (("val", t.val_data), ("test", t.test_data)):
        assert stream.transform is None
        got, want = by_key(stream.epoch(0)), by_key(raw[split].epoch(0))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), split


def test_draws_are_a_pure_function_of_seed_epoch_and_key():
    cfg = load_config(None, ["augment.noise.p=1", "augment.crop.p=0.5", "augment.hflip.p=0.5"]).augment
    x = torch.rand(1, 8, 8)
    aug = Augment(cfg, seed=0)
    rng = torch.get_rng_state()
    a = aug(x, key="train-0000001", epoch=2)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG (dropout's) is never touched
    assert torch.equal(a, Augment(cfg, seed=0)(x, key="train-0000001", epoch=2))
    assert not torch.equal(a, aug(x, key="train-0000001", epoch=3))  # a new draw every epoch
    assert not torch.equal(a, aug(x, key="train-0000002", epoch=2))  # and for every sample
    assert not torch.equal(a, Augment(cfg, seed=1)(x, key="train-0000001", epoch=2))


def test_augmentation_does_not_depend_on_the_worker_that_reads_the_sample(data_root):
    aug = Augment(load_config(None, ["augment.noise.p=1", "augment.crop.p=1"]).augment, seed=0)
    index = read_index(data_root / "digits")
    kw = dict(batch_size=32, rank=0, world_size=1, seed=0, shuffle_buffer=100, train=True, transform=aug)
    inline = by_key(ShardStream(index, "train", num_workers=0, **kw).epoch(1))
    workers = by_key(ShardStream(index, "train", num_workers=2, **kw).epoch(1))
    common = inline.keys() & workers.keys()
    assert len(common) > 1000 and all(torch.equal(inline[k], workers[k]) for k in common)


def test_resume_with_augmentation_and_dropout_is_exact(tmp_path, data_root):
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=2",
        "train.log_every=1",
        "model.kwargs.dropout=0.2",
        "augment.crop.p=0.5",
        "augment.noise.p=0.5",
        "augment.brightness.p=0.5",
        "log.progress=false",
    ]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    run_dtrain(args + ["run.name=resumed", "run.stop_at_step=25"], tmp_path)
    assert "at step 25" in run_dtrain(args + ["run.name=resumed"], tmp_path).stderr

    def curve(name):
        return [(r["step"], r["loss"]) for r in metrics_of(tmp_path / "runs" / name) if "loss" in r]

    assert curve("straight") == curve("resumed") and len(curve("straight")) == 38


def test_preview_png_shows_originals_and_augmented_versions(tmp_path, data_root):
    cfg = load_config(None, [f"data.root={data_root}", "augment.crop.p=1", "augment.noise.p=1", "augment.contrast.p=1"])
    result = augment_preview(cfg.augment, cfg.data, cfg.run.seed, tmp_path / "grid.png", samples=6, versions=3)
    assert result["original"].shape == (6, 1, 8, 8) and len(result["augmented"]) == 3
    for rows in result["augmented"]:
        assert (abs(rows - result["original"]) > 1e-3).any(axis=(1, 2, 3)).all()  # every image changed
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "grid.png")[..., :3]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels.var() > 0.01  # not a blank canvas: dark digits on white
    assert (
        main(["augment-preview", "--out", str(tmp_path / "cli.png"), f"data.root={data_root}", "augment.hflip.p=0.5"])
        == 0
    )
    assert (tmp_path / "cli.png").stat().st_size > 10_000


def test_preview_without_augmentation_is_a_one_line_error(tmp_path, data_root):
    proc = run_dtrain(["augment-preview", f"data.root={data_root}"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "dtrain: error: config: augment: every probability is 0"
    )


def test_train_subset_uses_exactly_the_first_n_samples(tmp_path, data_root):
    index = read_index(data_root / "digits")
    first = [k for _, _, kb in ShardStream(index, "train", batch_size=500, rank=0, world_size=1).epoch(0) for k in kb][
        :300
    ]
    sub = index.subset("train", 300)
    assert sub.num_samples("train") == 300 and sub.num_samples("val") == index.num_samples("val")
    s = ShardStream(sub, "train", batch_size=20, rank=0, world_size=1, seed=1, shuffle_buffer=100, train=True)
    for epoch in (0, 1):
        keys = [k for _, _, kb in s.epoch(epoch) for k in kb]
        assert len(keys) == 300 and set(keys) == set(first)
    result = result_of(
        run_dtrain(
            ["train", f"data.root={data_root}", "data.train_subset=100", "data.batch_size=50", "train.epochs=1"],
            tmp_path,
        )
    )
    assert result["step"] == 2
