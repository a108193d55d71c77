"""The README's example pairs, run as shipped: their claims must keep holding."""

import os

import pytest

from conftest import CONFIGS, REPO, result_of, run_dtrain

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


# ---- text classification (configs/snippets.yaml, examples/snippets_script.py): string fields and a collate ----
SNIPPETS = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "examples")])}


def test_text_snippet_example_learns_from_the_config(tmp_path):
    """The config route as the README runs it, shorter: shards from wds.TarWriter, `.txt` read as strings,
    hashed into tokens by examples/snippets.py's collate, a BERT from a small config (README: 12 epochs)."""
    import subprocess
    import sys
    from conftest import _env
    subprocess.run([sys.executable, "-m", "snippets", "data/snippets"], cwd=tmp_path, env=_env(SNIPPETS), check=True,
                   capture_output=True, timeout=300)
    proc = run_dtrain(["train", "--config", str(CONFIGS / "snippets.yaml"), "log.progress=false", "train.epochs=4"],
                      tmp_path, env=SNIPPETS, timeout=600)
    result = result_of(proc)
    assert result["step"] == 200 and result["test/f1"] > 0.45, result  # 4 classes: chance is 0.25; 0.61 seen


@pytest.mark.multiproc
def test_text_snippet_script_on_two_ranks_resumes_exactly_after_sigterm(tmp_path):
    """The script route under torchrun: hooks handed in on 2 ranks (start-up check on), stopped by SIGTERM
    on one rank and resumed, against an uninterrupted run: the same weights and the same test metrics."""
    import json
    import signal
    import uuid
    import torch
    from conftest import final_params, latest_logged_step, run_torchrun, start, torchrun_cmd, wait_for, workers
    script = REPO / "examples" / "snippets_script.py"
    args = ["log.progress=false", "train.log_every=1", "checkpoint.every=5", "train.max_steps=30",
            "train.val_every=15"]
    straight = run_torchrun(2, args + ["run.name=straight"], tmp_path, script=script)
    assert "world_size=2" in straight.stderr and "ok    shards" in straight.stderr
    expected = result_of(straight)

    tag, run = uuid.uuid4().hex, tmp_path / "runs" / "r"
    proc = start(torchrun_cmd(2, args + ["run.name=r"], script=script), tmp_path, tag)
    wait_for(lambda: latest_logged_step(run) >= 8, timeout=300, what="step 8")
    os.kill(workers(tag, needle=script.name.encode())[1], signal.SIGTERM)  # one rank: all of them stop
    out, err = proc.communicate(timeout=300)  # rank 0 exits 75; torchrun says 1 for any rank's non-zero exit
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stop_reason"] == "signal:SIGTERM" and stopped["step"] < 30, err[-3000:]
    resumed = run_torchrun(2, args + ["run.name=r"], tmp_path, script=script)
    assert "resumed from" in resumed.stderr
    assert result_of(resumed) == expected  # test loss, accuracy and the torchmetrics F1, to the last bit
    a, b = final_params(tmp_path / "runs" / "straight"), final_params(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
