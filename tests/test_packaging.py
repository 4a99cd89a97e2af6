"""The distribution: a wheel built from what the image's builder stage copies holds every module,
the Lua scripts, the price table and the console, carries the licence, and builds without a
setuptools warning; the editable install of scripts/venv.sh prints none either."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "proxy"


def _builder_sources() -> list[str]:
    """The sources of the Dockerfile builder stage's COPY lines: the image's build context."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    builder = text.split("\nFROM ", 2)[1]
    sources: list[str] = []
    for line in builder.splitlines():
        if line.startswith("COPY "):
            *copied, _destination = line.split()[1:]
            sources.extend(copied)
    return sources


def _copy_sources(destination: Path) -> None:
    sources = _builder_sources()
    assert {"pyproject.toml", "proxy"} <= set(sources), sources
    for name in sources:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(
                origin, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(origin, destination / name)


def _warning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"warn", line, re.IGNORECASE)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the wheel, pip's output) of `pip wheel` run on a copy of the builder's sources."""
    source = tmp_path_factory.mktemp("source")
    _copy_sources(source)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    (wheel,) = out.glob("tollgate-*.whl")
    return wheel, output


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _source_files(pattern: str) -> set[str]:
    return {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_wheel_build_prints_no_setuptools_warning(built: tuple[Path, str]) -> None:
    _wheel, output = built
    assert _warning_lines(output) == [], output


def test_wheel_holds_every_module_of_every_subpackage(built: tuple[Path, str]) -> None:
    wheel, _output = built
    modules = _source_files("**/*.py")
    assert "proxy/surfaces/chat.py" in modules
    assert modules - _names(wheel) == set()


def test_wheel_holds_the_lua_scripts_price_table_and_type_marker(built: tuple[Path, str]) -> None:
    wheel, _output = built
    data = _source_files("lua/*.lua") | {"proxy/prices.toml", "proxy/py.typed"}
    assert "proxy/lua/limits_admit.lua" in data
    assert data - _names(wheel) == set()


def test_wheel_holds_the_console_files(built: tuple[Path, str]) -> None:
    wheel, _output = built
    console = _source_files("console/**/*")
    if (PACKAGE / "console").is_dir():
        assert "proxy/console/index.html" in console
    assert console - _names(wheel) == set()


def test_wheel_carries_the_apache_licence(built: tuple[Path, str]) -> None:
    wheel, _output = built
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
        (licence_name,) = [n for n in archive.namelist() if n.endswith("/licenses/LICENSE")]
        licence = archive.read(licence_name).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "Apache License\n                           Version 2.0, January 2004" in licence
    assert licence == (REPO / "LICENSE").read_text()


def test_editable_install_as_venv_sh_runs_it_prints_no_warning(tmp_path: Path) -> None:
    # scripts/venv.sh hides setuptools' "Editable installation." notice, and only that notice.
    (notice_filter,) = re.findall(
        r'editable_notice="([^"]+)"', (REPO / "scripts/venv.sh").read_text()
    )
    source = tmp_path / "source"
    source.mkdir()
    _copy_sources(source)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--disable-pip-version-check", "-e", str(source)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONWARNINGS": notice_filter},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert _warning_lines(output) == [], output
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert installed.stdout.strip() == str(source / "proxy" / "__init__.py"), installed.stderr
