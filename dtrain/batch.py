"""What dtrain needs to know of a batch and of a model's output, whatever their shape.

A batch is what the data set yields: dtrain's own data sets give a tuple `(x, y, keys)`; a sample
mapping gives a dict `{"x": ..., "y": ..., "__key__": [keys]}` (any field names; the keys always under
`__key__`, webdataset's convention). A model's output is a tensor, a dict or a Hugging Face `ModelOutput`
(a dict too). The built-in loss and metrics take the output's logits and the batch's target; a user's
loss and metrics take (output, batch) as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from .config import ConfigError

KEY = "__key__"


def keys(batch) -> list[str]:
    """The sample keys of a batch (for the sample-key log)."""
    if isinstance(batch, Mapping):
        return list(batch.get(KEY, []))
    return list(batch[-1]) if isinstance(batch, (tuple, list)) and len(batch) > 2 else []


def size(batch) -> int:
    """Samples in a batch: its keys where it has them (a collate hook's fields may all be lists or strings,
    or lead with a tensor that is not per sample), else the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, Mapping) and isinstance(batch.get(KEY), (list, tuple)):
        return len(batch[KEY])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return len(v)
        if isinstance(v, Mapping) or (isinstance(v, (tuple, list)) and not _is_keys(v)):
            n = size(v)  # nested fields; a list of strings is the keys
            if n:
                return n
    return 0


def to_device(batch, move: Callable[[torch.Tensor], torch.Tensor]):
    """Every tensor of a (nested) batch through `move` (the engine's to_device); keys and other values stay."""
    if isinstance(batch, torch.Tensor):
        return move(batch)
    if isinstance(batch, (tuple, list)):
        if _is_keys(batch):  # not walked string by string: ~1 us a key, per step
            return batch
        return type(batch)(to_device(v, move) for v in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, move) for k, v in batch.items()}
    return batch


def _is_keys(values) -> bool:
    """A list of strings (a batch's keys, or a text field): nothing in it to move or to count."""
    return all(isinstance(k, str) for k in values)


def model_input(batch):
    """What the default forward passes: x of a tuple batch or of a dict batch that has one."""
    if isinstance(batch, Mapping):
        return batch["x"]
    return batch[0]


def default_forward(model, batch):
    """model(x) for (x, y, keys) and {"x": ...}; model(**fields) for other dicts (e.g. input_ids, labels),
    fields starting with `__` (webdataset's metadata) left out."""
    if isinstance(batch, Mapping) and "x" not in batch:
        return model(**{k: v for k, v in batch.items() if not k.startswith("__")})
    return model(model_input(batch))


def target(batch) -> torch.Tensor:
    """The target the built-in loss and metrics compare with: y."""
    if isinstance(batch, Mapping):
        if "y" not in batch:
            raise ConfigError(
                f"config: loss: the built-in losses and metrics need a target `y` in the batch; it has "
                f"{', '.join(k for k in batch if not k.startswith('__'))}: set loss.fn (and "
                "metrics.fn or metrics.builtin=false)"
            )
        y = batch["y"]
    else:
        y = batch[1]
    if not isinstance(y, torch.Tensor):  # e.g. a dict of labels from data.collate
        what = f"a dict ({', '.join(map(str, y))})" if isinstance(y, Mapping) else f"a {type(y).__name__}"
        raise ConfigError(
            f"config: loss: the batch's target y is {what}; the built-in losses and metrics take one "
            "tensor of labels or values: return that as y from data.collate, or set loss.fn (and "
            "metrics.fn or metrics.builtin=false) to score it yourself"
        )
    return y


def token_ids(batch) -> Optional[tuple[str, torch.Tensor]]:
    """(field, tensor) of a batch's token ids: the model input (x, else a dict batch's `input_ids`, Hugging
    Face's name) when it is an integer tensor of shape [batch, tokens]. None for other inputs (images,
    features, strings)."""
    if isinstance(batch, Mapping):
        name = "x" if "x" in batch else "input_ids"
        ids = batch.get(name)
    else:
        name, ids = "x", model_input(batch)
    if (
        isinstance(ids, torch.Tensor)
        and ids.dim() == 2
        and not ids.is_floating_point()
        and not ids.is_complex()
        and ids.dtype != torch.bool
    ):
        return name, ids
    return None


