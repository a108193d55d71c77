"""The README's example pairs, run as shipped: their claims must keep holding."""

import os

import pytest

from conftest import CONFIGS, REPO, result_of, run_dtrain

pytestmark = pytest.mark.slow


def test_dropout_and_augmentation_generalise_better_than_the_overfit_run(tmp_path, data_root):
    results = {
        name: result_of(
            run_dtrain(
                ["train", "--config", str(CONFIGS / f"{name}.yaml"), f"data.root={data_root}", "log.progress=false"],
                tmp_path,
            )
        )
        for name in ("overfit", "regularized")
    }
    assert results["overfit"]["stop_reason"] == "early_stop"
    assert results["regularized"]["test/acc"] > results["overfit"]["test/acc"] + 0.02, results


def test_fine_tuning_beats_training_from_scratch_on_40_images(tmp_path, data_root):
    run_dtrain(
        ["train", "--config", str(CONFIGS / "digits.yaml"), f"data.root={data_root}", "log.progress=false"], tmp_path
    )
    results = {
        name: result_of(
            run_dtrain(
                ["train", "--config", str(CONFIGS / f"{name}.yaml"), f"data.root={data_root}", "log.progress=false"],
                tmp_path,
            )
        )
        for name in ("finetune_parity", "parity_scratch")
    }
    assert results["finetune_parity"]["test/acc"] > results["parity_scratch"]["test/acc"] + 0.02, results
    assert results["finetune_parity"]["test/loss"] < results["parity_scratch"]["test/loss"], results


def test_two_class_photo_example_learns(tmp_path):
    """configs/photos.yaml as the README runs it: real photographs as an image folder, sharded as jpg + cls,
    decoded by webdataset, augmented by a user transform, a Hugging Face ResNet from random initialisation."""
    import os
    from conftest import REPO

    proc = run_dtrain(
        ["train", "--config", str(CONFIGS / "photos.yaml"), "log.progress=false"],
        tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "examples")])},
        timeout=600,
    )
    result = result_of(proc)
    assert result["step"] == 168 and result["test/acc"] >= 0.9, result  # README: 98.0%
    classes = (tmp_path / "data" / "photos" / "train.json").read_text()
    assert '"china"' in classes and '"flower"' in classes


# ---- text classification (configs/snippets.yaml, examples/snippets_script.py): string fields and a collate ----
SNIPPETS = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "examples")])}


def test_text_snippet_example_learns_from_the_config(tmp_path):
    """The config route as the README runs it, shorter: shards from wds.TarWriter, `.txt` read as strings,
    hashed into tokens by examples/snippets.py's collate, a BERT from a small config (README: 12 epochs)."""
    import subprocess
    import sys
    from conftest import _env

    subprocess.run(
        [sys.executable, "-m", "snippets", "data/snippets"],
        cwd=tmp_path,
        env=_env(SNIPPETS),
        check=True,
        capture_output=True,
        timeout=300,
    )
    proc = run_dtrain(
        ["train", "--config", str(CONFIGS / "snippets.yaml"), "log.progress=false", "train.epochs=4"],
        tmp_path,
        env=SNIPPETS,
        timeout=600,
    )
    result = result_of(proc)
    assert result["step"] == 200 and result["test/f1"] > 0.45, result  # 4 classes: chance is 0.25; 0.61 seen


# The script route on 2 ranks, stopped by SIGTERM and resumed to the same weights and test metrics: the
# (script, torchrun, text, resume) cell of tests/test_matrix.py.
