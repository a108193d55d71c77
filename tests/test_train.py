"""End-to-end training as a user runs it: real processes, real files."""

import hashlib
import json
import shutil

import pytest
import torch

from conftest import CONFIGS, final_params, metrics_of, result_of, run_dtrain


def test_digits_example_reaches_95_percent(tmp_path, data_root):
    proc = run_dtrain(["train", "--config", str(CONFIGS / "digits.yaml"), f"data.root={data_root}"], tmp_path)
    result = result_of(proc)
    assert result["stop_reason"] == "completed"
    assert result["test/acc"] >= 0.95, result
    run = tmp_path / "runs" / "digits"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "best" / "manifest.json").is_file()
    records = metrics_of(run)
    assert any("val/acc" in r for r in records) and records[-1]["test/acc"] == result["test/acc"]


@pytest.mark.slow
def test_count_example_halves_the_mean_baseline(tmp_path):
    proc = run_dtrain(["train", "--config", str(CONFIGS / "count.yaml")], tmp_path, timeout=600)
    result = result_of(proc)
    assert result["test/mae"] <= 0.5 * result["test/mae_predict_mean"], result


def test_resume_after_stop_continues_the_same_curve(tmp_path, data_root):
    # 5 epochs of 19 steps; the interrupted run stops mid-epoch (step 30) and is run again.
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=5",
        "train.log_every=1",
        "schedule.warmup_steps=10",
        "model.kwargs.dropout=0.2",
        "data.shuffle_buffer=200",
    ]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    stopped = run_dtrain(args + ["run.name=resumed", "run.stop_at_step=30"], tmp_path)
    assert result_of(stopped) == {"step": 30, "stop_reason": "stop_at_step"}
    shutil.copytree(tmp_path / "runs" / "resumed", tmp_path / "runs" / "old", symlinks=True)
    resumed = run_dtrain(args + ["run.name=resumed"], tmp_path)
    assert "resumed from" in resumed.stderr and "at step 30" in resumed.stderr

    def curve(name):
        return [(r["step"], r["loss"], r["lr"]) for r in metrics_of(tmp_path / "runs" / name) if "loss" in r]

    straight, again = curve("straight"), curve("resumed")
    assert [s for s, _, _ in again] == list(range(1, 96))  # no step twice, none missing
    assert again == straight  # same LR and loss at every step, bit for bit on CPU
    a, b = final_params(tmp_path / "runs" / "straight"), final_params(tmp_path / "runs" / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a checkpoint written by the dtrain before stateful parts (format 1: the data position and the skipped
    # updates inside the trainer's entry) resumes the same way
    ckpt = tmp_path / "runs" / "old" / "checkpoints" / "step-00000030"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state.pop("format") == 2
    position = {k: v for k, v in state.pop("data").items() if k not in ("step", "batch")}
    state["trainer"] = {
        "step": 30,
        "steps_per_epoch": 19,
        "data": position,
        "skipped_updates": state.pop("nonfinite")["skipped_updates"],
    }
    del state["stop"]
    torch.save(state, ckpt / "state.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    old = run_dtrain(args + ["run.name=old"], tmp_path)
    assert "at step 30" in old.stderr
    assert curve("old") == straight
    c = final_params(tmp_path / "runs" / "old")
    assert all(torch.equal(a[k], c[k]) for k in a)


WALL_TIME = {"samples_per_s", "tokens_per_s", "step_time_s", "data_wait_frac", "peak_mem_mb", "mfu"}


def test_what_is_logged_after_a_resume_equals_the_uninterrupted_run(tmp_path, data_root):
    """log every 4 steps, interrupted at step 6: the line at step 8 averages steps 5-8 in both runs (after the
    resume it averaged 7-8 alone: the first loss logged differed, #32.8). Every value but wall-time throughput
    is the same, bit for bit."""
    args = [
        "train",
        f"data.root={data_root}",
        "train.max_steps=14",
        "train.log_every=4",
        "train.val_every=5",
        "model.kwargs.dropout=0.2",
        "data.shuffle_buffer=200",
        "schedule.warmup_steps=3",
        "log.progress=false",
    ]
    run_dtrain(args + ["run.name=straight"], tmp_path)
    run_dtrain(args + ["run.name=resumed", "run.stop_at_step=6"], tmp_path)
    run_dtrain(args + ["run.name=resumed"], tmp_path)

    def logged(name):
        return [{k: v for k, v in r.items() if k not in WALL_TIME} for r in metrics_of(tmp_path / "runs" / name)]

    straight, resumed = logged("straight"), logged("resumed")
    assert [r["step"] for r in straight if "loss" in r] == [4, 8, 12, 14]
    assert resumed == straight


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
def test_a_diverged_run_never_says_completed(tmp_path, data_root, nonfinite):
    """optim.lr=1e30 (lr=inf is refused by the config now): SGD's first update takes the weights to 1e29, and
    from there every gradient is NaN; skipped (skip: finite weights that give NaN) or applied (ignore: NaN
    weights). It said "completed" with a NaN test loss, and a rerun "nothing to do" (#32.5)."""
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=1",
        "optim.name=sgd",
        "optim.lr=1e30",
        f"train.nonfinite={nonfinite}",
        "checkpoint.every=5",
        "log.progress=false",
    ]
    for _ in range(2):  # and run again: it resumes from the newest checkpoint and diverges again
        proc = run_dtrain(args, tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert result_of(proc) == {"step": 19 if nonfinite == "skip" else 5, "stop_reason": "nonfinite"}
        assert "the run diverged" in proc.stderr and "nothing to do" not in proc.stderr
        # no command that resumes it as it is (it would diverge again): the stop line says what to change
        assert "resume" not in json.loads((tmp_path / "runs" / "digits" / "summary.json").read_text())
    if nonfinite == "skip":  # saved at steps 5, 10, 15 (finite weights); not at 19
        assert all(torch.isfinite(v).all() for v in final_params(tmp_path / "runs" / "digits").values())
    else:  # NaN at step 2, found at the first save: none
        assert not (tmp_path / "runs" / "digits" / "checkpoints" / "latest").exists()


def test_resume_falls_back_from_a_corrupt_latest_checkpoint(tmp_path, data_root):
    args = [
        "train",
        f"data.root={data_root}",
        "train.epochs=2",
        "checkpoint.every=10",
        "checkpoint.keep_last=5",
        "checkpoint.save_best=false",
        "run.name=r",
    ]
    run_dtrain(args + ["run.stop_at_step=20"], tmp_path)
    ckpts = tmp_path / "runs" / "r" / "checkpoints"
    state = ckpts / "step-00000020" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    proc = run_dtrain(args, tmp_path)
    assert "does not match its checksum" in proc.stderr
    assert "resuming from step-00000010" in proc.stderr and "at step 10" in proc.stderr
    assert result_of(proc)["step"] == 38


def test_debug_runs_a_few_steps_with_detail(tmp_path, data_root):
    proc = run_dtrain(["train", "--debug", f"data.root={data_root}", "train.debug_steps=3"], tmp_path)
    steps = [l for l in proc.stderr.splitlines() if l.startswith("step ") and "grad_norm" in l]
    assert len(steps) == 3 and "batch (64, 1, 8, 8)" in steps[0]
    assert "launch: single" in proc.stderr
    assert not (tmp_path / "runs" / "digits-debug" / "checkpoints").exists()


def test_shard_command_writes_index(tmp_path):
    proc = run_dtrain(["shard", "--dataset", "digits", "--out", "shards", "--shard-size", "100"], tmp_path)
    assert "train: 1257 samples in 13 shards" in proc.stdout
    run = run_dtrain(["train", "data.dataset=folder:shards", "train.epochs=1"], tmp_path)
    assert result_of(run)["stop_reason"] == "completed"


def test_eval_command_prints_metrics(tmp_path, data_root):
    run_dtrain(["train", f"data.root={data_root}", "train.epochs=3"], tmp_path)
    proc = run_dtrain(["eval", "--checkpoint", "runs/digits", "--split", "test"], tmp_path)
    assert "test/acc" in proc.stdout and "step" in proc.stdout


def test_missing_shard_is_one_line(tmp_path, data_root):
    shutil.copytree(data_root / "digits", tmp_path / "d" / "digits")
    next((tmp_path / "d" / "digits").glob("val-*.tar")).unlink()
    proc = run_dtrain(["train", "data.root=d"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dtrain: error: data: missing shard")


@pytest.mark.parametrize("in_memory", [True, False])
def test_eval_batch_size_changes_the_batches_not_the_metrics(data_root, in_memory):
    from dtrain import dist
    from dtrain.build import build_core
    from dtrain.config import load_config

    def evaluate(*overrides):
        cfg = load_config(None, [f"data.root={data_root}", f"data.in_memory={str(in_memory).lower()}", *overrides])
        core = build_core(cfg, dist.setup(force_single=True), log=lambda msg: None)
        sizes = [len(b[1]) for b in core.data.val.epoch(0)]
        return sizes, core.evaluator.evaluate(core.data.val, "val"), core.evaluator.evaluate(core.data.test, "test")

    sizes, *default = evaluate()
    big_sizes, *big = evaluate("data.eval_batch_size=1000", "data.batch_size=32")  # the training batch is not it
    assert sizes[:-1] == [64] * (len(sizes) - 1) and big_sizes == [sum(sizes)]
    for a, b in zip(default, big):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
