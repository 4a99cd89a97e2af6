"""The admin API of a running Tollgate over HTTP, for integration tests and benchmarks: keys,
their records, usage and the raw record export, with the one admin token of tests/servers.py.
(Unit tests reach the in-process app through conftest's `Harness` instead.)
"""

from __future__ import annotations

import json
import math
import time
from types import TracebackType
from typing import Any

import httpx

from tests.servers import ADMIN_TOKEN, wait_for


def _window(since: float) -> dict[str, int]:
    """From a second before `since` (never before the epoch: 0 means every record) to a minute
    from now, in Unix seconds."""
    return {"since": max(0, math.floor(since) - 1), "until": math.ceil(time.time()) + 60}


class Admin:
    """The admin API of one proxy; close it (or use it as a context manager) when done."""

    def __init__(self, base_url: str, *, trust_env: bool = True) -> None:
        self.client = httpx.Client(
            base_url=base_url,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
            trust_env=trust_env,
        )

    def __enter__(self) -> Admin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def create_key(self, **fields: Any) -> dict[str, Any]:
        response = self.client.post("/admin/keys", json={"name": "integration", **fields})
        assert response.status_code == 201, response.text
        record: dict[str, Any] = response.json()
        return record

    def key(self, key_id: str) -> dict[str, Any]:
        response = self.client.get(f"/admin/keys/{key_id}")
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record

    def usage(self, key_id: str, *, since: float, group_by: str = "model") -> dict[str, Any]:
        response = self.client.get(
            f"/admin/keys/{key_id}/usage", params={**_window(since), "group_by": group_by}
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def export(self, *, since: float) -> list[dict[str, Any]]:
        response = self.client.get("/admin/usage/export", params=_window(since))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.text.splitlines() if line]

    def record(self, request_id: str, *, since: float, timeout_s: float = 10) -> dict[str, Any]:
        """The usage record of one request, by Tollgate's id or the one the client sent,
        waiting (bounded) for its settlement."""
        found: list[dict[str, Any]] = []

        def landed() -> bool:
            found[:] = [
                r
                for r in self.export(since=since)
                if request_id in (r["request_id"], r.get("client_request_id"))
            ]
            return bool(found)

        wait_for(landed, timeout_s=timeout_s, what=f"usage record of {request_id}")
        assert len(found) == 1, found
        return found[0]
