"""Samples and batches: a raw webdataset sample (member extension -> bytes, plus `__key__`, `__url__`)
decoded into named fields, and the batches made of them.

Two formats:
- dtrain's own shards (`x.npy` uint8 array + `y.cls` label, written by `dtrain shard --dataset`): x a float
  tensor scaled by the descriptor's x_scale, y an int64 label (float32 for regression; task lm: x, y =
  tokens[:-1], tokens[1:]). Batches are tuples `(x, y, keys)`.
- any other webdataset: `data.sample` maps members to fields by extension, e.g. {x: "jpg;png", y: "cls"}
  (the first extension present: webdataset's `a;b` convention of `to_tuple`/`rename`; a number inside a
  JSON member by a JSON pointer after `#`: y: "json#/count"; task lm: one field of token ids, shifted as
  dtrain's own), each decoded by webdataset's own decoders (`autodecode`: images to float CHW tensors in
  [0, 1], cls to int, json, txt, npy, pth), less what would run code or exhaust memory on hostile shards;
  or a function maps the raw
  sample dict to fields. Batches are dicts `{field: batched values, "__key__": [keys]}`: tensors stacked by
  torch's default_collate, or by a collate hook given the list of sample dicts (for variable shapes).

Shards are data (anyone's): no member runs code when decoded (pickle members refused, .pth read with
weights_only, .npy without pickles), and no few bytes become gigabytes (an image declaring more pixels
than PIL.Image.MAX_IMAGE_PIXELS, a .gz member inflating past GZ_LIMIT: refused before they are decoded).
In a classification every sample's label (field y) is checked against the number of classes as it is
decoded (`ClassLabels`). Each refusal is one DataError line naming the sample and its shard.

Between DataLoader workers and the training process a batch travels as `Columns`: per field a tensor
stacked over the samples, or a list of per-sample values. Both can be cut and joined along the samples,
which a collated batch in general cannot (default_collate transposes sequences, a collate hook pads);
that is what lets a rank yield exactly `batch_size` samples per batch whatever its workers' batches, and
gives a collate hook exactly the samples of its batch.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import default_collate
from webdataset import autodecode

from ..config import ConfigError
from .errors import DataError
from .fields import no_member, parse, pointed


# ---- batches as columns ----------------------------------------------------------------------------------
def _column(values: list):
    """Per-sample values as one stacked tensor where they stack (tensors, arrays, numbers), else a list."""
    if isinstance(values[0], (torch.Tensor, np.ndarray, int, float, np.number)):
        try:
            stacked = default_collate(values)  # in a DataLoader worker: straight into shared memory
            if isinstance(stacked, torch.Tensor):
                return stacked
        except (RuntimeError, TypeError):  # shapes or types differ: the collate hook's job
            pass
    return list(values)


def _join_column(parts: list):
    if all(isinstance(p, torch.Tensor) for p in parts) and len({(p.shape[1:], p.dtype) for p in parts}) == 1:
        return torch.cat(parts)
    return [v for p in parts for v in (p.unbind(0) if isinstance(p, torch.Tensor) else p)]


def _restore(value, kind):
    """A value cut from a stacked column as the sample gave it (`kind`: its type there): a collate hook or a
    transform gets the int, float or NumPy array it would get without the stacking, untouched."""
    if kind is None or not isinstance(value, torch.Tensor):
        return value
    if kind is np.ndarray:
        return value.numpy()
    return kind(value.item())  # int, float, bool, NumPy scalars


class Columns:
    """The samples of a (part of a) batch: their keys, and per field a stacked tensor or a list. `kinds`:
    the type of the values of each field stacked from something other than tensors (ints, arrays)."""

    __slots__ = ("keys", "fields", "kinds")

    def __init__(self, keys: list[str], fields: dict, kinds: Optional[dict] = None):
        self.keys, self.fields, self.kinds = keys, fields, kinds or {}

    @staticmethod
    def of(samples: list[dict]) -> "Columns":
        names = [n for n in samples[0] if n != "__key__"]
        for s in samples[1:]:
            if len(s) != len(names) + 1 or any(n not in s for n in names):
                raise DataError(
                    f"data: samples {samples[0]['__key__']!r} and {s['__key__']!r} have different "
                    f"fields ({', '.join(names)} / {', '.join(n for n in s if n != '__key__')})"
                )
        fields = {n: _column([s[n] for s in samples]) for n in names}
        return Columns([s["__key__"] for s in samples], fields, _kinds(fields, samples[0]))

    @staticmethod
    def join(parts: list["Columns"]) -> "Columns":
        if len(parts) == 1:
            return parts[0]
        return Columns(
            [k for p in parts for k in p.keys],
            {n: _join_column([p.fields[n] for p in parts]) for n in parts[0].fields},
            {k: v for p in parts for k, v in p.kinds.items()},
        )

    def __len__(self) -> int:
        return len(self.keys)

    def cut(self, start: int, end: int) -> "Columns":
        return Columns(self.keys[start:end], {n: v[start:end] for n, v in self.fields.items()}, self.kinds)

    def take(self, index: torch.Tensor) -> "Columns":
        """The samples at `index` (an int64 tensor), in that order."""
        rows = index.tolist()
        return Columns(
            [self.keys[i] for i in rows],
            {n: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for n, v in self.fields.items()},
            self.kinds,
        )

    def transformed(self, transform: Callable[[Any, str, int], Any]) -> "Columns":
        """The input (first field) of each sample through transform(input, key, k), k its index here; the
        other fields as they are (not unstacked and stacked again)."""
        name = next(iter(self.fields))
        kind = self.kinds.get(name)
        values = [transform(_restore(x, kind), k, j) for j, (x, k) in enumerate(zip(self.fields[name], self.keys))]
        column = _column(values)
        kinds = {**{k: v for k, v in self.kinds.items() if k != name}, **_kinds({name: column}, {name: values[0]})}
        return Columns(self.keys, {**self.fields, name: column}, kinds)

    def samples(self) -> list[dict]:
        """Each sample's fields as its decoding gave them (what a collate hook gets)."""
        return [
            {**{n: _restore(v[i], self.kinds.get(n)) for n, v in self.fields.items()}, "__key__": k}
            for i, k in enumerate(self.keys)
        ]

    def pin_memory(self) -> "Columns":  # DataLoader(pin_memory=True) calls this in its pinning thread
        return Columns(
            self.keys,
            {n: v.pin_memory() if isinstance(v, torch.Tensor) else v for n, v in self.fields.items()},
            self.kinds,
        )


