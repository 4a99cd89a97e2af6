"""Real servers for integration tests: redis-server, a Redis Cluster and `tollgate serve`.

Each listens on a free loopback port, lives in a temporary directory and is stopped by its
context manager, so a failing test never leaves a process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# The one admin token of every Tollgate the tests start (in-process or as a process), and the
# upstream key those processes send to their upstream.
ADMIN_TOKEN = "test-admin-token-0123456789"
UPSTREAM_KEY = "sk-upstream-integration-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port that Redis Cluster accepts: at most 55535, with port + 10000 free too."""
    for _ in range(200):
        port = free_port()
        if port <= 55535 and not _port_open(port + 10000):
            return port
        with socket.socket() as sock:
            candidate = 20000 + (port % 30000)
            if sock.connect_ex(("127.0.0.1", candidate)) != 0 and not _port_open(candidate + 10000):
                return candidate
    raise RuntimeError("no free port for a Redis Cluster node")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, made by the openssl CLI
    (scripts/test.sh installs it)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [shutil.which("openssl") or "openssl", "req", "-x509", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def wait_for(check: object, *, timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll `check()` until it returns truthy; fail loudly after `timeout_s`."""
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """A real redis-server on a free loopback port; can be stopped and started again."""

    def __init__(
        self,
        *,
        port: int | None = None,
        cluster: bool = False,
        persistent: bool = False,
        node_timeout_ms: int = 15_000,
    ) -> None:
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.cluster = cluster
        self.persistent = persistent  # AOF with fsync on every write, to survive a restart
        self.node_timeout_ms = node_timeout_ms  # a cluster master silent this long fails over
        self.dir = Path(tempfile.mkdtemp(prefix="tollgate-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
            "--save", "", "--protected-mode", "no",
            "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
            "--enable-debug-command", "local",  # DEBUG SLEEP stalls Redis in failure tests
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", str(self.node_timeout_ms)]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open(self.port), what=f"redis-server on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, check=True, text=True
        )
        return out.stdout.strip()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@contextmanager
def redis_cluster(
    masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 15_000
) -> Iterator[list[RedisServer]]:
    """A real Redis Cluster on loopback: `masters` masters with `replicas` replicas each. The
    list is in `--cluster create` order (masters first); roles change with failovers, so ask
    `role_of()` rather than trusting the order afterwards."""
    nodes = [
        RedisServer(cluster=True, node_timeout_ms=node_timeout_ms)
        for _ in range(masters * (1 + replicas))
    ]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        wait_for(lambda: cluster_ready(nodes, replicas=replicas), timeout_s=30, what="cluster")
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def cluster_ready(nodes: list[RedisServer], *, replicas: int = 0) -> bool:
    """Every running node sees cluster_state:ok and, with replicas, each replica is synced."""
    running = [n for n in nodes if n.process is not None]
    if not all("cluster_state:ok" in n.cli("cluster", "info") for n in running):
        return False
    return replicas == 0 or all(
        "master_link_status:up" in n.cli("info", "replication")
        for n in running
        if role_of(n) == "slave"
    )


def role_of(node: RedisServer) -> str:
    """The role the node itself reports: "master" or "slave"."""
    return node.cli("role").splitlines()[0]


def tollgate_env(
    *,
    redis_url: str,
    upstream_url: str,
    spool_dir: Path | None = None,
    admin_token: str = ADMIN_TOKEN,
    upstream_api_key: str = UPSTREAM_KEY,
    log_level: str = "warning",
    **extra: str,
) -> dict[str, str]:
    """The TOLLGATE_* environment of one `tollgate serve`: its store, its upstream, the admin
    token, where its spool lives (the working directory's default when None) and any other
    setting in `extra` (e.g. TOLLGATE_FAIL_MODE="open")."""
    env = {
        "TOLLGATE_REDIS_URL": redis_url,
        "TOLLGATE_UPSTREAM_URL": upstream_url,
        "TOLLGATE_UPSTREAM_API_KEY": upstream_api_key,
        "TOLLGATE_ADMIN_TOKEN": admin_token,
        "TOLLGATE_LOG_LEVEL": log_level,
    }
    if spool_dir is not None:
        env["TOLLGATE_SPOOL_DIR"] = str(spool_dir)
    return {**env, **extra}


class ProxyServer:
    """`tollgate serve` (or any tollgate command line) as a real subprocess."""

    def __init__(self, *, env: Mapping[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env}
        # "{port}" in `args` is replaced by the free port chosen here.
        template = args or ["serve", "--host", "127.0.0.1", "--port", "{port}"]
        self.args = [a.replace("{port}", str(self.port)) for a in template]
        fd, log_path = tempfile.mkstemp(prefix="tollgate-log-", suffix=".txt")
        self.log = os.fdopen(fd, "wb")
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_path: str = "/healthz") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *self.args],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"tollgate exited early:\n{self.output()}")
            return httpx.get(self.url + ready_path, timeout=1).status_code == 200

        wait_for(ready, timeout_s=30, what="tollgate to answer")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None


@contextmanager
def proxy_server(
    *, env: Mapping[str, str], args: list[str] | None = None, ready_path: str = "/healthz"
) -> Iterator[ProxyServer]:
    server = ProxyServer(env=env, args=args)
    try:
        server.start(ready_path=ready_path)
        yield server
    finally:
        server.stop()
        server.log.close()
        server.log_path.unlink(missing_ok=True)


@contextmanager
def mock_upstream_server(tag: str | None = None) -> Iterator[str]:
    """The built-in mock upstream as a real uvicorn process; yields its base URL (…/v1). With a
    `tag` it names itself in an `x-mock-upstream` header on every answer."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TOLLGATE_MOCK_TAG"}
    if tag is not None:
        env["TOLLGATE_MOCK_TAG"] = tag
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory",
         "proxy.mock_upstream:create_mock_upstream_from_environ",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _port_open(port), what="mock upstream")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.kill()
        process.wait(timeout=10)
