"""Your own model, loss and metrics (issue 13): from a config file (import strings) or from a Python script,
with the guarantees dtrain gives its own. The user code lives in tests/usercode/ (on PYTHONPATH, not in
dtrain) and in examples/hf_gpt2.py; Hugging Face models are built from small configs, never downloaded."""

import hashlib
import json
import os
import shlex
import shutil
import signal
import time
import uuid

import pytest
import torch

from conftest import (
    REPO,
    final_params,
    key_log,
    latest_logged_step,
    metrics_of,
    result_of,
    run_dtrain,
    run_ranks,
    run_torchrun,
    start,
    torchrun_cmd,
    wait_for,
    workers,
)
from dtrain import dist
from dtrain.batch import default_forward, keys, logits, size, target
from dtrain.config import ConfigError, load_config
from dtrain.trainer import Trainer

USERCODE = REPO / "tests" / "usercode"
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(USERCODE)])}
SCRIPT = REPO / "examples" / "hf_gpt2.py"
HF_RESNET = [
    "model.factory=transformers:ResNetForImageClassification",
    "model.head=classifier",
    "model.kwargs={config: {_target_: 'transformers:ResNetConfig', num_channels: 1, num_labels: 10, "
    "embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic}}",
]
USER_NET = ["model.factory=mynet:build", "model.kwargs={num_classes: 10, width: 16}", "model.head=fc"]


@pytest.fixture
def usercode(monkeypatch):
    monkeypatch.syspath_prepend(str(USERCODE))


def trainer(tmp_path, data_root, *overrides) -> Trainer:
    cfg = load_config(
        None, [f"data.root={data_root}", f"run.dir={tmp_path / 'runs'}", "log.progress=false", *overrides]
    )
    return Trainer(cfg, dist.setup(force_single=True))


def files_of(run_dir) -> dict:
    """sha256 of every file under a run's checkpoints (symlinks by target)."""
    root = run_dir / "checkpoints"
    return {
        str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


# ---- batches and outputs of any shape ---------------------------------------------------------------------
def test_batches_may_be_tuples_or_dicts_and_outputs_tensors_dicts_or_model_outputs():
    from transformers.modeling_outputs import ImageClassifierOutput

    x, y = torch.rand(3, 2), torch.tensor([0, 1, 1])
    as_tuple, as_dict = (x, y, ["a", "b", "c"]), {"x": x, "y": y, "__key__": ["a", "b", "c"]}
    for b in (as_tuple, as_dict):
        assert size(b) == 3 and keys(b) == ["a", "b", "c"] and target(b) is y
    hf_batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "labels": torch.zeros(2, 5, dtype=torch.long),
        "__key__": ["a", "b"],
    }
    seen = {}
    default_forward(lambda **kw: seen.update(kw), hf_batch)  # other dicts: model(**fields), metadata left out
    assert set(seen) == {"input_ids", "labels"} and size(hf_batch) == 2
    assert default_forward(lambda t: t * 2, as_dict) is not None  # {"x": ...}: model(x)
    out = ImageClassifierOutput(logits=torch.ones(3, 2))
    assert logits(out) is out.logits and logits({"logits": out.logits}) is out.logits and logits(x) is x
    with pytest.raises(ConfigError, match="returned a dict without logits .*set loss.fn"):
        logits({"scores": x})


