"""Models from config: any factory named by an import string (model.factory + model.kwargs), or an object
handed in from Python. dtrain's own MLP, CNN and small GPT are ordinary factories (`mlp`, `cnn`, `gpt`),
each ending in a layer named `head`."""

from __future__ import annotations

import difflib
import inspect
import math
import sys
from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..importing import describe, resolve
from .gpt import GPT

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def _norm(kind: str, features: int, conv: bool) -> list[nn.Module]:
    """The normalisation layer after a hidden linear/conv layer (none: nothing)."""
    if kind == "batch":
        return [nn.BatchNorm2d(features) if conv else nn.BatchNorm1d(features)]
    if kind == "layer":  # for conv maps: one group = normalise over channels and pixels of each sample
        return [nn.GroupNorm(1, features) if conv else nn.LayerNorm(features)]
    return []


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        out_features: int,
        activation: str,
        dropout: float,
        norm: str = "none",
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), *_norm(norm, h, conv=False), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x):
        return self.head(self.body(x))


class CNN(nn.Module):
    """3x3 conv blocks (pooling while the image is larger than 4x4), global average pool, linear head."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        channels: list[int],
        out_features: int,
        activation: str,
        dropout: float,
        norm: str = "batch",
    ):
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


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config: model.kwargs.{name}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_mlp_cnn(widths_key: str, widths, activation: str, dropout: float, init: str, norm: str) -> None:
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError(f"config: model.kwargs.{widths_key}: {widths!r} must be a list of positive integers")
    _choice("activation", activation, ACTIVATIONS)
    _choice("init", init, ("default", "normal", "uniform", "xavier", "kaiming"))
    _choice("norm", norm, ("none", "batch", "layer"))
    if not 0 <= dropout < 1:
        raise ConfigError(f"config: model.kwargs.dropout: {dropout!r} must be in [0, 1)")


def mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: list[int] = (128, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    init: str = "kaiming",
    norm: str = "none",
) -> MLP:
    """dtrain's MLP: flatten, hidden linear layers (each: norm, activation, dropout), a linear `head`.
    init: default, normal, uniform, xavier, kaiming; norm: none, batch, layer."""
    _check_mlp_cnn("hidden", list(hidden), activation, dropout, init, norm)
    model = MLP(math.prod(input_shape), list(hidden), num_outputs, activation, dropout, norm)
    init_weights(model, init, activation)
    return model


def cnn(
    input_shape: tuple[int, ...],
    num_outputs: int,
    channels: list[int] = (16, 32),
    activation: str = "relu",
    dropout: float = 0.0,
    init: str = "kaiming",
    norm: str = "batch",
) -> CNN:
    """dtrain's CNN: 3x3 conv blocks (norm, activation, 2x2 max-pool), global average pool, a linear `head`."""
    _check_mlp_cnn("channels", list(channels), activation, dropout, init, norm)
    model = CNN(tuple(input_shape), list(channels), num_outputs, activation, dropout, norm)
    init_weights(model, init, activation)
    return model


def gpt(
    input_shape: tuple[int, ...],
    num_outputs: Optional[int] = None,
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    block_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    bias: bool = True,
    dropout: float = 0.0,
) -> GPT:
    """dtrain's GPT (GPT-2 124M's shape by default, with the data set's vocabulary and context unless
    vocab_size / block_size say otherwise; 50304 is GPT-2's vocabulary padded for fast matmuls). GPT-2's own
    initialisation: normal 0.02, residual projections scaled by depth."""
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config: model.kwargs.{name}: {value!r} must be a positive integer")
    if n_embd % n_head:
        raise ConfigError(f"config: model.kwargs.n_embd: {n_embd} must be a multiple of n_head ({n_head})")
    if not (vocab_size or num_outputs):  # token shards of one's own say no vocabulary: data.num_classes or this
        raise ConfigError(
            "config: model.kwargs.vocab_size: the data set does not say how many token ids there are; "
            "set model.kwargs.vocab_size (or data.num_classes) to the vocabulary's size"
        )
    return GPT(vocab_size or num_outputs, block_size or input_shape[-1], n_layer, n_head, n_embd, dropout, bias)


# dtrain's own factories, by the short names model.factory accepts: the same import path a user's takes
BUILTIN = {"mlp": "dtrain.models:mlp", "cnn": "dtrain.models:cnn", "gpt": "dtrain.models:gpt"}
FACTS = ("input_shape", "num_outputs")  # what a factory may ask of the data set, by parameter name


