"""Keeping API keys out of configs: an endpoint URL carries no credential, and a key's setting names an
environment variable instead of holding the key. Both are checked at load, before anything is written, and
the messages never repeat the offending value (it may be the secret)."""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

from dreamshot.utils.errors import ConfigError

# Query parameters that carry a credential (compared lower-case, '-' read as '_'): Azure's `api-key`, Google's
# `key`, signed URLs' `sig`, OAuth's `access_token`, ... A harmless parameter (Azure's `api-version`) passes.
CREDENTIAL_PARAMETERS = frozenset(
    {"key", "api_key", "apikey", "token", "access_token", "auth", "secret", "password", "sig", "signature", "code"}
)
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_endpoint(url: str | None, key: str, key_env_key: str) -> None:
    """Refuse an endpoint URL (the setting `key`) holding a user, a password or a credential query parameter."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        raise ConfigError(f"{key} is not a valid URL", key=key) from None
    hint = f"give the base URL alone and the key in the environment variable named by {key_env_key}"
    if user is not None or password is not None:
        raise ConfigError(f"{key} holds credentials (user:key@host); {hint}", key=key)
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower().replace("-", "_") in CREDENTIAL_PARAMETERS:
            raise ConfigError(f"{key} holds a credential in its query (parameter {name!r}); {hint}", key=key)


def check_key_variable(name: str, key: str) -> None:
    """Refuse a setting `key` that should name an environment variable but looks like the key itself: not a
    variable name, or a name mixing lower case and digits (as keys do) that the environment does not define."""
    looks_like_a_key = _VARIABLE_NAME.fullmatch(name) is None or (
        name not in os.environ and any(c.islower() for c in name) and any(c.isdigit() for c in name)
    )
    if looks_like_a_key:
        raise ConfigError(
            f"{key} must name the environment variable holding the API key (like OPENAI_API_KEY); its value "
            "looks like a key itself (not repeated here): put the key in the environment instead",
            key=key,
        )
