"""The README's example pairs, run as shipped: their claims must keep holding."""

import pytest

from conftest import CONFIGS, result_of, run_dtrain

pytestmark = pytest.mark.slow


def test_dropout_and_augmentation_generalise_better_than_the_overfit_run(tmp_path, data_root):
    results = {name: result_of(run_dtrain(["train", "--config", str(CONFIGS / f"{name}.yaml"),
                                           f"data.root={data_root}", "log.progress=false"], tmp_path))
               for name in ("overfit", "regularized")}
    assert results["overfit"]["stop_reason"] == "early_stop"
    assert results["regularized"]["test/acc"] > results["overfit"]["test/acc"] + 0.02, results


def test_fine_tuning_beats_training_from_scratch_on_40_images(tmp_path, data_root):
    run_dtrain(["train", "--config", str(CONFIGS / "digits.yaml"), f"data.root={data_root}", "log.progress=false"],
               tmp_path)
    results = {name: result_of(run_dtrain(["train", "--config", str(CONFIGS / f"{name}.yaml"),
                                           f"data.root={data_root}", "log.progress=false"], tmp_path))
               for name in ("finetune_parity", "parity_scratch")}
    assert results["finetune_parity"]["test/acc"] > results["parity_scratch"]["test/acc"] + 0.02, results
    assert results["finetune_parity"]["test/loss"] < results["parity_scratch"]["test/loss"], results


def test_two_class_photo_example_learns(tmp_path):
    """configs/photos.yaml as the README runs it: real photographs as an image folder, sharded as jpg + cls,
    decoded by webdataset, augmented by a user transform, a Hugging Face ResNet from random initialisation."""
    import os
    from conftest import REPO
    proc = run_dtrain(["train", "--config", str(CONFIGS / "photos.yaml"), "log.progress=false"], tmp_path,
                      env={"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "examples")])}, timeout=600)
    result = result_of(proc)
    assert result["step"] == 168 and result["test/acc"] >= 0.9, result  # README: 98.0%
    classes = (tmp_path / "data" / "photos" / "train.json").read_text()
    assert '"china"' in classes and '"flower"' in classes
