"""A proxy process killed with SIGKILL mid-stream: another process's sweeper writes the one
estimated record and releases the reservation and the concurrency slot."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from proxy.sweeper import SWEPT_STATUS
from tests.admin_client import Admin
from tests.servers import RedisServer, mock_upstream_server, proxy_server, tollgate_env, wait_for


def test_killed_proxy_leaves_one_estimated_record_and_no_reservation(
    real_redis: RedisServer,
) -> None:
    with mock_upstream_server() as upstream:
        env = tollgate_env(
            redis_url=real_redis.url,
            upstream_url=upstream,
            TOLLGATE_UPSTREAM_TIMEOUT="3",  # lease 13 s, a sweep every 6.5 s
        )
        with (
            proxy_server(env=env) as doomed,
            proxy_server(env=env) as survivor,
            Admin(survivor.url) as admin,
        ):
            record = admin.create_key(name="crash", credits=1.0, max_concurrency=1)
            first_chunk = threading.Event()
            seen: dict[str, Any] = {}

            def stream() -> None:
                body = {"model": "mock-gated", "stream": True,
                        "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
                headers = {"authorization": f"Bearer {record['key']}"}
                try:
                    with httpx.stream("POST", doomed.url + "/v1/chat/completions", json=body,
                                      headers=headers, timeout=30) as response:  # fmt: skip
                        seen["request_id"] = response.headers["x-request-id"]
                        for _ in response.iter_raw():
                            first_chunk.set()
                except httpx.HTTPError:
                    pass  # the proxy is killed under this stream

            reader = threading.Thread(target=stream)
            reader.start()
            assert first_chunk.wait(15)
            shown = admin.key(record["id"])
            assert shown["reserved_credits"] > 0
            doomed.kill()
            reader.join(15)

            def records() -> list[dict[str, Any]]:
                return admin.export(since=0)

            wait_for(
                lambda: any(r["request_id"] == seen["request_id"] for r in records()),
                timeout_s=45,
                what="the sweeper's record",
            )
            mine = [r for r in records() if r["request_id"] == seen["request_id"]]
            assert len(mine) == 1
            assert mine[0]["usage_source"] == "estimated"
            assert mine[0]["model"] == "mock-gated"
            assert mine[0]["status"] == SWEPT_STATUS
            assert mine[0]["prompt_tokens"] > 0
            after = admin.key(record["id"])
            assert after["reserved_credits"] == 0
            assert after["credits"] == round(1.0 - mine[0]["cost_usd"], 6)
            # The concurrency slot is free again.
            response = httpx.post(
                survivor.url + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
                headers={"authorization": f"Bearer {record['key']}"},
            )
            assert response.status_code == 200
