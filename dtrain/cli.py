"""`dtrain train | launch | shard | index | eval | predict | export | plot | augment-preview | config | bench | doctor`. User errors end with one line on stderr
and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `dtrain --help` imports no torch
    from .build import Hooks
    from .result import FitResult

EXIT_USER_ERROR = 2
EXIT_FAILED = 1  # a rank stalled or died: CollectiveError


def _train(args) -> int:
    return _fit(args, print_outcome=True).exit_code


def _fit(args: argparse.Namespace, print_outcome: bool = False) -> FitResult:
    """`dtrain train` as `args` say (dtrain.run). -> the run's FitResult, on every rank."""
    from .config import load_config
    from .data import check_first_sample
    from .run import run

    cfg = load_config(args.config, args.overrides, args.defaults)
    if getattr(args.hooks, "sample", None) is None:  # a script's own sample function is seen per sample
        check_first_sample(cfg.data)  # a data.sample field the shards lack: one line before torch is imported
    return run(
        cfg,
        args.hooks,
        debug=args.debug,
        command=_train_command(args),
        program=_program(args),
        print_outcome=print_outcome,
    )


def _train_command(args) -> list[str]:
    """The command that goes on with this run: `dtrain launch`'s own (it sets DTRAIN_LAUNCH_COMMAND), or this
    process's (under torchrun or srun: the same launcher before it)."""
    if os.environ.get("DTRAIN_LAUNCH_COMMAND"):
        return shlex.split(os.environ["DTRAIN_LAUNCH_COMMAND"])
    if args.hooks is not None:  # a script through dtrain.main
        return [*_program(args), *sys.argv[1:]]
    return ["dtrain", "train", *(a for c in args.config or () for a in ("--config", c)), *args.overrides]


def _program(args) -> tuple[str, ...]:
    """What runs this run's other commands (`eval`, `export`): a script of one's own, as python runs it (only it
    can rebuild the model it handed in), else dtrain."""
    return ("python", sys.argv[0]) if args.hooks is not None else ("dtrain",)


def _doctor(args) -> int:
    from .config import load_config
    from .build import Hooks, build_data, build_model_for
    from .run import check_health, session

    cfg = load_config(args.config, args.overrides, args.defaults)
    hooks = args.hooks or Hooks()
    cfg = hooks.record(cfg)
    with session(cfg.dist) as info:
        model = build_model_for(cfg, build_data(cfg, info, hooks).facts, hooks, lambda msg: None)
        check_health(cfg, info, Path(cfg.run.dir) / cfg.run.name, model, brief=False, hooks=hooks)
    return 0


def _shard(args) -> int:
    from .config import ConfigError
    from .data import make_builtin

    if (args.dataset is None) == (args.from_folder is None):
        raise ConfigError("shard: give one of --dataset NAME and --from-folder DIR")
    if args.from_folder:
        from .data.folder import shard_folder

        index = shard_folder(
            args.from_folder,
            args.out,
            args.shard_size,
            val=args.val_fraction,
            test=args.test_fraction,
            seed=args.seed,
            progress=True,
        )
        print(f"{len(index.classes)} classes: {', '.join(index.classes)}")
    else:
        params = {"context": args.context, "num_bytes": args.text_bytes} if args.dataset == "text" else {}
        index = make_builtin(args.dataset, args.out, args.shard_size, seed=args.seed, progress=True, **params)
    for split, shards in index.splits.items():
        print(f"{split}: {sum(shards.values())} samples in {len(shards)} shards")
    print(f"wrote {', '.join(f'{args.out}/{split}.json' for split in index.splits)}")
    return 0


def _index(args) -> int:
    from .data.sources import count_shards, descriptor, write_descriptor

    shards = count_shards(args.patterns, jobs=args.jobs, progress=True)
    write_descriptor(descriptor(shards, args.out), args.out)
    print(f"{len(shards)} shard{'s' * (len(shards) != 1)}, {sum(n for _, n in shards)} samples: wrote {args.out}")
    return 0


