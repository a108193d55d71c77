"""Fault-injection target, run under torchrun: FSDP checkpoints saved back to back (each rank writing its
DCP shards) until a rank is killed. Each step's weights are a pure function of the step, so a resumed
job can check what it loaded. Rank 0 prints `ready STEP` once it has resumed (and checked) that step.

    torchrun --nproc-per-node 2 tests/fsdp_save_loop.py ROOT [--async]
"""

import sys
from pathlib import Path

import torch
from torch import nn

from dtrain import dist
from dtrain.checkpoint import Checkpointer
from dtrain.config import FSDPConfig, TrainConfig
from dtrain.engine import build_engine


def fill(engine, step: int) -> None:
    """Every parameter (this rank's shard of it) = step."""
    with torch.no_grad():
        for p in engine.module.parameters():
            p.to_local().fill_(float(step))


def main(root: Path, async_save: bool) -> None:
    info = dist.setup("gloo", timeout_s=60)
    model = nn.Sequential(nn.Linear(1500, 1500), nn.Linear(1500, 1500))  # 4.5M parameters, 54 MB with AdamW
    engine = build_engine(
        model,
        lambda m: torch.optim.AdamW(m.parameters()),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
        TrainConfig(engine="fsdp"),
        info,
        fsdp_cfg=FSDPConfig(),
        log=lambda m: None,
    )
    ckpt = Checkpointer(
        root, keep_last=2, dist_info=info, config_hash="test", async_save=async_save, group=dist.new_cpu_group(60)
    )
    found = ckpt.load_latest(lambda m: print(m, file=sys.stderr, flush=True))
    step = 0
    if found:
        path, state, _ = found
        engine.load_from(path, state["engine"])
        step = state["step"]
        for p in engine.module.parameters():
            assert torch.equal(p.full_tensor(), torch.full(p.shape, float(step))), f"{path} is not step {step}"
    if info.is_global_zero:
        print("ready", step, flush=True)
    while True:
        step += 1
        fill(engine, step)
        ckpt.save(
            step, {"engine": engine.state_dict(), "step": step}, {"rank": info.global_rank}, write_files=engine.save_to
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--async" in sys.argv)
