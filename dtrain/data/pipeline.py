"""Per-rank minibatch streams read from webdataset shards.

The sample order is a pure function of (seed, epoch, rank, world_size, worker): the shard list is
permuted by a seeded RNG, and the epoch's samples are dealt to ranks and then to DataLoader workers by
`elastic.py` (`normal_share`): each rank an equal consecutive run of the epoch's samples, each worker a
run of whole batches of its rank's, read as pieces of shards (from and to a position). Each worker
shuffles within a buffer seeded from the same tuple. Every epoch draws every sample once, less the
dropped remainder (data.remainder=drop) or plus the padded one (pad), whatever the shard sizes. Resuming
mid-epoch rebuilds that order and skips what was consumed; resuming on another number of ranks reads the
rest of the epoch as dealt by `elastic.py` (`dealt_epoch`). A sample is known by its shard and its
position in it, so replaying an order needs only the descriptors' counts.

Every rank yields exactly `batches_per_epoch` training batches, computed from the sample counts before
any data is read, which keeps the collectives of all ranks in lock step. A shard that holds another
number of samples than its descriptor lists is an error naming both counts, wherever it is read
(training, in memory, evaluation): not a silently different epoch.

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

from .elastic import EpochReplay, Segment, as_counts, dealt_order, normal_share, shuffle_seed
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


def _read_pieces_filter(src, listed: dict[str, int]):
    """The samples of each piece (url, first, end, pass: elastic.Piece) of a shard, each numbered by its
    position in the shard (`__index__`) and tagged with its pass (`__pass__`). A piece that ends where the
    shard's descriptor count does reads the shard to its end: a shard that holds another number of samples
    than its descriptor lists (0-byte, cut at a member boundary, which a tar reader takes for complete, or
    longer) is an error, not a silently different epoch. A piece that ends earlier stops reading there."""
    for url, first, end, pass_index in src:
        listed_n = listed.get(url, end)
        samples = tarfile_to_samples(handler=_raise_data_error)(iter([{"url": url}]))
        n = 0
        try:
            for sample in samples:
                if n == end:  # only read on where `end` is the descriptor's count: a sample too many
                    n += 1 + sum(1 for _ in samples)
                    break
                if n >= first:
                    sample["__index__"], sample["__pass__"] = n, pass_index
                    yield sample
                n += 1
                if n == end and end < listed_n:  # the rest is another rank's, or beyond a subset (train_subset)
                    break
        finally:
            samples.close()
        if n < end or n > listed_n:
            raise _miscounted(url, n, listed_n)


def _miscounted(url: str, holds: int, listed: int) -> DataError:
    return DataError(
        f"data: {url} holds {holds} samples, its descriptor lists {listed}: truncated or changed? "
        f"write it again, or count it again with `dtrain index`"
    )


_read_pieces = wds.pipelinefilter(_read_pieces_filter)


def _worker_share(shares: list[list]) -> Iterator:
    """The pieces this DataLoader worker reads (shares[worker]; shares[0] without workers)."""
    info = get_worker_info()
    return iter(shares[info.id if info else 0])


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


def _decode(sample: dict, fmt, transform: Optional[Callable], epoch: int) -> dict:
    pass_index = sample.get("__pass__", 0)  # a padded epoch's second draw of a sample is augmented anew
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
            stages = [*stream._reader([stream.whole_shards(stream.urls)]), wds.map(stream.format.decode)]
            samples = list(wds.DataPipeline(*stages))
            self.offsets = stream.offsets()
            self.columns = Columns.of(samples)
        return self

    def rows(self, items: list[tuple[str, int]]) -> torch.Tensor:
        """The rows of (shard, position) items."""
        return torch.tensor([self.offsets[url] + i for url, i in items], dtype=torch.int64)


class ShardStream:
    """One split's minibatches for this rank. Training streams are shuffled and cut to a fixed length."""

    def __init__(
        self,
        index: ShardIndex,
        split: str,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 0,
        train: bool = False,
        grad_accum: int = 1,
        remainder: str = "drop",
        pin_memory: bool = False,
        transform: Optional[Callable] = None,
        prefetch_factor: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        sample_format=None,
        in_memory=False,
    ):
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
            raise DataError(
                f"data: '{split}' has {n} samples, fewer than one global batch "
                f"(batch_size {batch_size} x {world_size} ranks x grad_accum {grad_accum} = {per_step})"
            )
        # given: an elastic resume with an approximate global batch keeps the checkpoint's epoch length
        self.steps_per_epoch = steps_per_epoch or steps  # optimizer steps
        self.batches_per_epoch = self.steps_per_epoch * grad_accum  # micro-batches per rank

    def relayout(
        self,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        grad_accum: int,
        num_workers: int,
        steps_per_epoch: Optional[int] = None,
    ) -> "ShardStream":
        """The same split and seed for another rank layout (an elastic resume, or replaying an old one)."""
        return ShardStream(
            self.index,
            self.split,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            num_workers=num_workers,
            shuffle_buffer=self.shuffle_buffer,
            train=self.train,
            grad_accum=grad_accum,
            remainder=self.remainder,
            pin_memory=self.pin_memory,
            transform=self.transform,
            prefetch_factor=self.prefetch_arg,
            steps_per_epoch=steps_per_epoch,
            sample_format=self.format,
            in_memory=self.memory or False,
        )

    def offsets(self) -> dict[str, int]:
        """Each shard's first position in the split (shards in index order): a sample's place in the split."""
        return dict(zip(self.shard_counts, itertools.accumulate(self.shard_counts.values(), initial=0)))

    def shard_order(self, epoch: int) -> list[str]:
        if not self.train:
            return list(self.urls)
        order = list(self.urls)
        random.Random(f"{self.seed}/shards/epoch{epoch}").shuffle(order)
        return order

    def layout(self) -> Segment:
        """This stream's ranks, batch and workers: the normal segment of an epoch."""
        return Segment(self.world_size, self.batch_size, self.grad_accum, self.num_workers, 0)

    # ---- reading shards ---------------------------------------------------------------------------
    def whole_shards(self, urls: list[str]) -> list:
        """Pieces that read each of `urls` whole (as far as the index counts it)."""
        return [(u, 0, self.shard_counts[u], 0) for u in urls]

    def _reader(self, shares: list[list]) -> list:
        """Each DataLoader worker reads its share of pieces."""
        return [functools.partial(_worker_share, shares), _read_pieces(self.listed)]

    def _eval_reader(self) -> list:
        """Every shard of the split, read by this rank, which keeps its share by sample (_split_by_sample).
        Each rank reads the whole split's tar bytes (and decodes only its share): world_size reads of an
        evaluation split, which is small next to the training data, for equal shares and no idle rank.
        DataLoader workers split the shards among them where there are enough (each shard read once per
        rank); with fewer shards than workers they split by sample too, each reading every shard, so that
        none idles (a 1-shard split read by 2 workers: read twice, decoded once)."""
        by_worker, pieces = self.num_workers > len(self.urls), self.whole_shards(self.urls)
        workers = max(self.num_workers, 1)
        shares = [pieces if by_worker else pieces[w::workers] for w in range(workers)]
        return self._reader(shares) + [_split_by_sample(self.rank, self.world_size, self.offsets(), by_worker)]

    def _pipeline(self, stages: list, shuffle_seed_: str, epoch: int) -> wds.DataPipeline:
        if self.shuffle_buffer > 1:
            stages.append(worker_shuffle(self.shuffle_buffer, shuffle_seed_))
        stages.append(wds.map(functools.partial(_decode, fmt=self.format, transform=self.transform, epoch=epoch)))
        return wds.DataPipeline(*stages)

    def _loaded(self, pipeline: wds.DataPipeline, epoch: int) -> Iterator[Columns]:
        # A fresh DataLoader per epoch: its workers fork with this epoch's pieces baked in.
        # Its own generator: otherwise each new iterator draws a seed from the global torch RNG and
        # shifts every dropout mask after it, so a resumed run would diverge from an uninterrupted one.
        loader = DataLoader(
            pipeline,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=to_columns,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=self.prefetch_factor,
            generator=torch.Generator().manual_seed(self.seed * 7919 + epoch),
        )
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
            raise _miscounted(self.urls[0], 0, self.listed.get(self.urls[0], 0))
        return sample

    # ---- from memory ----------------------------------------------------------------------------
    def _from_memory(self, rows: torch.Tensor, epoch: int, first: int, end: int) -> Iterator[Batch]:
        """Batches first..end-1 of the samples at `rows` (in stream order; a row + k x the rows in memory:
        that row in its pass k)."""
        size, memory = self.batch_size, self.memory.columns
        rows = rows[first * size : end * size]
        passes = rows.div(len(memory), rounding_mode="floor")
        epoch_cols = memory.take(rows % len(memory))  # one gather, then views
        for b in range(first, end):
            cols = epoch_cols.cut((b - first) * size, (b - first + 1) * size)
            if self.transform is not None:
                cols = cols.transformed(
                    lambda x, key, j: self.transform(
                        x, key=key, epoch=epoch, pass_index=int(passes[(b - first) * size + j])
                    )
                )
            yield self.format.batch(cols)

    # ---- epochs ---------------------------------------------------------------------------------
    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches `start..` of this epoch: exactly `batches_per_epoch - start` for training,
        one pass (last batch partial) for evaluation."""
        if not self.train:
            # every world_size-th sample of the split (module docstring): the same share in memory and streamed
            if self.memory is not None:
                rows = torch.arange(self.rank, len(self.memory.load(self).columns), self.world_size)
                yield from self._from_memory(rows, epoch, start, math.ceil(len(rows) / self.batch_size))
                return
            pipeline = self._pipeline(self._eval_reader(), "", epoch)  # no shuffle: shuffle_buffer is 0
            batches = rebatch(self._loaded(pipeline, epoch), self.batch_size, partial=True)
            yield from (self.format.batch(c) for c in itertools.islice(batches, start, None))
            return
        if self.memory is not None:
            rows = (self.memory.load(self).offsets, len(self.memory.columns))
            order = torch.tensor(
                EpochReplay(self, epoch, [self.layout()]).normal_order(self.layout(), self.rank, rows),
                dtype=torch.int64,
            )
            yield from self._from_memory(order, epoch, start, self.batches_per_epoch)
            return
        shares = normal_share(
            self.shard_order(epoch), self.shard_counts, self.layout(), self.steps_per_epoch, self.rank
        )
        pipeline = self._pipeline(self._reader(shares), shuffle_seed(self.seed, epoch, 0, self.rank), epoch)
        # every worker hands whole batches (normal_share): the same micro-batches as the replay, however many
        batches = rebatch(self._loaded(pipeline, epoch), self.batch_size, partial=False)
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
            yield from self._from_memory(rows, epoch, start, total)
            return
        urls, counts = as_counts(items)
        # each shard read up to its last dealt sample (a position past the shard's count: the error below)
        pieces = [(u, 0, min(max(counts[u]) + 1, self.shard_counts[u]), 0) for u in urls]
        workers = max(self.num_workers, 1)
        pipeline = self._pipeline(
            self._reader([pieces[w::workers] for w in range(workers)]) + [_keep_counts(counts)], seed, epoch
        )
        batches = rebatch(self._loaded(pipeline, epoch), self.batch_size, partial=False)
        n = start
        for n, cols in enumerate(itertools.islice(batches, start, total), start + 1):
            yield self.format.batch(cols)
        if n < total:  # a shard shorter than when the epoch began
            raise DataError(
                f"data: rank {self.rank} read {n * self.batch_size} of the {len(items)} samples dealt "
                f"to it for the rest of epoch {epoch} from {', '.join(urls)}: a shard changed or is truncated"
            )
