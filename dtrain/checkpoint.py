"""When a run saves, and how: atomic, verified, on every rank at once, optionally in the background.

A save has every rank write its files into the step's temporary directory (checkpoint_files.py: the layout, the
manifest, publishing, verification), each phase ending with all ranks agreeing it succeeded, so a failure on
one rank publishes nothing anywhere and the previous checkpoint stays loadable. Loading verifies the manifest
and falls back to the newest complete checkpoint, saying so. Everything is read with
torch.load(weights_only=True): a checkpoint can never execute code. The config it stores names code (import
strings), which a command rebuilding the run uses only as dtrain.trust allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

import torch

from . import dist

# the on-disk side's names, re-exported: callers import them from here as before the split
from .checkpoint_files import (  # noqa: F401
    MANIFEST,
    CheckpointDir,
    CheckpointError,
    _sha256,
    fsync_tree,
    pointed,
    refusal,
    safe_load,
    save_fsynced,
    step_of,
    verify,
    write_error,
    written_by,
)

if TYPE_CHECKING:  # annotations only (state.py imports this module)
    from .callbacks import Callbacks
    from .state import Parts


class Snapshot:
    """Copies a state's tensors into CPU buffers, so training can change the originals while the copy is
    written. The buffers are kept from one save to the next (from a GPU they are pinned, for fast
    asynchronous device-to-host copies with one synchronize for all, and pinned memory is slow to
    allocate); a buffer is refilled only after the save that wrote it has finished (Checkpointer.save
    waits for that first)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, state):
        copied: dict[tuple, torch.Tensor] = {}  # the same tensor twice (tied weights): one copy, still shared
        kept, self._buffers = self._buffers, {}  # buffers of paths gone from the state are dropped
        copy = self._copy(state, (), copied, kept)
        if any(device.type == "cuda" for device, *_ in copied):
            torch.cuda.synchronize()
        return copy

    def _copy(self, obj: Any, path: tuple, copied: dict, kept: dict) -> Any:
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            same = (src.device, src.data_ptr(), src.shape, src.stride(), src.dtype)
            if same in copied:
                return copied[same]
            buf = kept.get(path)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
            buf.copy_(src, non_blocking=src.is_cuda)
            self._buffers[path] = copied[same] = buf
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, (*path, k), copied, kept) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
            return type(obj)(self._copy(v, (*path, i), copied, kept) for i, v in enumerate(obj))
        return obj  # scalars, strings, and sequences of them (python's RNG state): immutable or not shared


