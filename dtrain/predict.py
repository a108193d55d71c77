"""`dtrain predict`: a trained model over shards on N ranks, each sample once, outputs keyed by sample key.

Launched like training (`dtrain launch`, torchrun, srun, or one process; `python train.py predict ...` for a
script, which hands in its own model). Rank r takes the samples at positions r, r + world_size, ... of the
data's order (dtrain's evaluation dealing), and writes its outputs into part files of its own under --out:

  OUT/predict.json                        what the outputs are of: checkpoint, step, data; complete or not
  OUT/part-rank00000-000000.jsonl         {"__key__": key, "output": [...], "pred": class} a line per sample
  OUT/part-rank00000-000000.tar           or webdataset samples: KEY.output.npy (+ KEY.pred.cls)

A part is written to a temporary file, fsynced and renamed into place: a part that exists is complete (the
commit), so a predict stopped by a signal or killed loses at most the part it was writing. Started again
with the same command it skips every sample whose key a part already holds (on any number of ranks) and
writes only the rest. SIGTERM, SIGINT and SIGUSR1 make every rank write what it has and exit 75, as
training does. At the end rank 0 checks that the parts hold every sample of the data exactly once.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from . import batch as batches
from . import dist
from .build import Hooks
from .config import ConfigError
from .data import DataError, ShardIndex, ShardStream, sample_format
from .data.sources import resolve_split
from .importing import resolve
from .load import Loaded, rebuild
from .logging import progress_bar
from .signals import EXIT_INTERRUPTED, StopControl

SPLIT = "predict"  # the split name of --data in its own index
MANIFEST = "predict.json"
PART = re.compile(r"part-rank(\d{5})-(\d{6})\.(jsonl|tar)")


def predict_command(args) -> int:
    """`dtrain predict` (its command line: dtrain.cli)."""
    if args.part_size < 1:
        raise ConfigError("predict: --part-size must be >= 1")
    loaded = rebuild(
        args.checkpoint, args.hooks or Hooks(), args.config, args.overrides, args.defaults, args.trust_checkpoint_code
    )
    cfg = loaded.cfg
    stream = _stream(loaded, args.data)
    info = dist.setup(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.connect_timeout_s)
    clean = False
    try:
        code = _run(loaded, stream, info, args)
        clean = True
        return code
    finally:
        dist.teardown(clean)


def _stream(loaded: Loaded, spec: str) -> ShardStream:
    """The shards of --data, decoded as the run decoded its data (data.sample, or dtrain's own x.npy with the
    run's x_scale where --data has no descriptor of its own to say it). Rank and world size come later."""
    data = loaded.hooks.replacing(loaded.cfg).data
    urls, counts, meta = resolve_split(spec, "--data", data.counts, data.trust_descriptor_pipes)
    index = ShardIndex({SPLIT: dict(zip(urls, counts))}, meta or loaded.streams.index.meta, where=spec)
    fmt = sample_format(data, index, loaded.hooks.sample, loaded.hooks.collate)
    if not fmt.mapped:
        fmt = _Unlabeled(fmt)
    return ShardStream(
        index,
        SPLIT,
        batch_size=data.eval_batch_size or data.batch_size,
        rank=0,
        world_size=1,
        num_workers=data.num_workers,
        sample_format=fmt,
    )


class _Unlabeled:
    """dtrain's own x.npy + y.cls format for data to predict, which need not have labels: a sample without
    y.cls gets label 0, which nothing reads (no label is written out, no loss or metric is computed)."""

    mapped = False

    def __init__(self, fmt):
        self.fmt = fmt

    def decode(self, sample: dict) -> dict:
        return self.fmt.decode(sample if "y.cls" in sample else {**sample, "y.cls": b"0"})

    def batch(self, cols):
        return self.fmt.batch(cols)


def _run(loaded: Loaded, stream: ShardStream, info: dist.DistInfo, args) -> int:
    out = Path(args.out)
    total = stream.index.num_samples(SPLIT)
    # rank 0 checks the manifest, every rank hears the outcome (and raises alike): before any reads or writes parts
    refused = dist.broadcast_object(_claim(out, loaded, args.data, args.format, total) if info.is_global_zero else None)
    if refused:
        raise ConfigError(refused)
    done = set(read_keys(out))
    dist.barrier()  # every rank has read the parts before any writes new ones
    stream = stream.relayout(
        rank=info.global_rank,
        world_size=info.world_size,
        batch_size=stream.batch_size,
        grad_accum=1,
        num_workers=stream.num_workers,
    )
    writer = PartWriter(out, info.global_rank, args.format, loaded.streams.task == "classification")
    forward = loaded.hooks.forward or (
        resolve(loaded.cfg.model.forward, "model.forward") if loaded.cfg.model.forward else batches.default_forward
    )
    model = loaded.model.to(info.device)
    mine = len(range(info.global_rank, total, info.world_size))
    started, stop = time.monotonic(), StopControl(None)  # this rank's signals; ranks agree once, at the end
    try:
        with progress_bar(
            total=mine, desc="predict", unit="sample", enabled=info.is_global_zero and loaded.cfg.log.progress
        ) as bar:
            for batch in stream.epoch(0):
                keys = batches.keys(batch)
                if not all(k in done for k in keys):  # a batch a part already holds: not computed again
                    with torch.inference_mode():
                        output = forward(model, batches.to_device(batch, lambda t: t.to(info.device)))
                    writer.add(keys, batches.logits(output).detach().float().cpu(), done)
                    if writer.pending >= args.part_size:
                        writer.commit()
                bar.update(len(keys))
                if stop.should_stop():
                    break
            writer.commit()  # a stopped rank keeps what it computed
    finally:
        stop.close()
    counts = torch.tensor([float(stop.stop_signal is not None), writer.written], device=info.device)
    with dist.guard("predict's end (every rank's count)"):
        stopped = dist.all_reduce_max(counts[:1].clone()).item() > 0
        written = int(dist.all_reduce_sum(counts[1:].clone()).item())
    seconds = time.monotonic() - started
    rate = (
        f"{written} samples in {seconds:.1f} s, {written / max(seconds, 1e-9):.1f} samples/s on {info.world_size} "
        f"rank{'s' * (info.world_size > 1)}"
    )
    if stopped:
        if info.is_global_zero:
            print(f"predict: stopped by a signal ({rate}); run the same command again to go on", flush=True)
        return EXIT_INTERRUPTED
    missing = dist.broadcast_object(_check_complete(out, total, args.data) if info.is_global_zero else None)
    if missing:
        raise DataError(missing)
    if info.is_global_zero:
        print(f"predict: {total} outputs in {out} ({rate})", flush=True)
    return 0


def _claim(out: Path, loaded: Loaded, data: str, fmt: str, total: int) -> Optional[str]:
    """The manifest of --out: written on the first start, the same on every later one (outputs of another
    checkpoint or data set in the same directory would be mixed with these unseen). -> why not, or None."""
    want = {
        "checkpoint": str(loaded.source.resolve()),
        "step": loaded.step,
        "data": data,
        "format": fmt,
        "samples": total,
    }
    path = out / MANIFEST
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"predict: {path} is unreadable ({type(e).__name__}); give a new --out"
        differ = [k for k in want if have.get(k) != want[k]]
        if differ:
            return (
                f"predict: --out {out} holds the outputs of {differ[0]} {have.get(differ[0])!r}, not "
                f"{want[differ[0]]!r}; give a new --out (or remove that one) to start over"
            )
        return None
    if out.exists() and any(out.iterdir()):
        return f"predict: --out {out} holds files dtrain predict did not write; give a new or empty directory"
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(want, indent=1).encode())
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _publish(Path(tmp), path)


