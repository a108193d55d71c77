"""Model blocks: activations, seeded initialisation, dropout only in training, norm as a config switch."""

import math

import pytest
import torch
from torch import nn

from dtrain.config import load_config
from dtrain.models import ACTIVATIONS, build_model


def model(*overrides, shape=(1, 8, 8), out=10, seed=0):
    return build_model(load_config(None, list(overrides)).model, {"input_shape": shape, "num_outputs": out}, seed)


@pytest.mark.parametrize("name, kind, norm_types", [
    ("mlp", "auto", set()), ("mlp", "none", set()), ("mlp", "batch", {nn.BatchNorm1d}),
    ("mlp", "layer", {nn.LayerNorm}),
    ("cnn", "auto", {nn.BatchNorm2d}), ("cnn", "none", set()), ("cnn", "batch", {nn.BatchNorm2d}),
    ("cnn", "layer", {nn.GroupNorm}),
])
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
    expected_std = {"normal": 0.02, "uniform": 1 / math.sqrt(fan_in) / math.sqrt(3),
                    "xavier": math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out)), "kaiming": math.sqrt(2 / fan_in)}
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
