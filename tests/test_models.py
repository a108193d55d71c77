"""Model blocks: activations, seeded initialisation, dropout only in training, norm as a config switch."""

import math

import pytest
import torch
from torch import nn

from dtrain.config import load_config
from dtrain.models import ACTIVATIONS, build_model


def model(*overrides, shape=(1, 8, 8), out=10, seed=0):
    return build_model(load_config(None, list(overrides)).model, {"input_shape": shape, "num_outputs": out}, seed)


@pytest.mark.parametrize(
    "name, kind, norm_types",
    [
        ("mlp", "auto", set()),
        ("mlp", "none", set()),
        ("mlp", "batch", {nn.BatchNorm1d}),
        ("mlp", "layer", {nn.LayerNorm}),
        ("cnn", "auto", {nn.BatchNorm2d}),
        ("cnn", "none", set()),
        ("cnn", "batch", {nn.BatchNorm2d}),
        ("cnn", "layer", {nn.GroupNorm}),
    ],
)
def test_norm_is_a_config_switch(name, kind, norm_types):
    m = model(f"model.factory={name}", *([f"model.kwargs.norm={kind}"] if kind != "auto" else []))
    norms = [x for x in m.modules() if isinstance(x, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))]
    assert {type(x) for x in norms} == norm_types
    assert len(norms) == (2 if norm_types else 0)  # one per hidden layer: hidden [128, 64], channels [16, 32]
    assert m(torch.rand(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_every_activation_builds_and_runs(arch, activation):
    m = model(f"model.factory={arch}", f"model.kwargs.activation={activation}")
    assert any(isinstance(x, ACTIVATIONS[activation]) for x in m.modules())
    out = m(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("scheme", ["normal", "uniform", "xavier", "kaiming"])
def test_init_schemes_are_seeded_and_have_their_scale(scheme):
    a = model(f"model.kwargs.init={scheme}", "model.kwargs.hidden=[512, 512]", seed=3)
    b = model(f"model.kwargs.init={scheme}", "model.kwargs.hidden=[512, 512]", seed=3)
    c = model(f"model.kwargs.init={scheme}", "model.kwargs.hidden=[512, 512]", seed=4)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], b.state_dict()[k]) for k in sa)  # same seed, same weights
    assert not torch.equal(sa["body.4.weight"], sc["body.4.weight"])  # another seed, other weights
    w = sa["body.4.weight"]  # 512 x 512, relu
    fan_in = fan_out = 512
    expected_std = {
        "normal": 0.02,
        "uniform": 1 / math.sqrt(fan_in) / math.sqrt(3),
        "xavier": math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out)),
        "kaiming": math.sqrt(2 / fan_in),
    }
    assert w.std().item() == pytest.approx(expected_std[scheme], rel=0.03)
    assert all(not v.any() for k, v in sa.items() if k.endswith("bias"))  # biases start at zero


def test_dropout_is_off_in_eval_mode():
    torch.manual_seed(0)
    m = model("model.kwargs.dropout=0.5")
    plain = model("model.kwargs.dropout=0.0")
    plain.load_state_dict(m.state_dict())
    x = torch.rand(16, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), m(x)) and torch.allclose(m(x), plain.eval()(x))  # eval: deterministic, no dropout
    m.train()
    assert not torch.equal(m(x), m(x))  # training: a new mask every call


# ---- Hugging Face configs take any key: the ones the config class does not know are said once -----------
BERT = [
    "model.factory=transformers:BertForSequenceClassification",
    "model.head=classifier",
    "model.kwargs={config: {_target_: 'transformers:BertConfig', vocab_size: 64, hidden_size: 16, "
    "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32, num_labels: 3, pad_token_id: 0}}",
]
GPT2 = [
    "model.factory=transformers:GPT2LMHeadModel",
    "model.head=lm_head",
    "model.kwargs={config: {_target_: 'transformers:GPT2Config', vocab_size: 64, n_positions: 16, n_layer: 1, "
    "n_head: 2, hidden_size: 16, tie_word_embeddings: false}}",
]  # hidden_size: GPT-2's alias of n_embd


@pytest.mark.parametrize(
    "overrides, said",
    [
        (BERT, []),
        (GPT2, []),
        (
            BERT + ["model.kwargs.config.hiden_size=32"],
            [
                "model: model.kwargs.config: keys unknown to BertConfig (kept "
                "by it, unused by the model): hiden_size (did you mean hidden_size?)"
            ],
        ),
        (
            GPT2 + ["model.kwargs.config.n_layers=3", "model.kwargs.config.my_note=x"],
            [
                "model: model.kwargs.config: keys unknown to GPT2Config (kept by it, unused by the model): n_layers (did you "
                "mean n_layer?), my_note"
            ],
        ),
    ],
)
def test_keys_a_hugging_face_config_does_not_know_are_said_once(overrides, said):
    pytest.importorskip("transformers")
    lines = []
    m = build_model(load_config(None, overrides).model, {"input_shape": (16,), "num_outputs": 3}, 0, log=lines.append)
    assert lines == said
    assert m.config.to_dict().get("n_embd", m.config.hidden_size) == 16  # built all the same, typo ignored