def _kinds(fields: dict, first: dict) -> dict:
    """{field: the type of its values} for the fields stacked from values that are not tensors."""
    return {
        n: type(first[n])
        for n, v in fields.items()
        if isinstance(v, torch.Tensor) and not isinstance(first[n], torch.Tensor)
    }


def to_columns(samples: list[dict]) -> Columns:
    """The DataLoader's collate_fn: a worker's batch as columns (module level: picklable)."""
    return Columns.of(samples)


def rebatch(parts, size: int, partial: bool):
    """Exactly `size`-sample Columns from Columns of any sizes (a worker's last batch is short)."""
    pending: list[Columns] = []
    n = 0
    for part in parts:
        if n == 0 and len(part) == size:  # the common case: passed on as it is (pinned memory stays pinned)
            yield part
            continue
        pending.append(part)
        n += len(part)
        while n >= size:
            joined = Columns.join(pending)
            yield joined.cut(0, size)
            pending, n = ([joined.cut(size, n)] if n > size else []), n - size
    if partial and n > 0:
        yield Columns.join(pending)


def transform_input(sample: dict, transform: Callable, epoch: int, pass_index: int) -> dict:
    """`transform` applied to the sample's input: its first field (x)."""
    name = next(n for n in sample if n != "__key__")
    sample[name] = transform(sample[name], key=sample["__key__"], epoch=epoch, pass_index=pass_index)
    return sample


