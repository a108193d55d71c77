"""Bytes of parameters + gradients + optimizer state each rank holds, per engine (DDP, ZeRO-1/2/3, FSDP),
for the GPT example: the ZeRO paper's model-state accounting, measured on the engines' real tensors.

Run under torchrun, one engine per job (DeepSpeed patches modules it partitions); rank 0 prints one JSON
line with the largest rank's bytes:

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 benchmarks/memory.py --engine zero3
    benchmarks/memory.sh            # every engine on 2 and 4 ranks, then a markdown table

What is counted (unique storages, so a tensor viewed twice or a tied weight counts once), after one
optimizer step and the backward of the next (gradients and optimizer state both exist then):
  ddp, fsdp   the model's parameters and their .grad (FSDP: this rank's DTensor shards), optimizer.state
  zero1/2     the model's parameters (full: DeepSpeed's flat buffers), the fp32 master partition, the
              gradients held (full .grad, reduced partitions), the inner optimizer's state
  zero3       the parameter partitions (ds_tensor), the fp32 master partition, the gradient partitions,
              the inner optimizer's state
Activations, communication buckets and the CPU allocator's slack are not model state and not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from dtrain import dist
from dtrain.config import DeepSpeedConfig, FSDPConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from dtrain.engine import build_engine
from dtrain.models import build_model
from dtrain.optim import build_optimizer, build_scheduler

ENGINES = ["ddp", "zero1", "zero2", "zero3", "fsdp"]


def storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of tensors (a DTensor: its local shard)."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)  # the shard itself (to_local() may return an autograd view)
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def state_tensors(optimizer) -> list:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def held(engine, name: str) -> dict[str, dict[int, int]]:
    """{category: {storage: bytes}} of the model state this rank holds."""
    params = list(engine.module.parameters())
    if name in ("ddp", "fsdp"):
        return {
            "params": storages(params),
            "grads": storages(p.grad for p in params),
            "optimizer": storages(state_tensors(engine.optimizer)),
        }
    zero = engine.optimizer  # DeepSpeed's ZeRO optimizer around dtrain's AdamW
    if name == "zero3":
        masters = zero.fp32_partitioned_groups_flat
        return {
            "params": {**storages(p.ds_tensor for p in params), **storages(masters)},
            "grads": {
                **storages([zero.grad_partitions_flat_buffer]),
                **storages(m.grad for m in masters),
                **storages(g for gs in zero.averaged_gradients.values() for g in gs),
            },
            "optimizer": storages(state_tensors(zero.optimizer)),
        }
    masters = zero.single_partition_of_fp32_groups
    return {
        "params": {**storages(params), **storages(masters)},
        "grads": {
            **storages(p.grad for p in params),
            **storages(m.grad for m in masters),
            **storages(g for gs in zero.averaged_gradients.values() for g in gs),
        },
        "optimizer": storages(state_tensors(zero.optimizer)),
    }


def measure(args, info) -> dict:
    model_cfg = ModelConfig(
        factory="gpt",
        kwargs=dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=args.vocab, dropout=0.0),
    )
    model = build_model(model_cfg, {"input_shape": (args.seq_len,), "num_outputs": args.vocab}, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    train_cfg = TrainConfig(
        engine={"ddp": "ddp", "fsdp": "fsdp"}.get(args.engine, "deepspeed"),
        precision=args.precision,
        compile=False,
        clip_grad_norm=1.0,
    )
    stage = int(args.engine[-1]) if args.engine.startswith("zero") else 2
    engine = build_engine(
        model,
        lambda m: build_optimizer(OptimConfig(), m),
        lambda o: build_scheduler(ScheduleConfig(name="constant"), o, 10),
        train_cfg,
        info,
        DeepSpeedConfig(zero_stage=stage),
        args.batch_size,
        fsdp_cfg=FSDPConfig(),
        log=lambda m: None,
    )
    g = torch.Generator().manual_seed(info.global_rank)
    for step in range(2):
        x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
        with engine.no_backward_sync(True):
            logits = engine.model(x)
            engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()))
        if step == 0:
            engine.step()
    found = held(engine, args.engine)
    parts = [sum(found[k].values()) for k in ("params", "grads", "optimizer")]
    mine = torch.tensor([*parts, sum(parts)], dtype=torch.float64)
    dist.all_reduce_max(mine)  # the rank holding the most (shards can be uneven); the total of one rank
    params, grads, optimizer, total = mine.tolist()
    return {
        "engine": args.engine,
        "precision": args.precision,
        "ranks": info.world_size,
        "n_params": n_params,
        "params_bytes": params,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "total_bytes": total,
    }


def print_table(lines) -> None:
    rows = [json.loads(l) for l in lines if l.startswith("{")]
    ddp = {r["ranks"]: r["total_bytes"] for r in rows if r["engine"] == "ddp" and r["precision"] == "fp32"}
    print("| ranks | engine | precision | params MB | grads MB | optimizer MB | total MB per rank | / DDP | x ranks |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["ranks"], ENGINES.index(r["engine"]), r["precision"])):
        ratio = r["total_bytes"] / ddp[r["ranks"]] if r["ranks"] in ddp else float("nan")
        print(
            f"| {r['ranks']} | {r['engine']} | {r['precision']} | {r['params_bytes'] / 1e6:.1f} | {r['grads_bytes'] / 1e6:.1f} | "
            f"{r['optimizer_bytes'] / 1e6:.1f} | {r['total_bytes'] / 1e6:.1f} | {ratio:.3f} | "
            f"{ratio * r['ranks']:.2f} |"
        )
    n = next(iter(rows))["n_params"] if rows else 0
    print(
        f"\n{n / 1e6:.1f}M parameters, AdamW; `/ DDP` against fp32 DDP on as many ranks; `x ranks` = "
        "(per-rank bytes / DDP's) x ranks: 1.00 is a perfect 1/N partition (the target is <= 1.10 for ZeRO-3 and FSDP)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=ENGINES)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="train.precision: bf16 makes DeepSpeed keep bf16 parameters beside its fp32 master copy "
        "(FSDP's and DDP's persistent state stays fp32 either way)",
    )
    p.add_argument("--table", action="store_true", help="read the JSON lines of runs from stdin, print a table")
    args = p.parse_args()
    if args.table:
        return print_table(sys.stdin)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = dist.setup()
    result = measure(args, info)
    if info.is_global_zero:
        print(json.dumps(result), flush=True)
    dist.teardown(True)


if __name__ == "__main__":
    main()
