"""How the samples of an epoch are dealt to ranks and DataLoader workers, and resuming on a different
number of ranks: the per-rank batch that keeps the global batch, and the rest of the interrupted epoch
dealt over the new ranks.

A normal epoch deals samples, not whole shards: the epoch's samples (its shards in the epoch's seeded
order, each shard's in order; from the start again for a padded last step) are cut into world_size equal
consecutive runs, one a rank, so a rank reads whole shards except at most two it shares with a neighbour,
read from and to a position (`Piece`); each rank's run is cut again into num_workers runs of whole
batches, one a DataLoader worker. Every sample is drawn once an epoch whatever the shard sizes (less the
dropped remainder, or plus the padded one), and every rank takes the same number of steps.

An epoch is consumed in *segments*. Segment 0 is the normal one: N ranks, each reading its own run
(`ShardStream.epoch`). When a run resumes mid-epoch on M != N ranks, a new segment starts at that step:
the samples the N streams would still have consumed this epoch (their tails after the saved position)
are dealt over the M ranks, and each new rank reads only its share. The next epoch is a normal one on M
ranks again. The checkpoint stores the segments of the current epoch, so a later resume (on any number
of ranks, the same one included) replays them all and carries on exactly.

Replaying a stream reads no data, not even tar headers: a sample is known by (shard, position in the
shard), so the descriptors' sample counts are all it needs. It mirrors the pipeline: the dealing, the
seeded shuffle buffer of each worker, and the order in which a DataLoader hands out its workers' batches
(round-robin, a finished worker dropping out). A test holds the replay against the real streams. (An
in-memory split, pipeline.py, is read in this replayed order.)

The rest of an interrupted epoch is dealt the same way: the samples still to be read are put in (epoch
shard order, position in shard) order and cut into M equal runs, read filtered by position.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
import random
from typing import Iterator, NamedTuple, Optional

from ..config import ConfigError
from .errors import DataError

Item = tuple[str, int]  # (shard url, position of the sample in the shard)
Piece = tuple[str, int, int, int]  # (shard url, first position, end position, pass): a run of a shard's samples
DEALING = "samples"  # a checkpoint's data position says which dealing wrote it (none: whole shards per rank)


class ElasticError(ConfigError):
    """The checkpoint's global batch can't be kept exactly on this many ranks; the message names the switch."""


# ---- the per-rank batch on the new world size ----------------------------------------------------------
class BatchLayout(NamedTuple):
    batch_size: int  # per rank, per micro-batch
    grad_accum: int

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size


def choose_layout(global_batch: int, world_size: int, max_batch: int, mode: str = "exact") -> BatchLayout:
    """Per-rank batch and accumulation for `world_size` ranks so that their product with it is `global_batch`.
    The micro-batch stays <= `max_batch` (the old one, so memory per rank does not grow): the largest such
    divisor of the per-rank share, accumulating the rest. Not divisible: ElasticError (mode exact), or the
    nearest per-rank batch (mode approximate)."""
    share, rest = divmod(global_batch, world_size)
    if rest == 0:
        accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= max_batch)
        return BatchLayout(share // accum, accum)
    accum = math.ceil(global_batch / world_size / max_batch)
    nearest = BatchLayout(max(1, math.floor(global_batch / world_size / accum + 0.5)), accum)
    if mode == "approximate":
        return nearest
    ok = [str(m) for m in range(1, 2 * world_size + 1) if global_batch % m == 0]
    ok = " or ".join([", ".join(ok[:-1]), ok[-1]] if len(ok) > 1 else ok)
    raise ElasticError(
        f"resume: the checkpoint's global batch {global_batch} can't be split evenly over "
        f"{world_size} ranks; resume on {ok} ranks, or set "
        f"checkpoint.elastic=approximate to use per-rank batch {nearest.batch_size} "
        f"x grad_accum {nearest.grad_accum} (global {nearest.global_batch(world_size)})"
    )


# ---- the segments of one epoch ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Segment:
    """Steps `start..` of an epoch (until the next segment) taken by `world_size` ranks with this layout."""

    world_size: int
    batch_size: int
    grad_accum: int
    num_workers: int
    start: int  # optimizer step within the epoch

    def samples_per_rank(self, steps: int) -> int:
        return steps * self.grad_accum * self.batch_size


def shuffle_seed(seed: int, epoch: int, segment: int, rank: int) -> str:
    """The seed of a rank's shuffle buffer: segment 0 is the normal stream, later ones dealt streams."""
    base = f"{seed}/epoch{epoch}"
    return f"{base}/rank{rank}" if segment == 0 else f"{base}/elastic{segment}/rank{rank}"


