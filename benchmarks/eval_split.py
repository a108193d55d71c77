"""Validation time at 2 ranks with a validation split of one shard, streamed (issue 22, point 3): dealt by
shard (before), rank 1 has nothing to evaluate and the job waits on rank 0 for the whole split; dealt by
sample (after), each rank evaluates half.

    OMP_NUM_THREADS=1 python benchmarks/eval_split.py [--data jpg] [--passes 200] [data.num_workers=2 ...]

writes digits shards with `dtrain shard --dataset digits --shard-size 300` (val: one shard of 269 samples;
small samples, whose reading costs more than their decoding), or with `--data jpg` one val shard of 512
64x64 jpg images written by webdataset's TarWriter (decoding is most of the cost), and starts `torchrun
--nproc-per-node 2` on itself: in one process a rank, validations (Evaluator.evaluate of the val split,
data.in_memory=false: what a validation during training does, its all-reduce included) alternate between
the split dealt by sample (ShardStream.epoch) and dealt by shard (the code it replaced: every
world_size-th shard to a rank, read whole), so both see the same machine. Printed: the
median time of a validation each way, their ratio, and each rank's busy time (until its share is
evaluated, before the all-reduce).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ByShard:
    """An evaluation stream dealt by shard, as before issue 22: this rank's shards (every world_size-th),
    one pass, the last batch partial."""

    def __init__(self, stream):
        self.stream = stream

    def epoch(self, epoch: int, start: int = 0):
        from dtrain.data.samples import rebatch

        s = self.stream
        pieces, workers = s.whole_shards(s.urls[s.rank :: s.world_size]), max(s.num_workers, 1)
        pipeline = s._pipeline(s._reader([pieces[w::workers] for w in range(workers)]), "", epoch)
        yield from (s.format.batch(c) for c in rebatch(s._loaded(pipeline, epoch), s.batch_size, partial=True))


def time_validation(args) -> None:
    import torch

    from dtrain import batch as batches
    from dtrain import dist
    from dtrain.build import build_core
    from dtrain.config import load_config

    torch.set_num_threads(1)
    info = dist.setup("gloo", 600.0, 60.0)
    data = (
        [f"data.dataset=folder:{args.shards}"]
        if args.data == "digits"
        else [
            f"data.train={args.shards}/train.json",
            f"data.val={args.shards}/val.json",
            "data.sample={x: jpg, y: cls}",
            "data.num_classes=3",
        ]
    )
    cfg = load_config(None, [*data, "data.in_memory=false", *args.overrides])
    core = build_core(cfg, info, log=lambda msg: None)
    ways = {"by shard": ByShard(core.data.val), "by sample": core.data.val}
    times = {name: ([], []) for name in ways}  # (whole validation, this rank's busy part)
    samples = {name: sum(map(batches.size, way.epoch(0))) for name, way in ways.items()}
    for i in range(args.passes):
        for name, stream in ways.items():
            marks = []
            t0 = time.perf_counter()
            core.evaluator.evaluate(stream, "val", log_local=lambda loss: marks.append(time.perf_counter()))
            if i >= 3:
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(marks[0] - t0)
    mine = torch.tensor(
        [[samples[n], statistics.median(times[n][0]), statistics.median(times[n][1])] for n in ways],
        dtype=torch.float64,
    )
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    torch.distributed.all_gather(every, mine)
    if info.is_global_zero:
        for j, name in enumerate(ways):
            print(
                f"{name}: samples per rank {'/'.join(str(int(r[j, 0])) for r in every)}; a validation "
                f"{every[0][j, 1] * 1e3:.1f} ms (median of {args.passes - 3}); busy per rank "
                f"{'/'.join(f'{r[j, 2] * 1e3:.1f}' for r in every)} ms"
            )
        before, after = every[0][0, 1].item(), every[0][1, 1].item()
        print(
            f"validation of 1 val shard at 2 ranks: by shard (before) {before * 1e3:.1f} ms, by sample (after) "
            f"{after * 1e3:.1f} ms; after / before {after / before:.2f}",
            flush=True,
        )
    dist.teardown()


def write_jpg(out: Path) -> None:
    """Train: 2 shards of 64 images; val: 1 shard of 512 (64x64 jpg, class = the dominant colour)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    out.mkdir()
    rng = np.random.default_rng(0)
    for split, shards, n in (("train", 2, 64), ("val", 1, 512)):
        for k in range(shards):
            with wds.TarWriter(str(out / f"{split}-{k}.tar")) as tar:
                for i in range(n):
                    pixels = rng.integers(0, 120, (64, 64, 3), dtype=np.uint8)
                    pixels[..., i % 3] += 120
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                    tar.write({"__key__": f"{k}-{i:05d}", "jpg": buf.getvalue(), "cls": i % 3})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=200, help="validations each way")
    parser.add_argument("--data", choices=["digits", "jpg"], default="digits")
    parser.add_argument("--shards", default=None, help="(set by the launch) the digits shards")
    parser.add_argument("overrides", nargs="*", help="dtrain config overrides, e.g. data.num_workers=2")
    args = parser.parse_args()
    if args.shards:
        return time_validation(args)
    work = Path(tempfile.mkdtemp(prefix="dtrain-evalsplit-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if args.data == "jpg":
        write_jpg(work / "shards")
        for split, pattern in (("train", "train-{0..1}.tar"), ("val", "val-0.tar")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dtrain",
                    "index",
                    str(work / "shards" / pattern),
                    "--out",
                    str(work / "shards" / f"{split}.json"),
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
    else:
        subprocess.run(
            [sys.executable, "-m", "dtrain", "shard", "--dataset", "digits", "--out", "shards", "--shard-size", "300"],
            check=True,
            env=env,
            cwd=work,
            stdout=subprocess.DEVNULL,
        )
    assert len(list((work / "shards").glob("val-*.tar"))) == 1
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            "29533",
            __file__,
            "--shards",
            str(work / "shards"),
            "--passes",
            str(args.passes),
            "--data",
            args.data,
            *args.overrides,
        ],
        check=True,
        env=env,
        cwd=work,
    )


if __name__ == "__main__":
    main()