# ---- labels -------------------------------------------------------------------------------------------
def task_of_labels(y) -> Optional[str]:
    """The task a batch's targets `y` imply: floating-point values are a regression, integers (or bools)
    classes; None for anything else (strings, lists: what only the user's code knows how to score)."""
    if isinstance(y, torch.Tensor) and not y.is_complex():
        return "regression" if y.is_floating_point() else "classification"
    return None


class ClassLabels:
    """Every sample's class label (its field y) checked as it is decoded, against `num_classes` when known:
    a label outside 0..num_classes-1 would fail in cross-entropy mid-training (an IndexError on the CPU, a
    device-side assert that kills the CUDA context on a GPU), and a negative one could be ignored by it
    (ignore_index -100) while accuracy counts it. Checked in the DataLoader workers, where the samples are
    decoded: one compare a sample, none in the training process. `floats`: float labels are an error (no
    collate hook to turn them into classes)."""

    def __init__(self, num_classes: Optional[int], floats: bool = True):
        self.num_classes, self.floats = num_classes, floats

    def __call__(self, y, key: str, url: str) -> None:
        if type(y) is int:  # a .cls member's label: the common case, no array made
            lo = hi = y
        else:
            extremes = self._extremes(y, key, url)
            if extremes is None:
                return
            lo, hi = extremes
        n = self.num_classes
        if lo < 0:
            raise DataError(
                f"data: sample {key!r} of {url} has the class label {lo}; class labels are 0.."
                f"{n - 1 if n else 'num_classes-1'}: fix the label or leave the sample out of the shards"
            )
        if n is not None and hi >= n:
            raise DataError(
                f"data: sample {key!r} of {url} has the class label {hi}, but data.num_classes is {n} "
                f"(labels 0..{n - 1}): set data.num_classes to the number of classes (at least {hi + 1})"
            )

    def _extremes(self, y, key: str, url: str) -> Optional[tuple[int, int]]:
        """(smallest, largest) of integer labels; None for labels that are no classes to check (bools,
        strings, empty); float labels refused unless a collate hook makes them classes."""
        if isinstance(y, (int, float, np.number, np.ndarray)):  # bools too: their dtype is no integer
            y = np.asarray(y)
            floating, integral = y.dtype.kind in "fc", y.dtype.kind in "iu"
        elif isinstance(y, torch.Tensor):
            floating, integral = y.is_floating_point() or y.is_complex(), y.dtype != torch.bool
        else:  # a string, a list: what the collate hook makes classes of
            return None
        if floating and self.floats:
            value = y.item() if len(y.reshape(-1)) == 1 else f"a {y.dtype} array"
            raise DataError(
                f"data: sample {key!r} of {url} has the label {value}, not a class index; for numeric "
                "targets set data.task=regression"
            )
        if floating or not integral or len(y.reshape(-1)) == 0:
            return None
        return int(y.min()), int(y.max())


# ---- dtrain's own shards -------------------------------------------------------------------------------
_NPY_HEADERS: dict[bytes, tuple] = {}  # raw .npy header -> (shape, fortran_order, dtype)


def _npy(data: bytes) -> np.ndarray:
    """np.load of one .npy member, without re-parsing a header seen before: every sample of a split shares
    one, and parsing it (numpy evaluates the header dict literal) cost more than the rest of the decode."""
    buf = memoryview(data)
    if bytes(buf[:6]) != b"\x93NUMPY" or buf[6] not in (1, 2, 3):
        raise ValueError("not a .npy array")
    size_bytes = 2 if buf[6] == 1 else 4
    end = 8 + size_bytes + int.from_bytes(buf[8 : 8 + size_bytes], "little")
    header = bytes(buf[:end])
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        f = io.BytesIO(header)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        meta = _NPY_HEADERS.setdefault(header, read(f))
    shape, fortran, dtype = meta
    if dtype.hasobject:
        raise ValueError("object arrays are not loaded")
    return np.frombuffer(buf, dtype=dtype, offset=end).reshape(shape, order="F" if fortran else "C")


