"""`dtrain train | shard | eval | config`. User errors end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _train(args) -> int:
    import torch

    from . import dist
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.debug:
        launch = dist.detect()
        if launch.world_size > 1:
            raise dist.LaunchError(f"launcher: --debug runs one process, but this is rank {launch.global_rank} of "
                                   f"{launch.world_size} ({launch.mode}); run `dtrain train --debug` without "
                                   "torchrun or srun (launch/debug.sh does)")
        # one process, data in the main process, anomaly detection, per-step detail
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 0}),
                                     "log": cfg.log.model_copy(update={"progress": False})})
        torch.autograd.set_detect_anomaly(True)
    info = dist.setup(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.connect_timeout_s, force_single=args.debug)
    finished = False
    try:
        if info.is_global_zero:
            print(info.describe(), file=sys.stderr, flush=True)
        trainer = Trainer(cfg, info, debug=args.debug)
        if info.is_global_zero:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            (trainer.run_dir / "config.yaml").write_text(cfg.to_yaml())
        result = trainer.fit()
        if info.is_global_zero:
            print(json.dumps(result))
        finished = True
    finally:
        dist.teardown(finished)
    return 0


def _shard(args) -> int:
    from .data import make_builtin

    index = make_builtin(args.dataset, args.out, args.shard_size, seed=args.seed)
    for split, shards in index.splits.items():
        print(f"{split}: {sum(shards.values())} samples in {len(shards)} shards")
    print(f"wrote {args.out}/index.json")
    return 0


def _eval(args) -> int:
    from . import dist
    from .checkpoint import safe_load, verify
    from .config import Config
    from .trainer import Trainer

    path = Path(args.checkpoint)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory: its best, else latest
        path = next((path / "checkpoints" / n for n in ("best", "latest") if (path / "checkpoints" / n).exists()), path)
    verify(path)
    state = safe_load(path / "state.pt")
    cfg = Config.model_validate(state["config"])
    info = dist.setup(force_single=True)
    trainer = Trainer(cfg, info)
    trainer.engine.module.load_state_dict(state["engine"]["model"])
    stream = {"train": trainer.train_data, "val": trainer.val_data, "test": trainer.test_data}[args.split]
    if args.split == "train":
        stream = type(stream)(stream.index, "train", batch_size=stream.batch_size, rank=0, world_size=1)
    metrics = trainer.evaluate(stream, args.split)
    width = max(map(len, metrics))
    print(f"checkpoint {path.resolve()} (step {state['trainer']['step']}), split {args.split}")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.6g}")
    return 0


def _config(args) -> int:
    from .config import describe_fields, load_config

    if args.describe:
        print("\n".join(describe_fields()))
    else:
        print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain", description="Distributed data-parallel training with PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (one worker; start several with torchrun or srun)")
    t.add_argument("--config", help="YAML config (defaults: the digits example)")
    t.add_argument("--debug", action="store_true",
                   help="one process, no data workers, anomaly detection, train.debug_steps steps with per-step detail")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=0.01")
    t.set_defaults(func=_train)

    s = sub.add_parser("shard", help="write train/val/test webdataset shards and their index")
    s.add_argument("--dataset", required=True, help="built-in data set: digits, count")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--shard-size", type=int, default=250, help="samples per shard (default 250)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split and of generated data")
    s.set_defaults(func=_shard)

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a run directory's best) on a split")
    e.add_argument("--checkpoint", required=True, help="checkpoints/step-N directory, or a run directory")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.set_defaults(func=_eval)

    c = sub.add_parser("config", help="print the resolved config, or every key with its documentation")
    c.add_argument("--config")
    c.add_argument("--describe", action="store_true", help="list every key, its default and what it does")
    c.add_argument("overrides", nargs="*", metavar="key.sub=value")
    c.set_defaults(func=_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .dist import LaunchError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, LaunchError, CheckpointError) as e:
        print(f"dtrain: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
