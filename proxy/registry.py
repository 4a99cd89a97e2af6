"""The upstream registry: which upstreams exist, the API dialect each speaks, the models it serves.

`TOLLGATE_UPSTREAMS` names a TOML file of `[upstreams.<name>]` tables; secrets stay in the
environment (`api_key_env`). `TOLLGATE_UPSTREAM_URL` alone is one `openai` upstream, `default`,
which also serves the Anthropic route.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DIALECTS = ("openai", "anthropic")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FIELDS = frozenset(
    {"url", "api_key_env", "api", "models", "priority", "connect_timeout", "attempt_timeout"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    name: str
    url: str  # the base its API's SDK takes: https://api.openai.com/v1, https://api.anthropic.com
    api_key: str | None = field(default=None, repr=False)
    api: str = "openai"  # the dialect it speaks: which surfaces it serves
    # Other dialects' surfaces it also serves, below its own URL and with its own credential:
    # `default` (TOLLGATE_UPSTREAM_URL) also takes the Anthropic route, as OpenAI-compatible
    # gateways that publish `/messages` beside `/chat/completions` do.
    also_serves: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # glob patterns; empty = any model
    priority: int = 0  # lower first among upstreams that serve a model
    connect_timeout_s: float | None = None  # None: min(10 s, the upstream deadline)
    # Time to the response head of an attempt with a fallback after it (None: the setting).
    attempt_timeout_s: float | None = None

    def serves(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


class RegistryError(ValueError):
    """What is wrong with the upstream registry, in one line."""


def load_upstreams(text: str, environ: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    """Parse the registry TOML; `api_key_env` names are looked up in `environ`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"not valid TOML: {exc}") from None
    tables = data.get("upstreams")
    if not isinstance(tables, dict) or not tables:
        raise RegistryError("no [upstreams.<name>] table")
    return tuple(_upstream(name, raw, environ) for name, raw in tables.items())


def _upstream(name: str, raw: Any, environ: Mapping[str, str]) -> UpstreamConfig:
    where = f"[upstreams.{name}]"
    if not _NAME.match(name):
        raise RegistryError(f"{where}: a name is 1-64 letters, digits, _ or -")
    if not isinstance(raw, dict):
        raise RegistryError(f"{where} must be a table")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise RegistryError(f"{where}: unknown field {unknown[0]!r}")
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise RegistryError(f"{where}: url must start with http:// or https://")
    api = raw.get("api", "openai")
    if api not in DIALECTS:
        raise RegistryError(f"{where}: api must be one of {', '.join(DIALECTS)}")
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise RegistryError(f"{where}: models must be a list of model name patterns")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RegistryError(f"{where}: priority must be an integer")
    timeouts = {}
    for setting in ("connect_timeout", "attempt_timeout"):
        value = raw.get(setting)
        if value is not None:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf  # TOML has nan and inf
            ):
                raise RegistryError(f"{where}: {setting} must be a number of seconds above 0")
            timeouts[setting] = float(value)
    key_env = raw.get("api_key_env")
    api_key = None
    if key_env is not None:
        if not isinstance(key_env, str) or not environ.get(key_env):
            raise RegistryError(f"{where}: api_key_env names {key_env!r}, which is not set")
        api_key = environ[key_env]
    return UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        api_key=api_key,
        api=api,
        models=tuple(models),
        priority=priority,
        connect_timeout_s=timeouts.get("connect_timeout"),
        attempt_timeout_s=timeouts.get("attempt_timeout"),
    )
