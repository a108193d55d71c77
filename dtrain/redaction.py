"""What never leaves the machine: secrets in a config sent to another service (W&B).

A secret is recognised by its key or by its value, never by a word inside a key: `pad_token_id`,
`max_tokens`, `tokenizer` and `num_keys` are hyperparameters and reach W&B as they are.
- By key: the exact names that hold credentials (`api_key`, `password`, `token`, `hf_token`, ...), compared
  in lower case with `-` read as `_`.
- By value: a string that contains the value of a secret environment variable (WANDB_API_KEY, HF_TOKEN,
  AWS_SECRET_ACCESS_KEY, any *_TOKEN, *_KEY, *_SECRET, *_PASSWORD...), wherever it is: a token pasted into
  an override or into a URL is caught under any key.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

REDACTED = "<redacted>"

SECRET_KEYS = frozenset({
    "api_key", "apikey", "access_key", "secret_key", "secret_access_key", "aws_secret_access_key",
    "aws_session_token", "session_token", "wandb_api_key", "token", "access_token", "auth_token",
    "refresh_token", "bearer_token", "id_token", "hf_token", "hub_token", "use_auth_token", "password",
    "passwd", "secret", "client_secret", "private_key", "credentials", "authorization",
})
SECRET_ENV = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?|APIKEY)(_|$)", re.IGNORECASE)


def secret_values(environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """The values of this process's secret-looking environment variables that can be secrets: 8+ characters
    (shorter ones, "false" or "1", occur inside hyperparameters) and not a path (GOOGLE_APPLICATION_CREDENTIALS
    names a file: the file is the secret, a config that mentions its directory is not)."""
    environ = os.environ if environ is None else environ
    return {v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= 8 and not os.path.exists(v)}


def redact(value: Any, secrets: Optional[set[str]] = None) -> Any:
    """`value` (a config dict, nested) with every secret replaced by "<redacted>"; `secrets`: the values
    to catch (default: the environment's)."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str) and any(s in value for s in secrets):
        return REDACTED
    return value


def _secret_key(key: Any) -> bool:
    return str(key).lower().replace("-", "_") in SECRET_KEYS