def loader_order(per_worker: list[list], batch_size: int) -> list:
    """The items in the order a DataLoader yields them: each worker batches its own items (its last
    batch short), and the loader takes one batch from each worker in turn, dropping finished ones."""
    batches = [[items[i : i + batch_size] for i in range(0, len(items), batch_size)] for items in per_worker]
    out, active, taken = [], list(range(len(batches))), [0] * len(batches)
    while active:
        for w in list(active):
            if taken[w] < len(batches[w]):
                out.extend(batches[w][taken[w]])
                taken[w] += 1
            else:
                active.remove(w)
    return out


def shuffled(items: list, bufsize: int, rng: random.Random) -> list:
    """webdataset's buffer shuffle (`wds.shuffle` with initial = bufsize, what the pipeline runs) as a
    plain loop, which an in-memory split pays every epoch: the same draws, with randint(0, n - 1) inlined
    as CPython makes it (randrange(n) -> _randbelow: getrandbits(n.bit_length()) until below n): twice the
    speed of calling it (digits, 1257 items, buffer 1000: 0.30 vs 0.60 ms). A test holds it to webdataset's."""
    getrandbits = rng.getrandbits
    out: list = []
    buf: list = []
    it = iter(items)
    end = object()
    item = next(it, end)
    while buf or item is not end:
        if item is not end:  # filling: two items a draw until the buffer is full, then one
            buf.append(item)
            item = next(it, end)
            if len(buf) < bufsize and item is not end:
                buf.append(item)
                item = next(it, end)
            if len(buf) < bufsize and item is not end:
                continue
        n = len(buf)
        bits = n.bit_length()
        k = getrandbits(bits)
        while k >= n:
            k = getrandbits(bits)
        out.append(buf[k])
        buf[k] = buf[-1]
        buf.pop()
    return out


def cut(urls: list[str], counts: dict[str, int], first: int, end: int) -> list[Piece]:
    """Samples first..end-1 of the sequence of `urls`' samples (each shard's in order, then the next shard's,
    then from the start again in a next pass), as runs of shards: O(pieces x log(shards)), whatever the data
    size, for every rank and worker each epoch."""
    starts = list(itertools.accumulate((counts[u] for u in urls), initial=0))
    pieces, p = [], first
    while p < end:
        pass_index, at = divmod(p, starts[-1])
        # the shard holding sample `at` (never an empty one: its start is the next shard's, bisect passes it)
        k = bisect.bisect_right(starts, at) - 1
        a = at - starts[k]
        b = min(counts[urls[k]], a + end - p)
        pieces.append((urls[k], a, b, pass_index))
        p += b - a
    return pieces


