"""`dtrain export --format pt|safetensors|hf`: what the model's own library loads (a Hugging Face directory
from save_pretrained, a safetensors file), tied weights stored and counted once, written whole or not at all."""

import json
import os

import pytest
import torch

from test_lm_config import HF, OWN, VOCAB, write_tokens

from dtrain.cli import main

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def train(root, model, name):
    tokens = write_tokens(root / "data", n=64)
    assert (
        main(
            [
                "train",
                f"data.train={tokens}",
                "data.sample={x: tokens.npy}",
                "data.task=lm",
                "data.batch_size=16",
                *model,
                "optim.lr=0.01",
                "train.max_steps=3",
                f"run.dir={root / 'runs'}",
                f"run.name={name}",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 0
    )
    return root / "runs" / name


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("hf"), HF, "gpt2")


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("own"), OWN, "gpt")


def checkpoint_weights(run):
    from dtrain.load import read_checkpoint

    return read_checkpoint(str(run))[1]["engine"]["model"]


def hf_model(run):
    """A GPT2LMHeadModel of the run's config with the checkpoint's weights, built here by hand."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    model.load_state_dict(checkpoint_weights(run))
    return model.eval()


def said(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_hf_export_loads_with_from_pretrained_and_gives_the_same_logits(hf_run, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "exported" / "gpt2-hf"
    assert main(["export", "--checkpoint", str(hf_run), "--out", str(out), "--format", "hf", *HF[:2]]) == 0
    reference = hf_model(hf_run)
    n = sum(p.numel() for p in reference.parameters())  # torch counts a tied matrix once
    assert said(capsys).startswith(f"wrote {out} ({n} parameters, step 3) from ")
    loaded = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpt2-hf"]  # no temporary left
    assert (os.stat(out).st_mode & 0o777) == 0o777 & ~_umask()
    assert {os.stat(p).st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~_umask()}  # as open() makes files


def test_hf_export_builds_only_the_code_the_user_names(hf_run, tmp_path, capsys):
    """--format hf builds the model: the stored factory is imported only where the user names it (dtrain.trust)."""
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(hf_run), "--out", str(out), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith(f"dtrain: error: checkpoint: {(hf_run / 'checkpoints').resolve()}")
        and "asks to run model.factory=transformers:GPT2LMHeadModel" in err[-1]
        and err[-1].endswith("pass --trust-checkpoint-code if you trust this file")
    ), err
    assert not out.exists()
    assert (
        main(["export", "--checkpoint", str(hf_run), "--out", str(out), "--format", "hf", "--trust-checkpoint-code"])
        == 0
    )


def test_hf_export_of_a_model_that_is_not_hugging_faces_is_one_line(own_run, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(own_run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dtrain: error: export: --format hf writes a Hugging Face model (a transformers PreTrainedModel), the "
        "checkpoint's model is a dtrain.models.gpt.GPT: use --format safetensors or pt"
    )
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "run, kept, repeat",
    [("hf_run", "transformer.wte.weight", "lm_head.weight"), ("own_run", "body.wte.weight", "head.weight")],
)
def test_safetensors_export_stores_tied_weights_once(run, kept, repeat, tmp_path, capsys, request):
    from safetensors import safe_open
    from safetensors.torch import load_file

    run = request.getfixturevalue(run)
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "safetensors"]) == 0
    weights = checkpoint_weights(run)
    loaded = load_file(out)
    assert sorted(loaded) == sorted(set(weights) - {repeat})
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)
    assert torch.equal(weights[repeat], loaded[kept])
    with safe_open(out, "pt") as f:
        assert f.metadata()[repeat] == kept and f.metadata()["dtrain.step"] == "3"
    n = sum(t.numel() for k, t in weights.items() if k != repeat)
    assert said(capsys).startswith(f"wrote {out} ({n} parameters, step 3) from ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_safetensors_export_loads_into_the_model_with_its_ties(hf_run, tmp_path):
    from safetensors.torch import load_model

    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(hf_run), "--out", str(out), "--format", "safetensors"]) == 0
    model = hf_model(hf_run)
    torch.nn.init.zeros_(model.transformer.wte.weight)
    load_model(model, out)  # safetensors' own loader: the tied names from the metadata
    assert all(torch.equal(v, checkpoint_weights(hf_run)[k]) for k, v in model.state_dict().items())


def test_pt_export_counts_tied_weights_once(own_run, tmp_path, capsys):
    """The line printed counted GPT's tied head twice (the embedding's 32 x VOCAB again)."""
    out = tmp_path / "m.pt"
    assert main(["export", "--checkpoint", str(own_run), "--out", str(out)]) == 0
    weights = checkpoint_weights(own_run)
    n = sum(t.numel() for k, t in weights.items() if k != "head.weight")
    assert said(capsys).startswith(f"wrote {out} ({n} parameters, step 3) from ")
    exported = torch.load(out, weights_only=True)
    assert exported["step"] == 3 and all(torch.equal(exported["model"][k], v) for k, v in weights.items())


def test_hf_out_is_a_new_or_empty_directory_outside_the_checkpoints(hf_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    step = (hf_run / "checkpoints" / "latest").resolve()
    refused = {
        "full": "is a directory that holds files",
        "afile": "exists",
        "link": "is a symbolic link",
        str(step / "hf"): "is inside a checkpoint directory",
    }
    for out, why in refused.items():
        assert main(["export", "--checkpoint", str(hf_run), "--out", out, "--format", "hf", *HF[:2]]) == 2, out
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"dtrain: error: export: --out {out} {why}; give the path of a new or empty directory outside the run's "
            "checkpoints"
        )
    assert (tmp_path / "full" / "thesis.tex").read_text() == "mine" and not (step / "hf").exists()
    (tmp_path / "empty").mkdir()
    assert (
        main(["export", "--checkpoint", str(hf_run), "--out", str(tmp_path / "empty"), "--format", "hf", *HF[:2]]) == 0
    )
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["n_embd"] == 32


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
