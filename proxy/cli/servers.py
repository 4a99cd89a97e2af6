"""`tollgate serve`, `demo` and `mock-upstream`: check what the server needs, then run uvicorn.

`build_app` is uvicorn's factory in each worker process of `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

from proxy.cli.status import FAILED, USAGE_ERROR
from proxy.config import Settings, load_settings

GC_THRESHOLD = 10_000  # allocations between young collections; Python's default is 700
# Descriptors `serve` wants per allowed client connection: its socket and the upstream socket
# its request may hold; plus a margin for Redis, the spool, metrics files and the event loop.
FDS_PER_CONNECTION = 2
FDS_SPARE = 256

log = logging.getLogger("tollgate")


def build_app() -> Any:
    """uvicorn's factory in each worker process: Settings from the (inherited) environment."""
    from proxy.app import create_app

    app = create_app(load_settings(os.environ))
    # What is loaded now lives as long as the process: keep the collector off it, and collect
    # young objects less often (a request allocates a few hundred). Measured: about 7 % less
    # CPU per request and a lower p99 (README, Performance).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 50)
    return app


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _raise_open_files_limit(max_connections: int) -> None:
    """Lift the soft RLIMIT_NOFILE toward the hard one when TOLLGATE_MAX_CONNECTIONS needs more
    descriptors than it allows (workers inherit it); warn when even the hard limit is short."""
    needed = FDS_PER_CONNECTION * max_connections + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.debug("could not raise RLIMIT_NOFILE to %d: %s", wanted, exc)
    if soft < needed:
        log.warning(
            "the open-files limit is %d, below the %d that TOLLGATE_MAX_CONNECTIONS=%d needs "
            "(%d per connection + %d): connections beyond it fail; raise the hard limit "
            "(ulimit -Hn, LimitNOFILE=) or lower TOLLGATE_MAX_CONNECTIONS",
            soft, needed, max_connections, FDS_PER_CONNECTION, FDS_SPARE,
        )  # fmt: skip


def _ca_file_problem(path: Path) -> str | None:
    """Why OpenSSL cannot trust the CAs of TOLLGATE_UPSTREAM_CA_FILE, or None when it can."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return (
            f"TOLLGATE_UPSTREAM_CA_FILE: {str(path)!r} is not a PEM file of CA certificates: {exc}"
        )
    return None


def serve(settings: Settings) -> int:
    import uvicorn

    if not settings.upstream_configs():
        print(
            "tollgate: TOLLGATE_UPSTREAM_URL or TOLLGATE_UPSTREAMS is required for serve "
            "(`tollgate mock-upstream` runs a fake one to try it with)",
            file=sys.stderr,
        )
        return USAGE_ERROR
    if settings.upstream_ca_file is not None:
        problem = _ca_file_problem(settings.upstream_ca_file)
        if problem:
            print(f"tollgate: {problem}", file=sys.stderr)
            return USAGE_ERROR
    _raise_open_files_limit(settings.max_connections)
    created_metrics_dir = None  # made here, so removed here when serve returns
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        created_metrics_dir = tempfile.mkdtemp(prefix="tollgate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = created_metrics_dir
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:  # stale files of a previous run would be counted again
        shutil.rmtree(metrics_dir, ignore_errors=True)
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
    # Workers rebuild Settings from the environment: pass the flags on through it.
    os.environ["TOLLGATE_WORKERS"] = str(settings.workers)
    # uvicorn drains on SIGTERM, then raises the signal again with the handler found here: a
    # drained stop exits 0 (as under --workers) instead of being reported as killed (-15).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from proxy.http_server import http_protocol

    try:
        uvicorn.run(
            "proxy.cli.servers:build_app",
            factory=True,
            http=http_protocol(settings),
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
            proxy_headers=False,
            server_header=False,
        )
    finally:
        if created_metrics_dir is not None:
            shutil.rmtree(created_metrics_dir, ignore_errors=True)
    return 0


def demo(settings: Settings, host: str, port: int) -> int:
    from proxy.demo import run_demo

    sock = _listening(host, port)
    if sock is None:
        return FAILED
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(settings, sock=sock, host=host))
    return 0


def _listening(host: str, port: int) -> socket.socket | None:
    """A socket bound and listening on host:port, or None after one line on stderr."""
    from proxy.demo import listen

    try:
        return listen(host, port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"tollgate: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return None


def _shown(host: str) -> str:
    """The host of a URL a person can open: loopback for a wildcard, brackets for IPv6."""
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def mock_upstream(settings: Settings, host: str, port: int) -> int:
    """The built-in mock upstream on host:port until Ctrl+C or SIGTERM (exit 0)."""
    import uvicorn

    from proxy.mock_upstream import create_mock_upstream

    sock = _listening(host, port)
    if sock is None:
        return FAILED
    url = f"http://{_shown(host)}:{sock.getsockname()[1]}/v1"
    print(
        f"Tollgate's mock upstream is answering at {url} (no provider, no key needed).\n"
        f"Point Tollgate at it:  TOLLGATE_UPSTREAM_URL={url} tollgate serve\n"
        "Press Ctrl+C to stop.",
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_mock_upstream(), log_level=settings.log_level, access_log=False)
    )
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve(sockets=[sock]))
    return 0
