"""CPU DDP throughput: dtrain vs a hand-written DDP loop, for the digits (MLP) and count (CNN) examples.

Run under torchrun (1 or 2 ranks); rank 0 prints one JSON line per example:

    torchrun --nproc-per-node 2 benchmarks/ddp_cpu.py --steps 30 --reps 3
    benchmarks/ddp_cpu.sh            # 1 and 2 ranks, both examples, a markdown table

Segments, interleaved per repetition, medians of global samples/s:
  hand     model from the same config wrapped in DistributedDataParallel, AdamW, clipping, in-memory batches
  dtrain   dtrain's training loop (Trainer.train_epoch) on the same in-memory batches
  shards   dtrain's loop fed by its webdataset shards, as `dtrain train` runs it
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dtrain import dist
from dtrain.config import load_config
from dtrain.models import build_model
from dtrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {"digits": ("digits.yaml", []), "count": ("count.yaml", ["data.count_samples=2000"])}


def hand_loop(cfg, shape, out, task):
    model = DistributedDataParallel(build_model(cfg.model, {"input_shape": shape, "num_outputs": out}, cfg.run.seed))
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )

    def run(batches):
        for x, y, _ in batches:
            pred = model(x)
            loss = F.mse_loss(pred.squeeze(-1), y) if task == "regression" else F.cross_entropy(pred, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def print_table(lines) -> None:
    rows = sorted((json.loads(l) for l in lines if l.startswith("{")), key=lambda r: (r["example"], r["ranks"]))
    print(
        "| example | ranks | hand-written DDP samples/s | dtrain samples/s | dtrain / hand "
        "| dtrain shard-fed samples/s | shard-fed / hand |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['example']} | {r['ranks']} | {r['hand_samples_per_s']:.0f} | {r['dtrain_samples_per_s']:.0f} | "
            f"{r['dtrain_ratio']:.3f} | {r['shards_samples_per_s']:.0f} | {r['shards_ratio']:.3f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", default="digits,count")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--root", default=None, help="shards and runs (default: a temp dir shared via rank 0)")
    p.add_argument("--table", action="store_true", help="read the JSON lines of runs from stdin, print a table")
    args = p.parse_args()
    if args.table:
        return print_table(sys.stdin)
    info = dist.setup()
    root = args.root or dist.broadcast_object(
        tempfile.mkdtemp(prefix="dtrain-ddp-bench-") if info.is_global_zero else None
    )
    for name in args.examples.split(","):
        config, extra = EXAMPLES[name]
        cfg = load_config(
            REPO / "configs" / config,
            [
                *extra,
                f"run.dir={root}/runs",
                f"run.name={name}-{info.world_size}",
                f"data.root={root}/data",
                "log.progress=false",
                f"train.log_every={args.steps}",
                "schedule.name=constant",
            ],
        )
        trainer = Trainer(cfg, info)
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        trainer.feed.total_steps = trainer.feed.steps_per_epoch = 10**12  # no end-of-epoch validation while timing
        shape, task, out = tuple(trainer.facts.input_shape), trainer.facts.task, trainer.facts.num_outputs
        g = torch.Generator().manual_seed(info.global_rank)
        batches = []
        for _ in range(8):
            x = torch.rand(cfg.data.batch_size, *shape, generator=g)
            y = torch.randint(0, out if task == "classification" else 10, (cfg.data.batch_size,), generator=g)
            batches.append((x, y.float() if task == "regression" else y, []))
        synthetic = itertools.cycle(batches)
        shards = itertools.chain.from_iterable(trainer.feed.stream.epoch(e) for e in itertools.count())
        hand = hand_loop(cfg, shape, out, task)
        segments = {
            "hand": lambda n: hand(itertools.islice(synthetic, n)),
            "dtrain": lambda n: trainer.train_epoch(itertools.islice(synthetic, n), 0),
            "shards": lambda n: trainer.train_epoch(itertools.islice(shards, n), 0),
        }
        seconds = {k: [] for k in segments}
        for rep in range(-1, args.reps):
            for key, run in segments.items():
                td.barrier() if info.distributed else None
                t0 = time.perf_counter()
                run(3 if rep < 0 else args.steps)
                td.barrier() if info.distributed else None
                if rep >= 0:
                    seconds[key].append(time.perf_counter() - t0)
        global_batch = cfg.data.batch_size * info.world_size
        result = {
            "example": name,
            "ranks": info.world_size,
            "batch_per_rank": cfg.data.batch_size,
            **{f"{k}_samples_per_s": global_batch * args.steps / statistics.median(v) for k, v in seconds.items()},
            "dtrain_ratio": statistics.median(h / d for h, d in zip(seconds["hand"], seconds["dtrain"])),
            "shards_ratio": statistics.median(h / d for h, d in zip(seconds["hand"], seconds["shards"])),
        }
        if info.is_global_zero:
            print(json.dumps(result), flush=True)
    dist.teardown(True)


if __name__ == "__main__":
    main()
