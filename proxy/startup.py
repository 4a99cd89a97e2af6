"""What a starting process tells its operator: one line naming the upstreams, the store, the
fail mode, the workers and the admin API, and a warning for each TOLLGATE_* variable that
nothing reads. Names and hosts only: never a key, a password or a whole URL.
"""

from __future__ import annotations

import difflib
import logging
import os
from urllib.parse import urlsplit

from proxy.config import ENV_VARIABLES, Settings

log = logging.getLogger("tollgate")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PREFIX = "TOLLGATE_"


def host_of(url: str) -> str:
    """`host` or `host:port` of a URL, without its credentials, path or query."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a port that is no number
        return "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


def store_text(settings: Settings) -> str:
    url = settings.redis_url
    if not url:
        return "in-process (this process only)"
    if url.startswith("unix://"):
        return f"redis unix socket {urlsplit(url).path}"
    kind = "redis cluster" if settings.redis_cluster else "redis"
    tls = " (TLS)" if url.startswith("rediss://") else ""
    return f"{kind} {host_of(url) or 'localhost'}{tls}"


def startup_line(settings: Settings) -> str:
    upstreams = ", ".join(f"{u.name} ({host_of(u.url)})" for u in settings.upstream_configs())
    admin = "on at /admin" if settings.admin_token else "off (no TOLLGATE_ADMIN_TOKEN)"
    return (
        f"tollgate starting (pid {os.getpid()}): upstreams {upstreams or 'none'}; "
        f"store {store_text(settings)}; fail mode {'open' if settings.fail_open else 'closed'}; "
        f"workers {settings.workers}; admin API {admin}; access log {settings.access_log}"
    )


def resembling(name: str) -> str | None:
    """The known variable a misspelt one most resembles, if any is close."""
    known = [k.removeprefix(_PREFIX) for k in ENV_VARIABLES]
    close = difflib.get_close_matches(name.removeprefix(_PREFIX), known, n=1, cutoff=0.7)
    return _PREFIX + close[0] if close else None


def unknown_variable_warning(name: str) -> str:
    warning = f"{name} is not a Tollgate setting and is ignored"
    similar = resembling(name)
    return f"{warning}; did you mean {similar}?" if similar else warning


def announce(settings: Settings) -> None:
    """Log the startup line and the unknown-variable warnings. A worker process that uvicorn
    started for --workers has no logging set up: it gets the CLI's format on stderr first."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    log.info("%s", startup_line(settings))
    for name in settings.unknown_variables:
        log.warning("%s", unknown_variable_warning(name))
