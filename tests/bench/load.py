"""Load for the HTTP benchmark: one bounded `wrk` run and what its Lua done() reports.

wrk's own CPU time is kept too: near one core's worth means wrk, not the target, set the pace.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk" / "chat.lua"
_MARK = "BENCH_RESULT "


class LoadError(RuntimeError):
    """wrk failed, or requests failed: the run's figures would mean nothing."""


@dataclass(frozen=True, slots=True)
class Load:
    requests: int
    duration_s: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    wrk_cpu_s: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s


def wrk_binary() -> str:
    return shutil.which("wrk") or "/usr/bin/wrk"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    url: str,
    *,
    body_file: Path,
    authorization: str,
    stream_header: str | None,
    connections: int,
    duration_s: int,
    binary: str | None = None,
    warmup: bool = False,
) -> Load:
    """`wrk -t1 -c<connections> -d<duration_s>s` POSTing the body to `url`.

    Any non-2xx answer fails the run (a refusal means a misconfigured target); so do socket
    errors on more than 1 request in 1,000; and, unless this is a warm-up, no answer at all.
    """
    env = {
        **os.environ,
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_AUTHORIZATION": authorization,
        "BENCH_STREAM_HEADER": stream_header or "",
    }
    command = [binary or wrk_binary(), "-t1", f"-c{connections}", f"-d{duration_s}s",
               "--timeout", "10s", "-s", str(SCRIPT), url]  # fmt: skip
    before = _children_cpu_s()
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=duration_s + 30, check=False
    )
    wrk_cpu_s = _children_cpu_s() - before
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    result = json.loads(lines[-1].removeprefix(_MARK))
    errors = {k: int(v) for k, v in result["errors"].items()}
    sockets = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    empty = result["requests"] == 0 and not warmup
    if empty or errors["status"] or sockets * 1000 > result["requests"]:
        raise LoadError(f"requests failed against {url}: {result}\n{done.stdout}")
    latency = result["latency_us"]
    return Load(
        requests=int(result["requests"]),
        duration_s=result["duration_us"] / 1e6,
        errors=errors,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        mean_ms=latency["mean"] / 1000,
        wrk_cpu_s=wrk_cpu_s,
    )