def _load_for_eval(path_arg: str):
    from .load import read_checkpoint

    return read_checkpoint(path_arg)


# What evaluation never uses (it runs the loss and metrics, not the optimizer, schedule, augmentation or
# callbacks): emptied first, so their stored import strings need not be named again (a run of
# optim.name=torch.optim:RAdam asked `dtrain eval` to name it); the user's overrides still come after.
EVAL_UNUSED = (
    "data.transform=null",
    "optim.name=adamw",
    "optim.kwargs={}",
    "schedule.name=constant",
    "schedule.kwargs={}",
    "run.callbacks=[]",
)


def _stored_config(args, stored: dict, source: Path):
    from .load import stored_config

    return stored_config(
        stored,
        source,
        args.config,
        [*EVAL_UNUSED, *args.overrides],
        args.defaults,
        args.hooks,
        args.trust_checkpoint_code,
    )


def _eval(args) -> int:
    from . import dist
    from .build import build_core
    from .config import ConfigError

    path, state = _load_for_eval(args.checkpoint)
    cfg = _stored_config(args, state["config"], path)
    # the weights come from the checkpoint: don't reload the run's pretrained source (it may be gone);
    # evaluation needs no DeepSpeed or FSDP, whichever engine trained it
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"init_from": None}),
            "train": cfg.train.model_copy(update={"engine": "ddp"}),
        }
    )
    core = build_core(cfg, dist.setup(force_single=True), args.hooks, log=lambda msg: None)
    core.engine.module.load_state_dict(state["engine"]["model"])
    data = core.data
    stream = {"train": data.feed.stream, "val": data.val, "test": data.test}[args.split]
    if stream is None:
        raise ConfigError(f"eval: the run's data has no '{args.split}' split")
    if args.split == "train":  # one unshuffled, unaugmented pass
        stream = type(stream)(
            stream.index,
            "train",
            batch_size=stream.batch_size,
            rank=0,
            world_size=1,
            sample_format=stream.format,
            in_memory=stream.memory or False,
        )
    metrics = core.evaluator.evaluate(stream, args.split, progress=cfg.log.progress)
    width = max(map(len, metrics))
    print(f"checkpoint {path.resolve()} (step {state['trainer']['step']}), split {args.split}")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.6g}")
    if data.facts.task == "classification" and data.facts.num_outputs:  # classes unknown: no matrix
        print(
            format_confusion(core.evaluator.confusion_matrix(stream, data.facts.num_outputs, progress=cfg.log.progress))
        )
    return 0


def _export(args) -> int:
    from .export import export

    return export(
        args.checkpoint,
        Path(args.out),
        args.format,
        config=args.config,
        overrides=args.overrides,
        defaults=args.defaults,
        hooks=args.hooks,
        trusted=args.trust_checkpoint_code,
    )


def format_confusion(cm) -> str:
    """Rows: true class; columns: predicted class."""
    k = cm.shape[0]
    width = max(4, len(str(int(cm.max()))) + 1)
    lines = [
        "confusion matrix (rows: true class, columns: predicted)",
        " " * 6 + "".join(f"{c:>{width}}" for c in range(k)),
    ]
    lines += [f"  {r:>3} " + "".join(f"{int(cm[r, c]):>{width}}" for c in range(k)) for r in range(k)]
    return "\n".join(lines)


def _plot(args) -> int:
    from .config import ConfigError
    from .plot import plot_run, plot_schedule

    if args.lr:
        from .config import load_config

        cfg = load_config(args.target, args.overrides)
        out = args.out or str(Path(cfg.run.dir) / cfg.run.name / "plots" / "lr_schedule.png")
        data = plot_schedule(cfg, out, world_size=args.world_size)
        lrs = data["lr"] if "lr" in data else data["lr/head"]
        print(
            f"{cfg.schedule.name} schedule over {data['total_steps']} steps "
            f"(peak {max(lrs):.3g}, last {lrs[-1]:.3g}): wrote {data['file']}"
        )
        return 0
    if args.overrides:
        raise ConfigError("plot: overrides only apply with --lr CONFIG")
    result = plot_run(args.target, args.out)
    print(f"best checkpoint at step {result['best_step']}, early stop at step {result['early_stop_step']}")
    for name, file in result["files"].items():
        print(f"wrote {file}")
    return 0