def instantiate(factory: Callable, kwargs: dict, key: str, facts: Optional[Mapping] = None):
    """factory(**kwargs), with `_target_` mappings inside kwargs built first and the data set's facts passed
    where the factory's signature names them. Arguments the factory rejects are a one-line ConfigError
    naming `key`; an exception raised inside the factory is the factory's own (its traceback is kept)."""
    kwargs = {k: build_targets(v, f"{key}.{k}") for k, v in kwargs.items()}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have none: pass what was given
        params = {}
    for name in FACTS:
        if name in params and name not in kwargs:
            if (facts or {}).get(name) is not None:
                kwargs[name] = facts[name]
            elif facts is not None and params[name].default is inspect.Parameter.empty:
                fix = "set data.num_classes" if name == "num_outputs" else "describe the data set's shape"
                why = facts.why(name) if hasattr(facts, "why") else ""
                raise ConfigError(
                    f"config: model.kwargs: {describe(factory)} needs {name}, which the data set "
                    f"does not give{f' ({why})' if why else ''}; {fix} or model.kwargs.{name}"
                )
    try:
        return factory(**kwargs)
    except TypeError as e:
        # Raised while binding the arguments, the traceback ends in this frame; raised inside the factory it
        # goes on into the factory's own frames. (A signature can't tell in advance: Hugging Face's configs
        # accept more than theirs shows.)
        if e.__traceback__ is not None and e.__traceback__.tb_next is None:
            raise ConfigError(
                f"config: {key}: {describe(factory)} rejects these arguments ({e}); "
                f"its parameters: {', '.join(params) or 'none'}"
            ) from None
        raise


def build_targets(value, key: str):
    """A mapping with `_target_` (an import string) becomes the object it builds; lists and other mappings
    are walked; anything else is returned as it is."""
    if isinstance(value, dict) and "_target_" in value:
        rest = {k: v for k, v in value.items() if k != "_target_"}
        return instantiate(resolve(value["_target_"], f"{key}._target_"), rest, key)
    if isinstance(value, dict):
        return {k: build_targets(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [build_targets(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def build_model(
    cfg: ModelConfig, facts: dict, seed: int, given=None, log: Callable[[str], None] = lambda line: None
) -> nn.Module:
    """The model of model.factory + model.kwargs, or `given` (an nn.Module, or a callable returning one,
    handed in from Python). Seeded, so every rank builds the same initial weights (DDP also broadcasts
    rank 0's; sharding engines rely on it). `log` hears of config keys a Hugging Face config ignores."""
    torch.manual_seed(seed)
    if isinstance(given, nn.Module):
        return given
    if given is not None and not callable(given):
        raise ConfigError(
            f"config: model: a {type(given).__name__} was handed in; give an nn.Module or a callable that returns one"
        )
    if given is not None:
        model = instantiate(given, dict(cfg.kwargs), "model.kwargs", facts)
        source = describe(given)
    else:
        factory = resolve_factory(cfg.factory)
        model = instantiate(factory, dict(cfg.kwargs), "model.kwargs", facts)
        source = cfg.factory
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config: model.factory: {source} returned a {type(model).__name__}, not a torch.nn.Module")
    for line in unknown_config_keys(dict(cfg.kwargs)):
        log(line)
    return model


def unknown_config_keys(kwargs: dict, key: str = "model.kwargs") -> list[str]:
    """One line for each Hugging Face config built from a `_target_` mapping in `kwargs` that was given keys
    its class does not know. A PretrainedConfig keeps any keyword as an attribute, one the model never
    reads, so a typo (`hiden_size`) would train silently with the default; the model is built all the same
    (a key of your own on a config may be meant)."""
    lines = []
    for path, cls, given in _targets(kwargs, key):
        transformers = sys.modules.get("transformers")  # imported by the _target_ if it is one of its configs
        if transformers is None or not (isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)):
            continue
        try:
            default = cls()
        except Exception:  # a config that needs arguments (composite ones): not checked
            continue
        known = (
            set(default.to_dict())
            | set(getattr(cls, "attribute_map", {}))
            | {name for c in cls.__mro__ if "__init__" in vars(c) for name in _parameters(c.__init__)}
        )
        unknown = [k for k in given if k not in known and not hasattr(default, k)]  # hasattr: properties (num_labels)
        if unknown:
            named = [
                k + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(k, sorted(known), n=1))
                for k in unknown
            ]
            lines.append(
                f"model: {path}: keys unknown to {cls.__name__} (kept by it, unused by the model): {', '.join(named)}"
            )
    return lines


def _targets(value, key: str):
    """(key, class or callable, given keyword names) of every `_target_` mapping in `value`."""
    if isinstance(value, dict):
        if "_target_" in value:
            yield key, resolve(value["_target_"], f"{key}._target_"), [k for k in value if k != "_target_"]
        for k, v in value.items():
            yield from _targets(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _targets(v, f"{key}[{i}]")


def _parameters(function) -> list[str]:
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def resolve_factory(spec: str):
    return resolve(spec, "model.factory", BUILTIN)


def describe_factories() -> list[str]:
    """One line per built-in factory: its model.kwargs with their defaults, and what it builds."""
    lines = []
    for short, spec in BUILTIN.items():
        factory = resolve(spec, "model.factory")
        args = [f"{n}={p.default!r}" for n, p in inspect.signature(factory).parameters.items() if n not in FACTS]
        doc = " ".join((factory.__doc__ or "").split())
        lines.append(f"model.kwargs (model.factory={short}): {', '.join(args)}  # {doc}")
    return lines


def find_module(model: nn.Module, name: str, key: str = "model.head") -> nn.Module:
    """The submodule called `name` (dotted), or a one-line ConfigError listing the model's top-level ones."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        tops = [n for n, _ in model.named_children()]
        raise ConfigError(
            f"config: {key}: the model has no module '{name}'; its top-level modules: {', '.join(tops) or 'none'}"
        ) from None


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
