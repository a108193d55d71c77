"""Per-rank minibatch streams read from webdataset shards.

The sample order is a pure function of (seed, epoch, rank, world_size, worker): the shard list is
permuted by a seeded RNG, an explicit node split (every world_size-th shard from `rank`, what webdataset's
`split_by_node` does, but without reading rank and world size from the environment, so the streams of
other ranks and other world sizes can be replayed) and webdataset's `split_by_worker` hand shards to
ranks and then to DataLoader workers, and each worker shuffles within a buffer seeded from the same
tuple. Resuming mid-epoch rebuilds that order and skips what was consumed; resuming on another number of
ranks reads the rest of the epoch as dealt by `elastic.py` (`dealt_epoch`). A sample is known by its
shard and its position in it, so replaying an order needs only the descriptors' counts.

Every rank yields exactly `batches_per_epoch` training batches, computed from the sample counts before
any data is read: a rank whose shards run out wraps around to the start of its own order, a rank with
more stops early. That keeps the collectives of all ranks in lock step even with uneven shards.

A split that fits in memory (`in_memory`) is read and decoded once; its training epochs are then the same
order, computed by `elastic.py`'s replay (the one a test holds against the real pipelines), gathered from
memory: the same batches and resume as from the shards, at the speed of indexing a tensor.

Evaluation splits (validation, test) are dealt by sample, not by shard, in memory or streamed: rank r
evaluates the samples at positions r, r + world_size, ... of the split's fixed order (its shards in order,
each in its own order), so every rank gets an equal share (±1 sample) however few shards the split has, and
none idles through an evaluation (nor does a metric that fails on some rank's samples go unseen).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import tarfile
from typing import Callable, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from .elastic import EpochReplay, Segment, as_counts, dealt_order, shuffle_seed
from .samples import Columns, DtrainFormat, rebatch, to_columns, transform_input
from .shards import DataError, ShardIndex
from .tario import tarfile_to_samples

Batch = tuple  # (x, y, keys) for dtrain's own shards; a dict with "__key__" for mapped samples


def _raise_data_error(exn: Exception) -> bool:
    """webdataset handler: an unreadable shard is a user-facing error naming it (the url is the last
    argument webdataset's opener and dtrain's tar reader add)."""
    where = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "a shard"
    if isinstance(exn, (tarfile.TarError, OSError, EOFError, ValueError)):
        raise DataError(f"data: cannot read {where} ({type(exn).__name__}: {exn.args[0] if exn.args else ''})")
    raise exn


def _worker_shuffle(src, bufsize: int, seed: str):
    """Buffer shuffle seeded from (seed, epoch, rank) plus the worker id, known only inside the worker."""
    info = get_worker_info()
    rng = random.Random(f"{seed}/worker{info.id if info else 0}")  # str seeds are stable across runs
    return wds.shuffle(bufsize, bufsize, rng=rng)(src)


worker_shuffle = wds.pipelinefilter(_worker_shuffle)


def _numbered_filter(src, limits: dict[str, int], listed: dict[str, int]):
    """Each sample's position in its shard (`__index__`), and only the first limits[shard] samples of each
    (an index may list a subset of a split). Runs before the shuffle buffer, so the subset is the same
    whatever the seed. A shard holding another number of samples than its descriptor lists is an error,
    not a silently different epoch (one cut at a member boundary reads, to a tar reader, as complete)."""
    seen: dict[str, int] = {}
    current = None
    for sample in src:
        url = sample["__url__"]
        if url != current:  # shards are read one after the other: the last one is complete
            _check_complete(current, seen, listed)
            current = url
        i = seen.get(url, 0)
        seen[url] = i + 1
        if url in listed and i >= listed[url]:
            raise DataError(f"data: {url} holds more samples than the {listed[url]} its descriptor lists; "
                            f"count it again with `dtrain index`")
        if url not in limits or i < limits[url]:
            sample["__index__"] = i
            yield sample
    _check_complete(current, seen, listed)


def _check_complete(url, seen: dict[str, int], listed: dict[str, int]) -> None:
    if url in listed and seen.get(url, 0) < listed[url]:
        raise DataError(f"data: cannot read {url} (it holds {seen.get(url, 0)} samples, its descriptor lists "
                        f"{listed[url]}: truncated?)")


_numbered = wds.pipelinefilter(_numbered_filter)


def _split_by_node_filter(src, rank: int, world_size: int):
    """Every world_size-th shard from `rank`: webdataset's split_by_node with rank and world size given."""
    yield from itertools.islice(src, rank, None, world_size)


