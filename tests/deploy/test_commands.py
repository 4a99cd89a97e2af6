"""The image's ENTRYPOINT + CMD, and the compose file's `command:` for tollgate, really start a
ready server: each command line, read from its file, runs here with the image's environment,
with only the listen address moved to loopback and a free port.

(`promtool check config` of deploy/prometheus/prometheus.yml is in test_prometheus.py.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.files import COMPOSE, DOCKERFILE, load_yaml
from tests.deploy.tools import tool
from tests.servers import RedisServer, free_port, mock_upstream_server, wait_for

LOOPBACK = "127.0.0.1"


def _final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stage: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stage = []
        stage.append((keyword.upper(), rest.strip()))
    return stage


def _exec_form(keyword: str) -> list[str]:
    """The last ENTRYPOINT or CMD (the one Docker uses), which must be in exec (JSON) form."""
    (*_, raw) = [rest for kw, rest in _final_stage() if kw == keyword]
    command = json.loads(raw)
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), raw
    return command


def _image_env() -> dict[str, str]:
    """The final stage's ENV, in the KEY=VALUE form."""
    env = {}
    for keyword, rest in _final_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=VALUE form"
                env[name] = value
    return env


def _compose_tollgate() -> dict[str, Any]:
    service: dict[str, Any] = load_yaml(COMPOSE)["services"]["tollgate"]
    return service


def _compose_env() -> dict[str, str]:
    """The compose service's fixed settings; ${...} values come from the operator's .env."""
    raw = _compose_tollgate().get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {name: str(value) for name, value in raw.items() if "${" not in str(value)}


def _command(source: str) -> list[str]:
    entrypoint = _exec_form("ENTRYPOINT")
    if source == "dockerfile":
        return [*entrypoint, *_exec_form("CMD")]
    service = _compose_tollgate()
    assert "entrypoint" not in service, "compose must run the image's entrypoint"
    command = service["command"]
    return [*entrypoint, *(shlex.split(command) if isinstance(command, str) else command)]


def _on_loopback(argv: list[str], port: int) -> list[str]:
    """`argv` with only the values of --host and --port replaced."""
    local = list(argv)
    for index, arg in enumerate(local):
        for flag, value in (("--host", LOOPBACK), ("--port", str(port))):
            if arg == flag:
                local[index + 1] = value
            elif arg.startswith(flag + "="):
                local[index] = f"{flag}={value}"
    return local


def _here(env: dict[str, str], root: Path) -> dict[str, str]:
    """The image's absolute paths (metrics dir, spool) moved under `root`."""
    return {k: str(root / v.strip("/")) if v.startswith("/") else v for k, v in env.items()}


def _worker_pids(metrics_dir: Path) -> set[str]:
    """Processes with a multiprocess metrics file (each live gauge has one per process)."""
    return {path.stem.rpartition("_")[2] for path in metrics_dir.glob("gauge_livesum_*.db")}


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream_server() as url:
        yield url


@pytest.mark.parametrize("source", ["dockerfile", "compose"])
def test_container_command_starts_a_ready_server(
    source: str, real_redis: RedisServer, upstream: str, tmp_path: Path
) -> None:
    argv = _command(source)
    assert argv[0] == "tollgate", argv
    port = free_port()
    local = [tool("tollgate"), *_on_loopback(argv, port)[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    image_env = _here(_image_env(), tmp_path)
    env.update(image_env)
    if source == "compose":
        env.update(_compose_env())
    env.update(
        {
            # Where flags do not set the listen address (the image's bare `serve`), the
            # environment does; flags found in the command win over it.
            "TOLLGATE_HOST": LOOPBACK,
            "TOLLGATE_PORT": str(port),
            "TOLLGATE_REDIS_URL": real_redis.url,
            "TOLLGATE_UPSTREAM_URL": upstream,
        }
    )
    url = f"http://{LOOPBACK}:{port}"
    log_path = tmp_path / "tollgate.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            local, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"{local} exited early:\n{log_path.read_text()}")
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200

            wait_for(ready, timeout_s=30, what=f"{' '.join(argv)} to be ready")
            metrics = httpx.get(f"{url}/metrics", timeout=5)
            assert metrics.status_code == 200, metrics.text
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "tollgate_inflight_requests" in metrics.text
            # The image's PROMETHEUS_MULTIPROC_DIR is in force: each worker writes its file there.
            assert "PROMETHEUS_MULTIPROC_DIR" in image_env, "the image must set it (workers)"
            metrics_dir = Path(image_env["PROMETHEUS_MULTIPROC_DIR"])
            workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 1
            wait_for(
                lambda: len(_worker_pids(metrics_dir)) == workers,
                timeout_s=15,
                what=f"{workers} worker(s) writing metrics to {metrics_dir}",
            )
            # A container stop (SIGTERM) drains and ends cleanly.
            os.killpg(process.pid, signal.SIGTERM)
            assert process.wait(timeout=20) == 0, log_path.read_text()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