def normal_share(urls: list[str], counts: dict[str, int], seg: Segment, steps: int, rank: int) -> list[list[Piece]]:
    """What rank `rank` reads in a normal epoch of `steps` steps, per DataLoader worker (one list without
    workers): the epoch's samples (`urls` in the epoch's shard order) cut into world_size equal runs, one a
    rank, then the rank's run into num_workers runs of whole batches (their counts differing by at most one
    batch), so every worker hands the loader whole batches only."""
    batches = steps * seg.grad_accum
    workers = max(seg.num_workers, 1)
    first = rank * seg.samples_per_rank(steps)
    bounds = [first + seg.batch_size * (w * batches // workers) for w in range(workers + 1)]
    return [cut(urls, counts, bounds[w], bounds[w + 1]) for w in range(workers)]


def worker_order(per_worker: list[list], batch_size: int, shuffle_buffer: int, seed: str) -> list:
    """What a rank's pipeline yields when each DataLoader worker reads `per_worker[w]` (items in the order
    read): each worker's shuffle buffer (the same generator, seed and calls as pipeline._worker_shuffle),
    batched, taken round-robin by the loader."""
    if shuffle_buffer > 1:
        per_worker = [
            shuffled(items, shuffle_buffer, random.Random(f"{seed}/worker{w}")) for w, items in enumerate(per_worker)
        ]
    return loader_order(per_worker, batch_size)


def deal(remaining: list[Item], world_size: int, quota: int, shard_rank: dict[str, int]) -> list[list[Item]]:
    """`remaining` over `world_size` ranks, `quota` each: in (shard, position in shard) order, cut into
    consecutive runs. More needed than remain (checkpoint.elastic=approximate): repeated from the start;
    fewer: the last ones are left out."""
    total = world_size * quota
    if total and not remaining:
        raise DataError("data: nothing left of the epoch to deal over the new ranks")
    items = [remaining[i % len(remaining)] for i in range(total)]
    items.sort(key=lambda it: (shard_rank[it[0]], it[1]))
    return [items[j * quota : (j + 1) * quota] for j in range(world_size)]


def as_counts(items: list[Item]) -> tuple[list[str], dict[str, collections.Counter]]:
    """(shards in first-use order, per shard how often each position is to be read)."""
    counts: dict[str, collections.Counter] = {}
    for url, i in items:
        counts.setdefault(url, collections.Counter())[i] += 1
    return list(counts), counts


class EpochReplay:
    """Replays the segments of one epoch of `stream` (a ShardStream: index, seed, shuffle buffer, steps per
    epoch) to find what every rank of the last segment reads."""

    def __init__(self, stream, epoch: int, segments: list[Segment]):
        self.stream, self.epoch, self.segments = stream, epoch, segments
        self.steps = stream.steps_per_epoch
        self.urls = stream.shard_order(epoch)
        self.shard_rank = {u: i for i, u in enumerate(self.urls)}

    def normal_order(self, seg: Segment, rank: int, rows: Optional[tuple[dict[str, int], int]] = None) -> list:
        """Everything rank `rank` of a normal segment reads this epoch, in order (from the counts only:
        nothing is read): its (shard, position) items, or with `rows` (each shard's first row in memory,
        the rows in memory) row numbers, plus rows x the sample's pass (a padded epoch draws some twice)."""
        shares = normal_share(self.urls, self.stream.shard_counts, seg, self.steps, rank)
        if rows is None:
            per_worker = [[(u, i) for u, a, b, _ in pieces for i in range(a, b)] for pieces in shares]
        else:
            (first_row, size), per_worker = rows, []
            for pieces in shares:
                items: list = []
                for u, a, b, p in pieces:
                    row = first_row[u] + p * size  # in pass p (pipeline._from_memory)
                    items.extend(range(row + a, row + b))
                per_worker.append(items)
        return worker_order(
            per_worker, seg.batch_size, self.stream.shuffle_buffer, shuffle_seed(self.stream.seed, self.epoch, 0, rank)
        )

    def segment_streams(self) -> Iterator[tuple[list[list[Item]], list[list[Item]]]]:
        """Per segment: (what each of its ranks reads from the segment's start to the epoch's end, in
        order; what was dealt to each, in shard order: empty lists for the normal segment 0)."""
        first = self.segments[0]
        streams = [self.normal_order(first, r) for r in range(first.world_size)]
        dealt: list[list[Item]] = [[] for _ in streams]
        yield streams, dealt
        for i in range(1, len(self.segments)):
            prev, seg = self.segments[i - 1], self.segments[i]
            used = prev.samples_per_rank(seg.start - prev.start)
            remaining = [item for s in streams for item in s[used:]]  # the old ranks' unread tails
            dealt = deal(remaining, seg.world_size, seg.samples_per_rank(self.steps - seg.start), self.shard_rank)
            streams = [self.dealt_stream(i, r, dealt[r]) for r in range(seg.world_size)]
            yield streams, dealt

    def assignment(self, rank: int) -> list[Item]:
        """What rank `rank` of the last segment reads, in shard order."""
        *_, (_, dealt) = self.segment_streams()
        return dealt[rank]

    def dealt_stream(self, seg_index: int, rank: int, items: list[Item]) -> list[Item]:
        seg = self.segments[seg_index]
        return dealt_order(
            items,
            seg.batch_size,
            seg.num_workers,
            self.stream.shuffle_buffer,
            shuffle_seed(self.stream.seed, self.epoch, seg_index, rank),
        )


def dealt_order(items: list[Item], batch_size: int, num_workers: int, shuffle_buffer: int, seed: str) -> list[Item]:
    """The order a rank reads the `items` dealt to it: its shards in first-use order, split among its
    workers by shard, each read through and filtered by position, shuffled, batched by its workers (the
    last batch of each short: the pipeline joins them into whole ones)."""
    urls, counts = as_counts(items)
    per_worker = [
        [(u, i) for u in urls[w :: max(num_workers, 1)] for i in sorted(counts[u].elements())]
        for w in range(max(num_workers, 1))
    ]
    return worker_order(per_worker, batch_size, shuffle_buffer, seed)


def consumed_keys(stream, epoch: int, segments: list[Segment], until: int) -> list[list[list[Item]]]:
    """Per segment, per rank: the (shard, position) read in its steps up to step `until` of the epoch (audits, tests)."""
    out = []
    for i, (streams, _) in enumerate(EpochReplay(stream, epoch, segments).segment_streams()):
        seg = segments[i]
        end = segments[i + 1].start if i + 1 < len(segments) else until
        out.append([s[: seg.samples_per_rank(end - seg.start)] for s in streams])
    return out


class DataPosition:
    """Where the run is in its data, beyond the step: the global batch it keeps, and which rank layouts
    read the current epoch (its segments). Saved with every checkpoint (the trainer's state)."""

    def __init__(self, layout: Segment, global_batch: int, steps_per_epoch: int):
        self.layout = layout  # this run's ranks and batch
        self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch
        self.epoch, self.segments = 0, [layout]

    def segments_of(self, epoch: int) -> list[Segment]:
        """The segments of `epoch`; a new epoch is read normally by this run's ranks."""
        if epoch != self.epoch:
            self.epoch, self.segments = epoch, [dataclasses.replace(self.layout, start=0)]
        return self.segments

    def state_dict(self) -> dict:
        return {
            "dealing": DEALING,
            "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.epoch,
            "segments": [dataclasses.astuple(s) for s in self.segments],
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_batch, self.steps_per_epoch = state["global_batch"], state["steps_per_epoch"]
        self.epoch, self.segments = state["epoch"], [Segment(*s) for s in state["segments"]]

    @staticmethod
    def legacy_state(world_size: int, config: dict, step: int, steps_per_epoch: int) -> dict:
        """The state of a checkpoint written before elastic resume: one normal segment, from its config."""
        b, a, w = config["data"]["batch_size"], config["train"]["grad_accum"], config["data"]["num_workers"]
        return {
            "global_batch": b * a * world_size,
            "steps_per_epoch": steps_per_epoch,
            "epoch": step // steps_per_epoch,
            "segments": [(world_size, b, a, w, 0)],
        }