def _augment_preview(args) -> int:
    from .config import load_config
    from .plot import augment_preview

    cfg = load_config(args.config, args.overrides)
    result = augment_preview(cfg.augment, cfg.data, cfg.run.seed, args.out, samples=args.samples)
    print(f"wrote {result['file']} ({len(result['keys'])} samples x {len(result['augmented'])} augmented draws)")
    return 0


def _bench(args) -> int:
    from .bench import run_bench
    from .config import ConfigError

    if args.preset == "gpt2-124m":  # the GPU target: GPT-2 124M, B=16, T=1024, bf16, compiled
        args.model, args.n_layer, args.n_head, args.n_embd, args.vocab = "gpt", 12, 12, 768, 50304
        args.seq_len, args.batch_size, args.precision, args.compile = 1024, 16, "bf16", True
    if args.steps < 1 or args.reps < 1 or args.warmup < 1 or args.ckpt_every < 1:
        raise ConfigError("bench: --steps, --reps, --warmup and --ckpt-every must be >= 1")
    run_bench(args)
    return 0


def _config(args) -> int:
    from .config import Config, ConfigError, describe_fields, load_config

    if args.out and not args.schema:
        raise ConfigError("config: --out FILE goes with --schema")
    if args.schema:  # pydantic's, of draft 2020-12; unknown keys are refused (additionalProperties: false)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Config.model_json_schema()}
        text = json.dumps(schema, indent=2) + "\n"
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
        else:
            print(text, end="")
    elif args.describe:
        print("\n".join(describe_fields() + _describe_factories()))
    else:
        print(load_config(args.config, args.overrides, args.defaults).to_yaml(), end="")
    return 0


def _describe_factories() -> list[str]:
    """dtrain.models.describe_factories(), read from the models' source instead of imported: it imports torch
    (1.5 s and more of `dtrain config --describe`'s 1.7 s). tests/test_cli_fast.py keeps the two the same."""
    import ast

    root = Path(__file__).parent / "models"
    trees = {path.stem: ast.parse(path.read_text()) for path in root.glob("*.py")}
    top = {
        n.targets[0].id: n.value
        for n in trees["__init__"].body
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
    }
    builtin, facts = ast.literal_eval(top["BUILTIN"]), ast.literal_eval(top["FACTS"])
    functions = {n.name: n for tree in trees.values() for n in tree.body if isinstance(n, ast.FunctionDef)}
    lines = []
    for short, spec in builtin.items():
        factory = functions[spec.rpartition(":")[2]]
        params = factory.args.args[len(factory.args.args) - len(factory.args.defaults) :]
        args = [f"{a.arg}={ast.literal_eval(d)!r}" for a, d in zip(params, factory.args.defaults) if a.arg not in facts]
        doc = " ".join((ast.get_docstring(factory) or "").split())
        lines.append(f"model.kwargs (model.factory={short}): {', '.join(args)}  # {doc}")
    return lines


def _completion(args) -> int:
    from .completion import script

    print(script(args.shell, args.parser), end="")
    return 0