class DtrainFormat:
    """`x.npy` + `y.cls` samples -> {"x", "y", "__key__"} tensors; batches (x, y, keys)."""

    mapped = False

    def __init__(self, task: str = "classification", x_scale: float = 1.0, labels: Optional[ClassLabels] = None):
        self.task, self.x_scale, self.labels = task, x_scale, labels

    def checking(self, labels: Optional[ClassLabels]) -> "DtrainFormat":
        """This format, checking every class label with `labels`."""
        return DtrainFormat(self.task, self.x_scale, labels)

    def decode(self, sample: dict) -> dict:
        try:
            x = _npy(sample["x.npy"])
            if self.task == "lm":  # a window of context + 1 byte tokens: predict each next one
                tokens = torch.from_numpy(np.array(x, dtype=np.int64))  # a copy: x is read-only
                return {"x": tokens[:-1], "y": tokens[1:], "__key__": sample["__key__"]}
            y = int(sample["y.cls"])  # an ASCII integer, webdataset's convention
        except (KeyError, ValueError) as e:
            raise DataError(
                f"data: cannot decode sample {sample.get('__key__')!r} of "
                f"{sample.get('__url__', 'a shard')} ({type(e).__name__}: {e})"
            ) from None
        if self.labels is not None and self.task == "classification":
            self.labels(y, sample["__key__"], sample.get("__url__", "a shard"))
        return {
            "x": torch.from_numpy(np.asarray(x, dtype=np.float32) * self.x_scale),
            "y": torch.tensor(y, dtype=torch.float32 if self.task == "regression" else torch.int64),
            "__key__": sample["__key__"],
        }

    def batch(self, cols: Columns) -> tuple:
        return cols.fields["x"], cols.fields["y"], cols.keys


# ---- any webdataset ----------------------------------------------------------------------------------------
# Shards are data, which may come from anyone: decoding a member never runs code from it, nor inflates a few
# bytes into gigabytes. webdataset's basichandlers unpickle .pkl/.pickle/.pyd members and load .pth with
# torch.load(weights_only=False); its gzfilter inflates a .gz member whatever its size.
PICKLES = ("pkl", "pickle", "pyd")
GZ_LIMIT = 2**30  # bytes a .gz member may inflate to: 1 MB of gzip can hold 1 GB of zeros


def _gunzip(key: str, data: bytes):
    """webdataset's gzfilter (x.npy.gz is x.npy once inflated), bounded by GZ_LIMIT: zlib inflates at most
    that much, so a bomb is refused without its gigabytes ever being made."""
    if not key.endswith(".gz"):
        return None
    parts, rest, size = [], data, 0
    while rest:  # a gzip file may hold several members, one after the other
        inflate = zlib.decompressobj(wbits=31)
        parts.append(inflate.decompress(rest, GZ_LIMIT + 1 - size))
        size += len(parts[-1])
        if size > GZ_LIMIT:
            raise ValueError(
                f"it inflates to more than {GZ_LIMIT:,} bytes (dtrain.data.samples.GZ_LIMIT): a "
                "decompression bomb, or a member too large for a sample"
            )
        if not inflate.eof:
            raise ValueError("truncated gzip data")
        rest = inflate.unused_data.lstrip(b"\0")  # zero padding after the last member, as gzip allows
    return autodecode.Continue(key[:-3], b"".join(parts))


