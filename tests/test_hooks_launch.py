"""Issue #34's points on 2 ranks, each run stopped by a SIGTERM ((a)'s through `dtrain launch`) and resumed, in
as few real runs as cover them (a launch costs ~10 s of imports on 2 cores; the uninterrupted references are
ranks forked from the warm rank server, run_ranks, which train the same bits as the launcher's workers).

(a) A regression from a config alone on shards written by webdataset's TarWriter (png + json, the label from
    `json#/count`, point 4), the best checkpoint decided by early_stop.monitor=val/mae with a patience (point 1),
    RAdam and OneCycleLR by import string with their kwargs (point 2), a callback by import string recording its
    events on every rank, with a state each rank resumes (point 3). SIGTERM to the launcher at the first validation
    that does not improve on the best (the patience counts it), then the printed resume command: final weights,
    per-step losses and LRs, validations (val/best_mae), the early stop and sample keys equal the uninterrupted
    run's (exact), the launcher left no worker behind and the rank logs hold both launches (this is also
    `dtrain launch`'s own SIGTERM-and-the-same-command test, once tests/test_launcher.py's); the best value and
    patience are checked in the interrupted checkpoint and, through val/best_mae and the early stop, after it.
    The interrupted checkpoint also resumes on 1 rank: continuous, not bit-identical (the batches are composed
    otherwise, as in tests/test_elastic.py), so checked are its step count, every LR (OneCycleLR's state) and
    RAdam's own step count (the optimizer's state). Then `dtrain export --format safetensors`, dtrain.load_model
    and dtrain predict on it (point 5; predict's own SIGTERM under dtrain launch is tests/test_predict.py's).
(b) A causal LM from a config alone (data.task=lm, Hugging Face's GPT2LMHeadModel of a tiny config) on token
    shards written by TarWriter (point 7), SIGTERM to each rank, stopped and resumed on forked ranks (the
    launcher's forwarding of the signal and its resume command are (a)'s: a launch here cost ~10 s more),
    exact; `dtrain export --format hf` loads with AutoModelForCausalLM.from_pretrained with load_model's logits,
    and the summary's `dtrain eval` command with key=value overrides (data.val, data.eval_batch_size) gives the
    metrics computed here by hand.
Plus, in this process, the fix these runs found: load_model and predict no longer ask for the optimizer's,
schedule's and callbacks' import strings, and a safetensors export given to them is said to be one.
"""

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
import webdataset as wds

import dtrain
from dtrain.checkpoint import CheckpointError
from dtrain.load import rebuild
from conftest import (
    REPO,
    _env,
    final_params,
    key_log,
    metrics_of,
    result_of,
    run_dtrain,
    run_ranks,
    start,
    wait_for,
    workers,
)
from test_lm_config import HF, VOCAB, write_tokens
from test_optimizers import onecycle_lrs

