"""A client's key as the proxy sees it: its form, its secret, revocation and rotation, and the
models it may use; a refused key is a 401 (a refused model a 403) and nothing goes upstream."""

from __future__ import annotations

import pytest

from tests.answers import assert_auth_failed, assert_error
from tests.conftest import HELLO, Harness, bearer


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("sk-1234567890abcdef1234567890abcdef", id="openai-style"),
        pytest.param("sk-tg-", id="prefix-only"),
        pytest.param("sk-tg-0123456789abcdef_short", id="short-secret"),
        pytest.param("sk-tg-0123456789ABCDEF_" + "a" * 43, id="uppercase-id"),
        pytest.param("sk-tg-0123456789abcdef_" + "a" * 42 + "!", id="bad-character"),
        pytest.param("sk-tg-0123456789abcdef" + "a" * 43, id="no-separator"),
        pytest.param("sk-tg-0123456789abcdef_" + "a" * 500, id="too-long"),
    ],
)
def test_malformed_key_is_401(harness: Harness, token: str) -> None:
    assert_auth_failed(harness.chat(token))
    assert harness.mock.requests == []


def test_unknown_key_id_is_401(harness: Harness) -> None:
    harness.create_key()
    assert_auth_failed(harness.chat("sk-tg-0123456789abcdef_" + "A" * 43))
    assert harness.mock.requests == []


def test_right_id_with_wrong_secret_is_401(harness: Harness) -> None:
    record = harness.create_key()
    forged = f"sk-tg-{record['id']}_" + "x" * 43
    assert forged != record["key"]
    assert_auth_failed(harness.chat(forged))
    assert harness.mock.requests == []
    assert harness.chat(record["key"]).status_code == 200


def test_revoked_key_is_401_on_its_next_request(harness: Harness) -> None:
    record = harness.create_key()
    assert harness.chat(record["key"]).status_code == 200
    assert harness.admin("DELETE", f"/admin/keys/{record['id']}").status_code == 200
    assert_auth_failed(harness.chat(record["key"]))
    assert_auth_failed(harness.client.get("/v1/models", headers=bearer(record["key"])))
    assert len(harness.mock.requests) == 1


def test_rotated_key_old_secret_fails_and_new_one_works(harness: Harness) -> None:
    record = harness.create_key()
    rotated = harness.admin("POST", f"/admin/keys/{record['id']}/rotate").json()
    assert rotated["id"] == record["id"]
    assert rotated["key"] != record["key"]
    assert_auth_failed(harness.chat(record["key"]))
    assert harness.chat(rotated["key"]).status_code == 200


def test_model_outside_allowed_models_is_403(harness: Harness) -> None:
    key = harness.create_key(allowed_models=["gpt-4o"])["key"]
    response = harness.chat(key, HELLO)
    error = assert_error(response, 403, "permission_error", "model_not_allowed")
    assert error["param"] == "model"
    assert "gpt-4o-mini" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert harness.mock.requests == []
    assert harness.chat(key, {**HELLO, "model": "gpt-4o"}).status_code == 200


def test_model_allowed_by_prefix_only_is_403(harness: Harness) -> None:
    key = harness.create_key(allowed_models=["gpt-4o-mini"])["key"]
    for model in ("gpt-4o", "gpt-4o-mini-2", "gpt-4o-min"):
        response = harness.chat(key, {**HELLO, "model": model})
        assert_error(response, 403, "permission_error", "model_not_allowed")
    assert harness.mock.requests == []
