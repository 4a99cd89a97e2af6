"""The ledger: what is settled, what is released instead, and what waits for the store."""

from __future__ import annotations

import httpx

from proxy import store as keys_of
from proxy.config import Settings
from tests.answers import assert_error
from tests.conftest import HELLO, HarnessFactory, bearer
from tests.servers import free_port


def test_a_request_that_never_connected_is_released_without_a_record(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with harness_factory(settings, upstream="real", upstream_url=unreachable) as harness:
        record = harness.create_key(credits=1, max_concurrency=1)
        for body in (HELLO, {**HELLO, "stream": True}):
            response = harness.client.post(
                "/v1/chat/completions", json=body, headers=bearer(record["key"])
            )
            assert_error(response, 502, "upstream_error")
        embeddings = harness.client.post(
            "/v1/embeddings", json={"model": "m", "input": "x"}, headers=bearer(record["key"])
        )
        assert_error(embeddings, 502, "upstream_error")
        assert harness.export() == []
        after = harness.admin("GET", f"/admin/keys/{record['id']}").json()
        assert (after["credits"], after["reserved_credits"]) == (1, 0)
        inflight = harness.run(
            harness.gateway.store.client.zcard, keys_of.inflight_key(record["id"])
        )
        assert inflight == 0
        metrics = harness.client.get("/metrics").text
        assert 'status="502"' in metrics


def test_a_request_the_upstream_dropped_after_connecting_is_recorded(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": []})
        raise httpx.ReadError("connection reset", request=request)

    with harness_factory(settings, upstream=httpx.MockTransport(handler)) as harness:
        record = harness.create_key()
        response = harness.chat(record["key"], HELLO)
        assert_error(response, 502, "upstream_error")
        [usage] = harness.export()
        assert usage["request_id"] == response.headers["x-request-id"]
        assert (usage["status"], usage["cost_usd"]) == (502, 0)
