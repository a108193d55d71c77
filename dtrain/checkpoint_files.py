"""A run's checkpoints on disk: what a step directory holds, how it is published, how it is checked and read.

  checkpoints/step-00000120/state.pt       rank 0: the state of each stateful part of the run (state.py)
  checkpoints/step-00000120/rank-00000.pt  every rank: its RNG states
  checkpoints/step-00000120/deepspeed/     train.engine=deepspeed: every rank's ZeRO shards (DeepSpeed's files)
  checkpoints/step-00000120/fsdp/          train.engine=fsdp: every rank's DCP shards of model and optimizer
  checkpoints/step-00000120/manifest.json  written last: sha256 + size of every file, step, world size,
                                           config hash, versions. No manifest = not a checkpoint.
  checkpoints/latest, checkpoints/best     relative symlinks to complete checkpoints

Files are written into `.tmp-step-N`; `CheckpointDir.publish` writes the manifest, renames the directory into
place and only then moves the pointers, so a kill at any moment leaves the previous checkpoint loadable.
Everything is read with torch.load(weights_only=True): a checkpoint can never execute code. No collective
here (checkpoint.py's Checkpointer has the ranks agree): data, models and engines read checkpoints through
this module without depending on how a run saves them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import AbstractSet, Any, Optional

import torch

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


def fsync_tree(directory: Path) -> None:
    """Every file under `directory`, then every directory under it, to disk."""
    for f in directory.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    for d in [p for p in directory.rglob("*") if p.is_dir()]:
        _fsync_dir(d)


def save_fsynced(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def write_error(e: OSError | RuntimeError, root: Path) -> str:
    """What went wrong writing into `root`, in a few words; a full disk said as such."""
    error = f"{type(e).__name__}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]}"
    free = shutil.disk_usage(root if root.is_dir() else root.parent).free
    if isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or free < 2**26):
        # torch.save reports a short write on a full disk as "unexpected pos N vs M"
        error = f"No space left on device ({free // 1024} KiB free)"
    return error


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


class CheckpointDir:
    """The step directories of one run (`root`): published atomically with their manifest, pointed at by
    `latest` and `best`, pruned to the last `keep_last` (and those `protect`ed, and the pointers' targets)."""

    def __init__(self, root: str | Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last

    def tmp(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def final(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def make_tmp(self, step: int) -> Path:
        """An empty temporary directory for the step (leftovers of a killed save removed)."""
        tmp = self.tmp(step)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def publish(
        self,
        tmp: Path,
        step: int,
        best: bool,
        world_size: int,
        config_hash: str,
        protect: AbstractSet[str] = frozenset(),
    ) -> Path:
        """The manifest of every file in `tmp` (all fsynced), then `tmp` renamed to the step's directory, the
        pointers moved and the old step directories pruned."""
        final = self.final(step)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest: dict[str, Any] = {
            "step": step,
            "world_size": world_size,
            "config_hash": config_hash,
            "torch": torch.__version__,
            "dtrain": __version__,
            "files": {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files},
        }
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
        self._prune(protect)
        size = sum(f["bytes"] for f in manifest["files"].values())
        log.debug(
            f"checkpoint: {final.name} published ({len(files)} files, {size / 2**20:.1f} MiB{', best' if best else ''})"
        )
        return final

    def _point(self, name: str, target: Path) -> None:
        link, tmp = self.root / name, self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)  # atomic: readers see the old target or the new one
        _fsync_dir(self.root)

    def _prune(self, protect: AbstractSet[str]) -> None:
        steps = sorted(self.root.glob("step-*"), key=step_of)
        keep = set(steps[-self.keep_last :]) | {self.root / name for name in protect}
        for name in ("latest", "best"):
            if (self.root / name).is_symlink():
                keep.add(self.root / os.readlink(self.root / name))
        for path in steps:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def pointer(self, name: str) -> Optional[Path]:
        return pointed(self.root, name)

    def candidates(self) -> list[Path]:
        """Newest first: the `latest` target, then every other step directory by step."""
        steps = sorted(self.root.glob("step-*"), key=step_of, reverse=True) if self.root.is_dir() else []
        latest = self.pointer("latest")
        return ([latest] if latest in steps else []) + [p for p in steps if p != latest]


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
        raise CheckpointError(
            f"checkpoint: {link} points outside its run's checkpoints ({os.readlink(link)}); "
            "remove it, or give the checkpoint you mean by its own path"
        )
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


def refusal(path: Path, e: Exception) -> CheckpointError:
    """The one-line error for a file that torch's weights-only unpickler refused."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = next((l for l in lines if "Unsupported" in l or "unpickler error" in l.lower()), None)
    reason = (reason or (lines[0] if lines else type(e).__name__)).split(" was not an allowed global")[0]
    return CheckpointError(
        f"checkpoint: refusing to load {path}: not a plain tensor file ({reason[:200]}); dtrain never unpickles code"
    )
