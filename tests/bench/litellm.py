"""The optional LiteLLM target of the HTTP benchmark (`--litellm`), in its own venv under /tmp.

LiteLLM forwards no client header, so each traffic type gets its own instance whose api_base
picks the mock upstream's JSON or SSE answer by path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.servers import ProxyServer, free_port, wait_for

VERSION = "1.109.1"
VENV = Path(tempfile.gettempdir()) / "tollgate-bench-litellm"
MASTER_KEY = "sk-bench-litellm-master"
# litellm 1.109.1 pins certifi>=2026.10.19 and litellm-proxy-extras==0.4.113, which the package
# index does not hold (yet); neither matters to a proxy without a database, so uv overrides them.
_OVERRIDES = "certifi>=2024.2.2\nlitellm-proxy-extras>=0.4\n"


def _installed() -> bool:
    python = VENV / "bin" / "python"
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return check.stdout.strip() == VERSION and (VENV / "bin" / "litellm").exists()


def ensure_installed() -> Path:
    """`litellm[proxy]==VERSION` in VENV (not the project's venv); returns its `litellm`."""
    if not _installed():
        print(f"installing litellm[proxy]=={VERSION} into {VENV} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "uv"], check=True, timeout=300)
        overrides = VENV / "overrides.txt"
        overrides.write_text(_OVERRIDES, encoding="utf-8")
        subprocess.run(
            [str(VENV / "bin" / "uv"), "pip", "install", "--quiet",
             "--python", str(VENV / "bin" / "python"), "--override", str(overrides),
             f"litellm[proxy]=={VERSION}"],
            check=True, timeout=900, env={**os.environ, "UV_NATIVE_TLS": "1"},
        )  # fmt: skip
    return VENV / "bin" / "litellm"


def _config(api_base: str) -> str:
    return f"""model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {api_base}
      api_key: sk-upstream-bench
general_settings:
  master_key: {MASTER_KEY}
litellm_settings:
  drop_params: true
  request_timeout: 60
"""


@contextmanager
def litellm_server(directory: Path, *, api_base: str) -> Iterator[ProxyServer]:
    """`litellm --config ...` on a free loopback port, one worker, in its own process group."""
    binary = ensure_installed()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "litellm.yaml"
    config.write_text(_config(api_base), encoding="utf-8")
    server = ProxyServer(env={}, args=[])
    server.port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "VIRTUAL_ENV"))},
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list from the internet
        "LITELLM_MODE": "PRODUCTION",  # no .env loading
        "NO_PROXY": "*",
    }
    server.process = subprocess.Popen(
        [str(binary), "--config", str(config), "--host", "127.0.0.1",
         "--port", str(server.port), "--num_workers", "1"],
        env=env, cwd=directory, stdout=server.log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:

        def ready() -> bool:
            assert server.process is not None
            if server.process.poll() is not None:
                raise RuntimeError(f"litellm exited early:\n{server.output()[-4000:]}")
            url = server.url + "/health/liveliness"
            return httpx.get(url, timeout=1).status_code == 200

        wait_for(ready, timeout_s=180, what="litellm to answer")
        yield server
    finally:
        server.stop()
        server.log.close()
        server.log_path.unlink(missing_ok=True)