def _safe_basic(key: str, data: bytes):
    """webdataset's basichandlers (txt, cls, json, npz, msgpack, ...) less what could run code: pickles are
    refused, .pth/.pt members are read with weights_only=True (tensors and plain containers), .npy
    without pickles (an object array is refused)."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in PICKLES:
        raise ValueError(
            f"a .{ext} member is a Python pickle, which runs code when loaded; dtrain never unpickles "
            "shard data: store it as npy, json, cls or pth (tensors)"
        )
    if ext in ("pth", "pt"):
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as e:  # torch's refusal is a page long: the line naming what was refused
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            reason = next((l for l in lines if "unsupported" in l.lower()), lines[0] if lines else "")
            reason = reason.split(" was not an allowed global")[0]  # not torch's advice to allow it
            raise ValueError(f"not a plain tensor file ({reason[:200]}); dtrain never unpickles code") from None
    if ext == "npy":
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            if "allow_pickle" not in str(e):
                raise
            raise ValueError(
                "an object array, whose items are Python pickles, which run code when loaded; dtrain "
                "never unpickles shard data"
            ) from None
    return autodecode.basichandlers(key, data)


class _Image:
    """webdataset's image handler (`torchrgb`: float CHW in [0, 1]); a one-channel mode keeps its C axis.
    An image declaring more pixels than PIL.Image.MAX_IMAGE_PIXELS (PIL's own limit, 89,478,485 unless
    your code changes it) is refused from its header, before a pixel is decoded: a few bytes of PNG can
    declare 30000 x 30000 pixels (a decompression bomb, 10 GB as float RGB). PIL itself only warns up to
    twice its limit and decodes; refused here."""

    def __init__(self, mode: str):
        self.handler = autodecode.imagehandler(f"torch{mode}")

    def __call__(self, key: str, data: bytes):
        import PIL.Image  # as webdataset's handler does: not on every import of dtrain

        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            try:
                image = self.handler(key, data)
            except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
                declared = re.search(r"\((\d+) pixels\)", str(e))  # PIL's message is all that says
                pixels = f"{int(declared[1]):,}" if declared else "too many"
                raise ValueError(
                    f"the image declares {pixels} pixels, more "
                    f"than PIL.Image.MAX_IMAGE_PIXELS ({PIL.Image.MAX_IMAGE_PIXELS:,}): a decompression "
                    "bomb, or an image too large to train on; raise PIL.Image.MAX_IMAGE_PIXELS in your "
                    "own code if it is genuine"
                ) from None
        return image.unsqueeze(0) if isinstance(image, torch.Tensor) and image.ndim == 2 else image


class FieldMap:
    """{field: "ext1;ext2"}: each field from the first of its extensions the sample has, decoded by
    webdataset's Decoder (only the members a field uses are decoded; the others are ignored).
    {field: "json#/count"}: a number inside a JSON member, by a JSON pointer (RFC 6901) after `#`, which
    no member extension holds (`;` separates extensions, `.` is inside them: seg.png)."""

    def __init__(self, fields: dict[str, str], image: str = "rgb"):
        self.fields, self.pointers = parse(fields)  # fields.py: the rules dtrain launch checks too
        self.decoder = autodecode.Decoder([_Image(image)], pre=[_gunzip], post=[_safe_basic])

    def __call__(self, sample: dict) -> dict:
        out = {}
        key, url = sample["__key__"], sample.get("__url__", "a shard")
        for name, extensions in self.fields.items():
            ext = next((e for e in extensions if e in sample), None)
            if ext is None:
                raise no_member(key, url, name, extensions, sample)
            try:
                out[name] = self.decoder.decode1(ext, sample[ext])
            except Exception as e:  # PIL, json, numpy, torch: any decoder's failure is the data's
                raise DataError(
                    f"data: cannot decode {key}.{ext} of {url} "
                    f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                ) from None
            if name in self.pointers:
                out[name] = pointed(out[name], self.pointers[name], name, ext, key, url)
        return out


class MappedFormat:
    """Fields from a FieldMap or a user's function of the raw sample; batches are dicts with `__key__`."""

    mapped = True

    def __init__(
        self,
        to_fields: Callable[[dict], dict],
        collate: Optional[Callable[[list], dict]] = None,
        name: str = "data.sample",
        labels: Optional[ClassLabels] = None,
        next_tokens: bool = False,
    ):
        self.to_fields, self.collate, self.name, self.labels = to_fields, collate, name, labels
        self.next_tokens = next_tokens

    def checking(self, labels: Optional[ClassLabels]) -> "MappedFormat":
        """This format, checking every sample's class label (field y) with `labels`."""
        return MappedFormat(self.to_fields, self.collate, self.name, labels, self.next_tokens)

    def predicting_next(self) -> "MappedFormat":
        """This format for a causal language model (data.task=lm): the one field of token ids becomes x, its
        tokens but the last, and y, its tokens but the first, as dtrain's own text shards are decoded."""
        fields = getattr(self.to_fields, "fields", None)  # a FieldMap's; a function's are seen per sample
        if fields is not None and len(fields) != 1:
            raise ConfigError(
                f"config: data.task=lm takes one field of token ids, data.sample has "
                f"{', '.join(fields)}: map only the tokens, e.g. data.sample='{{x: tokens.npy}}' (y is "
                "x shifted by one)"
            )
        return MappedFormat(self.to_fields, self.collate, self.name, self.labels, True)

    def _shifted(self, fields: dict, sample: dict) -> dict:
        where = f"sample {sample.get('__key__')!r} of {sample.get('__url__', 'a shard')}"
        if len(fields) != 1:
            raise DataError(
                f"data: {self.name} returned the fields {', '.join(map(str, fields))} for {where}; "
                "data.task=lm takes one field of token ids (y is x shifted by one)"
            )
        ((name, ids),) = fields.items()
        tokens = torch.as_tensor(ids) if isinstance(ids, (torch.Tensor, np.ndarray, list)) else None
        if (
            tokens is None
            or tokens.dim() != 1
            or len(tokens) < 2
            or tokens.is_floating_point()
            or tokens.is_complex()
            or tokens.dtype == torch.bool
        ):
            what = (
                f"a {tokens.dtype} array of shape {tuple(tokens.shape)}"
                if tokens is not None
                else f"a {type(ids).__name__}"
            )
            raise DataError(
                f"data: {where}: field '{name}' is {what}; data.task=lm takes a 1-D array of at least 2 "
                "integer token ids"
            )
        tokens = tokens.long()  # cross-entropy's targets are int64; a copy where the ids were narrower
        return {"x": tokens[:-1], "y": tokens[1:]}

    def decode(self, sample: dict) -> dict:
        try:
            fields = self.to_fields(sample)
        except DataError:
            raise
        except Exception as e:  # a bug in the user's function: keep its traceback, say which sample
            e.add_note(f"({self.name} on sample {sample.get('__key__')!r} of {sample.get('__url__')})")
            raise
        if not isinstance(fields, dict) or not fields:
            raise DataError(
                f"data: {self.name} returned {type(fields).__name__} for sample "
                f"{sample.get('__key__')!r}; it must return a dict of fields, e.g. {{'x': ..., 'y': ...}}"
            )
        if self.next_tokens:
            fields = self._shifted(fields, sample)
        if self.labels is not None and "y" in fields:
            self.labels(fields["y"], sample["__key__"], sample.get("__url__", "a shard"))
        return {**{k: v for k, v in fields.items() if k != "__key__"}, "__key__": sample["__key__"]}

    def batch(self, cols: Columns) -> dict:
        if self.collate is not None:
            batch = self.collate([{k: v for k, v in s.items() if k != "__key__"} for s in cols.samples()])
            if not isinstance(batch, dict):
                raise DataError(f"data: data.collate returned {type(batch).__name__}; it must return a dict")
            return {**batch, "__key__": cols.keys}
        out = {}
        for name, values in cols.fields.items():
            try:
                out[name] = values if isinstance(values, torch.Tensor) else default_collate(values)
            except (RuntimeError, TypeError, KeyError, ValueError) as e:
                raise DataError(
                    f"data: cannot batch field '{name}' of samples {cols.keys[0]!r}... ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]}); set data.collate to batch samples of different shapes"
                ) from None
        out["__key__"] = cols.keys
        return out
