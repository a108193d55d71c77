"""Atomic, verified checkpoints.

  checkpoints/step-00000120/state.pt       rank 0: model, optimizer, scheduler, trainer state, config
  checkpoints/step-00000120/rank-00000.pt  every rank: its RNG states
  checkpoints/step-00000120/manifest.json  written last: sha256 + size of every file, step, world size,
                                           config hash, versions. No manifest = not a checkpoint.
  checkpoints/latest, checkpoints/best     relative symlinks to complete checkpoints

A save writes into `.tmp-step-N`, fsyncs every file, writes the manifest, renames the directory into
place and only then moves the pointers, so a kill at any moment leaves the previous checkpoint
loadable. Loading verifies the manifest and falls back to the newest complete checkpoint, saying so.
Everything is read with torch.load(weights_only=True): a checkpoint can never execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import dist

MANIFEST = "manifest.json"


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


def rng_state() -> dict:
    """This rank's RNG states, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int, dist_info, config_hash: str):
        self.root = Path(root)
        self.keep_last = keep_last
        self.info = dist_info
        self.config_hash = config_hash

    # ---- saving -------------------------------------------------------------------------------
    def save(self, step: int, state: dict, rank_state: dict, best: bool = False) -> Path:
        """Collective: every rank calls it. Rank 0 writes `state`, every rank its `rank_state`.
        Each phase ends with all ranks agreeing it succeeded everywhere, so a failure on one rank
        (disk full, read-only dir) raises on all of them and publishes nothing."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"

        def prepare():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
            tmp.mkdir()

        def write():
            name = tmp / f"rank-{self.info.global_rank:05d}.pt"
            torch.save(rank_state, name)
            _fsync_file(name)
            if self.info.is_global_zero:
                torch.save(state, tmp / "state.pt")
                _fsync_file(tmp / "state.pt")

        self._all_ok(prepare if self.info.is_global_zero else None, tmp)
        self._all_ok(write, tmp)
        self._all_ok((lambda: self._publish(tmp, final, step, best)) if self.info.is_global_zero else None, tmp)
        return final

    def _all_ok(self, action: Optional[Callable[[], None]], tmp: Path) -> None:
        error = None
        if action is not None:
            try:
                action()
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
                error = f"{type(e).__name__}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}"
        failed = dist.all_reduce_max(torch.tensor(0.0 if error is None else 1.0)).item() > 0
        if failed:
            if self.info.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint: cannot write {tmp.parent} ({error or 'failed on another rank'}); "
                                  "previous checkpoints are intact")

    def _publish(self, tmp: Path, final: Path, step: int, best: bool) -> None:
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "world_size": self.info.world_size, "config_hash": self.config_hash,
                    "torch": torch.__version__, "dtrain": _version(),
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

    def _point(self, name: str, target: Path) -> None:
        link, tmp = self.root / name, self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)  # atomic: readers see the old target or the new one
        _fsync_dir(self.root)

    def _prune(self) -> None:
        steps = sorted(self.root.glob("step-*"), key=_step_of)
        keep = set(steps[-self.keep_last:])
        for name in ("latest", "best"):
            if (self.root / name).is_symlink():
                keep.add(self.root / os.readlink(self.root / name))
        for path in steps:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------
    def pointer(self, name: str) -> Optional[Path]:
        link = self.root / name
        return self.root / os.readlink(link) if link.is_symlink() else None

    def candidates(self) -> list[Path]:
        """Newest first: the `latest` target, then every other step directory by step."""
        steps = sorted(self.root.glob("step-*"), key=_step_of, reverse=True) if self.root.is_dir() else []
        latest = self.pointer("latest")
        return ([latest] if latest in steps else []) + [p for p in steps if p != latest]

    def load_latest(self, log: Callable[[str], None]) -> Optional[tuple[Path, dict, dict]]:
        """(path, state, this rank's rank_state) of the newest complete checkpoint, or None.
        Rank 0 verifies (the manifest covers every rank's file) and chooses; all ranks load its choice."""
        chosen = None
        if self.info.is_global_zero:
            for i, path in enumerate(self.candidates()):
                try:
                    verify(path)
                except CheckpointError as e:
                    log(f"{e}; trying an older one")
                    continue
                if i > 0:
                    log(f"checkpoint: resuming from {path.name}, the newest complete checkpoint")
                chosen = path.name
                break
        chosen = dist.broadcast_object(chosen)
        if chosen is None:
            return None
        path = self.root / chosen
        return (path, *self.load(path, verified=True))

    def load(self, path: Path, verified: bool = False) -> tuple[dict, dict]:
        manifest = json.loads((path / MANIFEST).read_text()) if verified else verify(path)
        if manifest["world_size"] != self.info.world_size:
            raise CheckpointError(f"checkpoint: {path} was written by {manifest['world_size']} ranks, this run has "
                                  f"{self.info.world_size}; start it with {manifest['world_size']} ranks")
        return safe_load(path / "state.pt"), safe_load(path / f"rank-{self.info.global_rank:05d}.pt")


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint: refusing to load {path}: {first}") from None


def _version() -> str:
    from . import __version__
    return __version__
