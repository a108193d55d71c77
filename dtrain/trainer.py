"""The training loop: fit, validate, test, over the components build.py makes.

Each rule lives with its owner: the evaluator decides when to validate and when to stop early, the
checkpointer when to save, the stop control why training stops, the data feed what each epoch reads, the
engine how gradients are reduced. Distributed details live in dist.py and engine/.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import time
from typing import Optional

import torch

from . import batch as batches
from . import dist
from .build import Hooks, build_components, seed_all
from .checkpoint import CheckpointError, rng_state, set_rng_state, written_by
from .config import Config
from .data.elastic import DataPosition
from .resume import already_tested, check_config, finished, set_schedule_length
from .signals import StopReason, requeue_slurm_job
from .summary import Stopwatch, table, write_summary


def _collective(op: str):
    """Name the collective a method waits in, so a stalled or dead rank is reported by operation."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(*args, **kwargs):
            with dist.guard(op):
                return method(*args, **kwargs)
        return guarded
    return wrap


class Trainer:
    def __init__(self, cfg: Config, dist_info: dist.DistInfo, debug: bool = False, hooks: Optional[Hooks] = None):
        self.cfg, self.info, self.debug = cfg, dist_info, debug
        c = build_components(cfg, dist_info, hooks, debug)
        data, self.engine, self.evaluator, self.freezer = c.core.data, c.core.engine, c.core.evaluator, c.core.freezer
        self.facts, self.feed, self.val_data, self.test_data = data.facts, data.feed, data.val, data.test
        self.forward, self.loss = self.evaluator.forward, self.evaluator.loss
        self.run_dir, self.checkpointer, self.stop, self.log = c.run_dir, c.checkpointer, c.stop, c.log
        self.meter, self.key_log = c.meter, c.key_log
        self.step, self.saved_step = 0, -1
        self.skipped_updates = 0
        self._skips = torch.zeros((), device=dist_info.device)  # skipped updates not yet counted on the host
        self._skip_counted = 0  # the step up to which they were
        # running sums of "loss" and each named loss term since the last log line
        self._loss_sum = torch.zeros(len(self.loss.names), device=dist_info.device)
        self._loss_steps = 0
        self.clock = Stopwatch()  # this start's wall time by part (the end-of-run summary)

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
            done = already_tested(self.run_dir, self.step, self.stop.reason.value, self.info.is_global_zero,
                                  self.log.info)
            if done is not None:
                return done
        self.start_logs()
        while self.stop.reason is None and self.step < self.feed.total_steps:  # an epoch (or its rest) a pass
            with contextlib.closing(self.feed.batches(self.step)) as epoch_batches:
                self.train_epoch(epoch_batches)
        return self.finish(self.stop.reason or StopReason.COMPLETED)  # None: resumed at the end of the plan

    def start_logs(self) -> None:
        """Nothing is written before this: a run refused at resume, or found finished, changes no file."""
        self.log.start(self.step)
        if self.log.wandb is not None:  # rank 0: checkpoints as W&B artifacts (wandb.log_checkpoints)
            self.checkpointer.published = self.log.wandb.log_checkpoint
        if self.key_log:
            self.key_log.start(self.step, self.info.world_size, self.info.is_global_zero, self.log.info)
        self.log.info(f"training {self.feed.total_steps} steps ({self.feed.steps_per_epoch}/epoch, "
                      f"global batch {self.feed.samples_per_step}) in {self.run_dir}")
        self.meter.reset()

    def finish(self, reason: StopReason) -> dict:
        """The last checkpoint, then the test of the best weights, or (interrupted) how to go on."""
        if self.step != self.saved_step and not self.debug and reason != StopReason.NONFINITE:
            self.save()
        with self.clock.part("checkpoint"):
            self.checkpointer.wait()
        if not reason.finished:
            return self.interrupted(reason)
        return {"step": self.step, "stop_reason": reason.value, **self.test()}  # W&B gets test metrics too

    def train_epoch(self, epoch_batches, epoch: Optional[int] = None) -> None:
        """Optimizer steps on `epoch_batches` (micro-batches) until they run out or training stops.
        (`dtrain bench` feeds it synthetic batches: the same loop, timed.)"""
        epoch = self.step // self.feed.steps_per_epoch if epoch is None else epoch
        for micro_batches in self.meter.timed(_groups(epoch_batches, self.feed.grad_accum)):
            self.stop.step_started = time.monotonic()  # a SIGTERM long after this: the rank is stuck
            loss = self.train_step(micro_batches)
            self.stop.step_started = None
            self.step += 1
            self.after_step(loss, epoch)
            if self.stop.reason is not None:
                break

    def after_step(self, loss: torch.Tensor, epoch: int) -> None:
        self._loss_sum += loss
        self._loss_steps += 1
        self.meter.step()
        last = self.step >= self.feed.total_steps
        if self.step % self.cfg.train.log_every == 0 or last:
            self.log_train(epoch)
        self.log.advance(self.step)
        if self.freezer.apply(self.step):
            self.engine.trainable_changed()
            self.log.info(f"step {self.step}: unfroze {len(self.freezer.frozen)} parameter tensors")
        if self.evaluator.should_validate(self.step, self.feed.steps_per_epoch, last):
            self.validate(epoch)
        if self.checkpointer.should_save(self.step) and self.may_save():
            self.save()
        with dist.guard("stop-flag all-reduce"):
            self.stop.check(self.step, last)
        if self._loss_steps == 0:  # throughput counts training time only, not validation or saving
            self.meter.reset()

    def interrupted(self, reason: StopReason) -> dict:
        if reason == StopReason.SIGUSR1 and self.info.is_global_zero:
            requeue_slurm_job(self.log.info)
        if reason == StopReason.NONFINITE:
            self.log.warning(f"stopped at step {self.step}: non-finite gradients (train.nonfinite=stop); the last "
                             f"good checkpoint is {self.checkpointer.pointer('latest')}")
        else:
            self.log.info(f"stopped at step {self.step} ({reason.value}); checkpoint saved, run the same "
                          "command again to continue")
        return {"step": self.step, "stop_reason": reason.value}

    @_collective("gradient all-reduce (train step)")
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
        if skipped is not False:  # a device tensor when the optimizer decided there: counted at the next log
            self._skips += skipped
        if skipped is True or self.cfg.train.nonfinite == "stop":  # decided on the host, or must stop now
            self.count_skips(self.step + 1, first=self.step + 1)
        if self.debug:  # .item() syncs the device: only in debug
            x = batches.model_input(batch) if isinstance(batch, (tuple, list)) or "x" in batch else None
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else batches.size(batch)
            self.log.info(f"step {self.step + 1}: loss {loss_sum[0].item() / len(micro_batches):.5f} "
                          f"grad_norm {grad_norm.item():.4f} lr {self.engine.lr:.3e} batch {shape} "
                          f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
        return loss_sum / len(micro_batches) if len(micro_batches) > 1 else loss_sum

    def count_skips(self, step: int, first: Optional[int] = None) -> None:
        """Report updates skipped for a non-finite gradient norm in steps `first`..`step` (default: since
        the last count). A host sync."""
        n, first = int(self._skips.item()), first or self._skip_counted + 1
        self._skip_counted = step
        if n == 0:
            return
        self._skips.zero_()
        self.skipped_updates += n
        where = f"step {step}" if first == step else f"steps {first}-{step}"
        self.log.warning(f"{where}: non-finite gradient norm; {n} update{'s' * (n > 1)} skipped "
                         f"({self.skipped_updates} so far, train.nonfinite={self.cfg.train.nonfinite})")
        if self.cfg.train.nonfinite == "stop":
            self.stop.request(StopReason.NONFINITE)

    # ---- metrics ------------------------------------------------------------------------------
    @_collective("loss all-reduce (logging)")
    def log_train(self, epoch: int) -> None:
        # .tolist() is the sync point (every log_every steps): the clock read after it includes all device work
        losses = dist.all_reduce_mean(self._loss_sum / self._loss_steps).tolist()
        self.count_skips(self.step)
        speed = self.meter.record()  # rank 0's clock and data wait; samples/s counts the global batch
        record = {"step": self.step, "epoch": epoch, **dict(zip(self.loss.names, losses)), "lr": self.engine.lr,
                  **speed}
        self.log.metrics(record)
        shown = {k: speed[k] for k in ("samples_per_s", "tokens_per_s", "data_wait_frac", "mfu") if k in speed}
        if self.facts.task != "lm":
            shown.pop("tokens_per_s")
        self.log.progress(self.step, loss=losses[0], lr=record["lr"], **shown)
        self._loss_sum.zero_()
        self._loss_steps = 0
        self.meter.reset()

    @_collective("metrics all-reduce (evaluation)")
    def evaluate(self, stream, prefix: str, log_local: bool = False) -> dict:
        local = (lambda loss: self.log.info(f"local {prefix}/loss at step {self.step}: {loss:.6f}")) if log_local \
            else None
        return self.evaluator.evaluate(stream, prefix, local, progress=self.log.show_progress)

    def validate(self, epoch: int) -> None:
        if self.val_data is None:  # the data has no validation split
            return
        with self.clock.part("validation"):
            metrics = self.evaluate(self.val_data, "val", log_local=self.cfg.log.all_ranks and self.info.distributed)
        improved, stop_early = self.evaluator.observe(metrics["val/loss"], self.step)
        ev = self.evaluator
        self.log.metrics({"step": self.step, "epoch": epoch, **metrics, "val/best_loss": ev.best_val})
        self.log.info(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      + (" (best)" if improved else f" (no improvement for {ev.bad_validations})"))
        if improved and self.cfg.checkpoint.save_best and not self.debug:
            self.save(best=True)
        if stop_early:
            self.stop.request(StopReason.EARLY_STOP)
            self.log.info(f"early stop at step {self.step}: validation loss has not improved for "
                          f"{ev.bad_validations} validations (best {ev.best_val:.4f} at step {ev.best_step})")
            self.log.metrics({"step": self.step, "event": "early_stop", "best_step": ev.best_step})

    def test(self) -> dict:
        """Final evaluation on the held-out test split with the best weights (the last ones if none)."""
        self.checkpointer.wait()
        if self.test_data is None:  # the data has no test split
            return {}
        with self.clock.part("test"):
            best = self.checkpointer.pointer("best")
            if best is not None:
                state, _ = self.checkpointer.load(best)
                self.engine.load_weights(best, state["engine"])
            metrics = self.evaluate(self.test_data, "test")
        weights_step = self.evaluator.best_step if best else self.step
        self.log.metrics({"step": self.step, **metrics, "test/weights_step": weights_step})
        self.log.info("test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      + f" (weights of step {weights_step})")
        return metrics

    # ---- state --------------------------------------------------------------------------------
    def may_save(self) -> bool:
        return self.step != self.saved_step and not self.debug and self.stop.reason != StopReason.NONFINITE

    @_collective("checkpoint save")
    def save(self, best: bool = False) -> None:
        self.count_skips(self.step)  # skipped_updates is part of the state
        state = {"engine": self.engine.state_dict(), "config": self.cfg.to_dict(),
                 "trainer": {"step": self.step, "steps_per_epoch": self.feed.steps_per_epoch,
                             "skipped_updates": self.skipped_updates, "data": self.feed.state_dict()},
                 "evaluator": self.evaluator.state_dict(),
                 "logger": self.log.state_dict()}  # the W&B run id, so a resumed run continues it
        with self.clock.part("checkpoint"):
            self.checkpointer.save(self.step, state, {"rng": rng_state()}, best=best, write_files=self.engine.save_to)
        self.saved_step = self.step

    def summarize(self, result: dict, command: list[str]) -> Optional[dict]:
        """Rank 0, after fit(): the end-of-run table on stderr and <run dir>/summary.json (dtrain.summary).
        A start that found the run finished and tested writes nothing: the summary of the start that did stands."""
        if result["stop_reason"] == "already_completed":
            return None
        best = self.checkpointer.pointer("best")
        summary = write_summary(self.run_dir, result, self.evaluator.best_step if best else None,
                                self.clock.times(data_wait=self.meter.total_data_wait),
                                best or self.checkpointer.pointer("latest"), command)
        self.log.info("summary\n" + table(summary))
        return summary

    def resume(self) -> None:
        """Model, optimizer, schedule, data position, RNG states and the evaluator's best from the newest
        complete checkpoint, whatever number of ranks wrote it (the data feed keeps the global batch)."""
        if self.debug:
            return
        found = self.checkpointer.load_latest(self.log.info)
        if found is None:
            return
        path, state, rank_state = found
        check_config(state["config"], self.cfg, self.run_dir, self.log.info)  # refuses before anything is loaded
        self.engine.load_from(path, state["engine"])  # the deepspeed engine refuses another world size here
        trainer = state["trainer"]
        position = trainer.get("data") or DataPosition.legacy_state(written_by(path), state["config"],
                                                                    trainer["step"], trainer["steps_per_epoch"])
        if self.feed.resume(position, trainer["step"], state["config"], self.cfg.checkpoint.elastic, self.log.info):
            self.engine.set_grad_accum(self.feed.grad_accum)
            # the epoch length is the checkpoint's: the schedule the engine built from this run's must span it
            set_schedule_length(self.engine.optimizer, self.engine.scheduler, self.feed.total_steps)
            self.meter.samples_per_step, self.log.total_steps = self.feed.samples_per_step, self.feed.total_steps
        if trainer["steps_per_epoch"] != self.feed.steps_per_epoch:
            raise CheckpointError(f"checkpoint: it has {trainer['steps_per_epoch']} steps per epoch, this config "
                                  f"{self.feed.steps_per_epoch}; data or batch settings changed since it was written")
        self.step, self.skipped_updates = trainer["step"], trainer["skipped_updates"]
        self.evaluator.load_state_dict(state.get("evaluator", trainer))  # older checkpoints: in "trainer"
        self.checkpointer.load_state_dict(state.get("checkpointer", trainer))
        self.log.load_state_dict(state.get("logger", {}))
        if self.freezer.apply(self.step):  # frozen or not is a function of the step
            self.engine.trainable_changed()
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:  # a rank the checkpoint's run did not have
            seed_all(int.from_bytes(hashlib.sha256(f"{self.cfg.run.seed}/rank{self.info.global_rank}/resumed-at-"
                                                   f"{self.step}".encode()).digest()[:4], "little"))
        self.saved_step = self._skip_counted = self.step
        done = finished(self.step, self.feed.total_steps, self.evaluator.bad_validations, self.cfg.early_stop.patience)
        if done is not None:  # nothing left to train under this config
            self.stop.request(StopReason(done))
        self.log.info(f"resumed from {path} at step {self.step}")


def _groups(micro_batches, size: int):
    """Consecutive groups of `size` micro-batches (the stream's length is a multiple of it)."""
    it = iter(micro_batches)
    while group := list(itertools.islice(it, size)):
        yield group
