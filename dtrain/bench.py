"""`dtrain bench`: how much dtrain costs over a hand-written loop doing the same work, in one process.

  (a) hand-written loop   the same model (same config and seed), AdamW, clipping, autocast and compile
                          settings, on the same in-memory batches: what a minimal script would do
  (b) dtrain, synthetic   dtrain's own training loop (Trainer.train_epoch) on those in-memory batches
  (c) dtrain, shards      the same loop fed by webdataset shards (ShardStream, as in `dtrain train`)
  (d) checkpointing       (b) with a checkpoint every K steps, synchronous and async_save

Segments are interleaved (a, b, c, d..., b, c, d..., a, ...: rotated each repetition) so that machine noise
hits them alike, and
each ratio to (a) is the median of the per-repetition ratios. The stall of a save is the extra wall
time of a (d) segment over the (b) segment of the same repetition, per save.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from . import dist
from .config import ModelConfig, OptimConfig, TrainConfig, load_config
from .engine.single import pick_dtype, should_compile
from .models import build_model, has_convolutions

DATASETS = {"gpt": "text", "mlp": "digits", "cnn": "count"}


def bench_config(args, root: Path, name: str, overrides: list[str] = ()):
    o = [
        f"run.dir={root / 'runs'}",
        f"run.name={name}",
        f"data.root={root / 'data'}",
        f"data.dataset={DATASETS[args.model]}",
        f"model.factory={args.model}",
        f"data.batch_size={args.batch_size}",
        f"train.compile={str(args.compile).lower()}",
        f"train.precision={args.precision}",
        f"train.log_every={args.steps}",
        "schedule.name=constant",
        "log.progress=false",
        "checkpoint.save_best=false",
        "data.shuffle_buffer=100",
        f"data.num_workers={args.num_workers}",
        "data.in_memory=false",
    ]  # (c) measures reading shards, not the in-memory copy small data sets get
    if args.model == "gpt":
        windows = args.batch_size * (args.steps + 4) * 2  # enough for a couple of segments per epoch
        o += [
            f"data.text_context={args.seq_len}",
            f"data.text_bytes={max(200_000, windows * (args.seq_len + 1))}",
            f"model.kwargs.n_layer={args.n_layer}",
            f"model.kwargs.n_head={args.n_head}",
            f"model.kwargs.n_embd={args.n_embd}",
        ]
        if args.vocab:
            o.append(f"model.kwargs.vocab_size={args.vocab}")
    elif args.model == "cnn":
        o += ["data.count_samples=6000", "data.shard_size=350"]  # the example's size: ~90 steps per epoch
    return load_config(None, [*o, *overrides])


def synthetic_batches(args, input_shape, vocab: int, task: str, pin: bool, n: int = 8) -> list:
    """`n` distinct in-memory batches (x, y, keys), cycled: no loading cost at all."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        if task == "lm":
            x = torch.randint(0, vocab, (args.batch_size, input_shape[-1]), generator=g)
            y = torch.randint(0, vocab, (args.batch_size, input_shape[-1]), generator=g)
        else:
            x = torch.rand(args.batch_size, *input_shape, generator=g)
            y = torch.randint(0, 10, (args.batch_size,), generator=g)
            y = y.float() if task == "regression" else y
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        out.append((x, y, [f"synthetic-{i}-{j}" for j in range(args.batch_size)]))
    return out


