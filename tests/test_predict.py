"""dtrain predict (#34.5): a checkpoint's model over shards on N ranks, each sample once, outputs keyed by sample
key, resumable after SIGTERM with no duplicate and nothing missing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import webdataset as wds

import dtrain
from conftest import _env, run_dtrain, run_ranks
from dtrain.load import rebuild
from dtrain.predict import read_keys


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A digits run of dtrain's own mlp, trained in this process: its directory and its test descriptor."""
    where = tmp_path_factory.mktemp("predict")
    result = dtrain.fit(
        [
            f"data.root={data_root}",
            f"run.dir={where}",
            "run.name=mlp",
            "log.progress=false",
            "train.epochs=1",
            "data.batch_size=64",
        ]
    )
    assert result.exit_code == 0
    return result.run_dir, data_root / "digits" / "test.json"


@pytest.fixture(scope="module")
def expected(run):
    """{key: logits} of load_model's forward over every test sample (read as the run read its test split)."""
    model = dtrain.load_model(run[0])
    out = {}
    with torch.inference_mode():
        for x, _, keys in rebuild(run[0]).streams.test.epoch(0):
            out.update(zip(keys, model(x)))
    return out


def outputs(out) -> dict:
    """{key: [every output row under that key]} of the parts under `out` (JSON lines or tar shards)."""
    rows: dict = {}
    for part in sorted(out.glob("part-*")):
        if part.suffix == ".jsonl":
            for line in part.read_text().splitlines():
                record = json.loads(line)
                rows.setdefault(record["__key__"], []).append((record["output"], record["pred"]))
        else:
            for sample in wds.WebDataset(str(part), shardshuffle=False).decode():
                rows.setdefault(sample["__key__"], []).append((sample["output.npy"].tolist(), sample["pred.cls"]))
    return rows


def check_once(out, expected) -> None:
    """Every test sample exactly once, with load_model's output for it and its argmax."""
    rows = outputs(out)
    assert rows.keys() == expected.keys()
    assert all(len(v) == 1 for v in rows.values()), [k for k, v in rows.items() if len(v) > 1][:3]
    for key, [(row, pred)] in rows.items():
        assert torch.allclose(torch.tensor(row), expected[key], atol=1e-5), key
        assert pred == int(expected[key].argmax())
    assert json.loads((out / "predict.json").read_text())["complete"] is True


def test_predict_in_one_process_writes_every_key_once(run, expected, tmp_path):
    run_dir, test = run
    proc = run_dtrain(
        ["predict", "--checkpoint", str(run_dir), "--data", str(test), "--out", "out", "--part-size", "100"], tmp_path
    )
    check_once(tmp_path / "out", expected)
    assert len(list((tmp_path / "out").glob("part-rank00000-*.jsonl"))) == 3  # 271 samples: 128, 128, 15 (batch 64)
    assert f"predict: {len(expected)} outputs in out (" in proc.stdout and "samples/s on 1 rank)" in proc.stdout
    umask = os.umask(0)
    os.umask(umask)
    for written in (tmp_path / "out").iterdir():  # as open() makes files, not mkstemp's 0600
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written


def test_predict_on_two_ranks_writes_every_key_once(run, expected, tmp_path):
    run_dir, test = run
    run_ranks(
        2,
        [
            "predict",
            "--checkpoint",
            str(run_dir),
            "--data",
            str(test),
            "--out",
            "out",
            "--format",
            "tar",
            "--part-size",
            "64",
        ],
        tmp_path,
    )
    check_once(tmp_path / "out", expected)
    by_rank = Counter(p.name[:14] for p in (tmp_path / "out").glob("part-*.tar"))
    assert by_rank == {"part-rank00000": 3, "part-rank00001": 3}  # 136 and 135 samples each
    # a part lost (never committed): the same command on another number of ranks computes only its samples
    (tmp_path / "out" / "part-rank00001-000001.tar").unlink()
    proc = run_dtrain(
        ["predict", "--checkpoint", str(run_dir), "--data", str(test), "--out", "out", "--format", "tar"], tmp_path
    )
    check_once(tmp_path / "out", expected)
    assert f"predict: {len(expected)} outputs in out (64 samples in " in proc.stdout


def test_another_checkpoint_or_data_into_the_same_out_is_one_line(run, tmp_path):
    run_dir, test = run
    run_dtrain(["predict", "--checkpoint", str(run_dir), "--data", str(test), "--out", "out"], tmp_path)
    proc = run_dtrain(
        ["predict", "--checkpoint", str(run_dir), "--data", str(test.parent / "val.json"), "--out", "out"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"predict: --out out holds the outputs of data '{test}', not '{test.parent / 'val.json'}'; give a new --out "
            "(or remove that one) to start over"
        )
    )