def test_loss_terms_and_metric_sums_of_your_own_are_logged_and_reduced_exactly(tmp_path, data_root, usercode):
    t = trainer(
        tmp_path,
        data_root,
        *USER_NET,
        "loss.fn=mynet:two_terms",
        "metrics.fn=mynet:top2",
        "train.epochs=1",
        "train.log_every=5",
    )
    result = t.fit()
    records = metrics_of(t.run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/loss" in r]
    assert train and val and "test/top2" in result and "test/error_rate" in result
    for r in train:  # the sum of the terms is what was backpropagated, each term logged
        assert r["loss"] == pytest.approx(r["loss/ce"] + r["loss/logit_l2"], rel=1e-5)
    for r in val:
        assert r["val/loss"] == pytest.approx(r["val/loss/ce"] + r["val/loss/logit_l2"], rel=1e-6)
        assert r["val/error_rate"] == pytest.approx(1 - r["val/acc"], abs=1e-9)  # (numerator, denominator)
        assert r["val/acc"] <= r["val/top2"] <= 1  # a count divided by the samples


def test_flops_are_counted_on_a_real_batch_or_said_to_be_unknown(usercode):
    from transformers import GPT2Config, GPT2LMHeadModel
    from dtrain.build import DataFacts, probe
    from dtrain.losses import UserLoss
    from dtrain.metrics import Metrics

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_layer=1, n_head=2, n_embd=32))
    ids = {"input_ids": torch.randint(0, 256, (2, 16)), "labels": torch.randint(0, 256, (2, 16))}
    said = []
    flops = probe(
        gpt2,
        ids,
        default_forward,
        UserLoss(lambda out, b: out.loss, "test"),
        Metrics([]),
        torch.device("cpu"),
        DataFacts(None, None, None),
        said.append,
    )  # integer ids, a dict batch
    assert flops > 6 * 16 * sum(p.numel() for p in gpt2.transformer.h.parameters()) and not said

    embed = torch.nn.Embedding(10, 4)  # no matmul: nothing to count
    assert (
        probe(
            embed,
            (torch.tensor([1, 2]), torch.zeros(2), ["a", "b"]),
            default_forward,
            UserLoss(lambda out, b: out.sum(), "test"),
            Metrics([]),
            torch.device("cpu"),
            DataFacts(None, None, None),
            said.append,
        )
        is None
    )
    assert said == ["mfu: the model's FLOPs could not be counted; no MFU is logged"]


