"""The training loop: fit, validate, test. Distributed details live in dist.py and engine/."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import dist
from .checkpoint import CheckpointError, Checkpointer, rng_state, set_rng_state, written_by
from .signals import StopControl, requeue_slurm_job
from .config import Config
from .data import ShardStream, resolve_shards
from .data.augment import build_augment
from .data.elastic import BatchLayout, DataPosition, EpochReplay, Segment, choose_layout
from .engine import build_engine
from .logging import SampleKeyLog, build_logger
from .losses import METRICS, build_loss, metric_sums
from .models import build_model, flops_per_sample
from .models.transfer import Freezer, load_pretrained, lr_scales
from .optim import build_optimizer, build_scheduler
from .throughput import Throughput, peak_flops


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
    def __init__(self, cfg: Config, dist_info: dist.DistInfo, debug: bool = False):
        self.cfg, self.dist, self.debug = cfg, dist_info, debug
        self.run_dir = Path(cfg.run.dir) / (cfg.run.name + ("-debug" if debug else ""))
        self.device = dist_info.device
        index = resolve_shards(cfg.data, cfg.run.seed)
        self.task = index.task
        self.y_mean = index.stats.get("train", {}).get("y_mean", 0.0)
        stream = dict(batch_size=cfg.data.batch_size, rank=dist_info.global_rank, world_size=dist_info.world_size,
                      num_workers=0 if debug else cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                      prefetch_factor=cfg.data.prefetch_factor)
        train_index = index.subset("train", cfg.data.train_subset) if cfg.data.train_subset else index
        self.train_data = ShardStream(train_index, "train", train=True, seed=cfg.run.seed,
                                      grad_accum=cfg.train.grad_accum, shuffle_buffer=cfg.data.shuffle_buffer,
                                      remainder=cfg.data.remainder, transform=build_augment(cfg.augment, cfg.run.seed),
                                      **stream)  # augmented; validation and test never are
        self.val_data = ShardStream(index, "val", **stream)
        self.test_data = ShardStream(index, "test", **stream)
        self.accum = cfg.train.grad_accum
        self.steps_per_epoch = self.train_data.steps_per_epoch
        self.total_steps = plan_total_steps(cfg.train, self.steps_per_epoch, debug)
        self.samples_per_step = cfg.data.batch_size * dist_info.world_size * self.accum
        # which ranks read the current epoch, and how: what lets a run resume on another number of ranks
        self.position = DataPosition(Segment(dist_info.world_size, cfg.data.batch_size, self.accum,
                                             self.train_data.num_workers, 0),
                                     self.samples_per_step, self.steps_per_epoch)

        self.log = build_logger(cfg.log, dist_info, self.run_dir, self.total_steps, cfg.wandb, cfg.to_dict())
        model = build_model(cfg.model, index.input_shape, index.num_classes or 1, cfg.run.seed)
        if cfg.model.init_from:  # every rank loads it (DDP would broadcast rank 0's weights anyway)
            load_pretrained(model, cfg.model.init_from, self.log.info)
        self.freezer = Freezer(model, cfg.model)
        self.freezer.apply(0)  # before the engine: DDP only reduces parameters that require grad when wrapped
        # one group for all (the layout older checkpoints have) unless the backbone gets its own LR
        scales = lr_scales(cfg.optim.backbone_lr_ratio) if cfg.optim.backbone_lr_ratio != 1 else None
        channels_last = cfg.model.channels_last if cfg.model.channels_last != "auto" else \
            cfg.model.name == "cnn" and self.device.type == "cuda"
        # the model's own FLOP count, taken before compile/DDP wrap it
        flops = flops_per_sample(model, index.input_shape)
        self.engine = build_engine(model, lambda module: build_optimizer(cfg.optim, module, scales),
                                   lambda optimizer: build_scheduler(cfg.schedule, optimizer, self.total_steps),
                                   cfg.train, dist_info, cfg.deepspeed, cfg.data.batch_size,
                                   channels_last=channels_last, fsdp_cfg=cfg.fsdp, log=self.log.info)
        tokens_per_sample = index.input_shape[-1] if self.task == "lm" else 1  # tokens: samples unless sequences
        self.meter = Throughput(self.samples_per_step, tokens_per_sample, flops,
                                peak_flops(self.device, cfg.train.peak_flops), dist_info.world_size, self.device)
        self.loss_fn = build_loss(cfg.loss, self.task)
        # Coordination that must not share the training group: created in this order on every rank.
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, dist_info, cfg.hash(),
                                 keep_best=cfg.checkpoint.keep_best, async_save=cfg.checkpoint.async_save,
                                 group=dist.new_cpu_group(cfg.dist.timeout_s))
        self.control = StopControl(dist.new_cpu_group(cfg.dist.timeout_s), stuck_after_s=cfg.dist.timeout_s)
        self.key_log = SampleKeyLog(self.run_dir, dist_info.global_rank) if cfg.log.sample_keys else None
        # Each rank its own dropout/augmentation stream; resumed exactly from the checkpoint.
        seed = cfg.run.seed * 1000 + dist_info.global_rank
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)

        self.step, self.saved_step = 0, -1
        self.best_val, self.best_step, self.bad_validations = math.inf, -1, 0
        self.best_steps: list[int] = []  # newest last; the keep_best newest are the best m
        self.skipped_updates = 0
        self._skips = torch.zeros((), device=self.device)  # skipped updates not yet counted on the host
        self._skip_counted = 0  # the step up to which they were
        self.stop_reason: str | None = None
        # running sums of "loss" and each named loss term since the last log line
        self._loss_sum = torch.zeros(len(self.loss_fn.names), device=self.device)
        self._loss_steps = 0

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        ok = False
        try:
            result = self._fit()
            ok = True
            return result
        finally:
            self.log.close()  # before any error line: a bar closed later would print after it
            self.control.close(wait=ok)  # after a failure a peer may be gone: don't wait for it
            if self.key_log:
                self.key_log.close()

    def _fit(self) -> dict:
        self.resume()
        self._skip_counted = self.step
        self.log.start(self.step)
        self.log.info(f"training {self.total_steps} steps ({self.steps_per_epoch}/epoch, "
                      f"global batch {self.samples_per_step}) in {self.run_dir}")
        self.meter.reset()
        while self.step < self.total_steps and self.stop_reason is None:  # one epoch (or its rest) per pass
            epoch, done = divmod(self.step, self.steps_per_epoch)
            with contextlib.closing(self.train_batches(epoch, done)) as batches:
                self.train_epoch(batches, epoch)
        self.stop_reason = self.stop_reason or "completed"
        if self.step != self.saved_step and not self.debug and self.stop_reason != "nonfinite":
            self.save()
        self.ckpt.wait()
        if self.stop_reason in ("stop_at_step", "nonfinite") or self.stop_reason.startswith("signal"):
            return self.interrupted()
        results = self.test()  # the log closes after this, in fit(): test metrics go to W&B too
        return {"step": self.step, "stop_reason": self.stop_reason, **results}

    def train_batches(self, epoch: int, done: int):
        """This rank's micro-batches of `epoch` from step `done` on: its normal stream, or, in an epoch
        resumed on another number of ranks, its share of what the old ranks had not read (data/elastic.py)."""
        segments = self.position.segments_of(epoch)
        seg = segments[-1]
        if len(segments) == 1:
            stream = self.train_data
            if seg.num_workers != stream.num_workers:  # resumed with another data.num_workers: the workers
                # split the shards, so the epoch ends in the order it began; the new count from the next one
                stream = stream.relayout(rank=self.dist.global_rank, world_size=seg.world_size,
                                         batch_size=seg.batch_size, grad_accum=seg.grad_accum,
                                         num_workers=seg.num_workers, steps_per_epoch=self.steps_per_epoch)
            return stream.epoch(epoch, start=done * self.accum)
        stream = self.train_data.relayout(rank=self.dist.global_rank, world_size=seg.world_size,
                                          batch_size=seg.batch_size, grad_accum=seg.grad_accum,
                                          num_workers=seg.num_workers, steps_per_epoch=self.steps_per_epoch)
        items = EpochReplay(stream, epoch, segments).assignment(self.dist.global_rank)
        return stream.dealt_epoch(epoch, len(segments) - 1, items, start=(done - seg.start) * seg.grad_accum)

    def train_epoch(self, batches, epoch: int) -> None:
        """Optimizer steps on `batches` (micro-batches) until they run out, a stop, or the last step.
        (`dtrain bench` feeds it synthetic batches: the same loop, timed.)"""
        for micro_batches in self.meter.timed(_groups(batches, self.accum)):
            self.control.step_started = time.monotonic()  # a SIGTERM long after this: the rank is stuck
            loss = self.train_step(micro_batches)
            self.control.step_started = None
            self.step += 1
            self.after_step(loss, epoch)
            if self.stop_reason is not None or self.step >= self.total_steps:
                break

    def interrupted(self) -> dict:
        if self.stop_reason == "signal:SIGUSR1" and self.dist.is_global_zero:
            requeue_slurm_job(self.log.info)
        if self.stop_reason == "nonfinite":
            self.log.info(f"stopped at step {self.step}: non-finite gradients (train.nonfinite=stop); the last "
                          f"good checkpoint is {self.ckpt.pointer('latest')}")
        else:
            self.log.info(f"stopped at step {self.step} ({self.stop_reason}); checkpoint saved, run the same "
                          "command again to continue")
        return {"step": self.step, "stop_reason": self.stop_reason}

    @_collective("gradient all-reduce (train step)")
    def train_step(self, micro_batches) -> torch.Tensor:
        """Forward and backward on each micro-batch, all-reduce once (on the last), one optimizer step."""
        t0 = time.perf_counter()
        loss_sum = torch.zeros(len(self.loss_fn.names), device=self.device)
        if self.key_log:
            self.key_log.write(self.step + 1, [k for _, _, keys in micro_batches for k in keys])
        for i, (x, y, _) in enumerate(micro_batches):
            x, y = self.engine.to_device(x), y.to(self.device, non_blocking=True)
            with self.engine.no_backward_sync(i == len(micro_batches) - 1):
                with self.engine.autocast():
                    losses = self.loss_fn(self.engine.model(x), y)
                self.engine.backward(losses["loss"])
            loss_sum += torch.stack([losses[k].detach().float() for k in self.loss_fn.names])
        grad_norm, skipped = self.engine.step()
        if skipped is not False:  # a device tensor when the optimizer decided there: counted at the next log
            self._skips += skipped
        if skipped is True or self.cfg.train.nonfinite == "stop":  # decided on the host, or must stop now
            self.count_skips(self.step + 1, first=self.step + 1)
        if self.debug:  # .item() syncs the device: only in debug
            self.log.info(f"step {self.step + 1}: loss {loss_sum[0].item() / len(micro_batches):.5f} "
                          f"grad_norm {grad_norm.item():.4f} lr {self.engine.lr:.3e} batch {tuple(x.shape)} "
                          f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
        return loss_sum / len(micro_batches)

    def count_skips(self, step: int, first: int | None = None) -> None:
        """Report updates skipped for a non-finite gradient norm in steps `first`..`step` (default: since
        the last count). A host sync."""
        n, first = int(self._skips.item()), first or self._skip_counted + 1
        self._skip_counted = step
        if n == 0:
            return
        self._skips.zero_()
        self.skipped_updates += n
        where = f"step {step}" if first == step else f"steps {first}-{step}"
        self.log.info(f"{where}: non-finite gradient norm; {n} update{'s' * (n > 1)} skipped "
                      f"({self.skipped_updates} so far, train.nonfinite={self.cfg.train.nonfinite})")
        if self.cfg.train.nonfinite == "stop":
            self.stop_reason = "nonfinite"

    def after_step(self, loss: torch.Tensor, epoch: int) -> None:
        self._loss_sum += loss
        self._loss_steps += 1
        self.meter.step()
        last = self.step >= self.total_steps
        if self.step % self.cfg.train.log_every == 0 or last:
            self.log_train(epoch)
        self.log.advance(self.step)
        if self.freezer.apply(self.step):
            self.engine.trainable_changed()
            self.log.info(f"step {self.step}: unfroze {len(self.freezer.frozen)} parameter tensors")
        val_every = self.cfg.train.val_every
        if (val_every and self.step % val_every == 0) or self.step % self.steps_per_epoch == 0 or last:
            self.validate(epoch)
        every = self.cfg.checkpoint.every
        if every and self.step % every == 0 and self.step != self.saved_step and not self.debug \
                and self.stop_reason != "nonfinite":
            self.save()
        if self.cfg.run.stop_at_step is not None and self.step >= self.cfg.run.stop_at_step and not last:
            self.stop_reason = self.stop_reason or "stop_at_step"
        with dist.guard("stop-flag all-reduce"):
            stop_signal = self.control.should_stop()
        if stop_signal and not last:
            self.stop_reason = self.stop_reason or f"signal:{stop_signal}"
        if self._loss_steps == 0:  # throughput counts training time only, not validation or saving
            self.meter.reset()

    # ---- metrics ------------------------------------------------------------------------------
    @_collective("loss all-reduce (logging)")
    def log_train(self, epoch: int) -> None:
        # .tolist() is the sync point (every log_every steps): the clock read after it includes all device work
        losses = dist.all_reduce_mean(self._loss_sum / self._loss_steps).tolist()
        self.count_skips(self.step)
        loss = losses[0]
        speed = self.meter.record()  # rank 0's clock and data wait; samples/s counts the global batch
        record = {"step": self.step, "epoch": epoch, **dict(zip(self.loss_fn.names, losses)), "lr": self.engine.lr,
                  **speed}
        self.log.metrics(record)
        shown = {k: speed[k] for k in ("samples_per_s", "tokens_per_s", "data_wait_frac", "mfu") if k in speed}
        if self.task != "lm":
            shown.pop("tokens_per_s")
        self.log.progress(self.step, loss=loss, lr=record["lr"], **shown)
        self._loss_sum.zero_()
        self._loss_steps = 0
        self.meter.reset()

    @_collective("metrics all-reduce (evaluation)")
    @torch.inference_mode()
    def evaluate(self, stream: ShardStream, prefix: str, log_local: bool = False) -> dict:
        """Mean loss and metrics over the whole split: per-rank sums, one all-reduce, then divide."""
        model = self.engine.module
        was_training = model.training
        model.eval()  # dropout off, batch norm uses running statistics
        names = [*self.loss_fn.names, "n", *METRICS[self.task]]
        sums = dict.fromkeys(names, 0.0)
        with self.engine.evaluating():  # ranks run uneven numbers of batches: FSDP gathers its weights once
            for x, y, _ in stream.epoch(0):
                x, y = self.engine.to_device(x), y.to(self.device, non_blocking=True)
                with self.engine.autocast():
                    pred = model(x)
                pred = pred.float()
                for k, v in self.loss_fn(pred, y).items():
                    sums[k] = sums[k] + v * len(y)
                sums["n"] += len(y)
                for k, v in metric_sums(pred, y, self.task, self.y_mean).items():
                    sums[k] = sums[k] + v
        total = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in names])
        i_n = names.index("n")
        if log_local:  # this rank's own share, for diagnosing one rank's data (log.all_ranks)
            self.log.info(f"local {prefix}/loss at step {self.step}: {total[0].item() / max(total[i_n].item(), 1):.6f}")
        dist.all_reduce_sum(total)
        model.train(was_training)
        n = max(total[i_n].item(), 1.0)
        metrics = {f"{prefix}/{k}": total[i].item() / n for i, k in enumerate(names) if k != "n"}
        if self.task == "lm":  # perplexity of the mean token cross-entropy
            metrics[f"{prefix}/ppl"] = math.exp(min(metrics[f"{prefix}/loss"], 700.0))
        return metrics

    def validate(self, epoch: int) -> None:
        metrics = self.evaluate(self.val_data, "val", log_local=self.cfg.log.all_ranks and self.dist.distributed)
        val_loss = metrics["val/loss"]
        improved = val_loss < self.best_val - self.cfg.early_stop.min_delta
        if improved:
            self.best_val, self.best_step, self.bad_validations = val_loss, self.step, 0
        else:
            self.bad_validations += 1
        patience = self.cfg.early_stop.patience
        # the loss is already identical on all ranks; broadcasting rank 0's decision makes it certain
        should_stop = dist.broadcast_object(patience is not None and self.bad_validations >= patience)
        self.log.metrics({"step": self.step, "epoch": epoch, **metrics, "val/best_loss": self.best_val})
        self.log.info(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      + (" (best)" if improved else f" (no improvement for {self.bad_validations})"))
        if improved and self.cfg.checkpoint.save_best and not self.debug:
            self.best_steps.append(self.step)
            self.save(best=True)
        if should_stop:
            self.stop_reason = "early_stop"
            self.log.info(f"early stop at step {self.step}: validation loss has not improved for "
                          f"{self.bad_validations} validations (best {self.best_val:.4f} at step {self.best_step})")
            self.log.metrics({"step": self.step, "event": "early_stop", "best_step": self.best_step})

    def test(self) -> dict:
        """Final evaluation on the held-out test split with the best weights (the last ones if none)."""
        self.ckpt.wait()
        best = self.ckpt.pointer("best")
        if best is not None:
            state, _ = self.ckpt.load(best)
            self.engine.load_weights(best, state["engine"])
        metrics = self.evaluate(self.test_data, "test")
        self.log.metrics({"step": self.step, **metrics, "test/weights_step": self.best_step if best else self.step})
        self.log.info("test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                      + f" (weights of step {self.best_step if best else self.step})")
        return metrics

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "best_val": self.best_val, "best_step": self.best_step,
                "bad_validations": self.bad_validations, "steps_per_epoch": self.steps_per_epoch,
                "best_steps": list(self.best_steps), "skipped_updates": self.skipped_updates,
                "data": self.position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"checkpoint: it has {state['steps_per_epoch']} steps per epoch, this config "
                             f"{self.steps_per_epoch}; data or batch settings changed since it was written")
        self.step, self.best_val = state["step"], state["best_val"]
        self.best_step, self.bad_validations = state["best_step"], state["bad_validations"]
        self.best_steps, self.skipped_updates = list(state["best_steps"]), state["skipped_updates"]

    @_collective("checkpoint save")
    def save(self, best: bool = False) -> None:
        self.count_skips(self.step)  # skipped_updates is part of the state
        state = {"engine": self.engine.state_dict(), "trainer": self.state_dict(), "config": self.cfg.to_dict(),
                 "logger": self.log.state_dict()}  # the W&B run id, so a resumed run continues it
        keep = self.best_steps[-self.cfg.checkpoint.keep_best:] if self.cfg.checkpoint.keep_best else []
        self.ckpt.protect = {f"step-{s:08d}" for s in keep}
        self.ckpt.save(self.step, state, {"rng": rng_state()}, best=best, write_files=self.engine.save_to)
        self.saved_step = self.step

    def resume_data_position(self, path: Path, state: dict) -> None:
        """Per-rank batch, accumulation and data position from a checkpoint, whatever number of ranks
        wrote it: on another number, the same global batch (and steps per epoch, so the same schedule),
        and the rest of an interrupted epoch dealt over the new ranks."""
        trainer, world, log = state["trainer"], self.dist.world_size, self.log.info
        step = trainer["step"]
        saved = trainer.get("data") or DataPosition.legacy_state(written_by(path), state["config"], step,
                                                                 trainer["steps_per_epoch"])
        old = Segment(*saved["segments"][-1])
        if old.world_size != world:
            layout = choose_layout(saved["global_batch"], world, old.batch_size, self.cfg.checkpoint.elastic)
            log(describe_resize(old, world, layout, saved["global_batch"], saved["steps_per_epoch"]))
            self.use_layout(layout, saved["steps_per_epoch"])
        elif (old.batch_size, old.grad_accum) != (self.train_data.batch_size, self.accum) and \
                (self.cfg.data.batch_size, self.cfg.train.grad_accum) == \
                (state["config"]["data"]["batch_size"], state["config"]["train"]["grad_accum"]):
            # chosen by an earlier resume on another number of ranks: keep it (a batch setting the user
            # changed since is not overridden; load_state_dict's steps-per-epoch check speaks for it)
            self.use_layout(BatchLayout(old.batch_size, old.grad_accum), saved["steps_per_epoch"])
        kept_layout = self.position.layout
        self.position.load_state_dict(saved)
        self.position.layout = kept_layout
        epoch, done = divmod(step, self.steps_per_epoch)
        if old.world_size != world:
            kept = min(old.world_size, world)
            log(f"resume: {_ranks(0, kept)} continue{'s' if kept == 1 else ''} its saved RNG stream; " + (
                f"{_ranks(kept, world)} start{'s' if world - kept == 1 else ''} a fresh one seeded from "
                f"(run.seed, rank, step)" if world > kept else f"that of {_ranks(kept, old.world_size)} is dropped"))
        if old.num_workers != self.train_data.num_workers and done and self.position.epoch == epoch:
            log(f"resume: data.num_workers {old.num_workers} -> {self.train_data.num_workers} from epoch {epoch + 1}; "
                f"the rest of epoch {epoch} keeps the order of {old.num_workers} (workers split the shards)")
        if old.world_size != world and done and self.position.epoch == epoch:
            left = (self.steps_per_epoch - done) * old.grad_accum * old.batch_size * old.world_size
            self.position.segments.append(dataclasses.replace(self.position.layout, start=done))
            log(f"resume: epoch {epoch} at step {done} of {self.steps_per_epoch}: the {left} samples the "
                f"{old.world_size} ranks had still to read are dealt over {world} rank{'s' if world > 1 else ''} by shard; "
                f"later epochs use the normal {world}-rank order")

    def use_layout(self, layout: BatchLayout, steps_per_epoch: int) -> None:
        """Train with this per-rank batch and accumulation, keeping the epoch length (and so the schedule)."""
        world = self.dist.world_size
        self.train_data = self.train_data.relayout(rank=self.dist.global_rank, world_size=world,
                                                   batch_size=layout.batch_size, grad_accum=layout.grad_accum,
                                                   num_workers=self.train_data.num_workers,
                                                   steps_per_epoch=steps_per_epoch)
        self.accum = layout.grad_accum
        self.engine.set_grad_accum(layout.grad_accum)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = self.log.total_steps = plan_total_steps(self.cfg.train, steps_per_epoch, self.debug)
        self.samples_per_step = self.meter.samples_per_step = layout.global_batch(world)
        self.position.layout = Segment(world, layout.batch_size, layout.grad_accum, self.train_data.num_workers, 0)

    def resume(self) -> None:
        if self.debug:
            return
        found = self.ckpt.load_latest(self.log.info)
        if found is None:
            return
        path, state, rank_state = found
        self.engine.load_from(path, state["engine"])  # deepspeed refuses another world size; fsdp reshards
        self.resume_data_position(path, state)
        self.load_state_dict(state["trainer"])
        self.log.load_state_dict(state.get("logger", {}))
        if self.freezer.apply(self.step):  # frozen or not is a function of the step
            self.engine.trainable_changed()
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:  # a rank the checkpoint's run did not have
            seed = int.from_bytes(hashlib.sha256(f"{self.cfg.run.seed}/rank{self.dist.global_rank}/resumed-at-"
                                                 f"{self.step}".encode()).digest()[:4], "little")
            torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        self.saved_step = self.step
        if self.key_log:
            self.key_log.truncate(self.step)
            if self.dist.is_global_zero:
                self.key_log.truncate_ranks_from(self.dist.world_size, self.step)
        self.log.info(f"resumed from {path} at step {self.step}")


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
    return (f"resume: {old.world_size} -> {world} ranks; {what}: global batch {got} instead of {global_batch} "
            f"(checkpoint.elastic=approximate; LR schedule unchanged, {steps_per_epoch} steps per epoch kept)")


def plan_total_steps(train_cfg, steps_per_epoch: int, debug: bool = False) -> int:
    """Optimizer steps the run takes (the schedule spans them): epochs, capped by max_steps / debug_steps."""
    return int(min(train_cfg.epochs * steps_per_epoch, train_cfg.max_steps or math.inf,
                   train_cfg.debug_steps if debug else math.inf))


def _groups(batches, size: int):
    """Consecutive groups of `size` micro-batches (the stream's length is a multiple of it)."""
    it = iter(batches)
    while group := list(itertools.islice(it, size)):
        yield group
