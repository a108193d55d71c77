"""Per-step fault tolerance on torchft (issue #36): replica groups train under a quorum that torchft's
Lighthouse decides each step; a lost group leaves the quorum at the next step and the others train on at the
smaller world size; a restarted group heals from a live peer (no checkpoint read) and rejoins.

What dtrain adds to torchft's own loop is that every sample is still seen once:

- Each step's *global* batch is a pure function of (seed, epoch, step): samples step*B..(step+1)*B-1 of the
  epoch's order (`global_order`: the order one rank reading the whole epoch with batch B reads it). It is dealt
  over that step's quorum by replica rank (`deal_step`), so whatever the number of groups, the step trains
  on the same B samples.
- Each group's loss is its share's mean times share/B, and the gradients are all-reduced with SUM, so the
  update is the global batch's mean gradient at any quorum size (uneven shares included).
- The data position is torchft's committed step (`Manager.current_step`): a step whose commit fails does not
  advance it, so the next try deals the same samples again (over the new quorum); a healed group receives the
  step with the weights.

The quorum is synchronous (`use_async_quorum=False`): a step must know its participants before its forward
pass, to deal its batch; healing is then applied before the forward pass, and a group is never a spare.

`dtrain train` as a replica group (the run's own model, data, validation, checkpoints and logs around a
StepRunner) is dtrain.ft_train; the launcher's side is dtrain.ft_launch. A replica group may be several
processes (one per GPU of a node): each trains its share of the group's, summed over the group, then with
the same rank of the other groups (StepRunner's `group`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from .config import ConfigError
from .data.elastic import EpochReplay, Item, Segment

log = logging.getLogger("dtrain.ft")


# ---- which samples a step trains on, and which of them a replica group reads -------------------------------
def global_order(stream, epoch: int, global_batch: int) -> list[Item]:
    """The epoch's samples, (shard, position) each, in the order one rank with batch `global_batch` and no
    DataLoader workers reads them from `stream` (a training ShardStream): seeded shard order, shuffle buffer.
    A pure function of (seed, epoch), the same in every replica group; nothing is read."""
    seg = Segment(1, global_batch, 1, 0, 0)
    one_rank = stream.relayout(
        rank=0,
        world_size=1,
        batch_size=global_batch,
        grad_accum=1,
        num_workers=0,
        steps_per_epoch=stream.steps_per_epoch,
    )
    return EpochReplay(one_rank, epoch, [seg]).normal_order(seg, 0)


def memory_fetch(stream) -> Callable[..., tuple]:
    """A `fetch` for StepRunner from a training ShardStream read into memory (data.in_memory):
    `fetch(items, epoch)` -> the batch of (shard, position) items of that epoch, decoded and transformed
    (data.augment, a data transform: a pure function of the sample, its key, the epoch and its pass, 0 in an
    epoch that draws each sample once) as the stream's own batches are ((x, y, keys) for dtrain's shards)."""
    memory = stream.memory.load(stream)

    def fetch(items: Sequence[Item], epoch: int = 0) -> tuple:
        cols = memory.columns.take(memory.rows(list(items)))
        if stream.transform is not None:  # as ShardStream._from_memory applies it
            cols = cols.transformed(lambda x, key, j: stream.transform(x, key=key, epoch=epoch, pass_index=0))
        return stream.format.batch(cols)

    return fetch


def deal_step(keys: Sequence, replica_rank: int, participants: int) -> Sequence:
    """Replica rank `replica_rank`'s share of a step's global batch over `participants` groups: consecutive
    runs whose sizes differ by at most one, in rank order, so the shares of ranks 0..participants-1 are the
    batch exactly once."""
    n = len(keys)
    return keys[replica_rank * n // participants : (replica_rank + 1) * n // participants]


# ---- one replica group's steps ---------------------------------------------------------------------------
@dataclasses.dataclass
class StepResult:
    step: int  # the committed step this try trained (the data position)
    committed: bool
    participants: int
    replica_rank: int
    keys: list  # this group's share of the step's global batch
    micro_batches: int  # the share cut into at most `micro_batch` samples each, gradients accumulated
    loss: float  # the global batch's mean loss (summed over the quorum with the gradients)
    votes: list[float]  # each of the step's `votes`, summed over the quorum: a decision all groups share
    terms: list[float] = dataclasses.field(default_factory=list)  # each loss term's global mean (batch_loss)


class StepRunner:
    """Trains one replica group (or one process of it) a step at a time through a torchft Manager.

    `order(epoch)` gives the epoch's sample keys in order (at least steps_per_epoch * global_batch of them),
    `fetch(keys)` or `fetch(keys, epoch)` the batch (x, y, ...) of those keys (`global_order` and `memory_fetch` for a ShardStream),
    `loss_fn(output, y)` a mean over the batch. A share larger than `micro_batch` is trained in micro-batches
    of at most that many, accumulating: memory per group stays bounded when the quorum shrinks and the shares
    grow. The model, optimizer and schedule heal through the
    manager's state-dict callbacks, registered here; the step comes with torchft's own state."""

    def __init__(
        self,
        manager,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        order: Callable[[int], Sequence],
        fetch: Callable[[Sequence], tuple],
        global_batch: int,
        steps_per_epoch: int,
        scheduler=None,
        micro_batch: int | None = None,
        say: Callable[[str], None] = log.warning,
        *,
        batch_loss: Callable | None = None,
        update: Callable[[], Any] | None = None,
        state=None,
        seed: int | None = None,
        terms: int = 1,
        group: tuple[int, int] = (0, 1),
        group_sum: Callable[[torch.Tensor], None] | None = None,
    ):
        """Optional, for a trainer of its own (dtrain.ft_train): `batch_loss(batch)` -> the batch's mean loss
        terms, a 1-D tensor whose first is backpropagated (instead of loss_fn(model(x), y)), `terms` of them;
        `update()` applies the summed gradients (instead of optimizer.step and scheduler.step); `state`
        (state_dict and load_state_dict) is what a healing group receives (instead of model, optimizer and
        schedule); `seed`:
        torch's RNG is seeded from (seed, step, replica rank) before each try, so dropout draws are a pure
        function of them, the same after healing, a replay or a resume. A replica group of several processes
        (DDP inside the group): `group` = (this process's rank in its group, the group's size), and
        `group_sum(flat)` sums a tensor over the group's processes in place (torch.distributed.all_reduce over
        the group's own process group); each process then trains its own share of the group's."""
        self.manager, self.model, self.optimizer, self.scheduler = manager, model, optimizer, scheduler
        self.loss_fn, self.order, self.fetch, self.say = loss_fn, order, fetch, say
        # dtrain's fetches take the epoch too (a transform is a function of it); a fetch of one argument is asked
        # with the keys alone
        self._fetch_epoch = "epoch" in inspect.signature(fetch).parameters
        self.batch_loss = batch_loss or (lambda batch: self.loss_fn(self.model(batch[0]), batch[1]).reshape(1))
        self.update, self.state, self.seed, self.terms = update, state, seed, terms
        (self.group_rank, self.group_size), self.group_sum = group, group_sum
        self._averaged: tuple[Sequence[torch.Tensor], int] = ((), 1)  # the buffers a step averages, over how many
        self.global_batch, self.steps_per_epoch = global_batch, steps_per_epoch
        self.micro_batch = micro_batch or global_batch
        self.healed_at: list[int] = []  # the steps at which this group loaded a peer's state
        self._participants: int | None = None
        self._epoch_keys: tuple[int, Sequence] = (-1, ())
        manager.register_state_dict_fn("dtrain", self.load_state_dict, self.state_dict)

    # what a healing group receives from a live peer (the step is torchft's own state)
    def state_dict(self) -> dict[str, Any]:
        if self.state is not None:
            return self.state.state_dict()
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load(state)
        self.healed_at.append(self.manager.current_step())

    def _load(self, state: dict[str, Any]) -> None:
        if self.state is not None:
            self.state.load_state_dict(state)
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    # what a checkpoint holds: torchft's step too (its own docs: restore the Manager's state with the weights)
    def checkpoint_state(self) -> dict[str, Any]:
        return {"dtrain": self.state_dict(), "torchft": self.manager.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self._load(state["dtrain"])
        self.manager.load_state_dict(state["torchft"])

    def step_keys(self, step: int) -> Sequence:
        """The global batch of committed step `step`: samples done*B..(done+1)*B-1 of its epoch's order."""
        epoch, done = divmod(step, self.steps_per_epoch)
        if self._epoch_keys[0] != epoch:
            self._epoch_keys = (epoch, self.order(epoch))
        return self._epoch_keys[1][done * self.global_batch : (done + 1) * self.global_batch]

    def step(self, votes: Sequence[float] | Callable[[], Sequence[float]] = ()) -> StepResult:
        """One try of the next step: quorum (healing first if this group is behind), this group's share of the
        step's global batch, gradients summed over the quorum, commit. Not committed: the weights and the step
        are unchanged, so the next call trains the same samples again.

        `votes` (the same number from every group) travel with the gradients and come back summed over the
        quorum: 1.0 for "save now" (a signal this group got) makes every group of the committed step save. A
        callable is asked after the quorum (and healing): a vote may say that this group healed."""
        m = self.manager
        m.start_quorum()  # synchronous: heals before returning, so the forward pass sees the peer's weights
        step, participants, rank = m.current_step(), m.num_participants(), m.participating_rank()
        if participants != self._participants:
            if self._participants is not None:
                self.say(f"ft: step {step}: quorum {self._participants} -> {participants} replica groups")
            self._participants = participants
        # dealt over the quorum's processes: replica rank r's group takes the r-th share, its processes that in turn
        slot = rank * self.group_size + self.group_rank
        keys = list(deal_step(self.step_keys(step), slot, participants * self.group_size))
        votes = votes() if callable(votes) else votes
        if self.seed is not None:
            torch.manual_seed(_mix(self.seed, step, slot))
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        before = [b.clone() for b in buffers]  # a try that is not committed leaves them as they were
        self.optimizer.zero_grad(set_to_none=False)
        chunks = [keys[i : i + self.micro_batch] for i in range(0, len(keys), self.micro_batch)]
        terms, epoch = None, step // self.steps_per_epoch
        for chunk in chunks:
            batch = self.fetch(chunk, epoch=epoch) if self._fetch_epoch else self.fetch(chunk)
            # this chunk's mean x chunk/B: summed over chunks and the quorum, the global batch's mean
            part = self.batch_loss(batch) * (len(chunk) / self.global_batch)
            part[0].backward()
            terms = part.detach().double() if terms is None else terms + part.detach().double()
        if terms is None:  # no share this step (more groups than samples): nothing of ours in the sum
            terms = torch.zeros(self.terms, dtype=torch.float64)
        self._averaged = (buffers, participants * self.group_size)
        summed = self._sum_gradients(
            torch.cat([terms, torch.tensor(list(votes), dtype=torch.float64, device=terms.device)])
        )
        terms, votes = summed[: len(terms)].tolist(), summed[len(terms) :].tolist()
        committed = m.should_commit()
        if committed:
            if self.update is not None:
                self.update()
            else:
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
        else:
            with torch.no_grad():
                for b, old in zip(buffers, before):
                    b.copy_(old)
            self.say(
                f"ft: step {step} not committed ({_first_line(m.errored())}); "
                f"its samples are dealt again over the next quorum"
            )
        return StepResult(step, committed, participants, rank, keys, len(chunks), terms[0], votes, terms)

    def _sum_gradients(self, extra: torch.Tensor) -> torch.Tensor:
        """All-reduce (SUM) every gradient, the floating-point buffers (batch-norm statistics: averaged over
        the quorum, so that every group validates and saves the same ones), and `extra` (the loss, the votes),
        through torchft's managed process group in one flat buffer (one collective a step); -> `extra` summed.
        An error there is recorded by the manager and fails the commit, not this call.

        A group of several processes first sums the buffer over its own processes (`group_sum`), then each
        process sums it with the same rank of the other groups (torchft's process group joins rank i of every
        group): the quorum's total in every process, HSDP's two levels with DDP inside. Not DDP's reducer: it
        averages over the group (the shares here are weighted by size, and may be uneven or empty), and its
        overlap of the all-reduce with backward would need every process to take the same number of
        micro-batches; so the micro-batches run under the engine's no-sync and this one sum is the group's."""
        from torch.distributed import ReduceOp

        buffers, participants = self._averaged
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter unused by this share still takes part in the sum
                p.grad = torch.zeros_like(p)
        dtype = params[0].grad.dtype
        # in the gradients' dtype (no wider: it would double the bytes sent); votes are small whole numbers,
        # exact in any float dtype
        flat = torch.cat(
            [p.grad.reshape(-1) for p in params]
            + [b.reshape(-1).to(dtype) for b in buffers]
            + [extra.to(params[0].grad.device, dtype)]
        )
        if self.group_sum is not None:
            self.group_sum(flat)
        self.manager.allreduce(flat, reduce_op=ReduceOp.SUM).wait()
        if self.manager.errored() is not None:
            _close_connections(self.manager)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        with torch.no_grad():
            for b in buffers:
                b.copy_((flat[offset : offset + b.numel()] / participants).view_as(b))
                offset += b.numel()
        return flat[offset:]


