"""GET /v1/models and /v1/models/{id}: the upstream's list, filtered by the key's models."""

from __future__ import annotations

import pytest

from tests.answers import assert_auth_failed, assert_error
from tests.conftest import Harness, bearer


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
def test_models_aliases_answer_alike(harness: Harness, key: str, prefix: str) -> None:
    listing = harness.client.get(f"{prefix}/models", headers=bearer(key))
    assert listing.status_code == 200
    assert listing.json() == harness.client.get("/v1/models", headers=bearer(key)).json()
    one = harness.client.get(f"{prefix}/models/gpt-4o", headers=bearer(key))
    assert one.status_code == 200
    assert one.json()["id"] == "gpt-4o"


def test_models_lists_the_upstream_models(harness: Harness, key: str) -> None:
    response = harness.client.get("/v1/models", headers=bearer(key))
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "list"
    assert [m["id"] for m in answer["data"]] == ["gpt-4o-mini", "gpt-4o", "mock-slow", "mock-gated"]
    assert all(m["object"] == "model" for m in answer["data"])


def test_models_are_filtered_by_allowed_models(harness: Harness) -> None:
    key = harness.create_key(allowed_models=["gpt-4o", "not-upstream"])["key"]
    response = harness.client.get("/v1/models", headers=bearer(key))
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["gpt-4o"]


def test_model_lookup_of_a_disallowed_model_is_404(harness: Harness) -> None:
    key = harness.create_key(allowed_models=["gpt-4o"])["key"]
    response = harness.client.get("/v1/models/gpt-4o-mini", headers=bearer(key))
    error = assert_error(response, 404, "invalid_request_error", "not_found")
    assert error["param"] == "model"
    allowed = harness.client.get("/v1/models/gpt-4o", headers=bearer(key))
    assert allowed.status_code == 200
    assert allowed.json()["id"] == "gpt-4o"


def test_model_lookup_of_an_unknown_model_is_404(harness: Harness, key: str) -> None:
    response = harness.client.get("/v1/models/no-such-model", headers=bearer(key))
    assert_error(response, 404, "invalid_request_error", "not_found")


def test_models_need_a_valid_key(harness: Harness) -> None:
    assert_auth_failed(harness.client.get("/v1/models"))
    assert_auth_failed(harness.client.get("/v1/models/gpt-4o"))
    bad = bearer("sk-tg-0123456789abcdef_" + "a" * 43)
    assert_auth_failed(harness.client.get("/v1/models", headers=bad))
