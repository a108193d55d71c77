"""What may run when a command rebuilds a run from a file: only the code the user names.

A checkpoint or an exported file stores the config it was trained with, and a config names code: import
strings (model.factory, loss.fn, a `_target_` anywhere), `pipe:` shard URLs (shell commands), and the
permission for descriptors' `pipe:` URLs. Such a file is data (it may come from anyone), so a stored
setting that would run code is used only when the user's own command line, --config or script names the
same value, when it is one of dtrain's built-ins, or when the user opts in (--trust-checkpoint-code, in
the spirit of Hugging Face's `trust_remote_code`). Otherwise the command ends in one line naming the
setting and how to allow it, before anything is imported.

`dtrain.*` import strings are not safe for being dtrain's (dtrain.cli:main runs any command line): only
the short aliases of the built-in model factories and null are.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import yaml

from .checkpoint import CheckpointError
from .config import OPTIMIZERS, SCHEDULES, Config
from .models import BUILTIN

# Every setting whose value is an import string that dtrain imports and calls (tests/test_trust.py keeps this
# list complete against the config's documentation). A `_target_` mapping counts wherever it is.
IMPORT_STRINGS = (
    "model.factory",
    "model.forward",
    "loss.fn",
    "metrics.fn",
    "data.sample",
    "data.transform",
    "data.collate",
    "optim.name",
    "schedule.name",
    "run.callbacks",
)
# Settings that name dtrain's own code unless their value is an import string: a built-in name runs no user code.
OWN_NAMES = {"model.factory": BUILTIN, "optim.name": OPTIMIZERS, "schedule.name": SCHEDULES}
# Shards: a `pipe:` URL among them runs a shell command when the data is read.
SHARD_SOURCES = ("data.train", "data.val", "data.test", "data.counts")
# Permissions to run code found in data files: honoured only from the user.
PERMISSIONS = ("data.trust_descriptor_pipes",)

TRUST_FLAG = "--trust-checkpoint-code"


def code_settings(config: dict, reads_data: bool = True) -> Iterator[tuple[tuple, Any]]:
    """(key path, value) of every setting of `config` (a Config's dict) that would run code other than
    dtrain's built-ins; the shard sources and permissions only when the command reads data."""
    for key in IMPORT_STRINGS:
        value = _get(config, key.split("."))
        if isinstance(value, str) and value not in OWN_NAMES.get(key, ()):  # data.sample: or a dict
            yield tuple(key.split(".")), value
        elif isinstance(value, list):  # run.callbacks: each of them, at its index
            yield from (((*key.split("."), i), item) for i, item in enumerate(value))
    yield from _targets(config, ())
    if reads_data:
        for key in SHARD_SOURCES:
            value = _get(config, key.split("."))
            if any(_runs_a_command(item) for item in ([value] if isinstance(value, str) else value or [])):
                yield tuple(key.split(".")), value
        for key in PERMISSIONS:
            if _get(config, key.split(".")):
                yield tuple(key.split(".")), True


def check_stored(cfg: Config, user: Config, source, trusted: bool, reads_data: bool = True) -> None:
    """Refuse (CheckpointError, one line) the first setting of `cfg` (rebuilt from the file `source`) that
    would run code which `user` (what the user's command line, --config and script say) does not name."""
    if trusted:
        return
    own = user.to_dict()
    refused = [
        (path, value)
        for path, value in code_settings(cfg.to_dict(), reads_data)
        if _get(own, list(path)) != value
        # a script's own callable: rebuilt by that script only (importing.resolve says how)
        and not (isinstance(value, str) and value.startswith("__main__:"))
    ]
    if refused:
        (path, value), more = refused[0], [".".join(map(str, p)) for p, _ in refused[1:]]
        shown = value if len(str(value)) <= 80 else f"{str(value)[:77]}..."
        also = f" (and {', '.join(more)})" if more else ""
        raise CheckpointError(
            f"checkpoint: {source} asks to run {'.'.join(map(str, path))}={shown}{also}, which "
            "your command line, --config and script do not name; name it there yourself, or "
            f"pass {TRUST_FLAG} if you trust this file"
        )


def naming(cfg: Config) -> list[str]:
    """`key=value` overrides that name the code settings of `cfg` (what the run's own config named), which a
    command rebuilding the run from its checkpoint takes from the user: the summary's `evaluate` command
    carries them. A `_target_` is named by its own key (model.kwargs.config._target_=...), or inside a list
    by the whole list; a script's own callables (`__main__:...`) are not: the script hands them in."""
    config, named = cfg.to_dict(), {}
    for path, value in code_settings(config):
        if not (isinstance(value, str) and value.startswith("__main__:")):
            ints = [i for i, part in enumerate(path) if isinstance(part, int)]
            if ints:  # in a list, which no key=value reaches into: the list is named whole
                path = path[: ints[0]]
                value = _get(config, list(path))
            key = ".".join(path)
            plain = isinstance(value, str) and yaml.safe_load(value) == value  # read back as written
            named[key] = value if plain else json.dumps(value)
    return [f"{key}={value}" for key, value in named.items()]


def _runs_a_command(pattern: Any) -> bool:
    """A shard pattern any of whose URLs, brace-expanded as the data reader expands them, webdataset's gopen
    would run as a shell command: `{pipe:touch x; cat a.tar,b.tar}` and `PIPE:...` too (a prefix test of the
    unexpanded string let both through)."""
    from .data.sources import expand_urls, is_pipe

    if not isinstance(pattern, str):
        return False
    try:
        urls = expand_urls(pattern)
    except Exception:  # a pattern the reader can't expand either: judge the text as it is
        urls = [pattern]
    return any(is_pipe(url) for url in [pattern, *urls])


def _get(tree: Any, path: list) -> Any:
    for part in path:
        if isinstance(tree, list) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        elif isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return None
    return tree


def _targets(value: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "_target_":
                yield (*path, k), v
            else:
                yield from _targets(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _targets(v, (*path, i))