def test_objects_handed_in_from_python_param_groups_included(tmp_path, data_root, usercode):
    import mynet
    from dtrain.build import Hooks

    def groups(model):  # the head at 10x the backbone's LR, no weight decay anywhere
        head = list(model.fc.parameters())
        return [
            {"params": [p for p in model.parameters() if all(p is not q for q in head)], "lr": 1e-3},
            {"params": head, "lr": 1e-2, "weight_decay": 0.0},
        ]

    cfg = load_config(
        None,
        [
            f"data.root={data_root}",
            f"run.dir={tmp_path / 'runs'}",
            "log.progress=false",
            "model.head=fc",
            "train.epochs=1",
            "optim.weight_decay=0.1",
        ],
    )
    hooks = Hooks(model=mynet.build, loss=mynet.two_terms, metrics=mynet.top2, param_groups=groups)
    t = Trainer(hooks.record(cfg), dist.setup(force_single=True), hooks=hooks)
    result = t.fit()
    assert result["stop_reason"] == "completed" and "test/top2" in result
    state = torch.load(t.run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)
    opt = state["engine"]["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in opt] == [(1e-3, 0.1), (1e-2, 0.0)]
    assert state["config"]["model"]["factory"] == "mynet:build" and state["config"]["loss"]["fn"] == "mynet:two_terms"
    with pytest.raises(ConfigError, match="param_groups: 2 parameters are in no group"):
        Trainer(
            cfg,
            dist.setup(force_single=True),
            hooks=Hooks(model=mynet.build, param_groups=lambda m: [{"params": list(m.features.parameters())}]),
        )


# ---- clear errors, nothing lost -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    """A user-model run with checkpoints, which every bad command below must leave byte-identical."""
    cwd = tmp_path_factory.mktemp("errors")
    run_dtrain(
        ["train", f"data.root={data_root}", *USER_NET, "train.epochs=1", "log.progress=false", "run.name=mine"],
        cwd,
        env=ENV,
    )
    return cwd


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.factory=mynet_missing:build"], "model.factory: cannot import module 'mynet_missing'"),
        (["model.factory=mynet:nothing"], "model.factory: module 'mynet' has no attribute 'nothing'"),
        (["model.factory=mynet:NOT_CALLABLE"], "model.factory: 'mynet:NOT_CALLABLE' is a int, not a callable"),
        (
            ["model.factory=mynet:not_a_module", "model.kwargs={}"],
            "model.factory: mynet:not_a_module returned a str, not a torch.nn.Module",
        ),
        (["model.kwargs={num_classes: 10, colour: red}"], "model.kwargs: mynet:build rejects these arguments"),
        (
            ["model.head=classifier"],
            "model.head: the model has no module 'classifier'; its top-level modules: features, fc",
        ),
        (
            ["loss.fn=mynet:vector_loss"],
            "loss.fn: mynet:vector_loss returned a torch.float32 tensor of shape (2,), not a scalar",
        ),
        (["metrics.fn=mynet:vector_loss"], "metrics.fn: mynet:vector_loss returned a Tensor, not a dict"),
        (["loss.fn=mynet:two_terms", "loss.name=mse"], "loss.fn (or a loss handed in from Python) and loss.name"),
    ],
)
def test_hook_errors_are_one_line_exit_2_and_keep_the_checkpoints(
    finished_run, data_root, usercode, monkeypatch, capsys, overrides, message
):
    from dtrain.cli import main  # in-process: `dtrain train` as the command line runs it, without a new python

    monkeypatch.chdir(finished_run)
    run_dir = finished_run / "runs" / "mine"
    before = files_of(run_dir)
    args = ["train", f"data.root={data_root}", *USER_NET, "train.epochs=1", "log.progress=false", "run.name=mine"]
    assert main(args + overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("dtrain: error: config: ") and message in lines[-1], lines
    assert files_of(run_dir) == before


@pytest.mark.multiproc
def test_an_exception_in_your_code_keeps_its_traceback_and_ends_every_rank(tmp_path, data_root):
    tag = uuid.uuid4().hex
    args = [
        "train",
        f"data.root={data_root}",
        "model.factory=mynet:faulty",
        "model.head=fc",
        "train.epochs=2",
        "log.progress=false",
        "dist.timeout_s=30",
        "checkpoint.every=2",
        "run.name=faulty",
    ]
    t0 = time.monotonic()
    proc = start(torchrun_cmd(2, args), tmp_path, tag, env={**ENV, "FAULTY_RANK": "1", "FAULTY_CALL": "5"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    assert "Traceback" in err and "usercode/mynet.py" in err and "ValueError: a bug in mynet.Faulty.forward" in err
    assert not workers(tag)  # no rank left behind
    latest = tmp_path / "runs" / "faulty" / "checkpoints" / "latest"
    assert json.loads((latest / "manifest.json").read_text())["step"] == 4  # the last save before the bug stands


# ---- the config route: your model on 2 ranks, exact resume after SIGKILL ------------------------------------
# (a model of your own module, from the config, SIGKILLed on 2 ranks and resumed exactly, on shards dtrain did
# not write: tests/test_sources.py::test_foreign_jpg_shards_train_and_resume_exactly)
@pytest.mark.multiproc
@pytest.mark.slow
def test_hf_model_from_config_resumes_bit_identically_after_sigkill(tmp_path, data_root):
    args = [
        "train",
        f"data.root={data_root}",
        *HF_RESNET,
        "train.epochs=2",
        "data.batch_size=32",
        "optim.lr=0.02",
        "log.progress=false",
        "train.log_every=1",
        "checkpoint.every=4",
        "log.sample_keys=true",
        "data.shuffle_buffer=200",
    ]
    straight = run_ranks(2, args + ["run.name=straight"], tmp_path, env=ENV, preload=("transformers",))
    assert result_of(straight)["test/acc"] > 0.4 and "world_size=2" in straight.stderr  # it learned (10 classes)
    tag, run = uuid.uuid4().hex, tmp_path / "runs" / "r"
    proc = start(torchrun_cmd(2, args + ["run.name=r"]), tmp_path, tag, env=ENV)
    wait_for(lambda: latest_logged_step(run) >= 22, what="step 22")  # epoch 2 (19 steps per epoch)
    os.kill(workers(tag)[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    resumed = run_ranks(2, args + ["run.name=r"], tmp_path, env=ENV, preload=("transformers",))
    assert "resumed from" in resumed.stderr
    a, b = final_params(tmp_path / "runs" / "straight"), final_params(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert key_log(run) == key_log(tmp_path / "runs" / "straight")  # the same samples at every step


# ---- transfer learning on the layer model.head names -------------------------------------------------------
@pytest.mark.parametrize(
    "model, head, new_head",
    [
        (USER_NET, "fc", ["model.kwargs={num_classes: 2, width: 16}"]),
        (HF_RESNET, "classifier", [HF_RESNET[2].replace("num_labels: 10", "num_labels: 2")]),
    ],
)
def test_transfer_learning_replaces_and_trains_the_named_head(tmp_path, data_root, usercode, model, head, new_head):
    source = trainer(tmp_path, data_root, *model, "train.epochs=1", "run.name=source")
    source.fit()
    pretrained = final_params(source.run_dir)
    ft = trainer(
        tmp_path,
        data_root,
        *model,
        *new_head,
        "data.dataset=digits_parity",
        "data.train_subset=256",
        f"model.init_from={source.run_dir}",
        "model.freeze_all_but_head=true",
        "model.unfreeze_at_step=4",
        "train.epochs=2",
        "checkpoint.every=4",
        "checkpoint.keep_last=5",
        "checkpoint.save_best=false",
        "run.name=ft",
    )
    body = [n for n, _ in ft.engine.module.named_parameters() if not n.startswith(head + ".")]
    ft.fit()
    at_4 = torch.load(ft.run_dir / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)["engine"]["model"]
    final = final_params(ft.run_dir)
    assert all(torch.equal(at_4[n], pretrained[n]) for n in body)  # frozen: bit-identical to the source
    assert all(not torch.equal(final[n], pretrained[n]) for n in body)  # unfrozen at step 4: trained
    heads = [n for n in final if n.startswith(head + ".") and n.endswith("weight")]
    assert heads and all(final[n].shape[0] == 2 and pretrained[n].shape[0] == 10 for n in heads)  # a new head


# ---- text: string fields reach your collate untouched (issue 22, 2) -----------------------------------------
def text_shards(root, n=48):
    """txt + cls samples written with webdataset's own TarWriter (two classes: which word a line repeats),
    indexed as `dtrain index` does. -> {split: descriptor}"""
    import webdataset as wds
    from dtrain.data.sources import count_shards, descriptor, write_descriptor

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in (("train", n), ("val", n // 4)):
        with wds.TarWriter(str(root / f"{split}-0.tar")) as sink:
            for i in range(count):
                sink.write(
                    {"__key__": f"{split}{i:04d}", "txt": ("spam " if i % 2 else "eggs ") * (1 + i % 5), "cls": i % 2}
                )
        out[split] = root / f"{split}.json"
        write_descriptor(descriptor(count_shards([str(root / f"{split}-0.tar")]), out[split]), out[split])
    return out


def byte_collate(samples):
    assert all(isinstance(s["x"], str) and isinstance(s["y"], int) for s in samples), samples  # untouched
    ids = torch.zeros(len(samples), max(len(s["x"]) for s in samples), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["x"])] = torch.tensor(list(s["x"].encode()))
    return {"x": ids, "text": [s["x"] for s in samples], "y": torch.tensor([s["y"] for s in samples])}


def bag_of_bytes(num_outputs):
    return torch.nn.Sequential(torch.nn.EmbeddingBag(256, 8, padding_idx=0), torch.nn.Linear(8, num_outputs))


def test_samples_reach_the_collate_as_decoded_though_batched_as_columns():
    import numpy as np
    from dtrain.data.samples import Columns

    cols = Columns.join(
        [
            Columns.of(
                [{"x": np.arange(3, dtype=np.uint8), "y": i, "w": 0.5, "t": "a b", "l": [1, 2], "__key__": str(i)}]
            )
            for i in range(3)
        ]
    )  # as the workers' parts are joined
    assert isinstance(cols.fields["x"], torch.Tensor)  # stacked: one tensor through shared memory
    for s in cols.cut(1, 3).samples():
        assert type(s["x"]) is np.ndarray and s["x"].dtype == np.uint8 and type(s["y"]) is int
        assert type(s["w"]) is float and s["t"] == "a b" and s["l"] == [1, 2]


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_text_fields_reach_the_collate_and_the_input_shape_is_read_only_when_asked(tmp_path, in_memory):
    from dtrain.build import Hooks

    splits = text_shards(tmp_path / "text")
    cfg = load_config(
        None,
        [
            f"data.train={splits['train']}",
            f"data.val={splits['val']}",
            "data.sample={x: txt, y: cls}",
            "data.num_classes=2",
            "data.batch_size=4",
            "train.max_steps=12",
            "train.val_every=6",
            "optim.lr=0.05",
            "log.sample_keys=true",
            "log.progress=false",
            f"run.dir={tmp_path / 'runs'}",
            f"data.in_memory={in_memory}",
            "data.num_workers=1",
        ],
    )
    t = Trainer(cfg, dist.setup(force_single=True), hooks=Hooks(model=bag_of_bytes, collate=byte_collate))
    assert t.fit()["step"] == 12
    assert [r["val/acc"] for r in metrics_of(t.run_dir) if "val/acc" in r][-1] == 1.0  # it learned from the text
    logged = key_log(t.run_dir)[0]
    assert len(logged) == 12 and all(len(keys) == 4 and keys[0].startswith("train") for _, keys in logged)

    def needs_shape(input_shape, num_outputs):
        return bag_of_bytes(num_outputs)

    with pytest.raises(
        ConfigError,
        match=r"needs input_shape, which the data set does not give \(the input field "
        r"'x' is a str\); .* or model.kwargs.input_shape$",
    ):
        Trainer(cfg, dist.setup(force_single=True), hooks=Hooks(model=needs_shape, collate=byte_collate))


# ---- a data/model mismatch: one traceback, and a hint naming the field (issue 22, 4) ---------------------------
def test_a_data_model_mismatch_prints_the_traceback_once_with_a_hint(tmp_path, data_root):
    import traceback
    from dtrain.cli import main

    # dtrain's own shards read as foreign ones: x.npy stays uint8, into the default (float) MLP
    args = [
        "train",
        f"data.root={data_root}",
        f"data.train={data_root / 'digits' / 'train.json'}",
        "data.sample={x: x.npy, y: y.cls}",
        "data.num_classes=10",
        f"run.dir={tmp_path / 'runs'}",
    ]
    with pytest.raises(RuntimeError, match="same dtype") as caught:
        main(args)
    printed = "".join(traceback.format_exception(caught.value))  # as Python prints it
    assert printed.count("Traceback (most recent call last)") == 1 and "During handling" not in printed, printed
    assert printed.rstrip().splitlines()[-1] == (
        "hint: batch field 'x' is torch.uint8, the model's weights are "
        "torch.float32: convert it in data.transform or data.collate, "
        "e.g. x.to(torch.float32) (/ 255 for 8-bit pixels)"
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("state.pt"))


@pytest.mark.parametrize(
    "model, x, hint",
    [
        (
            lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)),
            torch.zeros(2, 1, 8, 8, dtype=torch.float64),
            "batch field 'x' is torch.float64, the model's weights are torch.float32: convert it",
        ),
        (lambda: torch.nn.Conv2d(1, 4, 3), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "'x' is torch.uint8"),
        (
            lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)),
            torch.zeros(2, 3, 8, 8),
            "'x' has shape (3, 8, 8) per sample, the model's first layer (Linear) takes in_features=64: reshape",
        ),
        (lambda: torch.nn.Conv2d(1, 4, 3), torch.zeros(2, 3, 8, 8), "first layer (Conv2d) takes in_channels=1"),
        (
            lambda: torch.nn.Embedding(10, 4),
            torch.zeros(2, 8),
            "'x' is torch.float32, the model's first layer (Embedding) takes integer ids: make them",
        ),
        (lambda: torch.nn.Linear(8, 4).to("meta"), torch.zeros(2, 8), "'x' is on cpu, the model on meta"),
        (lambda: torch.nn.Linear(8, 4), torch.zeros(2, 8), None),  # no mismatch: the model's own error, no hint
    ],
)
def test_mismatch_hints_name_the_field_and_the_fix(model, x, hint):
    from dtrain.batch import mismatch_hint

    module = model()
    for batch in ({"x": x, "y": torch.zeros(2)}, (x, torch.zeros(2), ["a", "b"])):
        try:
            module(x) if hint else module(x)[:, 9]  # the last: an IndexError of the model's own
        except Exception as e:
            said = mismatch_hint(module, batch, e)
        assert (hint in said and said.startswith("hint: ")) if hint else said == "", said


def test_a_hugging_face_model_of_other_channels_gets_the_data_image_hint():
    """Found walking the docs: data.image=rgb (the default) for an HF ResNet of num_channels=1 ended in HF's
    own ValueError ('Make sure that the channel dimension ...'), 66 lines and no hint."""
    transformers = pytest.importorskip("transformers")
    from dtrain.batch import mismatch_hint

    model = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=3
        )
    )
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError) as e:
        model(pixel_values=x)
    said = mismatch_hint(model, {"x": x, "y": torch.zeros(2)}, e.value)
    assert said.startswith(
        "hint: batch field 'x' has 3 channels per image, the model's first layer (Conv2d) takes "
        "in_channels=1: set data.image (l: 1 channel, rgb: 3, rgba: 4)"
    ), said