# A callback by import string (run.callbacks=[hookcb:Recorder]): each event on each rank, one JSON line in
# events-RANK.jsonl of the run directory, and a state (the steps it saw). Where the test sets HOOK_GATE (a
# directory), it also paces the steps (20 ms each: the ranks then compare their stop flags every step or two, so
# a stop comes within a few steps) and, at step HOOK_GATE_STEP, says it is there and waits for the test's `go`:
# the SIGTERM lands at a known step. Where it sets HOOK_SIGTERM_STEP, it paces the steps alike and at that step
# sends its own process SIGTERM (a real signal, to every rank at the same step, as a launcher forwards it).
CALLBACK = """import json, os, signal, time
from pathlib import Path


class Recorder:
    def __init__(self):
        self.gate, self.at = os.environ.get("HOOK_GATE"), int(os.environ.get("HOOK_GATE_STEP", 0))
        self.sigterm_at = int(os.environ.get("HOOK_SIGTERM_STEP", 0))
        self.steps = 0  # this rank's steps over the whole run: its state, resumed from rank-N.pt

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def say(self, *event):
        with open(self.out, "a") as f:
            f.write(json.dumps(event) + "\\n")

    def on_train_start(self, run):
        self.rank, self.out = run.global_rank, Path(run.run_dir) / f"events-{run.global_rank}.jsonl"
        self.say("start", run.step, run.world_size, run.total_steps)

    def on_step_end(self, step, loss):
        self.steps += 1
        self.say("step", step)
        if self.sigterm_at:
            time.sleep(0.02)
            if step == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
        if self.gate:
            time.sleep(0.02)
            if step == self.at:
                Path(self.gate, f"at-{self.rank}").touch()
                deadline = time.monotonic() + 120  # a test that failed meanwhile leaves no rank waiting for ever
                while not Path(self.gate, "go").exists() and time.monotonic() < deadline:
                    time.sleep(0.02)

    def on_validation_end(self, step, metrics):
        self.say("val", step, metrics)

    def on_checkpoint(self, path, step, best):
        self.say("checkpoint", step, best)

    def on_train_end(self, result):
        self.say("end", result.stop_reason, result.step, result.monitor, result.best_step, result.best_metrics,
                 str(result.best_checkpoint), self.steps)
"""


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict:
    """The environment of the runs: this checkout's dtrain (an env's PYTHONPATH replaces conftest._env's), then the
    callback's module."""
    where = tmp_path_factory.mktemp("usercode")
    (where / "hookcb.py").write_text(CALLBACK)
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(where)])}


def launch_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dtrain", "launch", "--nproc-per-node", "2", *args]


def interrupt(args: list[str], cwd, run_dir, env: dict, at: int):
    """`dtrain launch --nproc-per-node 2 ARGS`, SIGTERMed (the launcher only: it forwards the signal) while both
    ranks wait at step `at`; both ranks received it before they go on: exit 75, stopped by the signal, and no
    worker left behind."""
    gate, tag = cwd / f"gate-{uuid.uuid4().hex}", uuid.uuid4().hex
    gate.mkdir()
    proc = start(launch_cmd(args), cwd, tag, env={**env, "HOOK_GATE": str(gate), "HOOK_GATE_STEP": str(at)})
    try:
        wait_for(
            lambda: all((gate / f"at-{r}").exists() for r in (0, 1)) or proc.poll() is not None,
            timeout=240,
            what=f"both ranks at step {at}",
        )
        assert proc.poll() is None, proc.communicate()
        assert (run_dir / "checkpoints" / "latest").exists()  # the signal comes after a checkpoint
        proc.send_signal(signal.SIGTERM)
        logs = [run_dir / "logs" / f"rank-{r}.log" for r in (0, 1)]
        wait_for(
            lambda: all(p.exists() and "SIGTERM received" in p.read_text() for p in logs),
            timeout=60,
            what="both ranks to receive the SIGTERM",
        )
        (gate / "go").touch()
        out, err = proc.communicate(timeout=180)
    finally:
        (gate / "go").touch()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, f"exit {proc.returncode}\n{out}\n{err}"
    assert "launch: SIGTERM received: the workers saved and stopped" in err and "Traceback" not in err, err
    assert json.loads(out.strip().splitlines()[-1])["stop_reason"] == "signal:SIGTERM"
    assert not workers(tag, needle=b"dtrain.worker")  # the launcher's workers (not its tee processes) ended too


def events(run_dir, rank: int) -> list[list]:
    return [json.loads(line) for line in (run_dir / f"events-{rank}.jsonl").read_text().splitlines()]


def of_kind(evs: list[list], kind: str) -> list[list]:
    return [e[1:] for e in evs if e[0] == kind]


def pointer(run_dir, name: str) -> int:
    return int(os.readlink(run_dir / "checkpoints" / name).rsplit("-", 1)[1])


def state_of(run_dir, pointer_name: str = "latest") -> dict:
    return torch.load(run_dir / "checkpoints" / pointer_name / "state.pt", weights_only=True)


