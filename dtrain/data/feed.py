"""The training data of a run: this rank's micro-batches of each epoch, and where the run is in them.

It owns the per-rank batch and accumulation (which an elastic resume may re-choose to keep the global
batch), the steps per epoch, and the data position (which rank layouts read the current epoch), saved
with every checkpoint. Resuming on another number of ranks deals the rest of the interrupted epoch over
the new ranks (elastic.py); resuming with another data.num_workers finishes the epoch in its old order.
A checkpoint that an older dtrain (whole shards dealt per rank) wrote mid-epoch is refused: the rest of its
epoch can't be replayed in that order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Iterator

from ..checkpoint_files import CheckpointError
from .elastic import DEALING, BatchLayout, DataPosition, EpochReplay, Segment, choose_layout
from .pipeline import ShardStream

if TYPE_CHECKING:
    from ..config import TrainConfig


class TrainFeed:
    def __init__(
        self,
        stream: ShardStream,
        rank: int,
        world_size: int,
        train_cfg: TrainConfig,
        debug: bool = False,
        elastic: str = "keep_global_batch",
        log: Callable[[str], None] = print,
    ):
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.train_cfg, self.debug, self.elastic, self.log = train_cfg, debug, elastic, log
        self.configured = (stream.batch_size, train_cfg.grad_accum)  # this run's data.batch_size, train.grad_accum
        self.step = 0  # optimizer steps whose micro-batches were handed out
        self.grad_accum = stream.grad_accum
        self.steps_per_epoch = stream.steps_per_epoch
        self.total_steps = plan_total_steps(train_cfg, self.steps_per_epoch, debug)
        self.samples_per_step = stream.batch_size * world_size * self.grad_accum
        # which ranks read the current epoch, and how: what lets a run resume on another number of ranks
        self.position = DataPosition(
            Segment(world_size, stream.batch_size, self.grad_accum, stream.num_workers, 0),
            self.samples_per_step,
            self.steps_per_epoch,
        )

    def read_as_one(self, batch_size: int) -> None:
        """Replica groups (dtrain.ft_train): the run reads as one process of `batch_size` (its group's batch)
        without DataLoader workers, whichever of the group's ranks this is: each step is dealt from that
        process's order, and its position, its checkpoints and their resume (the global batch kept) are that
        process's, for groups of any size and for plain `dtrain train`."""
        self.rank, self.world_size = 0, 1
        self.stream = self.stream.relayout(
            rank=0,
            world_size=1,
            batch_size=batch_size,
            grad_accum=self.grad_accum,
            num_workers=0,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.samples_per_step = batch_size * self.grad_accum
        self.position = DataPosition(
            Segment(1, batch_size, self.grad_accum, 0, 0), self.samples_per_step, self.steps_per_epoch
        )

    def batches(self, step: int) -> Iterator:
        """This rank's micro-batches from optimizer step `step` to the end of its epoch: its normal stream,
        or, in an epoch resumed on another number of ranks, its share of what the old ranks had not read."""
        epoch, done = divmod(step, self.steps_per_epoch)
        segments = self.position.segments_of(epoch)
        seg = segments[-1]
        if len(segments) == 1:
            stream = self.stream
            if seg.num_workers != stream.num_workers:  # resumed with another data.num_workers: the workers
                # split the shards, so the epoch ends in the order it began; the new count from the next one
                stream = self._relayout(seg)
            return self._counted(stream.epoch(epoch, start=done * self.grad_accum), step)
        stream = self._relayout(seg)
        items = EpochReplay(stream, epoch, segments).assignment(self.rank)
        return self._counted(
            stream.dealt_epoch(epoch, len(segments) - 1, items, start=(done - seg.start) * seg.grad_accum), step
        )

    def _counted(self, micro_batches: Iterator, step: int) -> Iterator:
        """The micro-batches, counting the steps handed out (a step's last micro-batch counts it: the loop
        trains a step before it asks for the next)."""
        self.step = step
        try:
            for i, batch in enumerate(micro_batches, 1):
                if i % self.grad_accum == 0:
                    self.step += 1
                yield batch
        finally:
            if hasattr(micro_batches, "close"):
                micro_batches.close()

    def _relayout(self, seg: Segment) -> ShardStream:
        return self.stream.relayout(
            rank=self.rank,
            world_size=seg.world_size,
            batch_size=seg.batch_size,
            grad_accum=seg.grad_accum,
            num_workers=seg.num_workers,
            steps_per_epoch=self.steps_per_epoch,
        )

    def state_dict(self) -> dict:
        return {**self.position.state_dict(), "step": self.step, "batch": list(self.configured)}

    def load_state_dict(self, saved: dict) -> None:
        """Per-rank batch, accumulation and data position from a checkpoint's, whatever number of ranks wrote
        it: on another number, the same global batch (and steps per epoch, so the same schedule), and the rest
        of an interrupted epoch dealt over the new ranks. The trainer tells the engine and the schedule of a
        changed layout (Trainer.relaid)."""
        self._resume(saved)
        if saved["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(
                f"checkpoint: it has {saved['steps_per_epoch']} steps per epoch, this config "
                f"{self.steps_per_epoch}; data or batch settings changed since it was written"
            )
        self.step = saved["step"]

    def _resume(self, saved: dict) -> bool:
        """-> True when the layout changed."""
        world, log, step = self.world_size, self.log, saved["step"]
        old_epoch, old_done = divmod(step, saved["steps_per_epoch"])
        if saved.get("dealing") != DEALING and old_done:  # today's order is another: no exact rest of the epoch
            end = step - old_done + saved["steps_per_epoch"]
            raise CheckpointError(
                f"checkpoint: it stopped at step {old_done} of epoch {old_epoch}, written by a dtrain that dealt "
                f"whole shards to ranks, whose order this one (each sample once an epoch) can't replay; resume it "
                f"with the dtrain that wrote it to the epoch's end (run.stop_at_step={end}), then with this one"
            )
        old = Segment(*saved["segments"][-1])
        changed = False
        if old.world_size != world:
            layout = choose_layout(saved["global_batch"], world, old.batch_size, self.elastic)
            log(describe_resize(old, world, layout, saved["global_batch"], saved["steps_per_epoch"]))
            self.use_layout(layout, saved["steps_per_epoch"])
            changed = True
        elif (old.batch_size, old.grad_accum) != (self.stream.batch_size, self.grad_accum) and self.configured == tuple(
            saved["batch"]
        ):
            # chosen by an earlier resume on another number of ranks: keep it (a batch setting the user
            # changed since is not overridden; the steps-per-epoch check speaks for it)
            self.use_layout(BatchLayout(old.batch_size, old.grad_accum), saved["steps_per_epoch"])
            changed = True
        kept_layout = self.position.layout
        self.position.load_state_dict(saved)
        self.position.layout = kept_layout
        epoch, done = divmod(step, self.steps_per_epoch)
        if old.world_size != world:
            kept = min(old.world_size, world)
            log(
                f"resume: {_ranks(0, kept)} continue{'s' if kept == 1 else ''} its saved RNG stream; "
                + (
                    f"{_ranks(kept, world)} start{'s' if world - kept == 1 else ''} a fresh one seeded from "
                    f"(run.seed, rank, step)"
                    if world > kept
                    else f"that of {_ranks(kept, old.world_size)} is dropped"
                )
            )
        if old.num_workers != self.stream.num_workers and done and self.position.epoch == epoch:
            log(
                f"resume: data.num_workers {old.num_workers} -> {self.stream.num_workers} from epoch {epoch + 1}; "
                f"the rest of epoch {epoch} keeps the order of {old.num_workers} (workers split the shards)"
            )
        if old.world_size != world and done and self.position.epoch == epoch:
            left = (self.steps_per_epoch - done) * old.grad_accum * old.batch_size * old.world_size
            self.position.segments.append(dataclasses.replace(self.position.layout, start=done))
            log(
                f"resume: epoch {epoch} at step {done} of {self.steps_per_epoch}: the {left} samples the "
                f"{old.world_size} ranks had still to read are dealt over {world} rank{'s' if world > 1 else ''} by "
                f"shard; later epochs use the normal {world}-rank order"
            )
        return changed

    def use_layout(self, layout: BatchLayout, steps_per_epoch: int) -> None:
        """Train with this per-rank batch and accumulation, keeping the epoch length (and so the schedule)."""
        self.stream = self.stream.relayout(
            rank=self.rank,
            world_size=self.world_size,
            batch_size=layout.batch_size,
            grad_accum=layout.grad_accum,
            num_workers=self.stream.num_workers,
            steps_per_epoch=steps_per_epoch,
        )
        self.grad_accum = layout.grad_accum
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = plan_total_steps(self.train_cfg, steps_per_epoch, self.debug)
        self.samples_per_step = layout.global_batch(self.world_size)
        self.position.layout = Segment(
            self.world_size, layout.batch_size, layout.grad_accum, self.stream.num_workers, 0
        )


def _ranks(first: int, end: int) -> str:
    return f"rank {first}" if end - first == 1 else f"ranks {first}-{end - 1}"


def describe_resize(old: Segment, world: int, new: BatchLayout, global_batch: int, steps_per_epoch: int) -> str:
    """One line: what changed to keep the global batch (or how far from it the approximation is)."""
    changes = []
    if new.batch_size != old.batch_size:
        changes.append(f"per-rank batch {old.batch_size} -> {new.batch_size}")
    if new.grad_accum != old.grad_accum:
        changes.append(f"grad_accum {old.grad_accum} -> {new.grad_accum}")
    what = " and ".join(changes) or f"per-rank batch {old.batch_size} kept"
    got = new.global_batch(world)
    if got == global_batch:
        return f"resume: {old.world_size} -> {world} ranks; {what} to keep the global batch {global_batch}"
    return (
        f"resume: {old.world_size} -> {world} ranks; {what}: global batch {got} instead of {global_batch} "
        f"(checkpoint.elastic=approximate; LR schedule unchanged, {steps_per_epoch} steps per epoch kept)"
    )


def plan_total_steps(train_cfg: TrainConfig, steps_per_epoch: int, debug: bool = False) -> int:
    """Optimizer steps the run takes (the schedule spans them): epochs, capped by max_steps / debug_steps."""
    return int(
        min(
            train_cfg.epochs * steps_per_epoch,
            train_cfg.max_steps or math.inf,
            train_cfg.debug_steps if debug else math.inf,
        )
    )