def logits(output: Any) -> torch.Tensor:
    """The prediction in a model's output: the tensor itself, or a dict's / ModelOutput's `logits`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    what = (
        f"a dict without logits ({', '.join(map(str, output))})"
        if isinstance(output, Mapping)
        else f"a {type(output).__name__}"
    )
    raise ConfigError(
        f"config: loss: the built-in losses and metrics need a tensor or `logits` from the model, "
        f"which returned {what}: set loss.fn (and metrics.fn or metrics.builtin=false)"
    )


def check_token_ids(model: torch.nn.Module, batch) -> None:
    """A one-line ConfigError where the batch's token ids (token_ids) reach past the model's input embedding:
    torch's own error is `IndexError: index out of range in self`, deep in a traceback."""
    ids = token_ids(batch)
    get = getattr(model, "get_input_embeddings", None)  # Hugging Face's; else the first embedding
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        embedding = None
    if not isinstance(embedding, torch.nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if ids is None or embedding is None or ids[1].numel() == 0:
        return
    (name, t), size = ids, embedding.num_embeddings
    low, high = int(t.min()), int(t.max())
    if high >= size or low < 0:
        where = next((n for n, m in model.named_modules() if m is embedding), "") or "embedding"
        bad = f"token id {high}" if high >= size else f"a negative token id ({low})"
        raise ConfigError(
            f"config: model: batch field '{name}' holds {bad}, the model's input embedding ({where}) "
            f"has {size} entries (ids 0..{size - 1}): build the model with a vocabulary of at least "
            f"{max(high + 1, size)} (e.g. model.kwargs.vocab_size) or check the data's token ids"
        )


def mismatch_hint(model: torch.nn.Module, batch, error: Exception) -> str:
    """One line naming the batch field and the fix, for the data/model mismatches users commonly make (the
    error is torch's, raised in the model's first layer): the field's dtype, its device, its shape against
    the first layer's. "" when the error is none of these."""
    message = str(error)
    fields = _tensor_fields(batch)
    param = next(model.parameters(), None)
    if param is None or not fields:
        return ""
    first = next(
        (
            m
            for m in model.modules()
            if isinstance(
                m,
                (
                    torch.nn.Linear,
                    torch.nn.Conv1d,
                    torch.nn.Conv2d,
                    torch.nn.Conv3d,
                    torch.nn.Embedding,
                    torch.nn.EmbeddingBag,
                ),
            )
        ),
        None,
    )
    takes_ids = isinstance(first, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    if "device" in message:
        name, t = next(((n, t) for n, t in fields if t.device != param.device), (None, None))
        if name is not None:  # moved away again, or out of dtrain's reach (only dicts, lists, tuples are walked)
            return (
                f"hint: batch field '{name}' is on {t.device}, the model on {param.device}: return it from "
                "data.collate in a dict, list or tuple, which dtrain moves to the model's device"
            )
        return (
            f"hint: the batch is on {param.device} with the model; a tensor your forward, loss or metrics "
            "create must be made there too, e.g. torch.zeros(n, device=x.device)"
        )
    if "type" in message and takes_ids:  # "Expected tensor for argument #1 'indices' to have ... Long, Int"
        name, t = next(((n, t) for n, t in fields if t.is_floating_point()), (None, None))
        if name is not None:
            return (
                f"hint: batch field '{name}' is {t.dtype}, the model's first layer ({type(first).__name__}) "
                "takes integer ids: make them in data.transform or data.collate, e.g. x.long()"
            )
    elif "type" in message:  # "same dtype", "expected scalar type", "Input type (...)"
        name, t = next(((n, t) for n, t in fields if t.dtype != param.dtype), (None, None))
        if name is not None:
            pixels = " (/ 255 for 8-bit pixels)" if t.dtype == torch.uint8 else ""
            return (
                f"hint: batch field '{name}' is {t.dtype}, the model's weights are {param.dtype}: convert it "
                f"in data.transform or data.collate, e.g. x.to({param.dtype}){pixels}"
            )
    if first is not None and any(
        s in message for s in ("shapes cannot be multiplied", "channels", "size mismatch", "channel dimension")
    ):  # the last: Hugging Face's check
        name, t = fields[0]
        if isinstance(first, torch.nn.Conv2d) and t.dim() == 4 and t.shape[1] != first.in_channels:
            return (
                f"hint: batch field '{name}' has {t.shape[1]} channels per image, the model's first layer "
                f"(Conv2d) takes in_channels={first.in_channels}: set data.image (l: 1 channel, rgb: 3, rgba: "
                "4) to match, or build the model for the data's channels"
            )
        wants = (
            f"in_features={first.in_features}"
            if isinstance(first, torch.nn.Linear)
            else f"in_channels={first.in_channels}"
            if hasattr(first, "in_channels")
            else ""
        )
        return (
            f"hint: batch field '{name}' has shape {tuple(t.shape[1:])} per sample, the model's first layer "
            f"({type(first).__name__}) takes {wants}: reshape the input in data.transform or data.collate, or "
            "build the model for it (a model factory with an `input_shape` parameter is given the data's)"
        )
    return ""


def _tensor_fields(batch) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the inputs a model is given: x of a tuple batch or of a dict that has one, else a
    dict batch's tensor fields."""
    if isinstance(batch, Mapping):
        names = ["x"] if "x" in batch else [k for k in batch if not k.startswith("__")]
        return [(n, batch[n]) for n in names if isinstance(batch[n], torch.Tensor)]
    x = model_input(batch)
    return [("x", x)] if isinstance(x, torch.Tensor) else []
