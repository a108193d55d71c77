"""The training loop: the steps, and after each one the owners of the rules, over the components build.py makes.

Each rule has one owner, which decides "now?" and acts: the step log when to log (steplog.py), the evaluator
when to validate, the best validation and the patience (evaluate.py), the checkpointer when to save (cadence,
best, final) and what to keep (checkpoint.py), the stop control why training stops (signals.py), the data feed
what each epoch reads (data/feed.py), the engine how gradients are reduced (engine/). Saving and resuming are
loops over the run's stateful parts (state.py). Distributed details live in dist/ and engine/.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Optional

import torch

from . import batch as batches
from . import dist
from .build import Hooks, build_components, seed_all
from .callbacks import Callbacks, Reporter, RunStart, build_callbacks
from .config import Config
from .optim import set_schedule_length
from .resume import ConfigState, already_tested
from .signals import StopReason
from .state import RNG, Parts


class Trainer:
    def __init__(
        self,
        cfg: Config,
        dist_info: dist.DistInfo,
        debug: bool = False,
        hooks: Optional[Hooks] = None,
        callbacks: Optional[Callbacks] = None,
    ):
        self.cfg, self.info, self.debug = cfg, dist_info, debug
        # the run's lifecycle (run.py) hands in the callbacks it also tells how the run ended
        self.callbacks = callbacks or build_callbacks(cfg.run.callbacks, hooks and hooks.callbacks)
        c = build_components(cfg, dist_info, hooks, debug, self.callbacks)
        data, self.engine, self.evaluator, self.freezer = c.core.data, c.core.engine, c.core.evaluator, c.core.freezer
        self.facts, self.feed, self.val_data, self.test_data = data.facts, data.feed, data.val, data.test
        self.forward, self.loss = self.evaluator.forward, self.evaluator.loss
        self.run_dir, self.stop, self.log = c.run_dir, c.stop, c.log
        self.step_log, self.skipped, self.meter, self.clock = c.step_log, c.skipped, c.meter, c.clock
        self.key_log = c.key_log
        self.step = 0
        self.diverged: Optional[str] = None  # why, when check_weights stopped the run
        # what a checkpoint holds, restored in this order: the config is compared first, before anything loads
        # (the checkpointer adds its own state)
        self.checkpointer = c.make_checkpointer(
            parts=Parts(
                shared={
                    "config": ConfigState(cfg, self.run_dir, self.log.info),
                    "engine": self.engine,
                    "trainer": self,
                    "data": self.feed,
                    "nonfinite": self.skipped,
                    "evaluator": self.evaluator,
                    "logger": self.log,
                    "stop": self.stop,
                },
                own={
                    "rng": RNG(cfg.run.seed, dist_info.global_rank, lambda: self.step, seed_all),
                    "steplog": self.step_log,
                    "callbacks": self.callbacks,
                },
            )
        )

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        ok = False
        try:
            result = self._fit()
            ok = True
            return result
        finally:
            self.log.close()  # before any error line: a bar closed later would print after it
            self.stop.close(wait=ok)  # after a failure a peer may be gone: don't wait for it
            if self.key_log:
                self.key_log.close()

    def _fit(self) -> dict:
        self.resume()
        if self.stop.reason is not None:  # finished before this start: done, unless its test is still to run
            done = already_tested(
                self.run_dir,
                self.step,
                self.stop.reason.value,
                self.info.is_global_zero,
                self.log.info,
                has_test=self.test_data is not None,
            )
            if done is not None:
                return done
        self.start_logs()
        while self.stop.reason is None and self.step < self.feed.total_steps:  # an epoch (or its rest) a pass
            with contextlib.closing(self.feed.batches(self.step)) as epoch_batches:
                self.train_epoch(epoch_batches)
        return self.finish(self.stop.reason or StopReason.COMPLETED)  # None: resumed at the end of the plan

    def start_logs(self) -> None:
        """Nothing is written before this: a run refused at resume, or found finished, changes no file."""
        self.log.start(self.step, self.feed.total_steps)
        if self.log.wandb is not None:  # rank 0: checkpoints as W&B artifacts (wandb.log_checkpoints)
            self.callbacks.add(Reporter(self.log.wandb.log_checkpoint, self.log.warning))
        if self.key_log:
            self.key_log.start(self.step, self.info.world_size, self.info.is_global_zero, self.log.info)
        self.log.info(
            f"training {self.feed.total_steps} steps ({self.feed.steps_per_epoch}/epoch, "
            f"global batch {self.feed.samples_per_step}) in {self.run_dir}"
        )
        self.callbacks.emit(
            "on_train_start",
            RunStart(
                self.info.global_rank, self.info.world_size, self.run_dir.absolute(), self.step, self.feed.total_steps
            ),
        )
        self.meter.reset()

    def train_epoch(self, epoch_batches, epoch: Optional[int] = None) -> None:
        """Optimizer steps on `epoch_batches` (micro-batches) until they run out or training stops.
        (`dtrain bench` feeds it synthetic batches: the same loop, timed.)"""
        epoch = self.step // self.feed.steps_per_epoch if epoch is None else epoch
        for micro_batches in self.meter.timed(_groups(epoch_batches, self.feed.grad_accum)):
            self.stop.step_started = time.monotonic()  # a SIGTERM long after this: the rank is stuck
            with dist.guard("gradient all-reduce (train step)"):
                loss = self.train_step(micro_batches)
            self.stop.step_started = None
            self.step += 1
            self.callbacks.emit("on_step_end", self.step, loss[0])
            self.after_step(loss, epoch)
            if self.stop.reason is not None:
                break

    def train_step(self, micro_batches: list) -> torch.Tensor:
        """Forward and backward on each micro-batch, all-reduce once (on the last), one optimizer step."""
        t0 = time.perf_counter()
        if self.key_log:
            self.key_log.write(self.step + 1, [k for b in micro_batches for k in batches.keys(b)])
        loss_sum = None
        for i, batch in enumerate(micro_batches):
            batch = batches.to_device(batch, self.engine.to_device)
            with self.engine.no_backward_sync(i == len(micro_batches) - 1):
                with self.engine.autocast():
                    losses = self.loss(self.forward(self.engine.model, batch), batch)
                self.engine.backward(losses["loss"])
            terms = torch.stack([losses[k].detach().float() for k in self.loss.names])
            loss_sum = terms if loss_sum is None else loss_sum + terms
        grad_norm, skipped = self.engine.step()
        self.skipped.add(skipped, self.step + 1)
        if self.debug:  # .item() syncs the device: only in debug
            x = batches.model_input(batch) if isinstance(batch, (tuple, list)) or "x" in batch else None
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else batches.size(batch)
            self.log.info(
                f"step {self.step + 1}: loss {loss_sum[0].item() / len(micro_batches):.5f} "
                f"grad_norm {grad_norm.item():.4f} lr {self.engine.lr:.3e} batch {shape} "
                f"{(time.perf_counter() - t0) * 1e3:.1f} ms"
            )
        return loss_sum / len(micro_batches) if len(micro_batches) > 1 else loss_sum

    def after_step(self, loss: torch.Tensor, epoch: int) -> None:
        """The owners of the rules, each asked in turn whether to act at this step."""
        last = self.step >= self.feed.total_steps
        self.step_log.after_step(self.step, epoch, loss, last)
        if last or self.checkpointer.should_save(self.step):  # before this step's validation and saves
            self.check_weights()
        self.unfreeze()
        if self.val_data is not None and self.evaluator.should_validate(self.step, self.feed.steps_per_epoch, last):
            self.validate(epoch)
        self.checkpointer.after_step(self.step)
        with dist.guard("stop-flag all-reduce"):
            self.stop.check(self.step, last)
        self.step_log.training_resumes()

    def validate(self, epoch: int) -> None:
        with self.clock.part("validation"):
            improved, stop_early = self.evaluator.validate(
                self.val_data, self.step, epoch, self.log, log_local=self.cfg.log.all_ranks and self.info.distributed
            )
        self.callbacks.emit("on_validation_end", self.step, dict(self.evaluator.validated))
        self.checkpointer.after_validation(self.step, improved)
        if stop_early:
            self.stop.request(StopReason.EARLY_STOP)

    def unfreeze(self, say: bool = True) -> None:
        if self.freezer.apply(self.step):  # frozen or not is a function of the step
            self.engine.trainable_changed()
            if say:
                self.log.info(f"step {self.step}: unfroze {len(self.freezer.frozen)} parameter tensors")

    # ---- the end ------------------------------------------------------------------------------
    def check_weights(self, at_end: bool = False) -> None:
        """Collective. A run whose weights are non-finite stops (StopReason.NONFINITE, over any reason given
        before), so they are never saved, tested or reported "completed": a huge LR (optim.lr=1e30 with SGD)
        overflows the weights from finite gradients, which train.nonfinite's gradient check never sees, and
        under `ignore` the NaN gradients that follow are applied. So does a run that ends (`at_end`) in two or
        more skipped updates in a row (train.nonfinite=skip): its final weights gave non-finite gradients on as
        many batches (lr=1e30: finite weights of 1e29, every update after the first skipped, test loss NaN).
        Every parameter is read once (this rank's shards under FSDP), at the steps that save and at the end."""
        device = self.info.device
        finite = [
            torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all().to(device)  # DTensor: shard
            for p in self.engine.module.parameters()
        ]
        bad = (~torch.stack(finite).all()).float() if finite else torch.zeros((), device=device)
        with dist.guard("non-finite weights all-reduce"):
            nonfinite = bool(dist.all_reduce_max(bad).item())
        in_a_row = self.skipped.in_a_row() if at_end and not nonfinite else 0  # the same on every rank
        if nonfinite or in_a_row >= 2:
            self.stop.reason = StopReason.NONFINITE  # over any reason: nothing after this step is kept
            self.diverged = (
                "the weights are non-finite (NaN/inf)"
                if nonfinite
                else f"the last {in_a_row} updates were skipped (non-finite gradients from the same weights)"
            )

    def finish(self, reason: StopReason) -> dict:
        """The last checkpoint, then the test of the best weights, or (interrupted) how to go on."""
        if reason != StopReason.NONFINITE:
            self.check_weights(at_end=reason.finished)  # an interrupted run may still recover from a skip
            reason = self.stop.reason or reason
        self.checkpointer.at_end(self.step)
        latest = self.checkpointer.pointer("latest")
        if self.diverged:
            kept = f"the newest checkpoint is {latest}" if latest else "no checkpoint was kept"
            self.log.warning(
                f"stopped at step {self.step}: {self.diverged}: the run diverged; {kept}; lower "
                "optim.lr and run again, or start afresh under another run.name"
            )
        elif reason == StopReason.NONFINITE:
            self.log.warning(
                f"stopped at step {self.step}: non-finite gradients (train.nonfinite=stop); the last "
                f"good checkpoint is {latest}"
            )
        elif not reason.finished:
            self.log.info(
                f"stopped at step {self.step} ({reason.value}); checkpoint saved, run the same "
                "command again to continue"
            )
        return {"step": self.step, "stop_reason": reason.value, **(self.test() if reason.finished else {})}

    def test(self) -> dict:
        """Final evaluation on the held-out test split with the best weights (the last ones if none)."""
        self.checkpointer.wait()
        if self.test_data is None:  # the data has no test split
            return {}
        with self.clock.part("test"):
            return self.evaluator.test(
                self.test_data, self.step, self.checkpointer.pointer("best"), self.checkpointer.load, self.log
            )

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def resume(self) -> None:
        """Every stateful part from the newest complete checkpoint (checkpointer.restore), whatever number of
        ranks wrote it; then whether anything is left to train under this config."""
        layout = self._layout()
        path = self.checkpointer.restore(self.log.info)
        if path is None:
            return
        if self._layout() != layout:
            self.relaid()
        self.unfreeze(say=False)
        self.stop.resumed(self.step, self.feed.total_steps, self.evaluator.patience_used_up)
        self.log.info(f"resumed from {path} at step {self.step}")

    def _layout(self) -> tuple:
        """The feed's batch layout (its number of ranks is this run's: these say its per-rank batch too)."""
        return self.feed.grad_accum, self.feed.samples_per_step, self.feed.total_steps

    def relaid(self) -> None:
        """A resume on another number of ranks re-chose the per-rank batch (data feed) and kept the checkpoint's
        epoch length: the engine accumulates the new number of micro-batches, the schedule spans the run's
        steps, the meter counts by them. After the engine's state is loaded, so the schedule is the checkpoint's
        (a DeepSpeed engine refuses: ZeRO fixed its accumulation)."""
        self.engine.set_grad_accum(self.feed.grad_accum)
        set_schedule_length(self.engine.optimizer, self.engine.scheduler, self.feed.total_steps)
        self.meter.samples_per_step = self.feed.samples_per_step


def _groups(micro_batches, size: int):
    """Consecutive groups of `size` micro-batches (the stream's length is a multiple of it)."""
    it = iter(micro_batches)
    while group := list(itertools.islice(it, size)):
        yield group