def test_a_key_twice_in_the_outputs_fails_the_final_check(run, tmp_path):
    run_dir, test = run
    args = ["predict", "--checkpoint", str(run_dir), "--data", str(test), "--out", "out", "--part-size", "100"]
    run_dtrain(args, tmp_path)
    out = tmp_path / "out"
    shutil.copy(out / "part-rank00000-000001.jsonl", out / "part-rank00001-000000.jsonl")  # 128 keys twice
    proc = run_dtrain(args, tmp_path, check=False)
    assert proc.returncode == 2
    assert "predict: out holds 128 keys more than once (first 'test-0000128') of --data" in proc.stderr


SLOW = """import time

def forward(model, batch):  # a slow model: the predict is still running when the test signals it
    time.sleep(0.1)
    return model(batch[0])
"""


def interrupt_then_finish(launcher: list[str], run, expected, tmp_path) -> None:
    """`LAUNCHER predict ...` SIGTERMed once its first part is written exits 75 with some keys written once; the
    same command again exits 0 with every key exactly once, computing only the rest."""
    run_dir, test = run
    (tmp_path / "slow.py").write_text(SLOW)
    cmd = [
        *launcher,
        "predict",
        "--checkpoint",
        str(run_dir),
        "--data",
        str(test),
        "--out",
        "out",
        "--part-size",
        "16",
        "data.eval_batch_size=8",
        "model.forward=slow:forward",
    ]
    env = _env({"PYTHONPATH": str(tmp_path)})
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "out").glob("part-*.jsonl")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # a launcher forwards it to every rank
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr
    assert "predict: stopped by a signal" in stdout and "run the same command again to go on" in stdout
    first = Counter(read_keys(tmp_path / "out"))
    assert 0 < len(first) < len(expected) and set(first.values()) == {1}
    again = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert again.returncode == 0, again.stderr
    check_once(tmp_path / "out", expected)
    assert f"predict: {len(expected)} outputs in out ({len(expected) - len(first)} samples in " in again.stdout
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temporary part left


def test_sigterm_mid_predict_exits_75_and_the_same_command_finishes_exactly_once(run, expected, tmp_path):
    interrupt_then_finish([sys.executable, "-m", "dtrain"], run, expected, tmp_path)


@pytest.mark.multiproc
def test_sigterm_to_dtrain_launch_of_two_ranks_exits_75_and_the_same_command_finishes(run, expected, tmp_path):
    interrupt_then_finish([sys.executable, "-m", "dtrain", "launch", "--nproc-per-node", "2"], run, expected, tmp_path)


def test_unlabelled_shards_without_a_descriptor_of_dtrains_are_scaled_as_the_run_was(run, expected, tmp_path):
    """Data to predict has no labels, and shards indexed by `dtrain index` no x_scale: the run's is used (the
    raw pixels would give other logits, exit 0)."""
    run_dir, test = run
    tars = [test.parent / u["url"] for u in json.loads(test.read_text())["shardlist"]]
    with wds.TarWriter(str(tmp_path / "bare.tar")) as sink:
        for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):
            sink.write({"__key__": sample["__key__"], "x.npy": sample["x.npy"]})  # no y.cls
    run_dtrain(["index", "bare.tar", "--out", "bare.json"], tmp_path)
    run_dtrain(["predict", "--checkpoint", str(run_dir), "--data", "bare.json", "--out", "out"], tmp_path)
    check_once(tmp_path / "out", expected)


SCRIPT = """import math

import torch
import dtrain


def build_model(input_shape, num_outputs):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), num_outputs))


if __name__ == "__main__":
    dtrain.main(model=build_model, config={"run.name": "script", "train.max_steps": 4, "log.progress": False})
"""


def test_a_scripts_model_is_predicted_by_the_script(tmp_path, data_root):
    from conftest import _run_here

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    assert _run_here([f"data.root={data_root}"], tmp_path, None, script=script).returncode == 0
    args = ["predict", "--checkpoint", "runs/script", "--data", str(data_root / "digits" / "val.json"), "--out"]
    proc = _run_here([*args, "out"], tmp_path, None, script=script)
    assert proc.returncode == 0 and "predict: 269 outputs in out" in proc.stdout, proc.stderr[-2000:]
    # dtrain's own command can't rebuild it: one line saying how
    proc = run_dtrain([*args, "out2"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "'s model was built by a script's own __main__:build_model; hand it in: load_model(..., model=build_model), "
        "or run that script's predict command"
    ), proc.stderr[-2000:]