def _predict(args) -> int:
    from .predict import predict_command

    return predict_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain", description="Distributed data-parallel training with PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train (one worker; start several with `dtrain launch`, torchrun or srun)",
        epilog="`dtrain config --describe` lists every key with its default and what it does; "
        "`dtrain config [--config FILE] [key=value ...]` prints the resolved config.",
    )
    t.add_argument(
        "--config",
        action="append",
        help="YAML config (defaults: the digits example); given again, "
        "the later file's settings override the earlier's",
    )
    t.add_argument(
        "--debug",
        action="store_true",
        help="one process, no data workers, anomaly detection, train.debug_steps steps with per-step detail",
    )
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=0.01")
    t.set_defaults(func=_train)

    s = sub.add_parser(
        "shard",
        help="write train/val/test webdataset shards and their descriptors: a built-in "
        "data set, or a folder of images (a subfolder per class)",
    )
    s.add_argument("--dataset", help="built-in data set: digits, digits_parity, count, text, photos")
    s.add_argument(
        "--from-folder",
        metavar="DIR",
        help="images in DIR/CLASS/*.jpg|png|... (torchvision's ImageFolder "
        "layout), or in DIR/train/CLASS/..., DIR/val/CLASS/..., DIR/test/CLASS/... to keep that split",
    )
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--shard-size", type=int, default=250, help="samples per shard (default 250)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split and of generated data")
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="--from-folder without split subfolders: this fraction of each class for validation (default 0.15)",
    )
    s.add_argument("--test-fraction", type=float, default=0.15, help="... and this fraction for test (default 0.15)")
    s.add_argument("--context", type=int, default=256, help="text: tokens per sample (default 256)")
    s.add_argument("--text-bytes", type=int, default=1_000_000, help="text: bytes of stdlib source (default 1e6)")
    s.set_defaults(func=_shard)

    i = sub.add_parser(
        "index",
        help="count the samples of webdataset shards (tar headers only) into a shard "
        "descriptor (webdataset's wids shape) that data.train/val/test can name",
    )
    i.add_argument(
        "patterns",
        nargs="+",
        metavar="PATTERN",
        help="shards: paths, brace patterns ('train-{000000..000099}.tar'), pipe: commands or http(s):// URLs",
    )
    i.add_argument("--out", required=True, help="the descriptor to write, e.g. train.json")
    i.add_argument("--jobs", type=int, default=8, help="shards counted at once (default 8)")
    i.set_defaults(func=_index)

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a run directory's best) on a split")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoints/step-N directory, a run directory, or a file from `dtrain export`",
    )
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument(
        "--config",
        action="append",
        help="YAML config over the checkpoint's stored one (e.g. naming "
        "your own model.factory); given again, the later file's settings override the earlier's",
    )
    e.add_argument(
        "--trust-checkpoint-code",
        action="store_true",
        help="run the code the checkpoint's stored config names (import strings such as model.factory, "
        "pipe: shards) even where your command line, --config and script do not name it; only for "
        "files you trust, as with Hugging Face's trust_remote_code",
    )
    e.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides over the checkpoint's stored config, e.g. data.test=other/test.json",
    )
    e.set_defaults(func=_eval)

    x = sub.add_parser(
        "export",
        help="a checkpoint (DeepSpeed ZeRO or FSDP shards too) as what its users load: "
        "one plain file (pt, safetensors) or a Hugging Face directory (hf)",
        epilog="pt: torch.load(FILE, weights_only=True)['model'] (no DeepSpeed or torch.distributed "
        "needed), or `dtrain eval --checkpoint FILE`; safetensors: "
        "safetensors.torch.load_file(FILE) (tied weights stored once); hf: "
        "from_pretrained(DIR) of the model's own class.",
    )
    x.add_argument("--checkpoint", required=True, help="checkpoints/step-N directory, or a run directory (its best)")
    x.add_argument("--out", required=True, help="output file, e.g. model.pt (a new or empty directory for hf)")
    x.add_argument(
        "--format",
        default="pt",
        choices=["pt", "safetensors", "hf"],
        help="pt (default): {'model': fp32 state dict, 'config': dict, 'step': int}; safetensors: the "
        "state dict; hf: the model's save_pretrained (a transformers PreTrainedModel, built from "
        "the stored config: its factory must be named by you, as for eval)",
    )
    x.add_argument(
        "--config",
        action="append",
        help="with --format hf: YAML config over the checkpoint's stored one (e.g. naming the model.factory)",
    )
    x.add_argument(
        "--trust-checkpoint-code",
        action="store_true",
        help="with --format hf: build the model with the code the checkpoint's stored config names even "
        "where your command line and --config do not name it; only for files you trust",
    )
    x.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="with --format hf: config overrides over the checkpoint's stored config, e.g. "
        "model.factory=transformers:GPT2LMHeadModel",
    )
    x.set_defaults(func=_export)

    pl = sub.add_parser("plot", help="PNGs of a run's loss, metrics and LR (or, with --lr, of a config's schedule)")
    pl.add_argument("target", metavar="RUN_DIR|CONFIG", help="a run directory; with --lr, a YAML config")
    pl.add_argument("--lr", action="store_true", help="plot the LR schedule CONFIG would train with, before training")
    pl.add_argument(
        "--out",
        help="output directory (default RUN_DIR/plots); with --lr the PNG file "
        "(default <run dir>/plots/lr_schedule.png)",
    )
    pl.add_argument("--world-size", type=int, default=1, help="with --lr: ranks the run will use (default 1)")
    pl.add_argument("overrides", nargs="*", metavar="key.sub=value", help="with --lr: config overrides")
    pl.set_defaults(func=_plot)

    a = sub.add_parser("augment-preview", help="PNG grid of training samples next to augmented versions")
    a.add_argument("--config", action="append", help="YAML config with an augment: section")
    a.add_argument("--out", default="augment_preview.png", help="PNG file (default augment_preview.png)")
    a.add_argument("--samples", type=int, default=8, help="training samples shown (default 8)")
    a.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a.set_defaults(func=_augment_preview)

    d = sub.add_parser(
        "doctor",
        help="check the cluster before a long job: versions, config, all-reduce, "
        "shards, checkpoint dir, devices (run it like train)",
    )
    d.add_argument("--config", action="append")
    d.add_argument("overrides", nargs="*", metavar="key.sub=value")
    d.set_defaults(func=_doctor)

    b = sub.add_parser("bench", help="throughput of dtrain vs a hand-written loop, shards, checkpoint stalls")
    b.add_argument("--model", default="gpt", choices=["gpt", "mlp", "cnn"], help="gpt: text; mlp: digits; cnn: count")
    b.add_argument(
        "--preset",
        choices=["gpt2-124m"],
        help="gpt2-124m: 12x768, 12 heads, vocab 50304, B=16, T=1024, bf16, compiled (a GPU benchmark)",
    )
    b.add_argument("--steps", type=int, default=20, help="optimizer steps per timed segment (default 20)")
    b.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians are reported (default 3)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps per segment first (default 3)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--seq-len", type=int, default=128, help="gpt: tokens per sample (default 128)")
    b.add_argument("--n-layer", type=int, default=2, help="gpt: blocks (default 2)")
    b.add_argument("--n-head", type=int, default=4, help="gpt: heads (default 4)")
    b.add_argument("--n-embd", type=int, default=128, help="gpt: width (default 128)")
    b.add_argument("--vocab", type=int, default=None, help="gpt: vocabulary (default: bytes, 256)")
    b.add_argument("--compile", action="store_true", help="torch.compile both loops")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--ckpt-every", type=int, default=5, help="(d): checkpoint every N steps (default 5)")
    b.add_argument("--num-workers", type=int, default=0, help="(c): DataLoader workers (default 0)")
    b.add_argument("--out", default=None, help="directory for shards and runs (default: a new temp dir)")
    b.add_argument("--json", default=None, help="also write the results as JSON here")
    b.set_defaults(func=_bench)

    c = sub.add_parser("config", help="print the resolved config, or every key with its documentation")
    c.add_argument("--config", action="append", help="YAML config; given again, the later file overrides")
    c.add_argument("--describe", action="store_true", help="list every key, its default and what it does")
    c.add_argument(
        "--schema",
        action="store_true",
        help="print the config's JSON schema (for editors: YAML "
        "completion and checks, e.g. `# yaml-language-server: $schema=dtrain.schema.json`)",
    )
    c.add_argument("--out", metavar="FILE", help="with --schema: write it to FILE instead")
    c.add_argument("overrides", nargs="*", metavar="key.sub=value")
    c.set_defaults(func=_config)

    pr = sub.add_parser(
        "predict",
        help="run a checkpoint's model over shards on N ranks (launch it like train): "
        "each sample once, outputs keyed by sample key, resumable",
    )
    pr.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoints/step-N directory, a run directory (its best), or a file from `dtrain export`",
    )
    pr.add_argument(
        "--data",
        required=True,
        metavar="DESCRIPTOR|PATTERN",
        help="the shards: a descriptor (.json, as `dtrain index` writes), or a pattern whose counts data.counts holds",
    )
    pr.add_argument("--out", required=True, help="output directory; the same command again resumes into it")
    pr.add_argument(
        "--format",
        default="jsonl",
        choices=["jsonl", "tar"],
        help="jsonl: a JSON line per sample; tar: webdataset shards of KEY.output.npy (default jsonl)",
    )
    pr.add_argument(
        "--part-size",
        type=int,
        default=10000,
        help="samples per part file (at the first batch's end at or past it), each written "
        "atomically: at most what a SIGKILL loses (default 10000)",
    )
    pr.add_argument("--config", action="append", help="YAML config over the checkpoint's stored one")
    pr.add_argument(
        "--trust-checkpoint-code",
        action="store_true",
        help="run the code the checkpoint's stored config names (import strings) even where your "
        "command line, --config and script do not name it; only for files you trust",
    )
    pr.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides over the checkpoint's stored config, e.g. data.eval_batch_size=512",
    )
    pr.set_defaults(func=_predict)

    co = sub.add_parser(
        "completion",
        help="print a shell completion script (commands, options, config keys)",
        epilog="bash: `source <(dtrain completion bash)` (or save it in "
        "~/.local/share/bash-completion/completions/dtrain); zsh: "
        "`source <(dtrain completion zsh)` after `autoload -U compinit && compinit`",
    )
    co.add_argument("shell", choices=["bash", "zsh"])
    co.set_defaults(func=_completion)

    from .ft_launch import add_parser  # dtrain launch (launcher.py), and its --ft mode (ft_launch.py)

    add_parser(sub)
    return p


