"""The package's layering, read from the source (ast, nothing imported; the import walker is test_imports.py's).

Each module sits in one layer, by its job; an import may go sideways or down, never up:

  1 base        what every part stands on, and knows no training: config (+ capabilities, what each engine
                can't honour, which config validation asks), redaction, importing, records, version, logging,
                loggers, batch, signals, dist (launch detection, rendezvous, collectives), checkpoint_files
                (a checkpoint directory on disk: manifest, verification, safe load, pointers, publishing),
                worker (a rank's log and its one-line error; `dtrain launch`'s per-rank entry imports no more)
  2 components  data, models, losses, metrics, optim
  3 engine      engine/ (how gradients are reduced and the optimizer stepped)
  4 run parts   checkpoint (when and how a run saves), state, resume, evaluate, steplog, summary, throughput,
                trust, callbacks, runlock, doctor
  5 assembly    build, trainer, load, predict, export, bench, plot
  6 run         run (the lifecycle), result, ft, ft_train
  7 entry       cli, completion, launcher, ft_launch, __main__, the package itself (dtrain/__init__)

A module not listed is refused by test_every_module_has_a_layer, so a new one is placed on purpose. Lazy
imports (inside a function) count: they tie the designs together as much as a module-level one.

`python tests/test_layers.py` prints the figures of issue #34.6: the imports that run back up, the longest
classes, and the functions that take the whole Config.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_imports import PACKAGE, import_edges, module_names  # noqa: E402

LAYERS = {
    1: [
        "version",
        "config",
        "capabilities",
        "redaction",
        "importing",
        "records",
        "logging",
        "loggers",
        "batch",
        "signals",
        "dist",
        "checkpoint_files",
        "worker",
    ],
    2: ["data", "models", "losses", "metrics", "optim"],
    3: ["engine"],
    4: [
        "checkpoint",
        "state",
        "resume",
        "evaluate",
        "steplog",
        "summary",
        "throughput",
        "trust",
        "callbacks",
        "runlock",
        "doctor",
    ],
    5: ["build", "trainer", "load", "predict", "export", "bench", "plot"],
    6: ["run", "result", "ft", "ft_train"],
    7: ["cli", "completion", "launcher", "ft_launch", "__main__", ""],
}
TOP = PACKAGE.name

# Imports up the layers that are still there, each a candidate for its owner (none: the last three, the engines'
# load_state_dict calling resume.config_hyperparameters, went when that rule moved down to optim.py).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name: its own entry, else its package's (dtrain.data.feed: data's)."""
    name = module.removeprefix(TOP).removeprefix(".")
    parts = name.split(".") if name else []
    for prefix in [".".join(parts[:i]) for i in range(len(parts), 0, -1)] or [""]:
        for layer, names in LAYERS.items():
            if prefix in names:
                return layer
    return None


def upward(edges=None) -> list:
    """The imports from a lower layer to a higher one."""
    edges = import_edges() if edges is None else edges
    return [e for e in edges if (layer_of(e.source) or 0) < (layer_of(e.target) or 0)]


def classes(root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(lines, module:Class) of every class, longest first."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root.parent)}:{node.name}"))
    return sorted(found, reverse=True)


WHOLE = {"Config", "Optional[Config]", "Config | None"}


def whole_config_takers(root: Path = PACKAGE) -> list[str]:
    """Functions with a parameter annotated as the whole Config (a section, e.g. TrainConfig, is not)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                if any(
                    a.annotation is not None and ast.unparse(a.annotation).strip("'\"") in WHOLE
                    for a in args.posonlyargs + args.args + args.kwonlyargs
                ):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}:{node.name}")
    return found


def test_layer_of():
    assert layer_of("dtrain.config") == 1
    assert layer_of("dtrain.data.feed") == 2
    assert layer_of("dtrain.engine.fsdp") == 3
    assert layer_of("dtrain") == 7
    assert layer_of("dtrain.nosuch") is None


def test_every_module_has_a_layer():
    assert [m for m in module_names() if layer_of(m) is None] == []


def test_no_import_runs_back_up_the_layers():
    """A new upward import fails here; one fixed must come off KNOWN_UPWARD."""
    found = upward()
    assert [str(e) for e in found if (e.source, e.target) not in KNOWN_UPWARD] == []
    assert {(e.source, e.target) for e in found} == KNOWN_UPWARD  # one fixed: take it off the list


if __name__ == "__main__":
    ups = upward()
    print(f"imports up the layers: {len(ups)} ({len({(e.source, e.target) for e in ups})} module pairs)")
    for e in ups:
        print(f"  {e}  [{layer_of(e.source)} -> {layer_of(e.target)}]")
    print("longest classes:")
    for lines, name in classes()[:5]:
        print(f"  {lines:4d} {name}")
    takers = whole_config_takers()
    print(f"functions taking the whole Config: {len(takers)}")
    for name in takers:
        print(f"  {name}")
