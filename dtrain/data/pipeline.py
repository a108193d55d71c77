"""Per-rank minibatch streams read from webdataset shards.

The sample order is a pure function of (seed, epoch, rank, world_size, worker): the shard list is
permuted by a seeded RNG, an explicit node split (every world_size-th shard from `rank`, what webdataset's
`split_by_node` does, but without reading rank and world size from the environment, so the streams of
other ranks and other world sizes can be replayed) and webdataset's `split_by_worker` hand shards to
ranks and then to DataLoader workers, and each worker shuffles within a buffer seeded from the same
tuple. Resuming mid-epoch rebuilds that order and skips what was consumed; resuming on another number of
ranks reads the rest of the epoch as dealt by `elastic.py` (`dealt_epoch`).

Every rank yields exactly `batches_per_epoch` training batches, computed from the shard index before
any data is read: a rank whose shards run out wraps around to the start of its own order, a rank with
more stops early. That keeps the collectives of all ranks in lock step even with uneven shards.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import random
import tarfile
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from .elastic import as_counts
from .shards import DataError, ShardIndex
from .tario import tarfile_to_samples

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def _raise_data_error(exn: Exception) -> bool:
    """webdataset handler: an unreadable shard is a user-facing error naming the file."""
    where = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "a shard")
    if isinstance(exn, (tarfile.TarError, OSError, EOFError, ValueError)):
        raise DataError(f"data: cannot read {where} ({type(exn).__name__}: {exn.args[0] if exn.args else ''})")
    raise exn


_NPY_HEADERS: dict[bytes, tuple] = {}  # raw .npy header -> (shape, fortran_order, dtype)


def _npy(data: bytes) -> np.ndarray:
    """np.load of one .npy member, without re-parsing a header seen before: every sample of a split shares
    one, and parsing it (numpy evaluates the header dict literal) cost more than the rest of the decode."""
    buf = memoryview(data)
    if bytes(buf[:6]) != b"\x93NUMPY" or buf[6] not in (1, 2, 3):
        raise ValueError("not a .npy array")
    size_bytes = 2 if buf[6] == 1 else 4
    end = 8 + size_bytes + int.from_bytes(buf[8:8 + size_bytes], "little")
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


def decode(sample: dict, labels: bool = True) -> tuple:
    """A raw webdataset sample -> (x array, label, key). Labels are `y.cls` (an ASCII integer,
    webdataset's convention); a language model's samples have none (`labels=False`: the key stands in,
    the targets are x shifted)."""
    try:
        x = _npy(sample["x.npy"])
        y = int(sample["y.cls"]) if labels else sample["__key__"]
    except (KeyError, ValueError) as e:
        where = sample.get("__url__", "a shard")
        raise DataError(f"data: cannot decode sample {sample.get('__key__')!r} of {where} "
                        f"({type(e).__name__}: {e})") from None
    return x, y, sample["__key__"]


def _worker_shuffle(src, bufsize: int, seed: str):
    """Buffer shuffle seeded from (seed, epoch, rank) plus the worker id, known only inside the worker."""
    info = get_worker_info()
    rng = random.Random(f"{seed}/worker{info.id if info else 0}")  # str seeds are stable across runs
    return wds.filters._shuffle(src, bufsize, bufsize, rng)


worker_shuffle = wds.pipelinefilter(_worker_shuffle)


def _first_per_shard_filter(src, counts: dict[str, int]):
    """Only the first counts[shard] samples of each shard (the index may list a subset of a split).
    Runs before the shuffle buffer, so the subset is the same whatever the seed. A shard that ends
    with fewer samples than the index lists (cut at a member boundary, which a tar reader can't tell
    from its end) is an error, not a silently shorter epoch."""
    seen: dict[str, int] = {}
    current = None
    for sample in src:
        url = sample.get("__url__")
        if url != current:  # shards are read one after the other: the last one is complete
            _check_complete(current, seen, counts)
            current = url
        seen[url] = seen.get(url, 0) + 1
        if url not in counts or seen[url] <= counts[url]:
            yield sample
    _check_complete(current, seen, counts)


def _check_complete(url, seen: dict[str, int], counts: dict[str, int]) -> None:
    if url in counts and seen.get(url, 0) < counts[url]:
        raise DataError(f"data: cannot read {url} (it holds {seen.get(url, 0)} samples, the index lists "
                        f"{counts[url]}: truncated?)")


_first_per_shard = wds.pipelinefilter(_first_per_shard_filter)


def _split_by_node_filter(src, rank: int, world_size: int):
    """Every world_size-th shard from `rank`: webdataset's split_by_node with rank and world size given."""
    yield from itertools.islice(src, rank, None, world_size)


_split_by_node = wds.pipelinefilter(_split_by_node_filter)


def _keep_counts_filter(src, counts: dict):
    """Only the samples dealt to this rank, each as often as dealt (counts[url][key])."""
    for sample in src:
        for _ in range(counts.get(sample.get("__url__"), {}).get(sample["__key__"], 0)):
            yield dict(sample)


_keep_counts = wds.pipelinefilter(_keep_counts_filter)


def _rebatch(batches: Iterator[Batch], size: int, partial: bool) -> Iterator[Batch]:
    """Exact `size`-row batches from worker batches that may end short (each worker's last one)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    keys: list[str] = []
    n = 0
    for x, y, k in batches:
        if n == 0 and len(x) == size:  # the common case: pass through without copying
            yield x, y, list(k)
            continue
        xs.append(x), ys.append(y), keys.extend(k)
        n += len(x)
        while n >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size], keys[:size]
            xs, ys, keys = [x_all[size:]], [y_all[size:]], keys[size:]
            n -= size
    if partial and n > 0:
        yield torch.cat(xs), torch.cat(ys), keys


class ShardStream:
    """One split's minibatches for this rank. Training streams are shuffled and cut to a fixed length."""

    def __init__(self, index: ShardIndex, split: str, *, batch_size: int, rank: int, world_size: int,
                 seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 0, train: bool = False,
                 grad_accum: int = 1, remainder: str = "drop", pin_memory: bool = False,
                 transform: Optional[Callable] = None, prefetch_factor: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None):
        self.index, self.split = index, split
        self.urls = index.shards(split)
        # samples to read from each shard: all of them, but fewer where the index is a subset
        self.shard_counts = dict(zip(self.urls, index.counts(split)))
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers, self.train = seed, num_workers, train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.pin_memory, self.transform = pin_memory, transform
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.regression = index.task == "regression"
        self.lm = index.task == "lm"
        self.grad_accum, self.remainder, self.prefetch_arg = grad_accum, remainder, prefetch_factor
        n = index.num_samples(split)
        per_step = batch_size * world_size * grad_accum
        steps = n // per_step if remainder == "drop" else math.ceil(n / per_step)
        if train and steps == 0:
            raise DataError(f"data: '{split}' has {n} samples, fewer than one global batch "
                            f"(batch_size {batch_size} x {world_size} ranks x grad_accum {grad_accum} = {per_step})")
        # given: an elastic resume with an approximate global batch keeps the checkpoint's epoch length
        self.steps_per_epoch = steps_per_epoch or steps  # optimizer steps
        self.batches_per_epoch = self.steps_per_epoch * grad_accum  # micro-batches per rank

    def relayout(self, *, rank: int, world_size: int, batch_size: int, grad_accum: int, num_workers: int,
                 steps_per_epoch: Optional[int] = None) -> "ShardStream":
        """The same split and seed for another rank layout (an elastic resume, or replaying an old one)."""
        return ShardStream(self.index, self.split, batch_size=batch_size, rank=rank, world_size=world_size,
                           seed=self.seed, num_workers=num_workers, shuffle_buffer=self.shuffle_buffer,
                           train=self.train, grad_accum=grad_accum, remainder=self.remainder,
                           pin_memory=self.pin_memory, transform=self.transform,
                           prefetch_factor=self.prefetch_arg, steps_per_epoch=steps_per_epoch)

    def shard_order(self, epoch: int) -> list[str]:
        if not self.train:
            return list(self.urls)
        order = list(self.urls)
        random.Random(f"{self.seed}/shards/epoch{epoch}").shuffle(order)
        return order

    def rank_samples(self, epoch: int) -> int:
        """Samples this rank's shards hold this epoch (split_by_node takes every world_size-th shard)."""
        counts = dict(zip(self.urls, self.index.counts(self.split)))
        return sum(counts[u] for u in self.shard_order(epoch)[self.rank::self.world_size])

    def _to_tensors(self, sample, epoch: int = 0, pass_index: int = 0, transform: bool = True):
        x, y, key = sample
        if self.lm:  # a window of context + 1 byte tokens: predict each next one
            tokens = torch.from_numpy(np.array(x, dtype=np.int64))  # a copy: x is read-only
            return tokens[:-1], tokens[1:], key
        x = torch.from_numpy(np.asarray(x, dtype=np.float32) * self.index.x_scale)
        y = torch.tensor(y, dtype=torch.float32 if self.regression else torch.int64)
        if self.transform is not None and transform:  # e.g. augmentation: a pure function of (x, key, epoch, pass)
            x = self.transform(x, key=key, epoch=epoch, pass_index=pass_index)
        return x, y, key

    def _pipeline(self, epoch: int, pass_index: int = 0) -> wds.DataPipeline:
        stages = [wds.SimpleShardList(self.shard_order(epoch)), _split_by_node(self.rank, self.world_size),
                  wds.split_by_worker, tarfile_to_samples(handler=_raise_data_error),
                  _first_per_shard(self.shard_counts)]
        return self._decoded(stages, f"{self.seed}/epoch{epoch}/rank{self.rank}", epoch, pass_index)

    def _decoded(self, stages: list, shuffle_seed: str, epoch: int, pass_index: int) -> wds.DataPipeline:
        if self.shuffle_buffer > 1:
            stages.append(worker_shuffle(self.shuffle_buffer, shuffle_seed))
        stages += [wds.map(functools.partial(decode, labels=not self.lm)),
                   wds.map(functools.partial(self._to_tensors, epoch=epoch, pass_index=pass_index))]
        return wds.DataPipeline(*stages)

    def check_readable(self, urls: list[str], first_only: bool = False) -> int:
        """Read and decode every sample of `urls` (or only each one's first) in this process, without
        node splitting. -> samples read. Raises DataError naming a shard that can't be read."""
        def samples(url_list):
            stages = [wds.SimpleShardList(url_list), tarfile_to_samples(handler=_raise_data_error),
                      wds.map(functools.partial(decode, labels=not self.lm))]
            return iter(wds.DataPipeline(*stages))
        if first_only:
            return sum(1 for url in urls if next(samples([url]), None) is not None)
        return sum(1 for _ in samples(urls))

    def first_batch(self, n: int):
        """The split's first `n` samples (in shard order) as one batch, read in this process: no workers, no
        shuffle, no transform. What the model and the loss are probed with before training."""
        stages = [wds.SimpleShardList(self.urls), tarfile_to_samples(handler=_raise_data_error),
                  _first_per_shard(self.shard_counts), wds.map(functools.partial(decode, labels=not self.lm)),
                  wds.map(functools.partial(self._to_tensors, transform=False))]
        return torch.utils.data.default_collate(list(itertools.islice(iter(wds.DataPipeline(*stages)), n)))

    def _one_pass(self, epoch: int, pass_index: int = 0, pipeline: Optional[wds.DataPipeline] = None) -> Iterator[Batch]:
        # A fresh DataLoader per pass: its workers fork with this epoch's shard order baked in.
        # Its own generator: otherwise each new iterator draws a seed from the global torch RNG and
        # shifts every dropout mask after it, so a resumed run would diverge from an uninterrupted one.
        loader = DataLoader(pipeline or self._pipeline(epoch, pass_index), batch_size=self.batch_size,
                            num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False, prefetch_factor=self.prefetch_factor,
                            generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        yield from loader

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start..` of this epoch: exactly `batches_per_epoch - start` for training,
        one pass (last batch partial) for evaluation."""
        if not self.train:
            yield from _rebatch(self._one_pass(epoch), self.batch_size, partial=True)
            return
        if self.rank_samples(epoch) == 0:
            raise DataError(f"data: rank {self.rank} got no '{self.split}' shards in epoch {epoch} "
                            f"({len(self.urls)} shards for {self.world_size} ranks); write more, smaller shards")
        passes = itertools.chain.from_iterable(self._one_pass(epoch, i) for i in itertools.count())
        batches = _rebatch(passes, self.batch_size, partial=False)
        yield from itertools.islice(batches, start, self.batches_per_epoch)

    def dealt_epoch(self, epoch: int, segment: int, items: list[tuple[str, str]], start: int = 0) -> Iterator[Batch]:
        """Batches `start..` of the samples dealt to this rank for the rest of `epoch` (elastic resume):
        its shards, read in order and filtered by key, shuffled in a buffer seeded from (seed, epoch,
        segment, rank). `items` ((url, key), in shard order) are exactly batches x batch_size samples."""
        urls, counts = as_counts(items)
        stages = [wds.SimpleShardList(urls), wds.split_by_worker,
                  tarfile_to_samples(handler=_raise_data_error), _keep_counts(counts)]
        pipeline = self._decoded(stages, f"{self.seed}/epoch{epoch}/elastic{segment}/rank{self.rank}", epoch, 0)
        batches = _rebatch(self._one_pass(epoch, 0, pipeline), self.batch_size, partial=False)
        total, n = len(items) // self.batch_size, start
        for n, batch in enumerate(itertools.islice(batches, start, total), start + 1):
            yield batch
        if n < total:  # a shard shorter than when the epoch began
            raise DataError(f"data: rank {self.rank} read {n * self.batch_size} of the {len(items)} samples dealt "
                            f"to it for the rest of epoch {epoch} from {', '.join(urls)}: a shard changed or is truncated")
