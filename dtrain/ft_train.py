"""A run as one replica group of `dtrain launch --ft` (torchft, issue #36): `dtrain train`, `dtrain.main` and
`dtrain.fit` train this way when the launcher says so, with the run's own model, loss, optimizer, schedule,
data, validation, checkpoints and logs, built as always (build.py), and dtrain.ft's StepRunner for the steps.

The launcher's contract (dtrain/ft_launch.py starts the groups; this module is one of them):

- A worker is a replica group iff DTRAIN_FT=1. Then the environment also has TORCHFT_LIGHTHOUSE
  (http://host:port), REPLICA_GROUP_ID (unique per group: "0", "1", ..., or "<host>-0", ... on several nodes),
  DTRAIN_FT_GROUPS (how many groups the launchers started), RANK / WORLD_SIZE / LOCAL_RANK within the group (0 of
  1 for a group of one process), MASTER_ADDR (127.0.0.1; on several nodes the node's hostname, which the other
  groups reach: torchft advertises it) and MASTER_PORT (a free port of this group's own, for the group's
  TCPStore), on several nodes GLOO_SOCKET_IFNAME (the interface toward the Lighthouse), and
  optionally DTRAIN_FT_TIMEOUT_S (collective timeout, default 10) and DTRAIN_FT_MIN_REPLICAS (the smallest
  quorum that trains, default 1).
- torch.distributed's default process group is the group's own (none for a group of one process): its
  processes are DDP ranks of each other; everything between groups goes through the torchft Manager.
- Exit codes are dtrain's: 0 done, 2 a user or config error (never restarted), 75 stopped by SIGTERM/SIGINT
  after a checkpoint was saved, anything else a crash (the launcher restarts that group alone, and it heals
  from a live peer).
- SIGTERM (the launcher sends it to every group at once) is a "save" vote in the next step: every group of
  the step that commits it stops there, the writing group saves the checkpoint, and all exit 75.
- The writing group: at each committed step, the group of participating (replica) rank 0 in that step's
  quorum, the lowest REPLICA_GROUP_ID taking part (torchft orders the quorum by the ids as strings: "10"
  before "2"). It alone writes that step's metrics records, checkpoints and, at the end, the test, the
  summary and the faults' lines: every committed step has exactly one writer, whichever groups are lost. Log
  lines go to each group's own stderr. The groups share the run directory and take no run lock: the launch
  holds it (ft_launch), so that another job on this run directory is refused.

What a step trains (dtrain.ft): the global batch is the config's, data.batch_size x train.grad_accum x the
group's processes, the batch one group takes as a `dtrain train` of that many ranks, whatever the number of
groups: committed step s trains samples s*B..(s+1)*B-1 of the epoch's order of one process, dealt over that
step's quorum (and in a group over its processes), each process's share in micro-batches of at most
ceil(B / (DTRAIN_FT_GROUPS x the group's processes)). So a run without faults is the one-process run of batch
B (up to the order of float sums), and its checkpoints are one process's: plain `dtrain train` resumes them.
Validation: every group validates the whole validation split itself with the same weights (torch.equal
after each commit; batch-norm statistics averaged over the quorum), so it takes the same best/early-stop
decisions with no collective; it costs each group a whole validation (no speed-up from more groups).
Randomness (dropout) is a pure function of (run.seed, step, replica rank). A restarted group heals the
engine (model, optimizer, schedule), the best value and patience, the step-log window, the skipped updates,
the best checkpoints and the fault history from a live peer: it decides as its peers do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Optional

import torch

from . import batch as batches
from .checkpoint import CheckpointError
from .config import ConfigError
from .dist import LaunchError
from .signals import HANDLED, StopReason, first_signal
from .trainer import Trainer

if TYPE_CHECKING:
    from .build import Hooks
    from .config import Config
    from .result import FitResult

log = logging.getLogger("dtrain.ft")


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """This worker is a replica group of `dtrain launch --ft`."""
    return environ.get("DTRAIN_FT") == "1"


@dataclasses.dataclass(frozen=True)
class GroupEnv:
    """What the launcher tells a replica group (the module docstring's contract)."""

    lighthouse: str
    group_id: str
    groups: int
    store: tuple[str, int]
    timeout_s: float = 10.0
    min_replicas: int = 1
    rank: int = 0  # this process's rank in its group
    size: int = 1  # the group's processes

    @classmethod
    def read(cls, environ: Mapping[str, str] = os.environ) -> "GroupEnv":
        need = ("TORCHFT_LIGHTHOUSE", "REPLICA_GROUP_ID", "DTRAIN_FT_GROUPS", "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in need if not environ.get(name)]
        if missing:
            raise LaunchError(
                f"launcher: DTRAIN_FT=1 but {', '.join(missing)} not set; start replica groups "
                "with `dtrain launch --ft` (or unset DTRAIN_FT)"
            )
        try:
            return cls(
                environ["TORCHFT_LIGHTHOUSE"],
                environ["REPLICA_GROUP_ID"],
                int(environ["DTRAIN_FT_GROUPS"]),
                (environ["MASTER_ADDR"], int(environ["MASTER_PORT"])),
                float(environ.get("DTRAIN_FT_TIMEOUT_S", 10)),
                int(environ.get("DTRAIN_FT_MIN_REPLICAS", 1)),
                int(environ.get("RANK", 0)),
                int(environ.get("WORLD_SIZE", 1)),
            )
        except ValueError as e:
            raise LaunchError(
                f"launcher: a replica group's variable is not a number ({e}); start replica groups "
                "with `dtrain launch --ft`"
            ) from None

    @property
    def slot(self) -> Optional[int]:
        """This group's place in the presence votes (who took part in a step): its id, where the ids are the
        numbers 0..groups-1 (the launcher's); None otherwise (the faults are then counted, not named)."""
        return int(self.group_id) if self.group_id.isdigit() and int(self.group_id) < self.groups else None


def check(cfg: Config, debug: bool) -> None:
    """What a replica group can't honour yet, one line each, before anything starts."""
    if debug:
        raise ConfigError("ft: --debug runs one process without replica groups; run it without `dtrain launch --ft`")
    if cfg.train.engine != "ddp":
        raise ConfigError(
            f"ft: train.engine={cfg.train.engine} can't train as replica groups yet (each process of a "
            "group steps the whole model, as DDP); use train.engine=ddp with `dtrain launch --ft`"
        )
    if cfg.train.precision == "fp16":
        raise ConfigError(
            "ft: train.precision=fp16 (loss scaling) is not supported with replica groups; use bf16 or fp32"
        )
    # The writing group may change during a run: jsonl, csv and TensorBoard reopen at the step it takes over,
    # dropping what a lost writer logged after it (TensorBoard by its purge marker); a W&B run lives in one
    # process, and another group's would be a second run
    if "wandb" in cfg.log.loggers or cfg.wandb.enabled:
        raise ConfigError(
            "ft: log.loggers wandb is not supported with replica groups yet (the writing group may "
            "change during a run); use jsonl, csv or tensorboard"
        )


# ---- the run ---------------------------------------------------------------------------------------------
def run(
    cfg: Config,
    hooks: Optional[Hooks] = None,
    debug: bool = False,
    command: Sequence[str] = (),
    program: Sequence[str] = ("dtrain",),
    print_outcome: bool = False,
) -> FitResult:
    """run.run's lifecycle for one process of a replica group: the group's own process group (none for a
    group of one; the Manager joins the groups) and no run lock (the groups share the run directory; the
    launcher is the one job); the summary, the outcome line and the faults' lines come from rank 0 of the
    group that writes the last step."""
    import json

    from . import dist
    from .callbacks import build_callbacks
    from .result import collect
    from .summary import summarize

    check(cfg, debug)
    group = GroupEnv.read()
    if importlib.util.find_spec("torchft") is None:  # said before the data and model are built
        raise ConfigError("ft: torchft is not installed; pip install 'dtrain[ft]'")
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's own lines: 6 a step at its default, info
    if hooks is not None:
        cfg = hooks.record(cfg)
    callbacks = build_callbacks(cfg.run.callbacks, hooks and hooks.callbacks)
    info = dist.setup(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.connect_timeout_s, force_single=group.size == 1)
    try:
        trainer = FtTrainer(cfg, info, group, hooks=hooks, callbacks=callbacks)
        try:
            outcome = trainer.fit()
        finally:
            trainer.manager.shutdown(wait=False)
        if trainer.writes and info.is_global_zero:
            for line in trainer.faults.lines(trainer.step):
                trainer.log.info(line)
            summarize(trainer, outcome, list(command), tuple(program))
            if print_outcome:
                print(json.dumps(outcome), flush=True)
        result = collect(trainer, outcome)
    except Exception as e:  # the callbacks are told, as run.run tells them
        callbacks.emit("on_exception", e)
        raise
    callbacks.emit("on_train_end", result)
    return result


class FtTrainer(Trainer):
    """The Trainer's components and rules (after_step: logs, validation, checkpoints, stop), with each step
    taken by a StepRunner over the step's quorum instead of the engine's own all-reduce."""

    def __init__(self, cfg: Config, dist_info, group: GroupEnv, hooks: Optional[Hooks] = None, callbacks=None):
        from .data.tar_index import indexed_fetch
        from .ft import StepRunner, build_manager, global_order, memory_fetch

        super().__init__(cfg, dist_info, hooks=hooks, callbacks=callbacks)
        feed, stream = self.feed, self.feed.stream
        if stream.transform is not None and cfg.data.remainder == "pad":
            raise ConfigError(
                "ft: data.augment (or a data transform) with data.remainder=pad is not supported with replica "
                "groups (a padded epoch augments its second draws anew); use data.remainder=drop"
            )
        # global_order reads the epoch as one process without DataLoader workers, of the group's batch: so does
        # the feed, so that resuming (a group, or `dtrain train`) keeps that order and the global batch
        feed.read_as_one(stream.batch_size * group.size)
        stream = feed.stream
        self.group, self.global_batch = group, feed.samples_per_step
        self.faults = Faults(group.groups)
        self.writes = False  # this group is the writing one (replica rank 0) at the last committed step
        self._voted: Optional[str] = None  # the signal the quorum agreed on
        # The stop control's signal check is the quorum's vote, not this process's own flags: a signal that
        # comes between two steps must stop every group at the same committed step.
        self.stop.should_stop = lambda: self._voted
        if self.key_log:
            own = "" if group.size == 1 else f"-rank-{group.rank}"
            self.key_log.path = self.key_log.path.with_name(f"group-{group.group_id}{own}.txt")
        self._first_commit, self._keys, self._healed = True, [], False
        self.manager = build_manager(
            group.group_id,
            group.lighthouse,
            timeout_s=group.timeout_s,
            min_replicas=group.min_replicas,
            store=group.store,
            host_store=group.size == 1,  # a group of several: dist.setup's store, hosted by its rank 0
            group=(group.rank, group.size),
        )
        names = self.loss.names
        self.runner = StepRunner(
            self.manager,
            self.engine.module,
            self.engine.optimizer,
            None,
            order=lambda epoch: global_order(stream, epoch, self.global_batch),
            # the split in memory, or each share read from the shard files by offset (data.in_memory=false,
            # or auto and larger than data.in_memory_mb)
            fetch=memory_fetch(stream) if stream.memory is not None else indexed_fetch(stream),
            global_batch=self.global_batch,
            steps_per_epoch=feed.steps_per_epoch,
            micro_batch=math.ceil(self.global_batch / (group.groups * group.size)),
            say=self.log.warning,
            batch_loss=self._batch_loss,
            update=self._update,
            state=HealState(self),
            seed=cfg.run.seed,
            terms=1 + len(names),
            group=(group.rank, group.size),
            group_sum=torch.distributed.all_reduce if group.size > 1 else None,
        )

    # ---- the loop -----------------------------------------------------------------------------
    def _fit(self) -> dict:
        from .resume import already_tested

        self.resume()
        if self.stop.reason is not None:
            done = already_tested(
                self.run_dir,
                self.step,
                self.stop.reason.value,
                self.info.is_global_zero,
                self.log.info,
                has_test=self.test_data is not None,
            )
            if done is not None:
                self.writes = self.group.slot in (0, None)  # one summary of a finished run
                return done
        self.start_logs()
        while self.stop.reason is None and self.step < self.feed.total_steps:
            self.ft_step()
        return self.finish(self.stop.reason or StopReason.COMPLETED)

    def start_logs(self) -> None:
        """As the trainer's, but the sinks open when this group first writes a step (`take_turn`)."""
        self.log.info(
            f"ft: replica group {self.group.group_id} of {self.group.groups}; training "
            f"{self.feed.total_steps} steps ({self.feed.steps_per_epoch}/epoch, global batch "
            f"{self.global_batch}, dealt over each step's quorum) in {self.run_dir}"
        )
        from .callbacks import RunStart

        self.callbacks.emit("on_train_start", RunStart(0, 1, self.run_dir.absolute(), self.step, self.feed.total_steps))
        self.meter.reset()

    def ft_step(self) -> None:
        """One try of the next step over its quorum; after a committed one, the trainer's rules (after_step)."""
        self._keys = []

        def votes() -> list[float]:  # asked after the quorum: this group's signals, and here (2: just healed)
            presence = [0.0] * self.group.groups
            if self.group.slot is not None and self.group.rank == 0:  # once per group
                presence[self.group.slot] = 2.0 if self._healed else 1.0
            return [*self.stop.flags.tolist(), *presence]

        r = self.runner.step(votes)
        if not r.committed:
            return
        self.step = r.step + 1
        epoch = r.step // self.feed.steps_per_epoch
        self.feed.step = self.step
        self.feed.position.segments_of(epoch)
        signals, present = r.votes[: len(HANDLED)], r.votes[len(HANDLED) :]
        self.take_turn(r.replica_rank == 0)
        self.faults.observe(self.step, r.participants, present if self.group.slot is not None else None)
        self._healed = False  # said in the step it committed
        if self.key_log:
            if self._first_commit:  # what this group logged after this step in an earlier start is replayed now
                self.key_log.truncate(self.step - 1)
            self.key_log.write(self.step, self._keys)
        self._first_commit = False
        if self._voted is None:
            self._voted = first_signal(signals)
        loss = torch.tensor(r.terms[1:], device=self.info.device)
        self.callbacks.emit("on_step_end", self.step, loss[0])
        self.after_step(loss, epoch)

    def take_turn(self, writes: bool) -> None:
        """This group writes this step's records and checkpoints, or not: the sinks open at the step before
        (dropping whatever a killed writer logged after it) and close when another group takes over."""
        if writes and not self.log.sinks:
            self.log.start(self.step - 1, self.feed.total_steps)
        elif not writes and self.log.sinks:
            self.log.close()
        self.writes = self.checkpointer.enabled = writes

    def _batch_loss(self, batch) -> torch.Tensor:
        """[loss, each loss term] of one micro-batch, as the trainer's train_step computes them."""
        self._keys += batches.keys(batch)
        batch = batches.to_device(batch, self.engine.to_device)
        # DDP's own all-reduce is off (no_sync's forward): StepRunner sums the group's gradients itself
        with self.engine.no_backward_sync(False), self.engine.autocast():
            losses = self.loss(self.forward(self.engine.model, batch), batch)
        return torch.stack([losses["loss"].float(), *(losses[k].detach().float() for k in self.loss.names)])

    def _update(self) -> None:
        """The engine's step (clipping, the non-finite rule, the schedule) on the gradients summed over the
        quorum: the same in every group."""
        _, skipped = self.engine.step()
        self.skipped.add(skipped, self.step + 1)

    def test(self) -> dict:
        """The writing group alone tests (the others' results lack the test metrics): another group could read
        the `best` pointer while the writer is still publishing the last checkpoint."""
        return super().test() if self.writes else {}

    # ---- state --------------------------------------------------------------------------------
    def resume(self) -> None:
        """The newest checkpoint, as the trainer's (a restarted group then heals past it from a peer), and the
        Manager's step from it. A checkpoint that several ranks wrote in the middle of an epoch is refused:
        their order of its rest is not the one process's order that replica groups deal."""
        for attempt in range(3):  # the writing group may be pruning the checkpoint a restarted group reads
            try:
                super().resume()
                break
            except CheckpointError:
                if attempt == 2:
                    raise
        feed, position = self.feed, self.feed.position
        done = self.step % feed.steps_per_epoch
        if done and [(s.world_size, s.num_workers) for s in position.segments] != [(1, 0)]:
            end = self.step - done + feed.steps_per_epoch
            raise CheckpointError(
                f"checkpoint: step {self.step} is in the middle of an epoch that a run of "
                f"{position.segments[-1].world_size} rank(s) and data workers read in its own "
                f"order; finish the epoch with `dtrain train` (run.stop_at_step={end}), then "
                "resume with `dtrain launch --ft`"
            )
        # A checkpoint of several ranks keeps its global batch and epoch length (the feed chose its layout):
        # the steps deal that batch, and the epochs from here on are read as one process without workers.
        self.global_batch = self.runner.global_batch = feed.samples_per_step
        self.runner.steps_per_epoch = feed.steps_per_epoch
        self.runner.micro_batch = math.ceil(self.global_batch / (self.group.groups * self.group.size))
        position.layout = dataclasses.replace(position.layout, num_workers=0)
        self.manager.load_state_dict({"step": self.step, "batches_committed": self.step})
        self.checkpointer.enabled = False  # until this group writes a step


class HealState:
    """What a restarting group receives from a live peer (torchft sends it with its own step): the parts of
    the run's state that decide what the next steps do, so that a healed group decides as its peers do."""

    def __init__(self, trainer: FtTrainer):
        self.trainer = trainer

    def parts(self) -> dict:
        t = self.trainer
        return {
            "engine": t.engine,
            "evaluator": t.evaluator,
            "checkpointer": t.checkpointer,
            "nonfinite": t.skipped,
            "steplog": t.step_log,
            "faults": t.faults,
        }

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts().items()}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = t.feed.step = t.manager.current_step()
        for name, part in self.parts().items():
            part.load_state_dict(state[name])
        t.unfreeze(say=False)  # frozen or not is a function of the step: the peer's step now
        t._healed = True
        t.log.info(f"ft: replica group {t.group.group_id} healed from a live peer at step {t.step}")


class Faults:
    """Which groups took part in each committed step (the presence votes: 1, or 2 for a group that healed in
    it), kept as the changes: -> one line per lost group at the end. Healed with the rest, so that whichever
    group writes the end knows them all."""

    def __init__(self, groups: int):
        self.groups = groups
        self.changes: list[tuple[int, int, list[int], list[int]]] = []  # (step, participants, present, healed)

    def observe(self, step: int, participants: int, present: Optional[Sequence[float]]) -> None:
        ids = [g for g, v in enumerate(present or []) if v > 0]
        healed = [g for g, v in enumerate(present or []) if v > 1]
        last = self.changes[-1] if self.changes else None
        if last is None or (participants, ids) != (last[1], last[2]) or healed:
            self.changes.append((step, participants, ids, healed))

    def lines(self, end: int) -> list[str]:
        """'ft: group 2 lost at step 17, rejoined (healed) at step 23; 6 steps at 2 of 3 groups', per fault
        (the groups' ids unknown: 'a replica group', from the quorum's size)."""
        out = []
        named = any(ids for _, _, ids, _ in self.changes)
        for g in range(self.groups) if named else [None]:
            lost = None  # (step, the smallest quorum since)
            for i, (step, n, ids, healed) in enumerate(self.changes):
                there = (g in ids) if g is not None else n >= self.groups
                if lost is None and not there and i > 0 and (g is None or g in self.changes[i - 1][2]):
                    lost = (step, n)
                elif lost is not None and not there:
                    lost = (lost[0], min(lost[1], n))
                elif lost is not None and there:
                    how = " (healed)" if g in healed else ""
                    out.append(
                        f"ft: {_who(g)} lost at step {lost[0]}, rejoined{how} at step {step}; "
                        f"{step - lost[0]} steps at {lost[1]} of {self.groups} groups"
                    )
                    lost = None
            if lost is not None:
                out.append(
                    f"ft: {_who(g)} lost at step {lost[0]}, not back by the end (step {end}); "
                    f"{end - lost[0] + 1} steps at {lost[1]} of {self.groups} groups"
                )
        return out

    def state_dict(self) -> dict:
        return {"changes": [[step, n, list(ids), list(healed)] for step, n, ids, healed in self.changes]}

    def load_state_dict(self, state: dict) -> None:
        self.changes = [(step, n, list(ids), list(healed)) for step, n, ids, healed in state["changes"]]


def _who(group: Optional[int]) -> str:
    return f"group {group}" if group is not None else "a replica group"