def test_the_unknown_key_line_comes_once_at_start_up(tmp_path, data_root, capsys):
    from dtrain.cli import main

    pytest.importorskip("transformers")
    hf_resnet = [
        "model.factory=transformers:ResNetForImageClassification",
        "model.head=classifier",
        "model.kwargs={config: {_target_: 'transformers:ResNetConfig', num_channels: 1, num_labels: 10, "
        "embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], layer_type: basic, hiden_act: gelu}}",
    ]
    assert (
        main(
            [
                "train",
                f"data.root={data_root}",
                f"run.dir={tmp_path}",
                "log.progress=false",
                "train.max_steps=2",
                *hf_resnet,
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("keys unknown to ResNetConfig") == 1
    assert (
        "model: model.kwargs.config: keys unknown to ResNetConfig (kept by it, unused by the model): hiden_act "
        "(did you mean hidden_act?)\n" in err
    )


# ---- token ids: past the embedding, one line; tokens_per_s counted from the token ids (#32) -----------------
USERCODE = __import__("pathlib").Path(__file__).parent / "usercode"
HF_GPT2 = (
    "model.kwargs={{config: {{_target_: 'transformers:GPT2Config', vocab_size: {vocab}, n_positions: 48, "
    "n_layer: 1, n_head: 2, n_embd: 16}}}}"
)


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
    """Byte tokens (ids.npy, 48 int64 ids of 0..255 each, written with webdataset's TarWriter), indexed as
    `dtrain index` does: a dict batch of input_ids (and labels, the same ids) for a Hugging Face GPT-2."""
    import sys

    sys.path.insert(0, str(USERCODE))
    import matrix_user
    from dtrain.cli import main

    root = tmp_path_factory.mktemp("tokens")
    shards = matrix_user.write_token_shards(root, per_class=40)
    for split in ("train", "val", "test"):
        assert (
            main(["index", *[str(p) for p in shards if p.name.startswith(split)], "--out", str(root / f"{split}.json")])
            == 0
        )
    return [f"data.{split}={root / f'{split}.json'}" for split in ("train", "val", "test")] + [
        "data.sample={input_ids: ids.npy, labels: ids.npy}",
        "model.factory=transformers:GPT2LMHeadModel",
        "model.head=lm_head",
        "loss.fn=matrix_user:hf_loss",
        "metrics.builtin=false",
        "data.batch_size=8",
        "train.max_steps=4",
        "train.log_every=2",
        "log.progress=false",
    ]


def run_here(args, cwd, monkeypatch, capsys):
    from dtrain.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(USERCODE))
    code = main(args)
    return code, capsys.readouterr().err


def test_token_ids_past_the_embedding_are_one_line_before_training(tmp_path, token_shards, monkeypatch, capsys):
    """They were torch's `IndexError: index out of range in self` at the end of a 96-line traceback."""
    code, err = run_here(["train", *token_shards, HF_GPT2.format(vocab=64)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert (
        err.strip().splitlines()[-1].startswith("dtrain: error: config: model: batch field 'input_ids' holds token id ")
    ), err
    assert (
        "the model's input embedding (transformer.wte) has 64 entries (ids 0..63): build the model with a "
        "vocabulary of at least" in err
    )
    code, err = run_here(
        [
            "train",
            "data.dataset=text",
            "data.text_context=32",
            "data.text_bytes=20000",
            f"data.root={tmp_path / 'data'}",
            "model.factory=gpt",
            "model.kwargs={vocab_size: 64, n_layer: 1, n_head: 2, n_embd: 16}",
            "train.max_steps=2",
            "log.progress=false",
        ],
        tmp_path,
        monkeypatch,
        capsys,
    )  # dtrain's GPT, tuple batches
    assert code == 2 and "Traceback" not in err, err
    assert (
        "config: model: batch field 'x' holds token id " in err.strip().splitlines()[-1]
        and "the model's input embedding (body.wte) has 64 entries" in err
    ), err


def test_tokens_per_s_counts_the_token_ids_of_every_batch_form(tmp_path, token_shards, data_root, monkeypatch, capsys):
    """A dict batch of 48 input_ids a sample logged tokens_per_s == samples_per_s; images log none."""
    from conftest import metrics_of

    code, err = run_here(
        ["train", *token_shards, HF_GPT2.format(vocab=256), "run.name=hf"], tmp_path, monkeypatch, capsys
    )
    assert code == 0, err
    train = [r for r in metrics_of(tmp_path / "runs" / "hf") if "loss" in r]
    assert len(train) == 2 and all(r["tokens_per_s"] == pytest.approx(48 * r["samples_per_s"]) for r in train)
    code, err = run_here(
        ["train", f"data.root={data_root}", "train.max_steps=2", "log.progress=false", "run.name=images"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    train = [r for r in metrics_of(tmp_path / "runs" / "images") if "loss" in r]
    assert train and all("samples_per_s" in r and "tokens_per_s" not in r for r in train)  # a token is no pixel