def _publish(tmp: Path, path: Path) -> None:
    """`tmp` as `path`, durably: its bytes on disk before the rename, the rename on disk after it; readable as
    open() would have made it (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartWriter:
    """This rank's outputs, committed a part file at a time (the module docstring)."""

    def __init__(self, out: Path, rank: int, fmt: str, classes: bool):
        self.out, self.rank, self.fmt, self.classes = out, rank, fmt, classes
        for tmp in out.glob(f".part-rank{rank:05d}-*"):  # a part being written when a run was killed
            tmp.unlink(missing_ok=True)
        taken = [int(m[2]) for p in out.iterdir() if (m := PART.fullmatch(p.name)) and int(m[1]) == rank]
        self.next = max(taken, default=-1) + 1
        self.rows: list[tuple[str, np.ndarray]] = []
        self.written = 0

    @property
    def pending(self) -> int:
        return len(self.rows)

    def add(self, keys: list[str], outputs: torch.Tensor, done: set) -> None:
        """Each sample's output row (the model's logits) under its key, but those a committed part holds."""
        for key, row in zip(keys, outputs.numpy()):
            if key not in done:
                self.rows.append((key, row))

    def commit(self) -> None:
        if not self.rows:
            return
        name = f"part-rank{self.rank:05d}-{self.next:06d}.{self.fmt}"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out)
        with os.fdopen(fd, "wb") as f:
            if self.fmt == "jsonl":
                for key, row in self.rows:
                    line = {"__key__": key, "output": row.tolist()}
                    if self.classes:
                        line["pred"] = int(row.argmax())
                    f.write((json.dumps(line) + "\n").encode())
            else:
                import webdataset as wds

                with wds.TarWriter(f, mtime=0) as sink:
                    for key, row in self.rows:
                        sink.write(
                            {
                                "__key__": key,
                                "output.npy": row,
                                **({"pred.cls": int(row.argmax())} if self.classes else {}),
                            }
                        )
        _publish(Path(tmp), self.out / name)
        self.written += len(self.rows)
        self.next, self.rows = self.next + 1, []


def read_keys(out: Path) -> Iterator[str]:
    """The sample key of every output the parts under `out` hold (a key twice where it is there twice)."""
    if not out.is_dir():
        return
    for path in sorted(p for p in out.iterdir() if PART.fullmatch(p.name)):
        if path.suffix == ".jsonl":
            with open(path) as f:
                yield from (json.loads(line)["__key__"] for line in f if line.strip())
        else:
            with tarfile.open(path) as tar:  # headers only; a sample's members are consecutive: its key once
                yield from dict.fromkeys(base_plus_ext(name)[0] for name in tar.getnames())


def _check_complete(out: Path, total: int, data: str) -> Optional[str]:
    """Every sample of the data exactly once: as many distinct keys as the data has samples, none twice; then
    the manifest says complete. -> what is wrong, or None."""
    counts = Counter(read_keys(out))
    twice = [k for k, n in counts.items() if n > 1]
    if twice or len(counts) != total:
        what = (
            f"{len(twice)} keys more than once (first {twice[0]!r})"
            if twice
            else f"{len(counts)} distinct keys for the {total} samples"
        )
        return (
            f"predict: {out} holds {what} of --data {data}; are its sample keys unique? give a new --out to "
            "predict again"
        )
    manifest = json.loads((out / MANIFEST).read_text())
    _write_atomic(out / MANIFEST, json.dumps({**manifest, "complete": True}, indent=1).encode())
    return None
