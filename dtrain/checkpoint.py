"""Atomic, verified checkpoints.

  checkpoints/step-00000120/state.pt       rank 0: the state of each stateful part of the run (state.py)
  checkpoints/step-00000120/rank-00000.pt  every rank: its RNG states
  checkpoints/step-00000120/deepspeed/     train.engine=deepspeed: every rank's ZeRO shards (DeepSpeed's files)
  checkpoints/step-00000120/fsdp/          train.engine=fsdp: every rank's DCP shards of model and optimizer
  checkpoints/step-00000120/manifest.json  written last: sha256 + size of every file, step, world size,
                                           config hash, versions. No manifest = not a checkpoint.
  checkpoints/latest, checkpoints/best     relative symlinks to complete checkpoints

A save writes into `.tmp-step-N`, fsyncs every file, writes the manifest, renames the directory into
place and only then moves the pointers, so a kill at any moment leaves the previous checkpoint
loadable. Loading verifies the manifest and falls back to the newest complete checkpoint, saying so.
Everything is read with torch.load(weights_only=True): a checkpoint can never execute code. The config it
stores names code (import strings), which a command rebuilding the run uses only as dtrain.trust allows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Optional

import torch

from . import dist
from .version import __version__

MANIFEST = "manifest.json"
log = logging.getLogger("dtrain.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint can't be written or loaded; the message names the file and the reason."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


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

    def _copy(self, obj, path: tuple, copied: dict, kept: dict):
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
    """When to save (every N steps) and how (atomic, verified, pruned to the last k and the best m)."""

    def __init__(self, root: str | Path, keep_last: int, dist_info, config_hash: str, keep_best: int = 1,
                 async_save: bool = False, group=None, every: int = 0, save_best: bool = True, enabled: bool = True,
                 callbacks=None):
        self.root = Path(root)
        self.keep_last, self.keep_best, self.every, self.save_best = keep_last, keep_best, every, save_best
        self.enabled = enabled  # False (train --debug): nothing is ever written
        self.saved_step = -1  # the step of the newest checkpoint written or resumed from
        self.parts = None  # the run's stateful parts (state.Parts), registered by the trainer
        self.halted = lambda: False  # True once training stopped on a bad step: nothing after it is saved
        self.clock = contextlib.nullcontext  # clock("checkpoint"): where the time saving takes is counted
        self.best_steps: list[int] = []  # newest last; the keep_best newest are the best m
        self.info = dist_info
        self.config_hash = config_hash
        self.async_save = async_save
        self.group = group  # gloo group the save thread coordinates on (never the training group)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.protect: set[str] = set()  # step directories kept regardless of age (the best m)
        self._snapshot = Snapshot()
        # every rank, once every rank knows the checkpoint is published (in the save thread under async_save):
        # callbacks.on_checkpoint(path, step, best), the user's and W&B's artifacts (callbacks.Reporter)
        self.callbacks = callbacks

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
        self.parts.load(path, state, own)
        self.saved_step = _step_of(path)
        return path

    def state_dict(self) -> dict:
        return {"best_steps": list(self.best_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.best_steps = list(state["best_steps"])

    def save(self, step: int, state: dict, rank_state: dict, best: bool = False,
             write_files: Optional[Callable[..., Optional[Future]]] = None) -> Path:
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
        self.protect = {f"step-{s:08d}" for s in (self.best_steps[-self.keep_best:] if self.keep_best else [])}
        state = {**state, "checkpointer": self.state_dict()}  # with the best step just added
        if not self.async_save:
            return self._save(step, state, rank_state, best, write_files)
        files = None
        if write_files is not None:
            files = _start(write_files, self._prepare(step), self.group)
        # only rank 0 writes `state` (the model and optimizer): the others need not copy it
        state = self._snapshot({"state": state if self.info.is_global_zero else None, "rank": rank_state})
        state, rank_state = state["state"], state["rank"]
        self._thread = threading.Thread(target=self._save_in_background, args=(step, state, rank_state, best,
                                                                               None, files),
                                        name=f"dtrain-checkpoint-{step}", daemon=True)  # joined by wait()
        self._thread.start()
        return self.root / f"step-{step:08d}"

    def _save_in_background(self, *args) -> None:
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
    def _save(self, step: int, state: dict, rank_state: dict, best: bool = False,
              write_files: Optional[Callable[..., Optional[Future]]] = None, files: Optional[Future] = None) -> Path:
        """Collective: every rank calls it. Rank 0 writes `state`, every rank its `rank_state`, and
        `write_files` its engine's files; or, from save() with async_save, the engine's files are already
        being written into the prepared temporary directory and `files` is their future.
        Each phase ends with all ranks agreeing it succeeded everywhere, so a failure on one rank
        (disk full, read-only dir) raises on all of them and publishes nothing."""
        final = self.root / f"step-{step:08d}"
        tmp = self._prepare(step) if files is None else self._tmp(step)

        def write():
            if write_files is not None:
                write_files(tmp, background=False, group=self.group)
            if files is not None:
                files.result()
            if write_files is not None or files is not None:
                for f in tmp.rglob("*"):  # this rank's and its peers' files: fsync is per inode, cheap
                    if f.is_file():
                        _fsync_file(f)
                for d in [p for p in tmp.rglob("*") if p.is_dir()]:
                    _fsync_dir(d)
            name = tmp / f"rank-{self.info.global_rank:05d}.pt"
            torch.save(rank_state, name)
            _fsync_file(name)
            if self.info.is_global_zero:
                torch.save(state, tmp / "state.pt")
                _fsync_file(tmp / "state.pt")

        self._all_ok(write, tmp)
        self._all_ok((lambda: self._publish(tmp, final, step, best)) if self.info.is_global_zero else None, tmp)
        if self.callbacks is not None:  # an error of theirs is the user's (from the save thread: raised by wait())
            self.callbacks.emit("on_checkpoint", final.absolute(), step, best)
        return final

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def _prepare(self, step: int) -> Path:
        """Collective: rank 0 makes an empty temporary directory for the step (leftovers of a killed save
        removed); every rank returns once it exists."""
        tmp = self._tmp(step)

        def prepare():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._all_ok(prepare if self.info.is_global_zero else None, tmp)
        return tmp

    def _all_ok(self, action: Optional[Callable[[], None]], tmp: Path) -> None:
        error = None
        if action is not None:
            try:
                action()
            except (OSError, RuntimeError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}"
                free = shutil.disk_usage(self.root if self.root.is_dir() else self.root.parent).free
                if isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or free < 2**26):
                    # torch.save reports a short write on a full disk as "unexpected pos N vs M"
                    error = f"No space left on device ({free // 1024} KiB free)"
        failed = dist.all_reduce_max(torch.tensor(0.0 if error is None else 1.0), group=self.group).item() > 0
        if failed:
            if self.info.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint: cannot write {tmp.parent} ({error or 'failed on another rank'}); "
                                  "previous checkpoints are intact")

    def _publish(self, tmp: Path, final: Path, step: int, best: bool) -> None:
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "world_size": self.info.world_size, "config_hash": self.config_hash,
                    "torch": torch.__version__, "dtrain": __version__,
                    "files": {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. best, then final): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._point("latest", final)
        if best:
            self._point("best", final)
        self._prune()
        size = sum(f["bytes"] for f in manifest["files"].values())
        log.debug(f"checkpoint: {final.name} published ({len(files)} files, {size / 2**20:.1f} MiB"
                  f"{', best' if best else ''})")

    def _point(self, name: str, target: Path) -> None:
        link, tmp = self.root / name, self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)  # atomic: readers see the old target or the new one
        _fsync_dir(self.root)

    def _prune(self) -> None:
        steps = sorted(self.root.glob("step-*"), key=_step_of)
        keep = set(steps[-self.keep_last:]) | {self.root / name for name in self.protect}
        for name in ("latest", "best"):
            if (self.root / name).is_symlink():
                keep.add(self.root / os.readlink(self.root / name))
        for path in steps:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------
    def pointer(self, name: str) -> Optional[Path]:
        return pointed(self.root, name)

    def candidates(self) -> list[Path]:
        """Newest first: the `latest` target, then every other step directory by step."""
        steps = sorted(self.root.glob("step-*"), key=_step_of, reverse=True) if self.root.is_dir() else []
        latest = self.pointer("latest")
        return ([latest] if latest in steps else []) + [p for p in steps if p != latest]

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
                raise CheckpointError(f"checkpoint: no usable checkpoint in {self.root} (newest: {problem.removeprefix('checkpoint: ')}); "
                                      "move it away to start over")
            return None
        return found if found is not None else (self.root / chosen, *self.load(self.root / chosen))

    def load(self, path: Path, verified: bool = False) -> tuple[dict, Optional[dict]]:
        """(state, this rank's rank_state). A checkpoint written by fewer ranks has no file for this rank:
        rank_state is None (the trainer's elastic resume decides what a new rank starts from)."""
        manifest = json.loads((path / MANIFEST).read_text()) if verified else verify(path)
        own = f"rank-{self.info.global_rank:05d}.pt"
        return safe_load(path / "state.pt"), safe_load(path / own) if own in manifest["files"] else None


def _start(write_files: Callable[..., Optional[Future]], tmp: Path, group) -> Future:
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


def pointed(root: Path, name: str) -> Optional[Path]:
    """The step directory that the pointer root/`name` (best, latest) names; None where there is no pointer.
    A pointer names one of its own run's step directories: one that leads anywhere else (another run's
    checkpoint, `..`, an absolute path, a step directory that is itself a link out) is refused in one line,
    so no run reads or reports another's checkpoint as its own."""
    link = Path(root) / name
    if not link.is_symlink():
        return None
    target = link.resolve()
    if target.parent != Path(root).resolve() or not target.name.startswith("step-"):
        raise CheckpointError(f"checkpoint: {link} points outside its run's checkpoints ({os.readlink(link)}); "
                              "remove it, or give the checkpoint you mean by its own path")
    return Path(root) / target.name


def written_by(path: Path) -> int:
    """The number of ranks that wrote a (verified) checkpoint."""
    return json.loads((Path(path) / MANIFEST).read_text())["world_size"]


def verify(path: Path) -> dict:
    """The manifest of a complete, untampered checkpoint directory; CheckpointError otherwise."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint: {path} is incomplete (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint: {mpath} is unreadable ({e})") from None
    for name, want in files.items():
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint: {f} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"checkpoint: {f} is truncated ({f.stat().st_size} of {want['bytes']} bytes)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint: {f} does not match its checksum (corrupt or modified)")
    return manifest


def safe_load(path: Path) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only; never unpickles code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise refusal(path, e) from None


def refusal(path, e: Exception) -> CheckpointError:
    """The one-line error for a file that torch's weights-only unpickler refused."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = next((l for l in lines if "Unsupported" in l or "unpickler error" in l.lower()), None)
    reason = (reason or (lines[0] if lines else type(e).__name__)).split(" was not an allowed global")[0]
    return CheckpointError(f"checkpoint: refusing to load {path}: not a plain tensor file ({reason[:200]}); "
                           "dtrain never unpickles code")
