"""Shard reading speed in one process: dtrain's tar member reader (dtrain/data/tario.py) against
webdataset's own (`wds.tarfile_to_samples`, Python's tarfile), same shards, same pipeline otherwise
(node/worker split, shuffle buffer, .npy decode, collate into batches), interleaved repetitions.

    OMP_NUM_THREADS=1 python benchmarks/decode.py [--epochs 3 --reps 3]

Prints samples/s per dataset and reader, and the ratio fast / webdataset.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import webdataset as wds

from dtrain.data import ShardStream, make_builtin, read_index

DATASETS = {"digits": {}, "count": {"samples": 6000}, "text": {"context": 128, "num_bytes": 400_000}}


def samples_per_s(stream: ShardStream, epochs: int) -> float:
    t0, n = time.perf_counter(), 0
    for epoch in range(epochs):
        for x, _, _ in stream.epoch(epoch):
            n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--root", default=None)
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="dtrain-decode-"))
    print("| data set | webdataset reader samples/s | dtrain reader samples/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, kw in DATASETS.items():
        if not (root / name / "train.json").exists():
            make_builtin(name, root / name, 350, **kw)
        stream = ShardStream(
            read_index(root / name),
            "train",
            batch_size=args.batch_size,
            rank=0,
            world_size=1,
            seed=0,
            shuffle_buffer=1000,
            train=True,
        )
        results = {"wds": [], "fast": []}
        samples_per_s(stream, 1)  # warm-up: page cache, imports
        for _ in range(args.reps):
            with mock.patch("dtrain.data.pipeline.tarfile_to_samples", wds.tarfile_to_samples):
                results["wds"].append(samples_per_s(stream, args.epochs))
            results["fast"].append(samples_per_s(stream, args.epochs))
        w, f = statistics.median(results["wds"]), statistics.median(results["fast"])
        ratio = statistics.median(b / a for a, b in zip(results["wds"], results["fast"]))
        print(f"| {name} | {w:.0f} | {f:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