class HandWrittenLoop:
    """What a minimal training script does: model, AdamW, autocast, clip, step, zero_grad(set_to_none)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        train: TrainConfig,
        seed: int,
        input_shape,
        out_features: int,
        task: str,
        device: torch.device,
    ):
        facts = {"input_shape": input_shape, "num_outputs": out_features}
        self.model = build_model(model_cfg, facts, seed).to(device)
        self.channels_last = (
            has_convolutions(self.model) and device.type == "cuda" and model_cfg.channels_last is not False
        )  # auto or true
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if should_compile(train.compile, device) else self.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, betas=optim.betas, fused=True if device.type == "cuda" else None
        )
        self.dtype, self.device, self.task, self.clip = (
            pick_dtype(train.precision, device),
            device,
            task,
            train.clip_grad_norm,
        )

    def run(self, batches: Iterator) -> None:
        for x, y, _ in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
            with ctx:
                pred = self.forward(x)
                if self.task == "regression":
                    loss = F.mse_loss(pred.squeeze(-1), y)
                else:
                    loss = F.cross_entropy(pred.flatten(0, -2), y.flatten())
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle_epochs(stream) -> Iterator:
    for epoch in itertools.count():
        yield from stream.epoch(epoch)


def run_bench(args, out=print) -> dict:
    from .trainer import Trainer  # imports the data stack; keep `dtrain --help` fast

    device = (
        torch.device(args.device)
        if args.device
        else (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = dist.DistInfo("single", 0, 0, 1, device, None)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dtrain-bench-"))
    k = args.ckpt_every

    trainers = {"b": Trainer(bench_config(args, root, "synthetic"), info)}
    trainers["d_sync"] = Trainer(bench_config(args, root, "ckpt-sync", [f"checkpoint.every={k}"]), info)
    trainers["d_async"] = Trainer(
        bench_config(args, root, "ckpt-async", [f"checkpoint.every={k}", "checkpoint.async_save=true"]), info
    )
    base = trainers["b"]
    index_shape, vocab, task = base.facts.input_shape, base.facts.num_outputs, base.facts.task
    save_times: dict[str, list[float]] = {"d_sync": [], "d_async": []}
    for key, t in trainers.items():
        t.run_dir.mkdir(parents=True, exist_ok=True)
        t.feed.total_steps = t.feed.steps_per_epoch = 10**12  # no last step, no end-of-epoch validation while timing
        if key in save_times:
            _time_saves(t, save_times[key])
    c = base.cfg
    hand = HandWrittenLoop(c.model, c.optim, c.train, c.run.seed, index_shape, vocab, task, device)
    batches = synthetic_batches(args, index_shape, vocab, task, pin=device.type == "cuda")
    shard_batches = _cycle_epochs(base.feed.stream)

    def dtrain_on(trainer, source) -> Callable[[int], None]:
        return lambda n: trainer.train_epoch(itertools.islice(source, n), epoch=0)

    synthetic = itertools.cycle(batches)
    segments = {
        "a": ("(a) hand-written loop", lambda n: hand.run(itertools.islice(synthetic, n))),
        "b": ("(b) dtrain, synthetic batches", dtrain_on(base, synthetic)),
        "c": ("(c) dtrain, webdataset shards", dtrain_on(base, shard_batches)),
        "d_sync": (f"(d) dtrain + sync checkpoint every {k}", dtrain_on(trainers["d_sync"], synthetic)),
        "d_async": (f"(d) dtrain + async checkpoint every {k}", dtrain_on(trainers["d_async"], synthetic)),
    }
    seconds: dict[str, list[float]] = {key: [] for key in segments}
    saves: dict[str, list[int]] = {"d_sync": [], "d_async": []}
    order = list(segments)
    for rep in range(-1, args.reps):  # rep -1: warm-up (compilation, allocator, first DataLoader), not timed
        # rotate the order every repetition, so no segment always runs first (or right after a save)
        for key in order[max(rep, 0) % len(order) :] + order[: max(rep, 0) % len(order)]:
            run = segments[key][1]
            n = args.warmup if rep < 0 else args.steps
            before = len(save_times.get(key, []))
            _sync(device)
            t0 = time.perf_counter()
            run(n)
            _sync(device)
            elapsed = time.perf_counter() - t0
            if key in trainers:
                trainers[key].checkpointer.wait()  # an async save still in flight finishes outside the timed part
            if rep >= 0:
                seconds[key].append(elapsed)
                if key in saves:
                    saves[key].append(len(save_times[key]) - before)
    for t in trainers.values():
        t.checkpointer.wait()

    tokens_per_sample = index_shape[-1] if task == "lm" else 1
    per_step = args.batch_size * tokens_per_sample
    rows = []
    for key, (label, _) in segments.items():
        ratios = [a / s for a, s in zip(seconds["a"], seconds[key])]  # same work: time ratio = speed ratio
        med = statistics.median(seconds[key])
        rows.append(
            {
                "run": label,
                "key": key,
                "tokens_per_s": per_step * args.steps / med,
                "samples_per_s": args.batch_size * args.steps / med,
                "step_ms": 1e3 * med / args.steps,
                "ratio": statistics.median(ratios),
            }
        )
    stalls = {}
    for key in ("d_sync", "d_async"):
        per_rep = [(d - b) / max(n, 1) for d, b, n in zip(seconds[key], seconds["b"], saves[key])]
        stalls[key] = {
            "stall_ms": 1e3 * statistics.median(per_rep),
            "saves_per_segment": saves[key][0],
            "save_call_ms": 1e3 * statistics.median(save_times[key]) if save_times[key] else None,
        }
    flops = base.meter.flops_per_sample
    result = {
        "model": args.model,
        "params": sum(p.numel() for p in base.engine.module.parameters()),
        "device": _device_name(device),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "seq_len": index_shape[-1] if task == "lm" else None,
        "compile": bool(args.compile),
        "precision": args.precision,
        "steps": args.steps,
        "reps": args.reps,
        "ckpt_every": k,
        "flops_per_sample": flops,
        "rows": rows,
        "checkpoint_stall": stalls,
        "dir": str(root),
        # the shard-feeding target compares (c) with (b): the same loop, only the batches' source differs
        "shards_vs_synthetic": statistics.median(b / c for b, c in zip(seconds["b"], seconds["c"])),
    }
    peak = base.meter.peak
    if peak and flops:
        for r in rows:
            r["mfu"] = flops * r["samples_per_s"] / peak
    out(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _time_saves(trainer, sink: list[float]) -> None:
    """Record how long each checkpoint save blocks the loop (for async: the CPU snapshot + waiting on the last)."""
    save = trainer.checkpointer.save_run

    def timed(step: int, best: bool = False) -> None:
        t0 = time.perf_counter()
        save(step, best)
        sink.append(time.perf_counter() - t0)

    trainer.checkpointer.save_run = timed


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(r: dict) -> str:
    shape = f"batch {r['batch_size']}" + (f" x seq {r['seq_len']}" if r["seq_len"] else "")
    lines = [
        f"dtrain bench: {r['model']} ({r['params'] / 1e6:.3g}M params), {shape}, {r['device']}, "
        f"torch {r['torch']}, compile {'on' if r['compile'] else 'off'}, precision {r['precision']}, "
        f"{r['steps']} steps x {r['reps']} interleaved reps (medians)",
        "| run | tokens/s | samples/s | step ms | MFU | ratio to (a) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        lines.append(
            f"| {row['run']} | {row['tokens_per_s']:.0f} | {row['samples_per_s']:.1f} | "
            f"{row['step_ms']:.2f} | {mfu} | {row['ratio']:.3f} |"
        )
    lines.append(f"(c) shards / (b) synthetic: {r['shards_vs_synthetic']:.3f}")
    s, a = r["checkpoint_stall"]["d_sync"], r["checkpoint_stall"]["d_async"]
    frac = a["stall_ms"] / s["stall_ms"] if s["stall_ms"] > 0 else float("nan")
    lines.append(
        f"checkpoint every {r['ckpt_every']} steps: stall per save sync {s['stall_ms']:.1f} ms, "
        f"async {a['stall_ms']:.1f} ms (async/sync {frac:.3f}); save() blocks the loop "
        f"{s['save_call_ms'] or 0:.1f} ms sync, {a['save_call_ms'] or 0:.1f} ms async"
    )
    return "\n".join(lines)