# dtrain's errors for bad input (config, data, launch, checkpoint, health check, run directory), by module
USER_ERRORS = (
    ("config", "ConfigError"),
    ("data.errors", "DataError"),
    ("dist", "LaunchError"),
    ("checkpoint", "CheckpointError"),
    ("run", "DoctorError"),
    ("runlock", "RunDirError"),
)


def user_errors() -> tuple[type[Exception], ...]:
    """dtrain's errors for bad input (config, data, launch, checkpoint, health check, run directory): one line
    naming the problem and the fix; `dtrain ...` prints it and exits 2."""
    import importlib

    return tuple(getattr(importlib.import_module(f".{module}", __package__), name) for module, name in USER_ERRORS)


def _dtrain_error(error: BaseException, *names: str) -> bool:
    """Whether `error` is of one of dtrain's classes called `names` (or of a subclass), told from its class's
    name and module, not by importing dtrain's classes to ask: importing dist or checkpoint imports torch,
    1.5 s and more before a config error's line. (A class moved between dtrain's modules is still told.)"""
    return any(c.__name__ in names and c.__module__.split(".")[0] == __package__ for c in type(error).__mro__)


def _with_verbosity(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """-q / -v before or after the command (`dtrain -q train`, `python train.py -q key=value`)."""
    commands = next(a.choices for a in parser._subparsers._group_actions)
    for p in (parser, *commands.values()):
        group = p.add_mutually_exclusive_group()
        # SUPPRESS: a command's unset flag must not overwrite the one given before the command
        group.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=argparse.SUPPRESS,
            help="warnings and errors only (the `dtrain` logger at WARNING)",
        )
        group.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="debug lines too (the `dtrain` logger at DEBUG)",
        )
    return parser


