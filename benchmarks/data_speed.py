"""Data feeding speed, each comparison in one run (issue 14, "How it is shown"):

(a) pipeline  a shard-fed image pipeline (jpg decoded and transformed in DataLoader workers) through dtrain's
              ShardStream vs a hand-written webdataset + DataLoader loop on the same shards and decode;
              samples/s of each, interleaved repetitions, ratio of medians (target >= 0.95).
(b) train     `dtrain train` end to end on the digits example vs a hand-written loop on the same data held
              in memory (same model, AdamW, clipping, cosine schedule, a validation pass per epoch as dtrain
              does), at 1 and 2 ranks. Each is timed as a whole process for W and W + D steps; the rate is
              D / (time(W + D) - time(W)), so start-up (imports, process group, data set creation, the final
              test and save) cancels (target >= 0.9).

    OMP_NUM_THREADS=1 python benchmarks/data_speed.py train [--ranks 1,2 --warm 60 --delta 3000 --reps 9]
    OMP_NUM_THREADS=1 python benchmarks/data_speed.py pipeline [--images 2000 --workers 2 --reps 3]
    OMP_NUM_THREADS=1 python benchmarks/data_speed.py pipeline --baseline /tmp/base   # + another dtrain's stream

(a') with --baseline DIR (a checkout of another dtrain, e.g. `git worktree add /tmp/base HEAD~3`), that dtrain's
              ShardStream is timed too, in the same interleaved repetitions: a python of its own with DIR first
              on its path (`stream-epochs`, fed epoch numbers on stdin), its epochs timed inside it, as ours
              are here. Printed: its samples/s and ours over its (the before/after ratio of a change), and
              the same per CPU second (the process's and its reaped DataLoader workers' user + system time),
              which other jobs on a shared machine disturb far less than the wall clock.

(b') interleaved  (b) in one process a rank, an epoch of each in turn: what the whole-process timing
              cannot give on a machine whose speed drifts between runs.

    OMP_NUM_THREADS=1 python benchmarks/data_speed.py interleaved [--epochs 300]
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/data_speed.py interleaved [--epochs 300]

(`hand` is the hand-written digits loop itself, started by `train`.)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---- (b): the hand-written loop on digits in memory --------------------------------------------------------
class HandLoop:
    """What a minimal DDP script does: the digits split in memory, a seeded permutation per epoch, each rank
    every world_size-th batch of 64, AdamW, clipping, a cosine LR schedule over `steps`, and a validation
    pass (all-reduced) after each epoch."""

    def __init__(self, steps: int, world: int = 1, rank: int = 0):
        import torch

        from dtrain.config import load_config
        from dtrain.data.datasets import digits
        from dtrain.models import build_model

        self.world, self.rank = world, rank
        self.cfg = cfg = load_config(REPO / "configs" / "digits.yaml")
        splits, meta = digits()
        x, self.y = (torch.from_numpy(a) for a in splits["train"])
        self.x = x.float() * meta["x_scale"]
        vx, vy = (torch.from_numpy(a) for a in splits["val"])
        self.vx, self.vy = vx[rank::world].float() * meta["x_scale"], vy[rank::world]
        self.model = build_model(cfg.model, {"input_shape": (1, 8, 8), "num_outputs": 10}, 0)
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr)
        # the same cosine decay over the run as dtrain's schedule (the same training, not only the same model)
        cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine)
        self.batch, self.g = cfg.data.batch_size, torch.Generator().manual_seed(0)
        self.per_epoch = len(self.x) // (self.batch * world)

    def epoch(self, steps: int) -> int:
        """One epoch, or its first `steps` steps, then the validation pass. -> steps taken."""
        import torch
        import torch.distributed as td
        import torch.nn.functional as F

        model, opt, b, world, rank = self.model, self.opt, self.batch, self.world, self.rank
        order = torch.randperm(len(self.x), generator=self.g)
        n = min(self.per_epoch, steps)
        for i in range(n):
            idx = order[(i * world + rank) * b : (i * world + rank + 1) * b]
            loss = F.cross_entropy(model(self.x[idx]), self.y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.train.clip_grad_norm)
            opt.step()
            self.sched.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            total = torch.stack(
                [F.cross_entropy(model(self.vx), self.vy, reduction="sum"), torch.tensor(float(len(self.vy)))]
            )
        if world > 1:
            td.all_reduce(total)
        model.train()
        return n


def hand(args) -> None:
    import torch.distributed as td

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        td.init_process_group("gloo")
    loop, step = HandLoop(args.steps, world, rank), 0
    while step < args.steps:
        step += loop.epoch(args.steps - step)
    if world > 1:
        td.barrier()  # no rank tears gloo down while a peer is still in a collective
        td.destroy_process_group()


def interleaved(args) -> None:
    """(b) in one process a rank (alone, or under torchrun): an epoch of dtrain's Trainer (train_epoch: its
    steps, logging and validation) and an epoch of the hand-written loop, alternating, so both see the same
    machine. The whole-process measurement's repetitions vary with this machine's speed; this one pairs
    epochs ~25 ms apart."""
    import contextlib

    import torch

    from dtrain import dist
    from dtrain.config import load_config
    from dtrain.trainer import Trainer

    torch.set_num_threads(1)
    root = Path(args.out or "/tmp/dtrain-interleaved")  # every rank the same
    cfg = load_config(
        REPO / "configs" / "digits.yaml",
        [
            f"run.dir={root / 'runs'}",
            f"run.name=interleaved-{os.getppid()}",
            f"data.root={root / 'data'}",
            "log.progress=false",
            "train.epochs=100000",
            "run.doctor=false",
            "checkpoint.save_best=false",
            *args.dtrain_overrides,
        ],
    )
    info = dist.setup("gloo", 600.0, 60.0)  # under torchrun: both loops on the same process group
    trainer = Trainer(cfg, info)
    trainer.resume()
    trainer.start_logs()
    loop = HandLoop(cfg.train.epochs * trainer.feed.steps_per_epoch, info.world_size, info.global_rank)

    def dtrain_epoch() -> int:
        first = trainer.step
        with contextlib.closing(trainer.feed.batches(trainer.step)) as batches:
            trainer.train_epoch(batches)
        return trainer.step - first

    times: dict[str, list[float]] = {"hand": [], "dtrain": []}
    for i in range(args.epochs + 3):  # the first three: warm-up
        for name, run in (("hand", lambda: loop.epoch(loop.per_epoch)), ("dtrain", dtrain_epoch)):
            t0 = time.perf_counter()
            steps = run()
            if i >= 3:
                times[name].append((time.perf_counter() - t0) / steps)
    trainer.stop.close()
    h, d = statistics.median(times["hand"]), statistics.median(times["dtrain"])
    paired = statistics.median(a / b for a, b in zip(times["hand"], times["dtrain"]))
    if info.is_global_zero:
        print(
            f"(b, in one process a rank) {info.world_size} rank(s), {args.epochs} epochs each, alternating: "
            f"hand-written {1 / h:.0f} steps/s, dtrain {1 / d:.0f} steps/s; ratio of medians {h / d:.2f}, "
            f"median of paired ratios {paired:.2f}",
            flush=True,
        )
    dist.teardown()


def _launch(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        *args,
    ]


def _timed(cmd: list[str], cwd: Path) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def train(args) -> None:
    cwd = Path(args.out or tempfile.mkdtemp(prefix="dtrain-data-speed-"))
    cwd.mkdir(parents=True, exist_ok=True)
    print(
        f"(b) dtrain train vs a hand-written loop on digits in memory: rate from {args.warm} vs "
        f"{args.warm + args.delta} steps, {args.reps} interleaved repetitions (median)"
    )
    print("| ranks | hand-written steps/s | dtrain train steps/s | ratio |")
    print("|---:|---:|---:|---:|")
    for ranks in (int(r) for r in args.ranks.split(",")):

        def dtrain(steps: int, rep: int) -> list[str]:
            return _launch(
                ranks,
                [
                    "-m",
                    "dtrain",
                    "train",
                    "--config",
                    str(REPO / "configs" / "digits.yaml"),
                    f"run.name=r{ranks}-{steps}-{rep}",
                    "train.epochs=100000",
                    f"train.max_steps={steps}",
                    "log.progress=false",
                    "run.doctor=false",
                    "checkpoint.save_best=false",
                    *args.dtrain_overrides,
                ],
            )

        def handwritten(steps: int, rep: int) -> list[str]:
            return _launch(ranks, [str(Path(__file__).resolve()), "hand", "--steps", str(steps)])

        _timed(dtrain(args.warm, -1), cwd)  # warm-up: writes the digits shards, fills the page cache
        rates: dict[str, list[float]] = {"hand": [], "dtrain": []}
        for rep in range(args.reps):
            # which goes first alternates: a machine whose speed drifts favours neither
            for name, cmd in (("hand", handwritten), ("dtrain", dtrain))[:: 1 if rep % 2 == 0 else -1]:
                short, long = _timed(cmd(args.warm, rep), cwd), _timed(cmd(args.warm + args.delta, rep), cwd)
                rates[name].append(args.delta / (long - short))
        h, d = statistics.median(rates["hand"]), statistics.median(rates["dtrain"])
        ratios = [b / a for a, b in zip(rates["hand"], rates["dtrain"])]
        print(f"| {ranks} | {h:.0f} | {d:.0f} | {statistics.median(ratios):.2f} |", flush=True)
        print(
            f"  (per repetition, steps/s: hand {[round(r) for r in rates['hand']]}, "
            f"dtrain {[round(r) for r in rates['dtrain']]}; ratios {[round(r, 2) for r in ratios]})",
            file=sys.stderr,
            flush=True,
        )


# ---- (a): an image pipeline, dtrain's stream vs webdataset + DataLoader written by hand ---------------------
def _photo_shards(root: Path, images: int, size: int, shard_size: int) -> list[str]:
    """jpg + cls shards of `size`-pixel crops of scikit-learn's two bundled photos (class = which photo)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "photos-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(images):
            label = i % 2
            h, w, _ = photos[label].shape
            y, x = rng.integers(0, h - 2 * size), rng.integers(0, w - 2 * size)
            crop = Image.fromarray(photos[label][y : y + 2 * size, x : x + 2 * size]).resize((size, size))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:07d}", "jpg": buf.getvalue(), "cls": label})
    return sorted(str(p) for p in root.glob("photos-*.tar"))