# ---- the Python route: your own script under torchrun ------------------------------------------------------
@pytest.mark.multiproc
@pytest.mark.slow
def test_hf_gpt2_script_under_torchrun_stops_on_sigterm_and_resumes(tmp_path):
    """The example script (GPT-2 from a config, a torchmetrics metric, W&B) on 2 ranks: SIGTERM to rank 0
    stops and saves, the same command resumes into the same W&B run, and the script evaluates its checkpoint.
    That the resumed weights are bit-identical to an uninterrupted run's, dropout included, on a script of
    your own with a Hugging Face model under torchrun after a SIGTERM: test_matrix's script-torchrun-text-resume
    (BERT) cell."""
    from wandb_records import read_run

    args = [
        f"data.root={tmp_path / 'data'}",
        "data.text_bytes=30000",
        "data.text_context=32",
        "data.batch_size=8",
        "data.shard_size=100",
        "log.progress=false",
        "train.log_every=1",
        "checkpoint.every=10",
        "wandb.enabled=true",
        "wandb.project=tests",
    ]
    tag, run = uuid.uuid4().hex, tmp_path / "runs" / "r"
    proc = start(torchrun_cmd(2, args + ["run.name=r"], script=SCRIPT), tmp_path, tag)
    wait_for(lambda: latest_logged_step(run) >= 12, what="step 12")  # of ~40
    os.kill(workers(tag, needle=SCRIPT.name.encode())[0], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stop_reason"] == "signal:SIGTERM" and "world_size=2" in err, err[-2000:]
    resumed = run_torchrun(2, args + ["run.name=r"], tmp_path, script=SCRIPT)
    total = result_of(resumed)["step"]
    assert "resumed from" in resumed.stderr and result_of(resumed)["stop_reason"] == "completed"
    assert stopped["step"] < total
    records = metrics_of(run)
    val = [r for r in records if "val/loss" in r]
    assert val and all(r["val/token_acc"] == pytest.approx(r["val/acc"], abs=1e-6) for r in val)  # synchronised
    assert [r["step"] for r in records if "loss" in r] == list(range(1, total + 1))  # each step once

    config = (run / "config.yaml").read_text()
    assert "factory: __main__:build_model" in config and "fn: __main__:loss" in config
    first, second = (read_run(f) for f in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")))
    assert first["id"] == second["id"]
    history = [k for row in first["history"] + second["history"] for k in row]
    assert {"loss", "val/token_acc", "test/token_acc"} <= set(history)

    evaluate = shlex.split(json.loads((run / "summary.json").read_text())["evaluate"])  # the command it gives
    assert evaluate[:3] == ["python", str(SCRIPT), "eval"], evaluate  # `dtrain eval` can't rebuild its model
    evaluated = run_dtrain_script(evaluate[2:], tmp_path)
    assert "test/token_acc" in evaluated.stdout


def test_under_dtrain_launch_a_script_that_names_its_own_run_is_told_where_the_rank_logs_are(tmp_path, data_root):
    """`dtrain launch train.py` reads the script's key=value arguments, not its dtrain.main(config=...): a script
    that sets run.name itself had its rank logs under the default name's directory, with no word of it. Rank 0
    says where they are and how to keep them together; a run whose logs are its own says nothing."""
    from conftest import _run_here

    script, args = USERCODE / "script_hooks.py", [f"data.root={data_root}", "train.max_steps=2", "log.progress=false"]
    for name, logs in (("digits", "runs/digits/logs"), ("script-hooks", "runs/script-hooks/logs")):
        (tmp_path / logs).mkdir(parents=True)
        proc = _run_here(args, tmp_path, {"DTRAIN_LAUNCH_LOGS": logs}, script=script)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = [line for line in proc.stderr.splitlines() if "the rank logs are in" in line]
        assert said == (
            [
                f"launch: the rank logs are in {logs}, not in this run's runs/script-hooks: `dtrain launch` "
                "reads a script's key=value arguments, not what it sets itself; pass "
                "run.name=script-hooks to keep them together"
            ]
            if name == "digits"
            else []
        ), proc.stderr
        shutil.rmtree(tmp_path / "runs")


@pytest.mark.multiproc
@pytest.mark.slow
def test_data_hooks_from_a_script_pass_the_start_up_check_on_two_ranks(tmp_path, data_root):
    """Issue 22 (1): the check rebuilt sample/collate from their recorded names (`__main__:collate`), which
    no import can, and failed every rank; it must use the objects the script handed in."""
    script, args = USERCODE / "script_hooks.py", [f"data.root={data_root}"]
    proc = run_ranks(2, args, tmp_path, script=script)  # run.doctor is on by default
    assert "world_size=2" in proc.stderr and "ok    shards" in proc.stderr, proc.stderr[-3000:]
    assert result_of(proc)["stop_reason"] == "completed"
    assert "collate: __main__:collate" in (tmp_path / "runs" / "script-hooks" / "config.yaml").read_text()
    evaluate = json.loads((tmp_path / "runs" / "script-hooks" / "summary.json").read_text())["evaluate"]
    assert shlex.split(evaluate)[:3] == ["python", str(script), "eval"], evaluate  # the script rebuilds its model
    doctor = run_ranks(2, ["doctor", *args], tmp_path, script=script)  # the full check, as `dtrain doctor`
    assert "ok    shards" in doctor.stderr, doctor.stderr[-3000:]


def run_dtrain_script(args, cwd):
    """`python SCRIPT ARGS` in this process (a new python would cost ~6 s of torch, transformers and
    torchmetrics imports)."""
    from conftest import _run_here

    proc = _run_here(args, cwd, None, script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_readme_shows_the_script_that_is_tested():
    assert f"```python\n{SCRIPT.read_text()}```" in (REPO / "docs" / "python-api.md").read_text()
