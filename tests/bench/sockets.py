"""Which sockets a server's process tree holds open, by what each one connects to.

Counts the `socket:[inode]` links in /proc/<pid>/fd and looks each inode up in the kernel's
TCP tables (loopback, IPv4 and IPv6), so a leak shows up as the kind that keeps growing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tests.bench import procfs

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def inodes(pids: list[int]) -> list[int]:
    """The inode of every socket the processes hold (one per open descriptor)."""
    found: list[int] = []
    for pid in pids:
        fd_dir = _PROC / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue  # ended while we looked
        for name in names:
            try:
                target = os.readlink(fd_dir / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.append(int(target[8:-1]))
    return found


def _tcp_table() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) for every TCP socket of this namespace."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                            state)  # fmt: skip
    return table


def census(root: int, *, listen_port: int, peers: Mapping[str, int]) -> dict[str, int]:
    """Sockets of `root`'s tree: `total`, `listen`, `client` (accepted on `listen_port`), one
    count per named peer port (e.g. upstream, redis), and `other` (Unix sockets, such as the
    event loop's self-pipe, or TCP to anything else)."""
    held = inodes(procfs.tree(root))
    table = _tcp_table()
    by_port = {port: name for name, port in peers.items()}
    counts = dict.fromkeys(("total", "listen", "client", *peers, "other"), 0)
    counts["total"] = len(held)
    for inode in held:
        entry = table.get(inode)
        if entry is None:
            counts["other"] += 1
        elif entry[2] == _LISTEN:
            counts["listen"] += 1
        elif entry[1] in by_port:
            counts[by_port[entry[1]]] += 1
        elif entry[0] == listen_port:
            counts["client"] += 1
        else:
            counts["other"] += 1
    return counts
