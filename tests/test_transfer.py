"""Transfer learning: a new head on a pretrained body, frozen layers left bit-identical, unfreezing later."""

import pytest
import torch

from conftest import final_params, metrics_of, result_of, run_dtrain, run_ranks
from dtrain import dist
from dtrain.checkpoint import CheckpointError
from dtrain.config import ConfigError, load_config
from dtrain.trainer import Trainer


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_root):
    """A 10-class digits run whose best checkpoint the tests start from."""
    cwd = tmp_path_factory.mktemp("source")
    run_dtrain(["train", f"data.root={data_root}", "train.epochs=4", "run.name=digits", "log.progress=false"], cwd)
    state = torch.load(cwd / "runs" / "digits" / "checkpoints" / "best" / "state.pt", weights_only=True)
    return cwd / "runs" / "digits", state["engine"]["model"]


def body(params):
    return {k: v for k, v in params.items() if not k.startswith("head.")}


PARITY = [
    "data.dataset=digits_parity",
    "data.train_subset=200",
    "data.batch_size=50",
    "log.progress=false",
    "train.log_every=1",
]


def test_new_head_trains_and_frozen_body_stays_bit_identical(tmp_path, data_root, source):
    run_dir, pretrained = source
    proc = run_dtrain(
        [
            "train",
            f"data.root={data_root}",
            *PARITY,
            f"model.init_from={run_dir}",
            "model.freeze_all_but_head=true",
            "train.epochs=8",
            "run.name=ft",
        ],
        tmp_path,
    )
    assert "new head (head.weight, head.bias re-initialised)" in proc.stderr
    params = final_params(tmp_path / "runs" / "ft")
    assert params["head.weight"].shape == (2, 64)
    assert body(params).keys() == body(pretrained).keys()
    assert all(torch.equal(params[k], pretrained[k]) for k in body(pretrained))  # bit for bit
    losses = [r["loss"] for r in metrics_of(tmp_path / "runs" / "ft") if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]  # the head learned
    assert result_of(proc)["test/acc"] > 0.8


def test_unfreeze_after_k_steps_with_a_lower_backbone_lr_resumes_exactly(tmp_path, data_root, source):
    run_dir, pretrained = source
    args = [
        "train",
        f"data.root={data_root}",
        *PARITY,
        f"model.init_from={run_dir}",
        "model.freeze=[body]",
        "model.unfreeze_at_step=6",
        "optim.backbone_lr_ratio=0.1",
        "train.epochs=3",
        "checkpoint.every=6",
        "checkpoint.keep_last=5",
        "checkpoint.save_best=false",
        "model.kwargs.dropout=0.1",
    ]
    straight = run_dtrain(args + ["run.name=straight"], tmp_path)
    assert "step 6: unfroze 4 parameter tensors" in straight.stderr
    ckpts = tmp_path / "runs" / "straight" / "checkpoints"
    at_6 = torch.load(ckpts / "step-00000006" / "state.pt", weights_only=True)
    assert all(torch.equal(at_6["engine"]["model"][k], pretrained[k]) for k in body(pretrained))  # still frozen
    final = final_params(tmp_path / "runs" / "straight")
    assert all(not torch.equal(final[k], pretrained[k]) for k in body(pretrained))  # then trained
    groups = at_6["engine"]["optimizer"]["param_groups"]
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([0.0003, 0.003])  # backbone, head

    run_dtrain(args + ["run.name=resumed", "run.stop_at_step=4"], tmp_path)
    run_dtrain(args + ["run.name=resumed"], tmp_path)  # resumes frozen, unfreezes at step 6 as before

    def curve(name):
        return [(r["step"], r["loss"], r["lr"]) for r in metrics_of(tmp_path / "runs" / name) if "loss" in r]

    assert curve("straight") == curve("resumed")
    resumed = final_params(tmp_path / "runs" / "resumed")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["model.freeze=[trunk]"], ConfigError, "model.freeze: no parameter is named 'trunk'"),
        (["model.unfreeze_at_step=3"], ConfigError, "unfreeze_at_step needs something frozen"),
        (["model.init_from=SOURCE", "model.kwargs.hidden=[128, 64, 32]"], ConfigError, "has no 'body.7.weight'"),
        (
            ["model.init_from=SOURCE", "model.kwargs.hidden=[128]"],
            ConfigError,
            "has weights this model lacks (body.4.bias",
        ),
        (["model.init_from=SOURCE", "model.kwargs.hidden=[128, 32]"], ConfigError, "the body must match"),
        (["model.init_from=no/such/run"], CheckpointError, "no/such/run does not exist"),
    ],
)
def test_transfer_config_errors(tmp_path, data_root, source, overrides, error, message):
    overrides = [o.replace("SOURCE", str(source[0])) for o in overrides]
    cfg = load_config(None, [f"data.root={data_root}", f"run.dir={tmp_path}", *overrides])
    with pytest.raises(error) as err:
        Trainer(cfg, dist.setup(force_single=True))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tampered_source_checkpoint_is_refused(tmp_path, data_root, source):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(source[0], copy, symlinks=True)
    state = copy / "checkpoints" / "best" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = run_dtrain(["train", f"data.root={data_root}", f"model.init_from={copy}"], tmp_path, check=False)
    assert proc.returncode == 2 and "does not match its checksum" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_freeze_then_unfreeze_like_one_rank(tmp_path, source):
    # DDP fixes the parameters it all-reduces when it wraps the model, so unfreezing must re-wrap it on
    # every rank; otherwise each rank would step its body with its own gradients. One global batch of 256 is
    # the whole epoch (as in test_distributed.py), so 2 ranks x 128 must match 1 rank x 256. SGD, not Adam:
    # Adam blows float noise in near-zero gradients of a pretrained body up to full-size steps.
    from dtrain.data.datasets import digits
    from dtrain.data.shards import write_shards

    splits, meta = digits()
    (x, y) = splits["train"]
    data = tmp_path / "full"
    write_shards(
        data,
        {"train": (x[:256], y[:256]), "val": (x[256:384], y[256:384]), "test": (x[384:512], y[384:512])},
        meta,
        shard_size=64,
    )
    common = [
        "train",
        f"data.dataset=folder:{data}",
        f"model.init_from={source[0]}",
        "model.freeze_all_but_head=true",
        "model.unfreeze_at_step=3",
        "train.epochs=8",
        "data.shuffle_buffer=0",
        "optim.name=sgd",
        "optim.lr=0.05",
        "log.progress=false",
    ]
    run_dtrain(common + ["data.batch_size=256", "run.name=one"], tmp_path)
    two = run_ranks(2, common + ["data.batch_size=128", "run.name=two"], tmp_path)
    assert "world_size=2" in two.stderr and "step 3: unfroze" in two.stderr
    a, b = final_params(tmp_path / "runs" / "one"), final_params(tmp_path / "runs" / "two")
    assert all(not torch.equal(a[k], source[1][k]) for k in body(source[1]))  # the body did train
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), max(
        (a[k] - b[k]).abs().max().item() for k in a
    )


