"""Losses: Huber, label smoothing, a weighted sum of named terms logged one by one."""

import pytest
import torch

from conftest import metrics_of, result_of, run_dtrain
from dtrain.config import ConfigError, load_config
from dtrain.losses import build_loss


def loss(task, *overrides):
    return build_loss(load_config(None, list(overrides)).loss, task)


def test_regression_losses_match_their_formulas():
    pred, y = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0.5, 1.0, 1.0])
    err = (pred.squeeze(-1) - y).abs()  # 0.5, 0, 4
    assert loss("regression", "loss.name=mse").of(pred, y)["loss"].item() == pytest.approx((err**2).mean().item())
    assert loss("regression", "loss.name=mae").of(pred, y)["loss"].item() == pytest.approx(err.mean().item())
    huber = loss("regression", "loss.name=huber", "loss.huber_delta=2").of(pred, y)["loss"].item()
    assert huber == pytest.approx((0.5 * 0.5**2 + 0 + 2 * (4 - 0.5 * 2)) / 3)  # quadratic below 2, linear above


def test_label_smoothing_mixes_in_the_uniform_distribution():
    logits, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    logp = logits.log_softmax(-1)
    target = torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    got = loss("classification", "loss.label_smoothing=0.1").of(logits, y)["loss"].item()
    assert got == pytest.approx(-(target * logp).sum().item())
    assert loss("classification").of(logits, y)["loss"].item() == pytest.approx(-logp[0, 0].item())


def test_weighted_terms_sum_and_are_reported_separately():
    pred, y = torch.tensor([[0.0], [3.0]]), torch.tensor([1.0, 1.0])
    out = loss("regression", "loss.terms={mse: 1.0, mae: 0.5, huber: 2.0}").of(pred, y)
    assert set(out) == {"loss", "loss/mse", "loss/mae", "loss/huber"}
    assert out["loss/mse"].item() == pytest.approx(2.5) and out["loss/mae"].item() == pytest.approx(1.5)
    assert out["loss"].item() == pytest.approx(2.5 + 0.5 * 1.5 + 2.0 * out["loss/huber"].item())


@pytest.mark.parametrize(
    "task, overrides, message",
    [
        ("classification", ["loss.name=mse"], "loss.name: mse needs a regression data set"),
        ("regression", ["loss.terms={mse: 1, cross_entropy: 1}"], "loss.terms: cross_entropy needs a classification"),
        ("regression", ["loss.name=mae", "loss.terms={mse: 1}"], "loss.name (mae) and loss.terms are both set"),
        ("regression", ["loss.terms={mse: 0}"], "at least one > 0"),
    ],
)
def test_loss_config_errors(task, overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        loss(task, *overrides)
    assert message in str(err.value)


def test_each_term_is_logged_for_train_and_validation(tmp_path):
    proc = run_dtrain(
        [
            "train",
            "data.dataset=count",
            "data.count_samples=300",
            "data.shard_size=100",
            "data.batch_size=30",
            "model.factory=cnn",
            "model.kwargs.channels=[8]",
            "train.epochs=2",
            "train.log_every=2",
            "loss.terms={mse: 1.0, mae: 0.5}",
            "run.name=terms",
        ],
        tmp_path,
    )
    records = metrics_of(tmp_path / "runs" / "terms")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert train and val
    for r in train:
        assert r["loss"] == pytest.approx(r["loss/mse"] + 0.5 * r["loss/mae"], rel=1e-5)
    for r in val:
        assert r["val/loss"] == pytest.approx(r["val/loss/mse"] + 0.5 * r["val/loss/mae"], rel=1e-6)
        assert r["val/loss/mse"] == pytest.approx(r["val/mse"]) and r["val/loss/mae"] == pytest.approx(r["val/mae"])
    assert "test/loss/mae" in result_of(proc)


# ---- an output the built-in loss can't score against the target: one line before training (#32) ------------
@pytest.fixture(scope="module")
def count_root(tmp_path_factory, data_root):
    from dtrain.data import make_builtin

    root = tmp_path_factory.mktemp("count")
    make_builtin("count", root / "count", 250)
    (root / "digits").symlink_to(data_root / "digits")
    return root


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a regression model with 10 outputs: MSE broadcast [B, 10] against [B] and trained, exit 0
        (
            ["data.dataset=count", "model.kwargs.num_outputs=10"],
            "config: loss: the model's output has shape (10,) per sample, the target y () (1 value), which the built-in "
            "loss would broadcast: build the model with 1 output for this regression (a model factory's `num_outputs` "
            "parameter is given it, unless model.kwargs sets one), or set loss.fn",
        ),
        # 5 class scores for 10 classes: cross-entropy's IndexError (`Target 9 is out of bounds`), a traceback
        (
            ["model.kwargs.num_outputs=5"],
            "config: loss: the model gives 5 class scores per sample, the data has 10 classes (data.num_classes): build "
            "the model with 10 outputs",
        ),
    ],
)
def test_an_output_that_does_not_fit_the_target_is_one_line_before_training(
    tmp_path, count_root, monkeypatch, capsys, overrides, message
):
    from dtrain.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", f"data.root={count_root}", "train.max_steps=2", "log.progress=false", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"dtrain: error: {message}"), err
    assert "Traceback" not in err and not (tmp_path / "runs" / "digits" / "checkpoints").exists()


def test_labels_that_are_no_tensor_are_one_line_for_the_built_in_loss():
    from dtrain.batch import default_forward
    from dtrain.build import DataFacts, probe
    from dtrain.metrics import build_metrics

    cfg = load_config(None, [])
    batch = {"x": torch.rand(2, 4), "y": {"digit": torch.tensor([1, 2]), "parity": torch.tensor([1, 0])}}
    with pytest.raises(
        ConfigError,
        match=r"^config: loss: the batch's target y is a dict \(digit, parity\); the "
        r"built-in losses and metrics take one tensor of labels or values",
    ):
        probe(
            torch.nn.Linear(4, 10),
            batch,
            default_forward,
            build_loss(cfg.loss, "classification"),
            build_metrics(cfg.metrics, "classification", None),
            torch.device("cpu"),
            DataFacts("classification", (4,), 10),
            print,
        )


def test_shapes_the_built_in_losses_take():
    from dtrain.losses import check_shapes

    check_shapes(torch.zeros(2, 1), (None, torch.zeros(2)), "regression", 1)  # [B, 1] for [B]
    check_shapes(torch.zeros(2, 3), (None, torch.zeros(2, 3)), "regression", 1)  # several targets a sample
    check_shapes(torch.zeros(2, 8, 50304), (None, torch.zeros(2, 8, dtype=torch.long)), "lm", 50257)  # padded vocab
    with pytest.raises(ConfigError, match=r"output has shape \(8, 100\) per sample, the target y \(7,\): "):
        check_shapes(torch.zeros(2, 8, 100), (None, torch.zeros(2, 7, dtype=torch.long)), "lm", 100)
    with pytest.raises(ConfigError, match="the model gives 100 class scores per token, the data has 256 classes"):
        check_shapes(torch.zeros(2, 8, 100), (None, torch.zeros(2, 8, dtype=torch.long)), "lm", 256)