class Checkpointer:
    """When to save (every N steps, the best, the last) and how (atomic, verified, pruned to the last k and
    the best m), and the newest complete checkpoint put back.

    Its collaborators come with it: `parts`, the run's stateful parts (state.Parts) it saves and restores, its
    own best steps with them; `halted()`, True once training stopped on a bad step, after which nothing is
    saved; `clock(part)`, the context where the time saving takes is counted (summary.Stopwatch.part);
    `callbacks`, told on every rank once a checkpoint is published (in the save thread under async_save):
    on_checkpoint(path, step, best), the user's and W&B's artifacts (callbacks.Reporter)."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        dist_info: dist.DistInfo,
        config_hash: str,
        keep_best: int = 1,
        async_save: bool = False,
        group: Optional[torch.distributed.ProcessGroup] = None,
        every: int = 0,
        save_best: bool = True,
        enabled: bool = True,
        callbacks: Optional[Callbacks] = None,
        parts: Optional[Parts] = None,
        halted: Callable[[], bool] = lambda: False,
        clock: Callable[[str], ContextManager] = lambda part: contextlib.nullcontext(),
    ) -> None:
        self.files = CheckpointDir(root, keep_last)
        self.root = self.files.root
        self.keep_best, self.every, self.save_best = keep_best, every, save_best
        self.enabled = enabled  # False (train --debug): nothing is ever written
        self.saved_step = -1  # the step of the newest checkpoint written or resumed from
        if parts is not None:  # its own state goes with the parts (a caller may have listed it already)
            parts = dataclasses.replace(parts, shared={**parts.shared, "checkpointer": self})
        self.parts, self.halted, self.clock, self.callbacks = parts, halted, clock, callbacks
        self.best_steps: list[int] = []  # newest last; the keep_best newest are the best m
        self.info = dist_info
        self.config_hash = config_hash
        self.async_save = async_save
        self.group = group  # gloo group the save thread coordinates on (never the training group)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.protect: set[str] = set()  # step directories kept regardless of age (the best m)
        self._snapshot = Snapshot()

    # ---- when: the loop tells the checkpointer where it is; the checkpointer decides and saves ----------
    def should_save(self, step: int) -> bool:
        """The cadence: every checkpoint.every steps (0: never)."""
        return bool(self.every) and step % self.every == 0

    def may_save(self, step: int) -> bool:
        """Not in a debug run, not the same step twice, nothing after a step that stopped training as bad
        (train.nonfinite=stop: the last good checkpoint stays the newest)."""
        return self.enabled and step != self.saved_step and not self.halted()

    def after_step(self, step: int) -> None:
        if self.should_save(step):
            self.save_run(step)

    def after_validation(self, step: int, improved: bool) -> None:
        if improved and self.save_best:
            self.save_run(step, best=True)

    def at_end(self, step: int) -> None:
        """The final checkpoint (unless this step is saved already), and every save published."""
        self.save_run(step)
        with self.clock("checkpoint"):
            self.wait()

    def save_run(self, step: int, best: bool = False) -> None:
        """Collective. Save every registered part at `step`, if a save may happen now."""
        if not self.may_save(step):
            return
        assert self.parts is not None, "a Checkpointer made without parts saves only what save() is handed"
        with dist.guard("checkpoint save"), self.clock("checkpoint"):
            state, own = self.parts.state()
            self.save(step, state, own, best=best, write_files=self.parts.files)
        self.saved_step = step

    def restore(self, log: Callable[[str], None]) -> Optional[Path]:
        """Collective. Put the newest complete checkpoint back into every registered part (whatever number of
        ranks wrote it); its path, or None when there is none (or in a debug run)."""
        if not self.enabled:
            return None
        found = self.load_latest(log)
        if found is None:
            return None
        path, state, own = found
        assert self.parts is not None, "a Checkpointer made without parts restores nothing"
        self.parts.load(path, state, own)
        self.saved_step = step_of(path)
        return path

    def state_dict(self) -> dict:
        return {"best_steps": list(self.best_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.best_steps = list(state["best_steps"])

    def save(
        self,
        step: int,
        state: dict,
        rank_state: dict,
        best: bool = False,
        write_files: Optional[Callable[..., Optional[Future]]] = None,
    ) -> Path:
        """Collective. Synchronous, or (async_save) snapshot to CPU now and write in the background;
        either way atomic. At most one save is in flight: a new one first waits for the last.
        `write_files(tmp_dir, background=, group=)`, called on every rank, lets an engine add its own files
        (DeepSpeed's ZeRO shards, FSDP's DCP shards); they are checksummed and published with the rest.
        It may run collectives on the training group (DeepSpeed's does), so it is called in the training
        thread; with async_save (`background=True`) it may return a future of writes it goes on with in the
        background (DCP's async_save, coordinated on `group`), which the save thread waits for before
        checksumming. A best checkpoint is kept among the keep_best newest best ones; `state` gets the
        checkpointer's own."""
        self.wait()
        if best:
            self.best_steps.append(step)
        self.protect = {f"step-{s:08d}" for s in (self.best_steps[-self.keep_best :] if self.keep_best else [])}
        state = {**state, "checkpointer": self.state_dict()}  # with the best step just added
        if not self.async_save:
            return self._save(step, state, rank_state, best, write_files)
        files = None
        if write_files is not None:
            files = _start(write_files, self._prepare(step), self.group)
        # only rank 0 writes `state` (the model and optimizer): the others need not copy it
        state = self._snapshot({"state": state if self.info.is_global_zero else None, "rank": rank_state})
        state, rank_state = state["state"], state["rank"]
        self._thread = threading.Thread(
            target=self._save_in_background,
            args=(step, state, rank_state, best, None, files),
            name=f"dtrain-checkpoint-{step}",
            daemon=True,
        )  # joined by wait()
        self._thread.start()
        return self.files.final(step)

    def _save_in_background(self, *args: Any) -> None:
        try:
            self._save(*args)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight is published; raise its error here, in the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # ---- saving -------------------------------------------------------------------------------
    def _save(
        self,
        step: int,
        state: dict,
        rank_state: dict,
        best: bool = False,
        write_files: Optional[Callable[..., Optional[Future]]] = None,
        files: Optional[Future] = None,
    ) -> Path:
        """Collective: every rank calls it. Rank 0 writes `state`, every rank its `rank_state`, and
        `write_files` its engine's files; or, from save() with async_save, the engine's files are already
        being written into the prepared temporary directory and `files` is their future.
        Each phase ends with all ranks agreeing it succeeded everywhere, so a failure on one rank
        (disk full, read-only dir) raises on all of them and publishes nothing."""
        final = self.files.final(step)
        tmp = self._prepare(step) if files is None else self.files.tmp(step)

        def write():
            if write_files is not None:
                write_files(tmp, background=False, group=self.group)
            if files is not None:
                files.result()
            if write_files is not None or files is not None:
                fsync_tree(tmp)  # this rank's and its peers' files: fsync is per inode, cheap
            save_fsynced(rank_state, tmp / f"rank-{self.info.global_rank:05d}.pt")
            if self.info.is_global_zero:
                save_fsynced(state, tmp / "state.pt")

        def publish():
            self.files.publish(tmp, step, best, self.info.world_size, self.config_hash, self.protect)

        self._all_ok(write, tmp)
        self._all_ok(publish if self.info.is_global_zero else None, tmp)
        if self.callbacks is not None:  # an error of theirs is the user's (from the save thread: raised by wait())
            self.callbacks.emit("on_checkpoint", final.absolute(), step, best)
        return final

    def _prepare(self, step: int) -> Path:
        """Collective: rank 0 makes an empty temporary directory for the step; every rank returns once it exists."""
        self._all_ok((lambda: self.files.make_tmp(step)) if self.info.is_global_zero else None, self.files.tmp(step))
        return self.files.tmp(step)

    def _all_ok(self, action: Optional[Callable[[], object]], tmp: Path) -> None:
        error = None
        if action is not None:
            try:
                action()
            except (OSError, RuntimeError) as e:
                error = write_error(e, self.root)
        failed = dist.all_reduce_max(torch.tensor(0.0 if error is None else 1.0), group=self.group).item() > 0
        if failed:
            if self.info.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint: cannot write {tmp.parent} ({error or 'failed on another rank'}); "
                "previous checkpoints are intact"
            )

    # ---- loading ------------------------------------------------------------------------------
    def pointer(self, name: str) -> Optional[Path]:
        return self.files.pointer(name)

    def candidates(self) -> list[Path]:
        """Newest first: the `latest` target, then every other step directory by step."""
        return self.files.candidates()

    def load_latest(self, log: Callable[[str], None]) -> Optional[tuple[Path, dict, Optional[dict]]]:
        """(path, state, this rank's rank_state) of the newest checkpoint that verifies and loads, or
        None when there is none at all. Rank 0 verifies (the manifest covers every rank's file) and
        chooses; all ranks load its choice. Checkpoints that exist but none usable: an error, never a
        silent fresh start."""
        chosen, problem, found = None, None, None
        if self.info.is_global_zero:
            for i, path in enumerate(self.candidates()):
                try:
                    found = (path, *self.load(path))
                except CheckpointError as e:
                    problem = problem or str(e)
                    log(f"{e}; trying an older one")
                    continue
                if i > 0:
                    log(f"checkpoint: resuming from {path.name}, the newest complete checkpoint")
                chosen = path.name
                break
        chosen, problem = dist.broadcast_object((chosen, problem))
        if chosen is None:
            if problem:
                raise CheckpointError(
                    f"checkpoint: no usable checkpoint in {self.root} (newest: {problem.removeprefix('checkpoint: ')}); "
                    "move it away to start over"
                )
            return None
        return found if found is not None else (self.root / chosen, *self.load(self.root / chosen))

    def load(self, path: Path, verified: bool = False) -> tuple[dict, Optional[dict]]:
        """(state, this rank's rank_state). A checkpoint written by fewer ranks has no file for this rank:
        rank_state is None (the trainer's elastic resume decides what a new rank starts from)."""
        manifest = json.loads((path / MANIFEST).read_text()) if verified else verify(path)
        own = f"rank-{self.info.global_rank:05d}.pt"
        return safe_load(path / "state.pt"), safe_load(path / own) if own in manifest["files"] else None


def _start(
    write_files: Callable[..., Optional[Future]], tmp: Path, group: Optional[torch.distributed.ProcessGroup]
) -> Future:
    """An engine's writer started in the training thread -> the future of its files: the writer's own
    (DCP's thread, which runs collectives on `group`), or one already done (a synchronous writer) or
    failed. A failure is reported by the save thread, which agrees on it with the other ranks once they
    have their futures too: no rank may run a collective on `group` before then."""
    try:
        started = write_files(tmp, background=True, group=group)
    except (OSError, RuntimeError) as e:
        started = Future()
        started.set_exception(e)
    if started is None:  # a synchronous writer: its files are written
        started = Future()
        started.set_result(None)
    return started