def replay(validations: list[dict], key: str) -> dict:
    """The evaluator's state (mode min, evaluate.Evaluator.state_dict) after these validations, from their values."""
    best_val, best_step, bad = float("inf"), -1, 0
    for r in validations:
        best_val, best_step, bad = (r[key], r["step"], 0) if r[key] < best_val else (best_val, best_step, bad + 1)
    return {"best_val": best_val, "best_step": best_step, "bad_validations": bad}


def validations(run_dir) -> list[dict]:
    return [r for r in metrics_of(run_dir) if "val/loss" in r]


def training(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in metrics_of(run_dir) if "lr" in r]


# ---- (a) json labels, monitor, RAdam + OneCycleLR, a callback; export, load_model, predict ----------------------
def write_counts(root, split: str, n: int, seed: int, per_shard: int = 48):
    """8x8 grey PNGs of `count` white pixels, {"count": count} in a json member, by webdataset's TarWriter;
    counted by dtrain index. -> the descriptor."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = [root / f"{split}-{s}.tar" for s in range(n // per_shard)]
    for s, shard in enumerate(shards):
        with wds.TarWriter(str(shard)) as sink:
            for i in range(per_shard):
                count = int(rng.integers(0, 10))
                image = np.zeros(64, np.uint8)
                image[rng.choice(64, count, replace=False)] = 255
                png = io.BytesIO()
                Image.fromarray(image.reshape(8, 8)).save(png, format="PNG")
                sink.write(
                    {
                        "__key__": f"{split}{s}-{i:03d}",
                        "png": png.getvalue(),
                        "json": json.dumps({"count": count}).encode(),
                    }
                )
    from dtrain.cli import main

    assert main(["index", *map(str, shards), "--out", str(root / f"{split}.json")]) == 0
    return root / f"{split}.json"


LR = 0.5  # high for this model: val/mae falls, rises for a few validations after step ~14, falls again
TOTAL = 48  # 192 samples, global batch 16: 12 steps an epoch, 4 epochs
RADAM_ONECYCLE = [
    "optim.name=torch.optim:RAdam",
    "optim.kwargs={eps: 1.0e-7}",
    f"optim.lr={LR}",
    "schedule.name=torch.optim.lr_scheduler:OneCycleLR",
    "schedule.kwargs={pct_start: 0.25}",
]


def counts_args(data) -> list[str]:
    return [
        "train",
        f"data.train={data / 'train.json'}",
        f"data.val={data / 'val.json'}",
        f"data.test={data / 'val.json'}",
        'data.sample={x: png, y: "json#/count"}',
        "data.image=l",
        "data.task=regression",
        "data.batch_size=8",
        "model.factory=mlp",
        "model.kwargs.hidden=[32]",
        *RADAM_ONECYCLE,
        "early_stop.monitor=val/mae",
        "early_stop.mode=min",
        "early_stop.patience=3",
        "train.epochs=4",
        "train.val_every=2",
        "checkpoint.every=6",
        "train.log_every=1",
        "log.progress=false",
        "log.sample_keys=true",
        "run.callbacks=[hookcb:Recorder]",
        "run.doctor=false",
        "run.name=r",
    ]


@pytest.mark.slow
@pytest.mark.multiproc
def test_monitor_optimizer_json_labels_and_a_callback_resume_through_a_sigterm(tmp_path, user_env):
    data, env = tmp_path / "data", user_env
    write_counts(data, "train", 192, seed=0)
    write_counts(data, "val", 96, seed=1)
    args = counts_args(data)
    straight = tmp_path / "straight"
    straight.mkdir()
    run_ranks(2, args, straight, env=env)
    want = validations(straight / "runs" / "r")
    # the SIGTERM comes at the first validation (after a checkpoint: one every 6 steps) that does not improve on
    # the best, which the early stop's patience then counts: a resume that forgot the best value would log
    # another val/best_mae, one that forgot the patience would stop early later
    at = next(r["step"] for r in want if r["step"] >= 6 and r["val/mae"] > r["val/best_mae"])

    run_dir = tmp_path / "runs" / "r"
    interrupt(args, tmp_path, run_dir, env, at)
    stopped = state_of(run_dir)
    cut = stopped["trainer"]["step"]
    assert at < cut < TOTAL
    assert stopped["evaluator"] == replay([r for r in want if r["step"] <= cut], "val/mae")  # saved: best, patience
    stop = [r for r in metrics_of(straight / "runs" / "r") if r.get("event") == "early_stop"]
    assert (
        stopped["evaluator"]["bad_validations"] >= 1
        and stop
        and stop[0]["step"] > cut
        and stop[0]["best_step"] == stopped["evaluator"]["best_step"]
    ), ("premise: the uninterrupted run stops early after the cut, counting validations before it", stop)
    copy = tmp_path / "one-rank"
    shutil.copytree(tmp_path / "runs", copy / "runs", symlinks=True)  # resumed on 1 rank below

    said = shlex.split(json.loads((run_dir / "summary.json").read_text())["resume"])
    assert said[:4] == ["dtrain", "launch", "--nproc-per-node", "2"] and said[4:] == args, said
    resumed = subprocess.run(
        [sys.executable, "-m", *said],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(env),
        stdin=subprocess.DEVNULL,
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    log = (run_dir / "logs" / "rank-1.log").read_text()  # appended across both launches
    assert log.count("---- dtrain launch:") == 2 and "SIGTERM received" in log, log[-3000:]

    # exact: weights, every step's loss and LR, the validations (val/best_mae, the patience's early stop),
    # every rank's samples
    reference, got = straight / "runs" / "r", run_dir
    a, b = final_params(reference), final_params(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert training(got) == training(reference)
    end = training(got)[-1][0]
    assert [s for s, _, _ in training(got)] == list(range(1, end + 1))
    assert [lr for _, _, lr in training(got)] == onecycle_lrs(TOTAL, max_lr=LR, pct_start=0.25)[:end]
    assert validations(got) == want
    assert [r for r in metrics_of(got) if r.get("event") == "early_stop"] == stop
    assert key_log(got) == key_log(reference)
    assert state_of(got)["evaluator"] == state_of(reference)["evaluator"] == replay(want, "val/mae")

    # the best follows val/mae: the pointer, summary.json, the test's weights, FitResult (each rank's callback).
    # (val/loss, the default monitor, is lowest at the same step on this data; tests/test_monitor.py has two
    # monitors that pick different steps)
    best = replay(want, "val/mae")
    assert pointer(got, "best") == best["best_step"] != end
    summary = json.loads((got / "summary.json").read_text())
    assert summary["best"]["step"] == best["best_step"] and summary["best"]["monitor"] == "val/mae"
    assert summary["best"]["val/mae"] == best["best_val"]
    assert metrics_of(got)[-1]["test/weights_step"] == best["best_step"]
    assert result_of(resumed)["stop_reason"] == "early_stop" and end == stop[0]["step"]

    for rank in (0, 1):
        evs = events(got, rank)
        assert [e[0] for e in of_kind(evs, "step")] == list(range(1, end + 1))  # each step once across the starts
        assert of_kind(evs, "start") == [[0, 2, TOTAL], [cut, 2, TOTAL]]
        (first, last) = of_kind(evs, "end")
        assert first[:2] == ["signal:SIGTERM", cut]
        assert last[1:4] == [end, "val/mae", best["best_step"]] and last[4]["val/mae"] == best["best_val"]
        assert last[5] == str((got / "checkpoints" / f"step-{best['best_step']:08d}").absolute())
        assert first[6] == cut and last[6] == end  # its state: the steps before the cut counted on
        assert [v[0] for v in of_kind(evs, "val")] == [r["step"] for r in want]
        assert [v[1]["val/mae"] for v in of_kind(evs, "val")] == [r["val/mae"] for r in want]
        improved = [r["step"] for r in want if r["val/mae"] == r["val/best_mae"]]
        assert [c[0] for c in of_kind(evs, "checkpoint") if c[1]] == improved  # announced as best: those steps'

    # the interrupted checkpoint on 1 rank: the global batch kept (grad_accum 2), OneCycleLR's and RAdam's state
    one = run_dtrain(args, copy, env=env)
    assert "resume: 2 -> 1 ranks" in one.stderr, one.stderr[-3000:]
    steps = training(copy / "runs" / "r")
    assert [s for s, _, _ in steps] == list(range(1, steps[-1][0] + 1))
    assert of_kind(events(copy / "runs" / "r", 0), "end")[-1][6] == steps[-1][0]  # rank 0's callback state
    assert [lr for _, _, lr in steps] == onecycle_lrs(TOTAL, max_lr=LR, pct_start=0.25)[: len(steps)]
    radam = state_of(copy / "runs" / "r")["engine"]["optimizer"]["state"]
    assert {float(s["step"]) for s in radam.values()} == {steps[-1][0]}  # counted on from the checkpoint's

    # what the run gives its users: a safetensors file, the model, predictions
    from safetensors.torch import load_file

    run_dtrain(["export", "--checkpoint", str(got), "--out", "model.safetensors", "--format", "safetensors"], tmp_path)
    exported = load_file(tmp_path / "model.safetensors")
    model = dtrain.load_model(got)
    weights = state_of(got, "best")["engine"]["model"]
    assert exported.keys() == weights.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], weights[k]) and torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    run_dtrain(["predict", "--checkpoint", str(got), "--data", str(data / "val.json"), "--out", "preds"], tmp_path)
    rows = [
        json.loads(line)
        for part in sorted((tmp_path / "preds").glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
    ]
    with torch.inference_mode():
        expected = {
            k: y for batch in rebuild(got).streams.val.epoch(0) for k, y in zip(batch["__key__"], model(batch["x"]))
        }
    assert sorted(r["__key__"] for r in rows) == sorted(expected) and len(rows) == 96  # each sample once
    assert all(torch.allclose(torch.tensor(r["output"]), expected[r["__key__"]], atol=1e-6) for r in rows)
    assert not any("pred" in r for r in rows)  # a class only for a classification


def test_load_model_and_predict_need_not_name_the_optimizer_schedule_or_callbacks(tmp_path, data_root, monkeypatch):
    """load_model, predict and export --format hf build the model alone: a run trained with RAdam, OneCycleLR and a
    callback by import string loads without naming them again (it was refused: `asks to run optim.name=...`). A
    safetensors export, which load_model can't rebuild a model from, is said to be one."""
    monkeypatch.chdir(tmp_path)
    result = dtrain.fit(
        [
            f"data.root={data_root}",
            "train.max_steps=2",
            "log.progress=false",
            "run.doctor=false",
            *RADAM_ONECYCLE,
            "run.callbacks=[test_callbacks:Counter]",
        ]
    )
    weights = state_of(result.run_dir)["engine"]["model"]
    model = dtrain.load_model(result.run_dir)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    test = data_root / "digits" / "test.json"
    proc = run_dtrain(["predict", "--checkpoint", str(result.run_dir), "--data", str(test), "--out", "preds"], tmp_path)
    assert "predict: 271 outputs in preds" in proc.stdout
    # a safetensors export holds no config: said so, not "not a file written by dtrain export"
    run_dtrain(
        ["export", "--checkpoint", str(result.run_dir), "--out", "m.safetensors", "--format", "safetensors"], tmp_path
    )
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint: m.safetensors is a safetensors file: weights alone, no "
        r"config to rebuild the model from; give a file of `dtrain export "
        r"--format pt`, a run directory or checkpoints/step-N",
    ):
        dtrain.load_model("m.safetensors")