def test_a_pointer_that_leads_out_of_its_run_is_refused(tmp_path, data_root):
    """#32.7: a `best` or `latest` pointer to another run's checkpoint was used by `dtrain eval` silently, and
    the path it printed was not in the run. A pointer names a step directory of its own run, or is refused."""
    import shutil

    from dtrain.models.transfer import resolve_checkpoint

    run_dtrain(
        [
            "train",
            f"data.root={data_root}",
            "train.max_steps=2",
            "data.train_subset=64",
            "run.doctor=false",
            "log.progress=false",
            "run.name=a",
        ],
        tmp_path,
    )
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b", symlinks=True)
    ckpts = tmp_path / "runs" / "b" / "checkpoints"
    step = (ckpts / "latest").resolve().name
    shutil.rmtree(ckpts / step)
    for target in (f"../../a/checkpoints/{step}", str(tmp_path / "runs" / "a" / "checkpoints" / step)):
        for name in ("best", "latest"):
            (ckpts / name).unlink(missing_ok=True)
        (ckpts / "best").symlink_to(target)
        proc = run_dtrain(["eval", "--checkpoint", "runs/b"], tmp_path, check=False)
        said = [line for line in proc.stderr.splitlines() if line.startswith("dtrain: error:")]
        assert proc.returncode == 2 and said == [
            f"dtrain: error: checkpoint: runs/b/checkpoints/best points outside its run's checkpoints ({target}); "
            "remove it, or give the checkpoint you mean by its own path"
        ], proc.stderr[-2000:]
        with pytest.raises(CheckpointError, match="points outside its run's checkpoints"):
            resolve_checkpoint(ckpts / "best")  # the pointer given itself (eval --checkpoint, model.init_from)
    (ckpts / "best").unlink()
    (ckpts / step).symlink_to(tmp_path / "runs" / "a" / "checkpoints" / step)  # a step directory linked out
    (ckpts / "latest").symlink_to(step)
    with pytest.raises(CheckpointError, match="points outside its run's checkpoints"):
        resolve_checkpoint(tmp_path / "runs" / "b")