def parse_args(argv: list[str] | None, hooks=None, defaults: dict | None = None) -> argparse.Namespace:
    """dtrain's command line; for a user's script (`hooks` handed in) the command is optional and defaults
    to train, so `python train.py key=value` trains like `dtrain train key=value`."""
    parser = _with_verbosity(build_parser())
    if hooks is not None:
        if argv is None:  # in a Jupyter kernel sys.argv is the kernel's own (-f connection.json), not overrides
            argv = [] if Path(sys.argv[0]).name == "ipykernel_launcher.py" else sys.argv[1:]
        argv = list(argv)
        commands = next(a.choices for a in parser._subparsers._group_actions)
        if not argv or argv[0] not in commands:
            argv = ["train", *argv]
        parser.prog = Path(sys.argv[0]).name
    args = parser.parse_args(argv)
    args.hooks, args.defaults, args.parser = hooks, defaults, parser
    return args


def _recorded(func):
    """Under an elastic agent (torchrun, dtrain launch): uncaught errors go into its error record, and the
    worker dies with its agent (no orphans when the agent is SIGKILLed)."""
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        from .worker import die_with_launcher

        die_with_launcher(os.getppid())
        return record(func)
    return func


def main(argv: list[str] | None = None, hooks: Hooks | None = None, defaults: dict | None = None) -> int:
    """`dtrain ...`, or a user's script (`dtrain.main(model=...)` hands in `hooks`). -> the exit code."""
    from .run import is_other_rank
    from .worker import report_error

    args = parse_args(argv, hooks, defaults)
    level = _set_verbosity(args)

    def run(args) -> int:
        # handled here, inside `record`: torchrun's error file gets their one line, not a traceback
        try:
            return args.func(args)
        except Exception as e:
            if _dtrain_error(e, "CollectiveError"):
                report_error(str(e))
                return EXIT_FAILED
            if not _dtrain_error(e, *(name for _, name in USER_ERRORS)):
                raise  # the user's own code's error (or dtrain's bug): its traceback
            _exiting_with_user_error()
            # Every rank meets a config error alike, and usually a data error (in its own words: its
            # shards): rank 0 says it. A data error of one rank alone is still said where the launcher
            # shows every rank's error file (torchrun, dtrain launch), and under srun by the rank itself.
            seen = _dtrain_error(e, "ConfigError") or (
                _dtrain_error(e, "DataError") and "TORCHELASTIC_ERROR_FILE" in os.environ
            )
            report_error(str(e), quiet=seen and is_other_rank())
            return EXIT_USER_ERROR

    try:
        return _recorded(run)(args)
    finally:
        logging.getLogger("dtrain").setLevel(level)  # -q / -v for this command only: main may be called again