# ---- (b) a causal LM from a config alone; export --format hf, eval with an override -----------------------------
def lm_args(tokens) -> list[str]:
    """128 windows, global batch 16: 8 steps an epoch, 3 epochs."""
    return [
        "train",
        f"data.train={tokens}",
        f"data.val={tokens}",
        "data.sample={x: tokens.npy}",
        "data.task=lm",
        "data.batch_size=8",
        *HF,
        "optim.lr=0.01",
        "train.epochs=3",
        "train.val_every=4",
        "checkpoint.every=4",
        "train.log_every=1",
        "log.progress=false",
        "log.sample_keys=true",
        "run.callbacks=[hookcb:Recorder]",
        "run.doctor=false",
        "run.name=lm",
    ]


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_causal_lm_from_a_config_resumes_through_a_sigterm_and_exports_for_hugging_face(tmp_path, user_env):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    env, total = user_env, 24
    args = lm_args(write_tokens(tmp_path / "data"))
    straight = tmp_path / "straight"
    straight.mkdir()
    run_ranks(2, args, straight, env=env, preload=("transformers",))
    run_dir = tmp_path / "runs" / "lm"
    stopped = run_ranks(
        2, args, tmp_path, env={**env, "HOOK_SIGTERM_STEP": "6"}, check=False, preload=("transformers",)
    )
    assert stopped.returncode == 75 and result_of(stopped)["stop_reason"] == "signal:SIGTERM", stopped.stderr[-3000:]
    cut = state_of(run_dir)["trainer"]["step"]
    assert 6 < cut < total
    resumed = run_ranks(2, args, tmp_path, env=env, preload=("transformers",))
    assert (
        f"resumed from {run_dir.relative_to(tmp_path)}" in resumed.stderr
        and result_of(resumed)["stop_reason"] == "completed"
    )

    reference = straight / "runs" / "lm"
    a, b = final_params(reference), final_params(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert training(run_dir) == training(reference)
    assert [s for s, _, _ in training(run_dir)] == list(range(1, total + 1))
    assert validations(run_dir) == validations(reference)
    assert "val/ppl" in validations(run_dir)[-1] and "val/acc" in validations(run_dir)[-1]
    assert key_log(run_dir) == key_log(reference)
    for rank in (0, 1):
        evs = events(run_dir, rank)
        assert [e[0] for e in of_kind(evs, "step")] == list(range(1, total + 1))
        assert of_kind(evs, "start") == [[0, 2, total], [cut, 2, total]]
        assert [e[:2] for e in of_kind(evs, "end")] == [["signal:SIGTERM", cut], ["completed", total]]

    # Hugging Face's own loader reads the export, with the logits of dtrain's load_model
    run_dtrain(["export", "--checkpoint", str(run_dir), "--out", "hf", "--format", "hf", *HF[:2]], tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    mine = dtrain.load_model(run_dir, overrides=HF[:2])
    ids = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, mine(ids).logits)

    # the summary's evaluate command (the best checkpoint; val: there is no test split) with overrides: the
    # metrics of the best weights on the validation split eval is given, computed here by hand
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluate = shlex.split(summary["evaluate"])
    assert evaluate[:2] == ["dtrain", "eval"] and evaluate[evaluate.index("--split") + 1] == "val"
    half = write_tokens(tmp_path / "half", n=64)  # the first 64 of the 128 windows
    proc = run_dtrain([*evaluate[1:], f"data.val={half}", "data.eval_batch_size=5"], tmp_path, env=env)
    printed = {k: float(v) for k, v in (line.split() for line in proc.stdout.splitlines() if line.startswith("  val/"))}
    shards = sorted(str(p) for p in half.parent.glob("tokens-*.tar"))
    windows = torch.stack(
        [torch.as_tensor(s["tokens.npy"]).long() for s in wds.WebDataset(shards, shardshuffle=False).decode()]
    )
    with torch.no_grad():
        logits = mine(windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten()).item()
    acc = (logits.argmax(-1) == windows[:, 1:]).double().mean().item()
    assert printed == pytest.approx({"val/loss": loss, "val/acc": acc, "val/ppl": np.exp(loss)}, rel=1e-5)
    best = next(r for r in validations(run_dir) if r["step"] == summary["best"]["step"])
    assert printed["val/loss"] != pytest.approx(best["val/loss"], rel=1e-5)  # not the run's own validation split
