"""Settings: one immutable object built once at the edge (CLI) from TOLLGATE_* and flags.

Nothing else reads the environment; every component receives the Settings it needs.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.credits import PriceTable, load_prices
from proxy.registry import RegistryError, UpstreamConfig, load_upstreams

ENV_VARIABLES: dict[str, str] = {
    "TOLLGATE_UPSTREAM_URL": "upstream base URL; /chat/completions, /models, ... are appended",
    "TOLLGATE_UPSTREAM_API_KEY": "credential sent upstream as Authorization: Bearer",
    "TOLLGATE_REDIS_URL": "redis://, rediss:// or unix:// URL; unset means an in-process store",
    "TOLLGATE_REDIS_CLUSTER": "true to use Redis Cluster (the URL names any seed node)",
    "TOLLGATE_ADMIN_TOKEN": "bearer token for /admin/*; the admin API is off when unset",
    "TOLLGATE_UPSTREAM_TIMEOUT": "seconds for the whole upstream exchange",
    "TOLLGATE_PRICES": "path to a TOML price table",
    "TOLLGATE_FAIL_MODE": "open or closed: what limits do when Redis is unreachable",
    "TOLLGATE_MAX_BODY_BYTES": "largest accepted request body",
    "TOLLGATE_METRICS_KEY_LABEL": "true to label per-key metrics with the key's name",
    "TOLLGATE_SPOOL_DIR": "where usage records wait on disk while Redis is unreachable",
    "TOLLGATE_INJECT_STREAM_USAGE": "false for upstreams that reject stream_options",
    "TOLLGATE_DEFAULT_MAX_TOKENS": "completion tokens assumed when a request sets no max_tokens",
    "TOLLGATE_SHUTDOWN_TIMEOUT": "seconds in-flight requests and streams get to finish on SIGTERM",
    "TOLLGATE_USAGE_RETENTION_DAYS": "days raw usage records are kept (aggregates are kept)",
    "TOLLGATE_LOG_LEVEL": "debug, info, warning or error",
    "TOLLGATE_PASSTHROUGH_PATHS": "comma-separated /v1/* path patterns forwarded as they are",
    "TOLLGATE_MAX_HEADER_BYTES": "largest request line plus headers of one request",
    "TOLLGATE_MAX_HEADERS": "most header fields in one request",
    "TOLLGATE_HEADER_TIMEOUT": "seconds a client gets to send a whole request head",
    "TOLLGATE_MAX_CONNECTIONS": "open client connections per process; more are closed at once",
    "TOLLGATE_UPSTREAM_CA_FILE": "PEM file of extra CAs trusted for https upstreams",
    "TOLLGATE_FORWARD_HEADERS": "comma-separated extra client headers sent upstream",
    "TOLLGATE_UPSTREAMS": "TOML file of upstreams: url, api_key_env, api, models, priority",
    "TOLLGATE_UPSTREAM_ATTEMPT_TIMEOUT": "seconds to an attempt's response head before fallback",
    "TOLLGATE_UPSTREAM_MAX_ATTEMPTS": "upstreams tried at most for one request",
    "TOLLGATE_UPSTREAM_FAILURE_THRESHOLD": "failures in a row that take an upstream out",
    "TOLLGATE_UPSTREAM_COOLDOWN": "seconds an upstream is skipped before it is probed again",
    "TOLLGATE_HOST": "listen address for serve (flag --host)",
    "TOLLGATE_PORT": "listen port for serve (flag --port)",
    "TOLLGATE_WORKERS": "worker processes for serve (flag --workers)",
    "TOLLGATE_ACCESS_LOG": "json, text or off: the one line per request on stdout",
}
# TOLLGATE_* names that are no setting of the proxy but are not mistakes either.
_OTHER_VARIABLES = frozenset({"TOLLGATE_MOCK_TAG"})  # the mock upstream's (tollgate mock-upstream)
ACCESS_LOG_FORMATS = ("json", "text", "off")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable in one line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    upstream_url: str = ""
    upstream_api_key: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    admin_token: str | None = field(default=None, repr=False)
    upstream_timeout_s: float = 180.0
    prices: PriceTable = field(default_factory=lambda: load_prices(None))
    fail_open: bool = False
    max_body_bytes: int = 10 * 1024 * 1024
    metrics_key_label: bool = True
    spool_dir: Path = Path("tollgate-spool")
    inject_stream_usage: bool = True
    default_max_tokens: int = 1024
    shutdown_timeout_s: float = 185.0
    log_level: str = "info"
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    models_cache_s: float = 30.0
    metrics_multiprocess: bool = False  # PROMETHEUS_MULTIPROC_DIR is set
    usage_retention_days: int = 30
    passthrough_paths: tuple[str, ...] = ()
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    max_connections: int = 2048
    upstream_ca_file: Path | None = None
    forward_headers: tuple[str, ...] = ()
    upstreams: tuple[UpstreamConfig, ...] = ()  # from TOLLGATE_UPSTREAMS; see upstream_configs()
    # Fallback: an attempt with a candidate after it gets this long for its response head.
    upstream_attempt_timeout_s: float = 60.0
    upstream_max_attempts: int = 3
    upstream_failure_threshold: int = 3  # failures in a row that take an upstream out...
    upstream_cooldown_s: float = 30.0  # ...for this long, then one request probes it
    access_log: str = "json"  # json | text | off
    # TOLLGATE_* variables set but unknown (misspelt?), warned about at startup.
    unknown_variables: tuple[str, ...] = ()

    def upstream_configs(self) -> tuple[UpstreamConfig, ...]:
        """The registry, or the one `openai` upstream `default` of TOLLGATE_UPSTREAM_URL (which
        also serves the Anthropic route: one URL, no file, every surface)."""
        if self.upstreams:
            return self.upstreams
        if self.upstream_url:
            return (
                UpstreamConfig(
                    name="default",
                    url=self.upstream_url,
                    api_key=self.upstream_api_key,
                    also_serves=("anthropic",),
                ),
            )
        return ()


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _number(name: str, raw: str, *, integer: bool = False, minimum: float = 0) -> float:
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value < minimum or value != value or value == float("inf"):
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


def _passthrough_paths(raw: str) -> tuple[str, ...]:
    """`/v1/moderations,/v1/audio/*`: exact paths, or prefixes ending in `/*`, under /v1/."""
    patterns = tuple(p.strip() for p in raw.split(",") if p.strip())
    for pattern in patterns:
        body = pattern.removesuffix("/*")
        segments = body.split("/")[2:]
        if (
            not body.startswith("/v1/")
            or "*" in body
            or not all(segments)
            or any(s in (".", "..") for s in segments)
            or any(c in body for c in "%?#\\\x00")
        ):
            raise ConfigError(
                "TOLLGATE_PASSTHROUGH_PATHS: each pattern is a /v1/ path, optionally ending "
                f"in /*, without dot segments or %, ?, #: {pattern!r}"
            )
    return patterns


# Never forwarded, whatever the operator lists: the client's credential, hop-by-hop fields and
# what Tollgate itself sets.
_NEVER_FORWARDED = frozenset(
    {
        "authorization", "api-key", "x-api-key", "cookie", "proxy-authorization", "host",
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "content-length", "accept-encoding", "expect", "x-request-id",
        "x-client-request-id",
    }
)  # fmt: skip
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,100}$")


def _forward_headers(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
    for name in names:
        if not _HEADER_NAME.match(name) or name in _NEVER_FORWARDED:
            raise ConfigError(
                f"TOLLGATE_FORWARD_HEADERS: {name!r} is not a header Tollgate can forward"
            )
    return names


def unknown_variables(environ: Mapping[str, str], *, also_known: set[str]) -> tuple[str, ...]:
    """The TOLLGATE_* names in `environ` that nothing reads (`also_known`: names the upstream
    registry reads its keys from)."""
    return tuple(
        sorted(
            name
            for name in environ
            if name.startswith("TOLLGATE_")
            and name not in ENV_VARIABLES
            and name not in _OTHER_VARIABLES
            and name not in also_known
        )
    )


def _key_variables(text: str) -> set[str]:
    """The `api_key_env` names of a registry file that load_upstreams has accepted."""
    tables = tomllib.loads(text)["upstreams"]
    return {str(t["api_key_env"]) for t in tables.values() if "api_key_env" in t}


def load_settings(
    environ: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> Settings:
    """Build Settings from TOLLGATE_* variables; `overrides` (CLI flags) win over them."""
    env = {k: v for k, v in environ.items() if k.startswith("TOLLGATE_") and v != ""}
    values: dict[str, object] = {
        "metrics_multiprocess": bool(environ.get("PROMETHEUS_MULTIPROC_DIR"))
    }
    if "TOLLGATE_UPSTREAM_URL" in env:
        url = env["TOLLGATE_UPSTREAM_URL"].rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"TOLLGATE_UPSTREAM_URL must start with http:// or https://: {url!r}")
        values["upstream_url"] = url
    for name, attr in (
        ("TOLLGATE_UPSTREAM_API_KEY", "upstream_api_key"),
        ("TOLLGATE_ADMIN_TOKEN", "admin_token"),
    ):
        if name in env:
            values[attr] = env[name]
    if "TOLLGATE_REDIS_URL" in env:
        url = env["TOLLGATE_REDIS_URL"]
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"TOLLGATE_REDIS_URL must be a redis://, rediss:// or unix:// URL: {url!r}"
            )
        values["redis_url"] = url
    for name, attr in (
        ("TOLLGATE_REDIS_CLUSTER", "redis_cluster"),
        ("TOLLGATE_METRICS_KEY_LABEL", "metrics_key_label"),
        ("TOLLGATE_INJECT_STREAM_USAGE", "inject_stream_usage"),
    ):
        if name in env:
            values[attr] = _bool(name, env[name])
    for name, attr, integer, minimum in (
        ("TOLLGATE_UPSTREAM_TIMEOUT", "upstream_timeout_s", False, 0.001),
        ("TOLLGATE_MAX_BODY_BYTES", "max_body_bytes", True, 1),
        ("TOLLGATE_DEFAULT_MAX_TOKENS", "default_max_tokens", True, 1),
        ("TOLLGATE_SHUTDOWN_TIMEOUT", "shutdown_timeout_s", False, 0),
        ("TOLLGATE_USAGE_RETENTION_DAYS", "usage_retention_days", True, 1),
        ("TOLLGATE_MAX_HEADER_BYTES", "max_header_bytes", True, 1024),
        ("TOLLGATE_MAX_HEADERS", "max_headers", True, 8),
        ("TOLLGATE_HEADER_TIMEOUT", "header_timeout_s", False, 0.1),
        ("TOLLGATE_MAX_CONNECTIONS", "max_connections", True, 1),
        ("TOLLGATE_UPSTREAM_ATTEMPT_TIMEOUT", "upstream_attempt_timeout_s", False, 0.001),
        ("TOLLGATE_UPSTREAM_MAX_ATTEMPTS", "upstream_max_attempts", True, 1),
        ("TOLLGATE_UPSTREAM_FAILURE_THRESHOLD", "upstream_failure_threshold", True, 1),
        ("TOLLGATE_UPSTREAM_COOLDOWN", "upstream_cooldown_s", False, 0),
        ("TOLLGATE_PORT", "port", True, 1),
        ("TOLLGATE_WORKERS", "workers", True, 1),
    ):
        if name in env:
            values[attr] = _number(name, env[name], integer=integer, minimum=minimum)
    if "TOLLGATE_FAIL_MODE" in env:
        mode = env["TOLLGATE_FAIL_MODE"].strip().lower()
        if mode not in ("open", "closed"):
            raise ConfigError(f"TOLLGATE_FAIL_MODE must be open or closed, got {mode!r}")
        values["fail_open"] = mode == "open"
    if "TOLLGATE_ACCESS_LOG" in env:
        access_log = env["TOLLGATE_ACCESS_LOG"].strip().lower()
        if access_log not in ACCESS_LOG_FORMATS:
            raise ConfigError(f"TOLLGATE_ACCESS_LOG must be json, text or off, got {access_log!r}")
        values["access_log"] = access_log
    if "TOLLGATE_LOG_LEVEL" in env:
        level = env["TOLLGATE_LOG_LEVEL"].strip().lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"TOLLGATE_LOG_LEVEL must be debug|info|warning|error: {level!r}")
        values["log_level"] = level
    if "TOLLGATE_SPOOL_DIR" in env:
        values["spool_dir"] = Path(env["TOLLGATE_SPOOL_DIR"])
    if "TOLLGATE_PASSTHROUGH_PATHS" in env:
        values["passthrough_paths"] = _passthrough_paths(env["TOLLGATE_PASSTHROUGH_PATHS"])
    if "TOLLGATE_FORWARD_HEADERS" in env:
        values["forward_headers"] = _forward_headers(env["TOLLGATE_FORWARD_HEADERS"])
    if "TOLLGATE_UPSTREAM_CA_FILE" in env:
        ca_file = Path(env["TOLLGATE_UPSTREAM_CA_FILE"])
        if not ca_file.is_file():
            raise ConfigError(f"TOLLGATE_UPSTREAM_CA_FILE: no such file {str(ca_file)!r}")
        values["upstream_ca_file"] = ca_file
    key_variables: set[str] = set()
    if "TOLLGATE_UPSTREAMS" in env:
        path = Path(env["TOLLGATE_UPSTREAMS"])
        try:
            text = path.read_text(encoding="utf-8")
            values["upstreams"] = load_upstreams(text, environ)
        except (OSError, UnicodeDecodeError, RegistryError) as exc:
            raise ConfigError(f"TOLLGATE_UPSTREAMS: {path}: {exc}") from None
        key_variables = _key_variables(text)
    if "TOLLGATE_HOST" in env:
        values["host"] = env["TOLLGATE_HOST"]
    if "TOLLGATE_PRICES" in env:
        path = Path(env["TOLLGATE_PRICES"])
        try:
            values["prices"] = load_prices(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
            raise ConfigError(f"TOLLGATE_PRICES: cannot read price table {path}: {exc}") from None
    values["unknown_variables"] = unknown_variables(environ, also_known=key_variables)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigError(
            "--workers above 1 needs TOLLGATE_REDIS_URL (workers cannot share an in-process store)"
        )
    return settings
