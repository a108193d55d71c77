"""Models built from config: an MLP and a small CNN, each ending in a layer named `head`."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def _norm(kind: str, features: int, conv: bool) -> list[nn.Module]:
    """The normalisation layer after a hidden linear/conv layer (none: nothing)."""
    if kind == "batch":
        return [nn.BatchNorm2d(features) if conv else nn.BatchNorm1d(features)]
    if kind == "layer":  # for conv maps: one group = normalise over channels and pixels of each sample
        return [nn.GroupNorm(1, features) if conv else nn.LayerNorm(features)]
    return []


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], out_features: int, activation: str, dropout: float,
                 norm: str = "none"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), *_norm(norm, h, conv=False), ACTIVATIONS[activation](),
                       nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x):
        return self.head(self.body(x))


class CNN(nn.Module):
    """3x3 conv blocks (pooling while the image is larger than 4x4), global average pool, linear head."""

    def __init__(self, in_shape: tuple[int, ...], channels: list[int], out_features: int, activation: str,
                 dropout: float, norm: str = "batch"):
        super().__init__()
        c, size = in_shape[0], in_shape[-1]
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, padding=1), *_norm(norm, ch, conv=True), ACTIVATIONS[activation]()]
            if size > 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, out_features)

    def forward(self, x):
        return self.head(self.body(x))


def init_weights(model: nn.Module, scheme: str, activation: str) -> None:
    """Initialise linear and conv weights by a named scheme; biases start at zero."""
    if scheme == "default":
        return
    nonlinearity = "relu" if activation in ("relu", "gelu", "silu") else "tanh" if activation == "tanh" else "linear"
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = m.weight
        if scheme == "normal":
            nn.init.normal_(w, 0.0, 0.02)
        elif scheme == "uniform":
            bound = 1 / math.sqrt(nn.init._calculate_correct_fan(w, "fan_in"))
            nn.init.uniform_(w, -bound, bound)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain(nonlinearity))
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(cfg, input_shape: tuple[int, ...], out_features: int, seed: int) -> nn.Module:
    """Same seed on every rank, so every replica starts identical (DDP also broadcasts rank 0's)."""
    torch.manual_seed(seed)
    norm = cfg.norm if cfg.norm != "auto" else ("batch" if cfg.name == "cnn" else "none")
    if cfg.name == "mlp":
        model = MLP(math.prod(input_shape), cfg.hidden, out_features, cfg.activation, cfg.dropout, norm)
    else:
        model = CNN(tuple(input_shape), cfg.channels, out_features, cfg.activation, cfg.dropout, norm)
    init_weights(model, cfg.init, cfg.activation)
    return model