def _exiting_with_user_error() -> None:
    """Under srun --kill-on-bad-exit, the first task to exit 2 gets every other task SIGTERMed: one still on
    its way out with the same error then died by the signal, and the step's exit code was 143, not 2 (seen
    in the user-path matrix). Such a task ignores SIGTERM from here: it is only printing its line and leaving
    (nothing left to save; SLURM's SIGKILL after KillWait still ends it)."""
    import signal
    import threading

    if "SLURM_PROCID" in os.environ and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def fit(argv: list[str] | None, hooks: Hooks | None, defaults: dict | None = None) -> FitResult:
    """`dtrain.fit`: train as `dtrain.main` would, and return the run's FitResult instead of exiting. Bad
    input raises (one of user_errors(), the one-line message as its text); an interrupted run returns."""
    import io

    from .config import ConfigError

    try:
        with contextlib.redirect_stderr(io.StringIO()) as usage:
            args = parse_args(argv, hooks, defaults)
    except SystemExit as e:
        if not e.code:  # --help: printed, as asked
            raise
        raise ConfigError(usage.getvalue().strip().splitlines()[-1]) from None  # argparse's own line, as raised
    if args.func is not _train:
        raise ConfigError(f"fit: it trains; `{args.command}` is run by dtrain.main (or the dtrain command)")
    level = _set_verbosity(args)
    try:
        return _recorded(_fit)(args)
    finally:
        logging.getLogger("dtrain").setLevel(level)


def _set_verbosity(args) -> int:
    """-q / -v on the `dtrain` logger. -> its level before."""
    from .logging import log, set_verbosity

    level = log.level
    set_verbosity(getattr(args, "quiet", False), getattr(args, "verbose", False))
    return level


if __name__ == "__main__":
    sys.exit(main())
