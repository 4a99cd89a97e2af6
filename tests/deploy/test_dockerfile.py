"""The image: hadolint-clean, multi-stage, non-root, a working HEALTHCHECK, a lean build context."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.deploy.files import DOCKERFILE, REPO
from tests.deploy.tools import output, run


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _final(keyword: str) -> list[str]:
    return [rest for kw, rest in _stages()[-1] if kw == keyword]


def test_hadolint_finds_no_warnings_or_errors() -> None:
    result = run("hadolint", "--failure-threshold", "warning", str(DOCKERFILE))
    assert result.returncode == 0, output(result)


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    # Guards the test above: the linter really runs and a warning fails it.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    assert run("hadolint", "--failure-threshold", "warning", str(bad)).returncode != 0


def test_builder_stage_builds_a_wheel_and_final_stage_installs_only_wheels() -> None:
    stages = _stages()
    assert len(stages) >= 2
    builder_runs = " ".join(rest for kw, rest in stages[0] if kw == "RUN")
    assert "pip wheel" in builder_runs
    assert stages[-1][0][1].startswith("python:3.11-slim")
    final_runs = " ".join(_final("RUN"))
    assert "--no-index" in final_runs and ".whl" in final_runs
    # The source tree and build tools stay in the builder.
    assert not any("proxy" in rest or "pyproject" in rest for rest in _final("COPY"))
    for compiler in ("gcc", "g++", "build-essential", "clang", "make "):
        assert compiler not in final_runs


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    (user,) = _final("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000


def test_entrypoint_serves_on_8080() -> None:
    assert json.loads(_final("ENTRYPOINT")[0]) == ["tollgate"]
    assert json.loads(_final("CMD")[0]) == ["serve"]
    assert _final("EXPOSE") == ["8080"]


def test_prometheus_multiproc_dir_is_set_and_created_for_the_user() -> None:
    env = " ".join(_final("ENV"))
    assert "PROMETHEUS_MULTIPROC_DIR=/tmp/tollgate-metrics" in env
    runs = " ".join(_final("RUN"))
    assert re.search(r"mkdir -p [^&]*/tmp/tollgate-metrics", runs)
    assert re.search(r"chown [^&]*/tmp/tollgate-metrics", runs)


def _healthcheck_command() -> list[str]:
    (healthcheck,) = _final("HEALTHCHECK")
    command: list[str] = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[0] == "python" and "curl" not in healthcheck and "wget" not in healthcheck
    return [sys.executable, *command[1:]]


@contextmanager
def _server(status: int) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
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


def _check_health(port: int) -> int:
    env = {"TOLLGATE_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(_healthcheck_command(), env=env, timeout=30).returncode


def test_healthcheck_passes_when_healthz_answers_200() -> None:
    with _server(200) as port:
        assert _check_health(port) == 0


def test_healthcheck_fails_when_healthz_answers_503() -> None:
    with _server(503) as port:
        assert _check_health(port) != 0


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [src for rest in _stages()[0] if rest[0] == "COPY" for src in rest[1].split()[:-1]]
    assert copied, "the builder stage copies nothing"
    for source in [*copied, "proxy/app.py", "proxy/lua/limits_admit.lua"]:
        assert not _dockerignored(source.rstrip("/"), patterns), f"{source} must reach the build"
    for dropped in (".git/HEAD", ".venv/bin/python", "tests/test_app.py", "deploy/.env",
                    ".pytest_cache/v", "proxy/__pycache__/app.cpython-311.pyc"):  # fmt: skip
        assert _dockerignored(dropped, patterns), f"{dropped} must stay out of the build context"
