"""The usage spool: settlements that could not reach Redis wait here as JSON Lines.

Replay sends each line through the idempotent settle script (request ids deduplicate), so a
crash during replay never counts a record twice; the file is cut only after its lines landed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("tollgate.spool")


def _replaying(pid: int) -> bool:
    """Whether the process that claimed a file may still be replaying it.

    This process replays in one loop, so a claim of its own pid found at the start of a round
    was left by an earlier process with the same pid (a restarted container).
    """
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # One file per process: workers never interleave writes, and each replays its own.
        self.path = directory / f"usage-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def append(self, entry: str) -> None:
        """One entry (a JSON line without its newline), on disk before this returns."""
        line = entry + "\n"
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as spool_file:
                spool_file.write(line)
                spool_file.flush()
                os.fsync(spool_file.fileno())

    def files(self) -> list[Path]:
        """Every spool file in the directory, also those a dead process left behind: its own
        files and the ones it had claimed for a replay it never finished."""
        if not self.directory.is_dir():
            return []
        found = list(self.directory.glob("usage-*.jsonl"))
        for claimed in self.directory.glob("usage-*.replaying-*"):
            owner = claimed.suffix.removeprefix(".replaying-")
            if owner.isdigit() and not _replaying(int(owner)):
                found.append(claimed)
        return sorted(found)

    def pending(self) -> int:
        count = 0
        for path in self.files():
            with path.open("rb") as spool_file:
                count += sum(1 for _ in spool_file)
        return count

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                log.error("spool %s: dropping a torn line of %d bytes", path, len(line))
        return entries

    def claim(self, path: Path) -> Path | None:
        """Rename a file before replaying it, so two processes never replay the same one."""
        claimed = path.with_suffix(f".replaying-{os.getpid()}")
        try:
            path.rename(claimed)
        except FileNotFoundError:
            return None
        return claimed
