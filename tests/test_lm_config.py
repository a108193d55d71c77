"""A causal language model from a config alone, on token shards of one's own (webdataset's TarWriter, one
tokens.npy member a sample): data.task=lm, data.sample={x: tokens.npy}; x is the window's tokens but the last,
y its tokens but the first, for a Hugging Face GPT2LMHeadModel and dtrain's GPT alike."""

import json

import numpy as np
import torch
import pytest

from dtrain.config import ConfigError, DataConfig
from dtrain.data import build_streams

VOCAB, WINDOW = 32, 17  # 16 tokens of input a sample


def write_tokens(root, n=128, per_shard=64, dtype=np.int32, make=None):
    """Windows of a counting sequence (each token the previous + 1, mod VOCAB, from a random start): a next
    token a small model learns in a few steps. -> the train descriptor, counted by dtrain index."""
    import webdataset as wds

    from dtrain.cli import main

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n // per_shard):
        shards.append(root / f"tokens-{s}.tar")
        with wds.TarWriter(str(shards[-1])) as sink:
            for i in range(per_shard):
                window = ((rng.integers(VOCAB) + np.arange(WINDOW)) % VOCAB).astype(dtype)
                sink.write({"__key__": f"w{s}-{i:03d}", **(make(window) if make else {"tokens.npy": window})})
    assert main(["index", *map(str, shards), "--out", str(root / "tokens.json")]) == 0
    return root / "tokens.json"


def test_the_targets_are_the_tokens_shifted(tmp_path):
    tokens = write_tokens(tmp_path, dtype=np.uint16)
    s = build_streams(
        DataConfig(train=str(tokens), sample={"x": "tokens.npy"}, task="lm", batch_size=8, num_workers=0),
        seed=0,
        rank=0,
        world_size=1,
    )
    batch = next(iter(s.train.epoch(0)))
    x, y = batch["x"], batch["y"]
    assert s.task == "lm" and s.input_shape == (WINDOW - 1,) and x.shape == y.shape == (8, WINDOW - 1)
    assert x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all() and (y == (x + 1) % VOCAB).all()


HF = [
    "model.factory=transformers:GPT2LMHeadModel",
    "model.kwargs.config._target_=transformers:GPT2Config",
    f"model.kwargs.config.vocab_size={VOCAB}",
    "model.kwargs.config.n_positions=16",
    "model.kwargs.config.n_embd=32",
    "model.kwargs.config.n_layer=1",
    "model.kwargs.config.n_head=2",
]
OWN = [
    "model.factory=gpt",
    f"model.kwargs.vocab_size={VOCAB}",
    "model.kwargs.n_embd=32",
    "model.kwargs.n_layer=1",
    "model.kwargs.n_head=2",
]


@pytest.mark.parametrize("model", [HF, OWN], ids=["hf_gpt2", "dtrain_gpt"])
def test_a_causal_lm_trains_from_the_config_alone(tmp_path, model):
    """dtrain train, nothing but the config: next-token loss and the lm metrics (token accuracy, perplexity)."""
    pytest.importorskip("transformers")
    from dtrain.cli import main

    tokens = write_tokens(tmp_path / "data")
    assert (
        main(
            [
                "train",
                f"data.train={tokens}",
                f"data.val={tokens}",
                "data.sample={x: tokens.npy}",
                "data.task=lm",
                "data.batch_size=16",
                *model,
                "optim.lr=0.01",
                "train.epochs=4",
                f"run.dir={tmp_path / 'runs'}",
                "run.name=lm",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "runs/lm/metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val/ppl" in r]
    assert len(vals) == 4 and "val/mae" not in vals[-1], records
    # chance is 1/32 and a perplexity of 32; a counting sequence is learnt
    assert vals[-1]["val/acc"] > 0.5 and vals[-1]["val/ppl"] < vals[0]["val/ppl"] / 2 < VOCAB, vals


def test_lm_takes_one_field_of_token_ids(tmp_path, capsys):
    from dtrain.cli import main

    tokens = write_tokens(tmp_path, make=lambda w: {"tokens.npy": w, "cls": 1})
    with pytest.raises(
        ConfigError,
        match=r"^config: data.task=lm takes one field of token ids, data.sample has x, "
        r"y: map only the tokens, e.g. data.sample='\{x: tokens.npy\}' \(y is x "
        r"shifted by one\)$",
    ):
        build_streams(
            DataConfig(train=str(tokens), sample={"x": "tokens.npy", "y": "cls"}, task="lm", num_workers=0),
            seed=0,
            rank=0,
            world_size=1,
        )
    floats = write_tokens(tmp_path / "floats", dtype=np.float32)
    assert (
        main(
            [
                "train",
                f"data.train={floats}",
                "data.sample={x: tokens.npy}",
                "data.task=lm",
                *OWN,
                "train.max_steps=1",
                f"run.dir={tmp_path / 'runs'}",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dtrain: error: data: sample 'w0-000' of {tmp_path / 'floats/tokens-0.tar'}: field 'x' is a torch.float32 "
        f"array of shape ({WINDOW},); data.task=lm takes a 1-D array of at least 2 integer token ids"
    )


def test_dtrain_gpt_needs_a_vocabulary_where_the_data_gives_none(tmp_path, capsys):
    from dtrain.cli import main

    tokens = write_tokens(tmp_path)
    assert (
        main(
            [
                "train",
                f"data.train={tokens}",
                "data.sample={x: tokens.npy}",
                "data.task=lm",
                "model.factory=gpt",
                "train.max_steps=1",
                f"run.dir={tmp_path / 'runs'}",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dtrain: error: config: model.kwargs.vocab_size: the data set does not say how many token ids there are; "
        "set model.kwargs.vocab_size (or data.num_classes) to the vocabulary's size"
    )