def _close_connections(manager) -> None:
    """After a failed all-reduce, close this process's gloo connections at once (torchft's abort drops the
    process group, and gloo closes its sockets with it). gloo's ring all-reduce tells a dead peer only to the
    ranks that exchange with it; another rank waits for data from a live one that has left the collective,
    until that connection closes or the collective timeout (--ft-timeout), and the next quorum waits as long
    for it (the Lighthouse's join timeout is the same): with 4 replica groups every SIGKILL that broke an
    all-reduce cost the whole timeout, with 3 about one in 8. Nothing is lost: the commit fails, so the
    Lighthouse gives the next quorum a new id (it does on any member's commit failure) and torchft configures a
    new process group for it."""
    pg = getattr(manager, "dtrain_pg", None)
    if pg is not None:
        pg.abort()


def _mix(seed: int, step: int, rank: int) -> int:
    """A seed for torch's RNG from (seed, step, replica rank), well spread."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") % 2**63


def _first_line(error) -> str:
    """torchft's error in one sentence (ExceptionWithTraceback carries the whole traceback in its text, gloo's
    errors three sentences of advice)."""
    if error is None:
        return "too few replica groups"
    error = getattr(error, "original_exception", error)
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0].split('. ')[0]}"


def build_manager(
    replica_id: str,
    lighthouse: str,
    *,
    timeout_s: float = 10.0,
    quorum_timeout_s: float = 60.0,
    min_replicas: int = 1,
    store: tuple[str, int] | None = None,
    host_store: bool = False,
    group: tuple[int, int] = (0, 1),
):
    """A torchft Manager for one process of a replica group: gloo, a synchronous quorum, the group's TCPStore
    (at `store`, started here if `host_store`; or started here on a free port; a group of several processes
    shares the one its process group meets at). `group`: (this process's rank in the group, the group's
    size); the group's rank 0 talks to the Lighthouse for all. `timeout_s` bounds a collective with a lost
    peer."""
    from torch.distributed import TCPStore

    try:
        from torchft import Manager, ProcessGroupGloo
    except ImportError as e:
        raise ConfigError(f"ft: torchft is not installed ({e}); pip install 'dtrain[ft]'") from None

    own = None
    if store is None or host_store:
        addr, port = store or ("127.0.0.1", 0)
        own = TCPStore(addr, port, is_master=True, wait_for_workers=False)
        store = (addr, own.port)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=timeout_s))
    manager = Manager(
        pg=pg,
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replicas,
        use_async_quorum=False,
        # not at step 0: every group builds the same weights from run.seed (or reads the same checkpoint),
        # and torchft's step-0 sync picks its source round-robin by group rank, so that in a group of several
        # processes rank 0 would heal and rank 1 not (the healing parts' collectives then mismatch); a
        # group behind its peers heals with all its ranks at once
        init_sync=False,
        timeout=timedelta(seconds=timeout_s),
        quorum_timeout=timedelta(seconds=quorum_timeout_s),
        rank=group[0],
        world_size=group[1],
        store_addr=store[0],
        store_port=store[1],
        lighthouse_addr=lighthouse,
        replica_id=replica_id,
    )
    manager.dtrain_store = own  # the group's store must live as long as the manager that talks to it
    manager.dtrain_pg = pg  # closed after a failed all-reduce (_close_connections)
    _quiet(manager)
    return manager


class _SaidByDtrain(logging.Filter):
    """torchft.manager's lines that dtrain says itself in one line (a failed collective, heal or configure
    reaches `ft: step N not committed (...)` through Manager.errored(); torchft logs it with gloo's whole
    message and a traceback), or that do not apply to gloo (NCCL's flight recorder, at each quorum change)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "] got exception in" in message
            or "] got exception waiting for work" in message
            or "Unable to reset NCCL flight recorder" in message
        )


_SAID_BY_DTRAIN = _SaidByDtrain()


def _quiet(manager) -> None:
    """What torchft and torch print in a group's log that says nothing to dtrain's user, silenced at its
    source: the filter above; the access line ('GET /checkpoint/31/full HTTP/1.1" 200') of the HTTP server
    that sends this group's state to a healing peer (its error lines stay); torch's warning that the state a
    healing group receives is read from a buffer that is not writable (loaded into the model, then dropped)."""
    import warnings

    logging.getLogger("torchft.manager").addFilter(_SAID_BY_DTRAIN)
    warnings.filterwarnings(
        "ignore",
        message="The given buffer is not writable",
        category=UserWarning,
        module="torch.distributed._serialization",
    )
    server = getattr(getattr(manager, "_checkpoint_transport", None), "_server", None)
    handler = getattr(server, "RequestHandlerClass", None)
    if handler is not None:
        handler.log_request = lambda self, code="-", size="-": None
