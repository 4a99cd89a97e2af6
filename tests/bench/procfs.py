"""What /proc says about the benchmarked servers: CPU time and memory of a process tree.

A server's CPU is summed over its whole tree (uvicorn's supervisor and workers, nginx's
master and worker), read before and after a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    raw = (_PROC / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and every descendant still alive."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # ended while we looked
        children.setdefault(parent, []).append(int(entry.name))
    found = [root]
    for pid in found:
        found.extend(children.get(pid, ()))
    return found


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (those still alive)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15)
    return ticks / TICKS_PER_S


def _cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _rss_bytes(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class Memory:
    worker_rss_bytes: list[int]  # each process that serves requests
    total_rss_bytes: int  # the whole tree (supervisor/master included)


def memory(root: int) -> Memory:
    """RSS of the serving processes: the root's children if it has any (uvicorn --workers,
    nginx), else the root itself. Python's multiprocessing helper is no worker."""
    pids = tree(root)
    workers = [p for p in pids[1:] if "resource_tracker" not in _cmdline(p)] or [root]
    return Memory(
        worker_rss_bytes=[_rss_bytes(p) for p in workers],
        total_rss_bytes=sum(_rss_bytes(p) for p in pids),
    )


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, summed over cores, since boot."""
    fields = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / TICKS_PER_S, total / TICKS_PER_S
