"""Where a Tollgate worker spends its CPU under load: a py-spy recording and its summary.

py-spy is not a project dependency: pass its binary (`pip install py-spy` anywhere). Samples
are on-CPU only (py-spy leaves idle threads out); C code shows as the Python line calling it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.load import Load
from tests.servers import REPO

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
TOP = 15


def _package(path: str) -> str:
    """The top-level package of a frame's file (py-spy shows paths relative to sys.path)."""
    path = path.split("site-packages/", 1)[-1].removeprefix(f"{REPO}/")
    path = re.sub(r"^.*/python3\.\d+/", "", path)
    top = path.split("/", 1)[0].removesuffix(".py")
    return "proxy (Tollgate)" if top == "proxy" else top


def _short(frame: str) -> str:
    """`function (…/site-packages/pkg/mod.py:12)` -> `function (pkg/mod.py:12)`."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file").split("site-packages/", 1)[-1].removeprefix(f"{REPO}/")
    path = re.sub(r"^.*/python3\.\d+/", "", path)
    line = f":{match.group('line')}" if match.group("line") else ""
    return f"{match.group('function')} ({path}{line})"


def summarize(raw: str, top: int = TOP) -> dict[str, Any]:
    """Self time per frame (the leaf of each stack) and per package; inclusive time of
    Tollgate's own functions."""
    self_time: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_time[_short(frames[-1])] += count
        match = _FRAME.match(frames[-1])
        packages[_package(match.group("file") if match else "")] += count
        for frame in set(frames):  # Tollgate's own steps, each with what it calls
            if frame.endswith(")") and " (proxy/" in frame:
                inclusive[_short(frame)] += count

    def share(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"frame": k, "samples": v, "percent": round(100 * v / max(total, 1), 1)}
            for k, v in counter.most_common(n)
        ]

    return {
        "samples": total,
        "self": share(self_time, top),
        "packages": share(packages, top),
        "inclusive": share(inclusive, 20),
    }


def profile(
    pid: int, *, seconds: int, out: Path, binary: str | None, load: Callable[[], Load]
) -> dict[str, Any]:
    """Record `pid` for `seconds` while `load()` runs; returns the summary (and keeps `out`)."""
    py_spy = binary or shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy not found: pip install py-spy, then pass --py-spy PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
         "--function", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        driven = load()
        _, errors = recorder.communicate(timeout=seconds + 30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(timeout=10)
    if recorder.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({recorder.returncode}): {errors.decode()[-2000:]}")
    summary = summarize(out.read_text(encoding="utf-8", errors="replace"))
    summary["raw_file"] = str(out)
    summary["requests_per_s_while_recorded"] = round(driven.requests_per_s, 1)
    return summary


def table(summary: dict[str, Any], *, title: str) -> str:
    lines = [f"py-spy: {summary['samples']} on-CPU samples of {title}",
             "", "| self % | frame |", "|---:|---|"]  # fmt: skip
    lines += [f"| {f['percent']} | `{f['frame']}` |" for f in summary["self"]]
    lines += ["", "| self % | package |", "|---:|---|"]
    lines += [f"| {f['percent']} | {f['frame']} |" for f in summary["packages"]]
    lines += ["", "| inclusive % | Tollgate function |", "|---:|---|"]
    lines += [f"| {f['percent']} | `{f['frame']}` |" for f in summary["inclusive"]]
    return "\n".join(lines)
