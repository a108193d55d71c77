"""One replica group of tests/test_ft.py (and benchmarks/ft_faults.py): a small regression model on a synthetic
data set, trained through dtrain.ft.StepRunner. Writes one JSON line per step try to OUT/g<ID>.jsonl (step,
commit, quorum, replica rank, the sample keys it trained, a hash of the weights after the try) and one per
healing (the step, the hash of the weights received); the final weights to OUT/g<ID>.pt.

--kill-at STEP (or --kill-after N: its N-th step try): SIGKILL this process mid-step, after its backward pass
and before the all-reduce, as a lost machine would (the peers' collective fails, so the step is not committed
anywhere and is replayed).
--hold-at STEP --hold-for ID: wait before STEP until group ID's manager is up (its OUT/g<ID>.up), so that a
replacement surely joins before the survivors finish, however slow the machine. --stop-file: end at the step
written in it, once it is there (the benchmark ends the run when the last replacement has rejoined).

For benchmarks/ft_faults.py: --hidden W --layers L trains dtrain's own MLP (dtrain.models.mlp, L hidden layers
of W) with AdamW instead, a model whose state takes seconds to move; --save-every N saves
runner.checkpoint_state() with torch.save after every N-th committed step (OUT/ckpt-g<ID>.pt); the records
then also say how long each save, each hold and each heal's transfer took."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torchft  # noqa: F401 (imported before --wait-for's wait: seconds of imports, not part of joining)

from dtrain.ft import StepRunner, build_manager

N, DIM = 96, 8  # samples, features


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g)
    y = x @ torch.randn(DIM, 1, generator=g) + 0.1 * torch.randn(N, 1, generator=g)
    return x, y


def order(epoch: int) -> list[int]:
    return torch.randperm(N, generator=torch.Generator().manual_seed(1000 + epoch)).tolist()


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def build_optim(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # momentum: state that must heal too
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.8)


def build_large(hidden: int, layers: int):
    """dtrain's MLP (what `dtrain train` builds for model.kwargs.hidden=[hidden] * layers) and AdamW (dtrain's
    default optimizer, fused on CPU as optim.fused=auto picks): 12 bytes of checkpoint state per parameter."""
    from dtrain.models import mlp

    torch.manual_seed(0)
    model = mlp((DIM,), 1, hidden=[hidden] * layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.8)


def weights_hash(model) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replica-id", required=True)
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--kill-after", type=int, default=-1, help="SIGKILL mid-step in this process's N-th step try")
    ap.add_argument("--vote-at", type=int, default=-1, help="vote 1 (as a signal would: save now) at this step")
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--wait-for", type=Path, help="join only once this file exists (a replacement started early)")
    ap.add_argument("--hold-at", type=int, default=-1, help="before this step, wait until --hold-for has joined")
    ap.add_argument("--hold-for", default="", help="a replica id (its manager touches OUT/g<ID>.up)")
    ap.add_argument("--hidden", type=int, default=0, help="dtrain's MLP of this width with AdamW (0: the small model)")
    ap.add_argument("--layers", type=int, default=4, help="--hidden's number of hidden layers")
    ap.add_argument("--save-every", type=int, default=0, help="save a checkpoint after every N-th committed step")
    ap.add_argument("--stop-file", type=Path, help="once it exists: the step to end at (instead of --steps)")
    args = ap.parse_args()
    x, y = data()
    if args.hidden:
        model, opt, sched = build_large(args.hidden, args.layers)
    else:
        model = build_model()
        opt, sched = build_optim(model)
    records = (args.out / f"g{args.replica_id}.jsonl").open("a", buffering=1)
    hashed = (lambda m: None) if args.hidden else weights_hash  # hashing 100s of MB a step: not what is timed

    def write(**rec):
        records.write(json.dumps({"pid": os.getpid(), "t": time.time(), **rec}) + "\n")

    class Runner(StepRunner):
        def load_state_dict(self, state):
            super().load_state_dict(state)
            write(healed=self.manager.current_step(), weights=hashed(self.model))

        tries = 0

        def _sum_gradients(self, loss):
            self.tries += 1
            if self.manager.current_step() == args.kill_at or self.tries == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return super()._sum_gradients(loss)

    while args.wait_for and not args.wait_for.exists():
        time.sleep(0.02)
    manager = build_manager(args.replica_id, args.lighthouse, timeout_s=args.timeout)
    transport = getattr(manager, "_checkpoint_transport", None)  # torchft's own (private): timed, for benchmarks
    if transport is not None:
        receive = transport.recv_checkpoint

        def timed_receive(*a, **kw):
            start = time.monotonic()
            state = receive(*a, **kw)
            write(heal_transfer_s=time.monotonic() - start)  # in torchft's recovery thread: one line, one write
            return state

        transport.recv_checkpoint = timed_receive
    runner = Runner(
        manager,
        model,
        opt,
        torch.nn.functional.mse_loss,
        order,
        lambda keys: (x[keys], y[keys]),
        args.global_batch,
        N // args.global_batch,
        scheduler=sched,
        micro_batch=args.micro_batch,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    (args.out / f"g{args.replica_id}.up").touch()  # heartbeating from here on: the lighthouse will wait for it
    write(started=True)

    def last_step() -> int:  # every group reads the same step: they end together, none is left without a quorum
        told = args.stop_file and args.stop_file.exists() and args.stop_file.read_text().strip()
        return int(told) if told else args.steps

    while manager.current_step() < last_step():
        held = time.monotonic()
        while manager.current_step() == args.hold_at and not (args.out / f"g{args.hold_for}.up").exists():
            time.sleep(0.02)
        if time.monotonic() - held > 0.05:
            write(held_s=time.monotonic() - held)
        r = runner.step(votes=[float(manager.current_step() == args.vote_at)])
        write(
            step=r.step,
            committed=r.committed,
            participants=r.participants,
            rank=r.replica_rank,
            keys=r.keys,
            micro_batches=r.micro_batches,
            loss=r.loss,
            votes=r.votes,
            weights=hashed(model),
        )
        if r.committed and args.save_every and manager.current_step() % args.save_every == 0:
            start, path = time.monotonic(), args.out / f"ckpt-g{args.replica_id}.pt"
            torch.save(runner.checkpoint_state(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)  # as dtrain's saves: a whole file or the previous one
            write(saved=manager.current_step(), save_s=time.monotonic() - start, bytes=path.stat().st_size)
        time.sleep(args.step_delay)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out / f"g{args.replica_id}.pt")
    manager.shutdown(wait=False)
    write(done=True)


if __name__ == "__main__":
    main()
