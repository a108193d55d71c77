"""dtrain.load_model and FitResult.load_model (#34.5): the trained nn.Module back from its checkpoint, a user's
factory only from the user's own code."""

import math

import pytest
import torch

import dtrain
from dtrain.checkpoint import CheckpointError
from dtrain.build import Hooks
from dtrain.load import rebuild


def build_model(input_shape, num_outputs, hidden=32):  # a user's factory, handed in as dtrain.main's model=
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(math.prod(input_shape), hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, num_outputs),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A digits run of the user's factory, trained and tested in this process."""
    where = tmp_path_factory.mktemp("load")
    result = dtrain.fit(
        [
            f"data.root={data_root}",
            f"run.dir={where}",
            "run.name=user",
            "log.progress=false",
            "train.epochs=1",
            "data.batch_size=64",
        ],
        model=build_model,
    )
    assert result.exit_code == 0 and result.best_checkpoint is not None
    return result


def _test_accuracy(model, checkpoint) -> float:
    """The model's accuracy over the run's test split, read as the run read it."""
    stream = rebuild(checkpoint, Hooks(model=build_model)).streams.test
    right = n = 0
    with torch.inference_mode():
        for x, y, _ in stream.epoch(0):
            right += int((model(x).argmax(-1) == y).sum())
            n += len(y)
    return right / n


def test_load_model_returns_the_trained_weights_in_eval_mode(run):
    model = dtrain.load_model(run.best_checkpoint, model=build_model)
    stored = torch.load(run.best_checkpoint / "state.pt", weights_only=True)["engine"]["model"]
    assert isinstance(model, torch.nn.Sequential) and not model.training
    assert model.state_dict().keys() == stored.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    # its predictions are the run's: the test split's accuracy is the one the run measured with the best weights
    assert _test_accuracy(model, run.best_checkpoint) == pytest.approx(run.metrics["test/acc"], abs=1e-12)


def test_a_stored_user_factory_is_refused_without_the_users_own(run):
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint: .* asks to run model.factory=test_load_model:build_model"
        r".*pass --trust-checkpoint-code",
    ) as e:
        dtrain.load_model(run.best_checkpoint)
    assert "\n" not in str(e.value)
    # named by the user, or the file trusted: built
    named = dtrain.load_model(run.run_dir, overrides=["model.factory=test_load_model:build_model"])
    trusted = dtrain.load_model(run.best_checkpoint, trust_checkpoint_code=True)
    assert torch.equal(named[1].weight, trusted[1].weight)


def test_fit_result_leads_to_the_model_in_one_call(run):
    model = run.load_model(model=build_model)
    reference = dtrain.load_model(run.best_checkpoint, model=build_model)
    x = torch.rand(5, 8, 8)
    assert torch.equal(model(x), reference(x)) and not model.training


def test_weights_that_do_not_fit_the_factory_are_one_line(run):
    fix = "build it with the factory and model.kwargs that trained it"
    with pytest.raises(
        CheckpointError,
        match=rf"^checkpoint: .*weights do not fit the model built for it .*size "
        rf"mismatch.*; {fix}",
    ):
        dtrain.load_model(run.best_checkpoint, model=build_model, overrides=["model.kwargs.hidden=16"])


def test_an_exported_file_loads_the_same_model(run, tmp_path):
    from conftest import run_dtrain

    run_dtrain(["export", "--checkpoint", str(run.best_checkpoint), "--out", "model.pt"], tmp_path)
    exported = dtrain.load_model(tmp_path / "model.pt", model=build_model)
    reference = dtrain.load_model(run.best_checkpoint, model=build_model)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in reference.state_dict().items())
