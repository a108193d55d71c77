"""Import strings: how a config names a user's code (`package.module:attribute`, in the style of Hydra's
`_target_` and LightningCLI's `class_path`).

A config key holding an import string names a callable: a model factory, a loss, metrics, a sample
mapping, a transform. The string lives in the run's config.yaml; one stored in a checkpoint is resolved
only where dtrain.trust allows it (the user names it too, or trusts the file). `resolve` turns one into the object, or into a one-line ConfigError naming the key, the value
and what to fix: the module does not import, the attribute is missing, it is not callable.

An ImportError raised *inside* the user's module (a missing dependency of theirs) is theirs: the message
names it, as it names a module that calls sys.exit() when imported. Any other exception raised while
importing it is a bug in their code and keeps its traceback.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from .config import ConfigError

# Short names for dtrain's own factories: the same import path a user's takes, spelled shorter.
ALIASES: dict[str, str] = {}


def resolve(spec: str, key: str, aliases: Optional[dict[str, str]] = None) -> Any:
    """The callable named by `spec` ("package.module:attr" or "package.module.attr"; a short alias where
    `aliases` has one). `key` is the config key it came from, for the message."""
    target = (aliases or {}).get(spec, spec)
    if target.startswith("__main__:"):
        raise ConfigError(
            f"config: {key}: {spec} was handed in by a Python script; run that script (e.g. "
            "`python train.py eval --checkpoint ...`) to rebuild it"
        )
    module_name, sep, attr = target.partition(":")
    if not sep:  # "package.module.attr"
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        known = f"; or one of: {', '.join(sorted(aliases))}" if aliases else ""
        raise ConfigError(f"config: {key}: {spec!r} is not an import string; write 'package.module:callable'{known}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                f"config: {key}: cannot import module '{module_name}' ({spec!r}); is it installed or on PYTHONPATH?"
            ) from None
        raise ConfigError(
            f"config: {key}: importing '{module_name}' failed: it needs '{e.name}', which is not installed"
        ) from None
    except SystemExit as e:  # exit() at import time (a script's `main()` unguarded): not a reason to end silently
        raise ConfigError(
            f"config: {key}: importing '{module_name}' called sys.exit({e.code!r}); a module named by "
            "an import string must not exit when imported (guard it with `if __name__ == "
            "'__main__':`)"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"config: {key}: module '{module_name}' has no attribute '{attr}' ({spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"config: {key}: {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def describe(obj: Any) -> str:
    """`module:qualname` of a callable handed in from Python (for messages and the run's config)."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{name}"
