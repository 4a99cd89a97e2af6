"""Runs the external checkers (hadolint, promtool, kubernetes-validate, check-jsonschema)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.files import REPO


def tool(name: str) -> str:
    # The test venv's bin first: pytest is often run as .venv/bin/pytest without the venv on PATH.
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} not found: install the test extra and Debian's prometheus package"
    return found


def run(name: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(name), *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