_split_by_node = wds.pipelinefilter(_split_by_node_filter)


def _split_by_sample_filter(src, rank: int, world_size: int, offsets: dict[str, int], by_worker: bool):
    """This rank's samples of an evaluation split: those at positions rank, rank + world_size, ... of the
    split's order (a sample's position: its shard's offset plus its `__index__`, so whichever worker reads a
    shard keeps the same samples). With `by_worker` (the workers read every shard rather than split the
    shards), this worker keeps every num_workers-th of them: webdataset's split_by_node and split_by_worker,
    on samples instead of shards. Runs before decoding: a sample dropped here costs its tar bytes only."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if by_worker and info is not None else (0, 1)
    for sample in src:
        share, owner = divmod(offsets[sample["__url__"]] + sample["__index__"], world_size)
        if owner == rank and share % workers == worker:
            yield sample


_split_by_sample = wds.pipelinefilter(_split_by_sample_filter)


def _keep_counts_filter(src, counts: dict):
    """Only the samples dealt to this rank, each as often as dealt (counts[url][position])."""
    for sample in src:
        for _ in range(counts.get(sample["__url__"], {}).get(sample["__index__"], 0)):
            yield dict(sample)


_keep_counts = wds.pipelinefilter(_keep_counts_filter)


def _decode(sample: dict, fmt, transform: Optional[Callable], epoch: int, pass_index: int) -> dict:
    sample = fmt.decode(sample)
    if transform is not None:  # e.g. augmentation: a pure function of (x, key, epoch, pass)
        sample = transform_input(sample, transform, epoch, pass_index)
    return sample


def _one_line(error: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back with the worker's traceback in its message."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught DataError"):
        return DataError(lines[-1].split(": ", 1)[-1])
    return error


class MemorySplit:
    """A split's decoded samples (before any transform), read once in shard order, shared by the streams
    of every rank layout of one process (`relayout`)."""

    def __init__(self):
        self.columns: Optional[Columns] = None
        self.offsets: dict[str, int] = {}

    def load(self, stream: "ShardStream") -> "MemorySplit":
        if self.columns is None:
            stages = [wds.SimpleShardList(stream.urls), tarfile_to_samples(handler=_raise_data_error),
                      _numbered(stream.shard_counts, stream.listed), wds.map(stream.format.decode)]
            samples = list(wds.DataPipeline(*stages))
            self.offsets = stream.offsets()
            self.columns = Columns.of(samples)
        return self

    def rows(self, items: list[tuple[str, int]]) -> torch.Tensor:
        """The rows of (shard, position) items."""
        return torch.tensor([self.offsets[url] + i for url, i in items], dtype=torch.int64)


class ShardStream:
    """One split's minibatches for this rank. Training streams are shuffled and cut to a fixed length."""

    def __init__(self, index: ShardIndex, split: str, *, batch_size: int, rank: int, world_size: int,
                 seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 0, train: bool = False,
                 grad_accum: int = 1, remainder: str = "drop", pin_memory: bool = False,
                 transform: Optional[Callable] = None, prefetch_factor: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None, sample_format=None, in_memory=False):
        self.index, self.split = index, split
        self.urls = index.shards(split)
        # samples to read from each shard: all of them, but fewer where the index is a subset
        self.shard_counts = dict(zip(self.urls, index.counts(split)))
        self.listed = index.listed.get(split, {})
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers, self.train = seed, num_workers, train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.pin_memory, self.transform = pin_memory, transform
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.format = sample_format or DtrainFormat(index.task or "classification", index.x_scale)
        # True: read into memory on first use; a MemorySplit: share one (relayout)
        self.memory = in_memory if isinstance(in_memory, MemorySplit) else MemorySplit() if in_memory else None
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
                           prefetch_factor=self.prefetch_arg, steps_per_epoch=steps_per_epoch,
                           sample_format=self.format, in_memory=self.memory or False)

    def offsets(self) -> dict[str, int]:
        """Each shard's first position in the split (shards in index order): a sample's place in the split."""
        return dict(zip(self.shard_counts, itertools.accumulate(self.shard_counts.values(), initial=0)))

    def shard_order(self, epoch: int) -> list[str]:
        if not self.train:
            return list(self.urls)
        order = list(self.urls)
        random.Random(f"{self.seed}/shards/epoch{epoch}").shuffle(order)
        return order

    def rank_samples(self, epoch: int) -> int:
        """Samples this rank's shards hold this epoch (split_by_node takes every world_size-th shard)."""
        return sum(self.shard_counts[u] for u in self.shard_order(epoch)[self.rank::self.world_size])

    # ---- reading shards ---------------------------------------------------------------------------
    def _reader(self, urls: list[str], node_split: bool, worker_split: bool = True) -> list:
        return [wds.SimpleShardList(urls), *([_split_by_node(self.rank, self.world_size)] if node_split else []),
                *([wds.split_by_worker] if worker_split else []), tarfile_to_samples(handler=_raise_data_error),
                _numbered(self.shard_counts, self.listed)]

    def _eval_reader(self) -> list:
        """Every shard of the split, read by this rank, which keeps its share by sample (_split_by_sample).
        Each rank reads the whole split's tar bytes (and decodes only its share): world_size reads of an
        evaluation split, which is small next to the training data, for equal shares and no idle rank.
        DataLoader workers split the shards among them where there are enough (each shard read once per
        rank); with fewer shards than workers they split by sample too, each reading every shard, so that
        none idles (a 1-shard split read by 2 workers: read twice, decoded once)."""
        by_worker = self.num_workers > len(self.urls)
        return self._reader(list(self.urls), node_split=False, worker_split=not by_worker) + \
            [_split_by_sample(self.rank, self.world_size, self.offsets(), by_worker)]

    def _pipeline(self, stages: list, shuffle_seed_: str, epoch: int, pass_index: int) -> wds.DataPipeline:
        if self.shuffle_buffer > 1:
            stages.append(worker_shuffle(self.shuffle_buffer, shuffle_seed_))
        stages.append(wds.map(functools.partial(_decode, fmt=self.format, transform=self.transform, epoch=epoch,
                                                pass_index=pass_index)))
        return wds.DataPipeline(*stages)

    def _one_pass(self, epoch: int, pass_index: int = 0, pipeline: Optional[wds.DataPipeline] = None) -> Iterator[Columns]:
        if pipeline is None:
            pipeline = self._pipeline(self._reader(self.shard_order(epoch), True),
                                      shuffle_seed(self.seed, epoch, 0, self.rank), epoch, pass_index)
        # A fresh DataLoader per pass: its workers fork with this epoch's shard order baked in.
        # Its own generator: otherwise each new iterator draws a seed from the global torch RNG and
        # shifts every dropout mask after it, so a resumed run would diverge from an uninterrupted one.
        loader = DataLoader(pipeline, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=to_columns, pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=self.prefetch_factor,
                            generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        try:
            yield from loader
        except DataError as e:
            raise _one_line(e) from None

    def _decoded(self, urls: list[str]) -> Iterator[dict]:
        """Every sample of `urls` decoded (no transform), in this process, without node splitting."""
        stages = [wds.SimpleShardList(urls), tarfile_to_samples(handler=_raise_data_error), wds.map(self.format.decode)]
        return iter(wds.DataPipeline(*stages))

    def check_readable(self, urls: list[str], first_only: bool = False) -> int:
        """Read and decode every sample of `urls` (or only each one's first). -> samples read. Raises
        DataError naming a shard that can't be read."""
        if first_only:
            return sum(1 for url in urls if next(self._decoded([url]), None) is not None)
        return sum(1 for _ in self._decoded(urls))

    def first_batch(self, n: int):
        """The split's first `n` samples (in shard order) as one batch, read in this process: no workers, no
        shuffle, no transform. What the model and the hooks are probed with before training."""
        samples = list(itertools.islice(self._decoded(self.urls), n))
        if not samples:
            raise DataError(f"data: the '{self.split}' shards hold no samples")
        return self.format.batch(Columns.of(samples))

    def first_sample(self) -> dict:
        """The split's first sample, decoded (no transform): e.g. the input's shape."""
        sample = next(self._decoded(self.urls[:1]), None)
        if sample is None:
            raise DataError(f"data: {self.urls[0]} holds no samples")
        return sample

    # ---- from memory ----------------------------------------------------------------------------
    def _from_memory(self, rows: torch.Tensor, epoch: int, first: int, end: int, pass_len: int) -> Iterator[Batch]:
        """Batches first..end-1 of the samples at `rows` (in stream order); sample k is of pass k // pass_len."""
        size = self.batch_size
        epoch_cols = self.memory.columns.take(rows[first * size:end * size])  # one gather, then views
        for b in range(first, end):
            cols = epoch_cols.cut((b - first) * size, (b - first + 1) * size)
            if self.transform is not None:
                cols = cols.transformed(lambda x, key, j: self.transform(x, key=key, epoch=epoch,
                                                                         pass_index=(b * size + j) // pass_len))
            yield self.format.batch(cols)

    def _replayed_rows(self, epoch: int) -> torch.Tensor:
        """The rows of one pass of this rank's stream this epoch, in the order the shards would be read in."""
        segment = Segment(self.world_size, self.batch_size, self.grad_accum, self.num_workers, 0)
        first_row = self.memory.load(self).offsets
        return torch.tensor(EpochReplay(self, epoch, [segment]).one_pass(segment, self.rank, first_row),
                            dtype=torch.int64)

    # ---- epochs ---------------------------------------------------------------------------------
    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start..` of this epoch: exactly `batches_per_epoch - start` for training,
        one pass (last batch partial) for evaluation."""
        if not self.train:
            # every world_size-th sample of the split (module docstring): the same share in memory and streamed
            if self.memory is not None:
                rows = torch.arange(self.rank, len(self.memory.load(self).columns), self.world_size)
                yield from self._from_memory(rows, epoch, start, math.ceil(len(rows) / self.batch_size), len(rows) or 1)
                return
            pipeline = self._pipeline(self._eval_reader(), "", epoch, 0)  # no shuffle: shuffle_buffer is 0
            batches = rebatch(self._one_pass(epoch, 0, pipeline), self.batch_size, partial=True)
            yield from (self.format.batch(c) for c in itertools.islice(batches, start, None))
            return
        if self.rank_samples(epoch) == 0:
            raise DataError(f"data: rank {self.rank} got no '{self.split}' shards in epoch {epoch} "
                            f"({len(self.urls)} shards for {self.world_size} ranks); write more, smaller shards")
        if self.memory is not None:
            one = self._replayed_rows(epoch)
            need = self.batches_per_epoch * self.batch_size  # a short pass wraps around, as the shards do
            rows = one[:need] if len(one) >= need else one.repeat(math.ceil(need / len(one)))[:need]
            yield from self._from_memory(rows, epoch, start, self.batches_per_epoch, len(one))
            return
        passes = itertools.chain.from_iterable(self._one_pass(epoch, i) for i in itertools.count())
        batches = rebatch(passes, self.batch_size, partial=False)
        yield from (self.format.batch(c) for c in itertools.islice(batches, start, self.batches_per_epoch))

    def dealt_epoch(self, epoch: int, segment: int, items: list[tuple[str, int]], start: int = 0) -> Iterator[Batch]:
        """Batches `start..` of the samples dealt to this rank for the rest of `epoch` (elastic resume):
        its shards, read in order and filtered by position, shuffled in a buffer seeded from (seed, epoch,
        segment, rank). `items` ((url, position), in shard order) are exactly batches x batch_size samples."""
        total = len(items) // self.batch_size
        seed = shuffle_seed(self.seed, epoch, segment, self.rank)
        if self.memory is not None:
            order = dealt_order(items, self.batch_size, self.num_workers, self.shuffle_buffer, seed)
            rows = self.memory.load(self).rows(order)
            yield from self._from_memory(rows, epoch, start, total, len(order) + 1)  # one pass: pass 0
            return
        urls, counts = as_counts(items)
        pipeline = self._pipeline(self._reader(urls, False) + [_keep_counts(counts)], seed, epoch, 0)
        batches = rebatch(self._one_pass(epoch, 0, pipeline), self.batch_size, partial=False)
        n = start
        for n, cols in enumerate(itertools.islice(batches, start, total), start + 1):
            yield self.format.batch(cols)
        if n < total:  # a shard shorter than when the epoch began
            raise DataError(f"data: rank {self.rank} read {n * self.batch_size} of the {len(items)} samples dealt "
                            f"to it for the rest of epoch {epoch} from {', '.join(urls)}: a shard changed or is truncated")
