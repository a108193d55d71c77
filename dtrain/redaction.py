"""What never leaves the machine: secrets in a config, in any file dtrain writes (config.yaml, checkpoints,
summary.json, the printed commands) or hands to W&B.

A secret is recognised by its key or by its value, never by a word inside a key: `pad_token_id`,
`max_tokens`, `tokenizer` and `num_keys` are hyperparameters and reach W&B as they are.
- By key: the exact names that hold credentials (`api_key`, `password`, `token`, `hf_token`, ...), compared
  in lower case with `-` read as `_`.
- By value: a string that contains the value of a secret environment variable (WANDB_API_KEY, HF_TOKEN,
  AWS_SECRET_ACCESS_KEY, any *_TOKEN, *_KEY, *_SECRET, *_PASSWORD...), wherever it is: a token pasted into
  an override or into a URL is caught under any key.

What is sent away (W&B, TensorBoard, a printed command) holds "<redacted>". What dtrain reads back to
compare (config.yaml, a checkpoint's config) holds the secret sealed: "<redacted:scrypt:SALT:HASH>", a
salted scrypt hash (slow, so a short password can't be guessed from it quickly; salted per process, so
equal secrets in two runs don't show as equal), which a resume checks the value it is given against: a
changed secret is noticed, an unchanged one is not reported, and neither value is shown.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Mapping, Optional

import yaml

REDACTED = "<redacted>"

SECRET_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "access_key",
        "secret_key",
        "secret_access_key",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "wandb_api_key",
        "token",
        "access_token",
        "auth_token",
        "refresh_token",
        "bearer_token",
        "id_token",
        "hf_token",
        "hub_token",
        "use_auth_token",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "private_key",
        "credentials",
        "authorization",
    }
)
SECRET_ENV = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?|APIKEY)(_|$)", re.IGNORECASE)


def secret_values(environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """The values of this process's secret-looking environment variables that can be secrets: 8+ characters
    (shorter ones, "false" or "1", occur inside hyperparameters) and not a path (GOOGLE_APPLICATION_CREDENTIALS
    names a file: the file is the secret, a config that mentions its directory is not)."""
    environ = os.environ if environ is None else environ
    return {v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= 8 and not os.path.exists(v)}


def redact(value: Any, secrets: Optional[set[str]] = None, keyed: bool = False) -> Any:
    """`value` (a config dict, nested) with every secret replaced by "<redacted>", or with `keyed` by its
    seal; `secrets`: the values to catch (default: the environment's)."""
    secrets = secret_values() if secrets is None else secrets
    hide = _seal_kept if keyed else (lambda v: REDACTED)
    if isinstance(value, dict):
        return {k: hide(v) if secret_key(k) else redact(v, secrets, keyed) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets, keyed) for v in value)
    if isinstance(value, str) and any(s in value for s in secrets):
        return hide(value)
    return value


def redact_command(argv: list[str], secrets: Optional[set[str]] = None) -> list[str]:
    """A command line with each secret as "<redacted>": an override's value whose key names a credential
    (model.kwargs.api_key=...), a secret inside an override's YAML value (model.kwargs={token: ...}), and a
    secret environment variable's value anywhere (a token in a URL: the rest of the URL stays)."""
    secrets = secret_values() if secrets is None else secrets
    return [_redact_arg(arg, secrets) for arg in argv]


def _redact_arg(arg: str, secrets: set[str]) -> str:
    key, sep, raw = arg.partition("=")
    if sep and key.strip() and not arg.startswith("-"):  # key.sub=value, as dtrain.config reads it
        if any(secret_key(part) for part in key.strip().split(".")):
            return f"{key}={REDACTED}"
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and redact(value, secrets) != value:
            return f"{key}={yaml.safe_dump(redact(value, secrets), default_flow_style=True, width=1e9).strip()}"
    for secret in sorted(secrets, key=len, reverse=True):
        arg = arg.replace(secret, REDACTED)
    return arg


def sealed_settings(config: dict, secrets: Optional[set[str]] = None, prefix: str = "") -> list[str]:
    """The dotted keys whose values a stored config holds sealed: what a command that rebuilds the run from
    its checkpoint (dtrain eval) must be given again."""
    secrets = secret_values() if secrets is None else secrets
    keys = []
    for key, value in config.items():
        if isinstance(value, dict) and not secret_key(key):
            keys += sealed_settings(value, secrets, f"{prefix}{key}.")
        elif redact({key: value}, secrets, keyed=True) != {key: value}:
            keys.append(f"{prefix}{key}")
    return keys


def secret_key(key: Any) -> bool:
    """Whether a setting of this name holds a credential (whatever its value)."""
    return str(key).lower().replace("-", "_") in SECRET_KEYS


def is_secret(dotted_key: str, value: Any, secrets: Optional[set[str]] = None) -> bool:
    """Whether the setting `dotted_key` (e.g. model.kwargs.api_key) holding `value` is, or is under, a secret."""
    return (
        any(secret_key(part) for part in dotted_key.split("."))
        or redact(value, secrets) != value
        or (isinstance(value, str) and is_sealed(value))
    )


# a fresh salt per process, drawn at import (os.urandom: dtrain's seeded RNGs stay untouched); a seal keeps its
# salt, so a later process checks a value against it
_SALT = os.urandom(8).hex()
_SEALED = re.compile(r"<redacted:scrypt:([0-9a-f]{16}):([0-9a-f]{32})>")


def seal(value: Any, salt: Optional[str] = None) -> str:
    """`value` (any YAML value) as "<redacted:scrypt:SALT:HASH>"."""
    return f"<redacted:scrypt:{salt or _SALT}:{_kdf(json.dumps(value, sort_keys=True), salt or _SALT)}>"


@functools.lru_cache(maxsize=64)  # a checkpoint seals the same secrets at every save: ~50 ms each once
def _kdf(text: str, salt: str) -> str:
    return hashlib.scrypt(text.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1, dklen=16).hex()


def _seal_kept(value: Any) -> Any:
    """A value read back (config.yaml, a checkpoint) sealed, but for none and true/false (`token: null`,
    `use_auth_token: true`: no secret, and a model built from the file reads them as they were)."""
    return value if value is None or isinstance(value, bool) or is_sealed(value) else seal(value)


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and _SEALED.fullmatch(value) is not None


def same_secret(sealed: Any, value: Any) -> bool:
    """Whether `sealed` (a seal, as a checkpoint stored it) is the seal of `value` (the value given now)."""
    found = _SEALED.fullmatch(sealed) if isinstance(sealed, str) else None
    return found is not None and not is_sealed(value) and seal(value, found.group(1)) == sealed


def sealed_paths(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of `value` (a config dict) that hold a sealed secret, `<redacted:scrypt:...>`."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in sealed_paths(v, f"{prefix}{key}.")]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in sealed_paths(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if is_sealed(value) else []
