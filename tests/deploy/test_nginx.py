"""The compose front (deploy/nginx/tollgate.conf) run by a real nginx: the admin API and console
answer only to loopback and private addresses, everything else still reaches Tollgate.

nginx runs the file as compose mounts it, with three test-only changes: it listens on a free
loopback port, its upstream is a local recorder instead of the `tollgate` service (Debian's nginx
predates `resolve`), and the realip module takes the client address from a request header so one
test can speak as any address.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.deploy.files import DEPLOY
from tests.servers import free_port, wait_for

CONF = DEPLOY / "nginx" / "tollgate.conf"
CLIENT_HEADER = "X-Test-Client"  # the address nginx takes as the client's (realip)


@dataclass
class Front:
    port: int
    seen: list[str] = field(default_factory=list)  # paths that reached the upstream

    def get(self, path: str, *, client: str | None = None) -> int:
        """GET `path` sent as written (no client-side normalisation); the status nginx answers."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers={CLIENT_HEADER: client} if client else {})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


@contextmanager
def _recorder(seen: list[str]) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _rendered(port: int, upstream_port: int) -> str:
    text = CONF.read_text()
    text, servers = re.subn(
        r"server\s+tollgate:8080\s+resolve;", f"server 127.0.0.1:{upstream_port};", text
    )
    text, listens = re.subn(r"listen\s+8080;", f"listen 127.0.0.1:{port};", text)
    assert (servers, listens) == (1, 1), "tollgate.conf changed shape; update this test"
    return text


def _main_config(directory: Path, server_conf: Path) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
    set_real_ip_from 127.0.0.1;
    real_ip_header {CLIENT_HEADER};
    include {server_conf};
}}
"""


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx not found: scripts/test.sh installs nginx-light"
    directory = tmp_path_factory.mktemp("nginx")
    seen: list[str] = []
    with _recorder(seen) as upstream_port:
        port = free_port()
        server_conf = directory / "tollgate.conf"
        server_conf.write_text(_rendered(port, upstream_port))
        main = directory / "nginx.conf"
        main.write_text(_main_config(directory, server_conf))
        command = [
            binary,
            "-p",
            str(directory),
            "-c",
            str(main),
            "-e",
            str(directory / "error.log"),
        ]
        check = subprocess.run(
            [*command, "-t"], capture_output=True, text=True, timeout=30, check=False
        )
        assert check.returncode == 0, check.stderr
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            front = Front(port=port, seen=seen)

            def ready() -> bool:
                assert process.poll() is None, (directory / "error.log").read_text()
                return front.get("/healthz") == 200

            wait_for(ready, timeout_s=15, what="nginx")
            yield front
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.mark.parametrize(
    "path",
    ["/admin/", "/admin", "/admin/keys", "/admin/usage/export", "/v1/../admin/keys",
     "/%61dmin/keys", "//admin/keys"],
)  # fmt: skip
def test_admin_from_a_public_address_is_refused_by_nginx(front: Front, path: str) -> None:
    before = len(front.seen)
    assert front.get(path, client="203.0.113.7") == 403
    assert front.seen[before:] == [], "the request must not reach Tollgate"


@pytest.mark.parametrize("client", ["198.51.100.20", "172.32.0.1", "11.0.0.1", "192.169.0.1"])
def test_admin_from_addresses_just_outside_the_private_ranges_is_refused(
    front: Front, client: str
) -> None:
    assert front.get("/admin/keys", client=client) == 403


@pytest.mark.parametrize(
    "client", [None, "127.0.0.1", "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.5"]
)
def test_admin_from_loopback_or_a_private_address_reaches_tollgate(
    front: Front, client: str | None
) -> None:
    before = len(front.seen)
    assert front.get("/admin/keys", client=client) == 200
    assert front.seen[before:] == ["/admin/keys"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/healthz", "/readyz"])
def test_client_routes_from_a_public_address_reach_tollgate(front: Front, path: str) -> None:
    before = len(front.seen)
    assert front.get(path, client="203.0.113.7") == 200
    assert front.seen[before:] == [path]


def test_metrics_are_not_served_through_the_front(front: Front) -> None:
    before = len(front.seen)
    assert front.get("/metrics", client="10.1.2.3") == 404
    assert front.seen[before:] == []