def augment(x):
    """A random flip, 4-pixel shift and brightness change, drawing from torch's global generator (as
    torchvision.transforms.v2 does): what dtrain seeds per sample and the hand-written loop does not."""
    import torch
    import torch.nn.functional as F

    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 9, (2,)).tolist()
    x = F.pad(x, (4, 4, 4, 4))[:, dy : dy + h, dx : dx + w]
    return (x * (0.8 + 0.4 * torch.rand(()))).clamp(0, 1)


def _dtrain_epochs(args, urls: list[str]):
    """One training epoch of the photo shards through the ShardStream of whichever dtrain is imported."""
    from dtrain.data import ShardIndex, ShardStream
    from dtrain.data.augment import SeededTransform
    from dtrain.data.samples import FieldMap, MappedFormat
    from dtrain.data.sources import count_shards

    index = ShardIndex({"train": dict(count_shards(urls))})

    def dtrain_epoch(epoch: int) -> int:
        stream = ShardStream(
            index,
            "train",
            batch_size=args.batch_size,
            rank=0,
            world_size=1,
            seed=0,
            train=True,
            num_workers=args.workers,
            shuffle_buffer=args.shuffle_buffer,
            transform=SeededTransform(augment, 0),
            sample_format=MappedFormat(FieldMap({"x": "jpg", "y": "cls"})),
        )
        return sum(len(b["y"]) for b in stream.epoch(epoch))

    return dtrain_epoch


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (an epoch's DataLoader workers end with it)."""
    import resource

    return sum(t for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for t in resource.getrusage(who)[:2])


def stream_epochs(args) -> None:
    """(a'): reads an epoch number a line, runs that epoch, prints `samples seconds cpu_seconds` (the
    baseline's side)."""
    import dtrain

    dtrain_epoch = _dtrain_epochs(args, sorted(str(p) for p in Path(args.out).glob("photos-*.tar")))
    print(Path(dtrain.__file__).parents[1], flush=True)  # which dtrain this is
    for line in sys.stdin:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        n = dtrain_epoch(int(line))
        print(n, time.perf_counter() - t0, _cpu_seconds() - c0, flush=True)


class _Baseline:
    """Another dtrain's `stream-epochs` in a python of its own, its epochs run one at a time on request."""

    def __init__(self, args, root: Path):
        cmd = [sys.executable, __file__, "stream-epochs", "--out", str(root)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch_size", "workers", "shuffle_buffer")
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.baseline, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.where, self.seconds, self.cpu = self.proc.stdout.readline().strip(), 0.0, 0.0

    def __call__(self, epoch: int) -> int:
        self.proc.stdin.write(f"{epoch}\n")
        self.proc.stdin.flush()
        n, seconds, cpu = self.proc.stdout.readline().split()
        self.seconds, self.cpu = float(seconds), float(cpu)
        return int(n)


def pipeline(args) -> None:
    import webdataset as wds

    root = Path(args.out or tempfile.mkdtemp(prefix="dtrain-pipeline-"))
    urls = _photo_shards(root, args.images, args.size, args.shard_size)
    batches = args.images // args.batch_size
    dtrain_epoch = _dtrain_epochs(args, urls)

    def hand_epoch(epoch: int) -> int:
        dataset = (
            wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
            .shuffle(args.shuffle_buffer)
            .decode("torchrgb")
            .to_tuple("jpg", "cls")
            .map_tuple(augment, lambda y: y)
            .batched(args.batch_size)
        )
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)
        n = 0
        for _, y in loader:
            n += len(y)
            if n >= batches * args.batch_size:
                break
        return n

    runs = {"hand": hand_epoch, "dtrain": dtrain_epoch}
    if args.baseline:
        runs["baseline"] = _Baseline(args, root)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    per_cpu: dict[str, list[float]] = {k: [] for k in runs}  # samples per CPU second
    for rep in range(-1, args.reps):  # rep -1: warm-up (page cache, imports, first workers)
        for name, run in list(runs.items()) if rep % 2 else list(reversed(runs.items())):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            n = run(rep)
            seconds, cpu = (
                (run.seconds, run.cpu) if name == "baseline" else (time.perf_counter() - t0, _cpu_seconds() - c0)
            )
            if rep >= 0:
                rates[name].append(n / seconds)
                per_cpu[name].append(n / cpu)
    h, d = statistics.median(rates["hand"]), statistics.median(rates["dtrain"])
    ratio = statistics.median(b / a for a, b in zip(rates["hand"], rates["dtrain"]))
    print(
        f"(a) {args.images} jpg {args.size}x{args.size} in {len(urls)} shards, batch {args.batch_size}, "
        f"{args.workers} workers, decode + augment in the workers; {args.reps} interleaved repetitions (median)"
    )
    print("| pipeline | samples/s | ratio |")
    print("|---|---:|---:|")
    print(f"| webdataset + DataLoader, hand-written | {h:.0f} | 1.00 |")
    print(f"| dtrain ShardStream (seeded transform, exact epoch) | {d:.0f} | {ratio:.2f} |")
    if args.baseline:
        b = statistics.median(rates["baseline"])
        after = statistics.median(d / b for b, d in zip(rates["baseline"], rates["dtrain"]))
        print(
            f"| dtrain ShardStream of {runs['baseline'].where} (baseline) | {b:.0f} | "
            f"{statistics.median(x / y for y, x in zip(rates['hand'], rates['baseline'])):.2f} |"
        )
        print(
            f"this dtrain / baseline: {after:.3f} (median of the per-repetition ratios); per CPU second: "
            f"{statistics.median(per_cpu['dtrain']):.0f} / {statistics.median(per_cpu['baseline']):.0f} samples = "
            f"{statistics.median(d / b for b, d in zip(per_cpu['baseline'], per_cpu['dtrain'])):.3f}"
        )
        runs["baseline"].proc.stdin.close()
        runs["baseline"].proc.wait()
    print(
        "  (per repetition, samples/s: " + ", ".join(f"{k} {[round(r) for r in v]}" for k, v in rates.items()) + ")",
        file=sys.stderr,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hand")
    h.add_argument("--steps", type=int, required=True)
    t = sub.add_parser("train")
    t.add_argument("--ranks", default="1,2")
    t.add_argument("--warm", type=int, default=60)
    t.add_argument("--delta", type=int, default=3000)
    t.add_argument("--reps", type=int, default=9)
    t.add_argument("--out", default=None)
    t.add_argument("dtrain_overrides", nargs="*", help="extra dtrain config overrides, e.g. data.in_memory=false")
    i = sub.add_parser("interleaved")
    i.add_argument("--epochs", type=int, default=300)
    i.add_argument("--out", default=None)
    i.add_argument("dtrain_overrides", nargs="*")
    a = sub.add_parser("pipeline")
    a.add_argument("--images", type=int, default=2048)
    a.add_argument("--size", type=int, default=64)
    a.add_argument("--shard-size", type=int, default=256)
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--shuffle-buffer", type=int, default=500)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--out", default=None)
    a.add_argument("--baseline", default=None, help="a checkout of another dtrain whose ShardStream to time too")
    e = sub.add_parser("stream-epochs")  # (a')'s other side, started by `pipeline --baseline`
    e.add_argument("--out", required=True)
    for name, default in (("--batch-size", 64), ("--workers", 2), ("--shuffle-buffer", 500)):
        e.add_argument(name, type=int, default=default)
    args = p.parse_args()
    {"hand": hand, "train": train, "interleaved": interleaved, "pipeline": pipeline, "stream-epochs": stream_epochs}[
        args.what
    ](args)


if __name__ == "__main__":
    main()
