"""Expiry, rotation grace, restore and glob-allowed models through the official OpenAI SDK
against a real `tollgate serve` on a real redis-server."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest

from tests.integration.conftest import MESSAGES, Stack

MODEL = "gpt-4o-mini"


def _sdk(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0)


def _chat(sdk: openai.OpenAI, model: str = MODEL) -> str:
    answer = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5)
    return answer.id


def _patch(stack: Stack, key_id: str, **fields: Any) -> dict[str, Any]:
    response = stack.admin.client.patch(f"/admin/keys/{key_id}", json=fields)
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def test_expired_key_gets_401_on_chat_and_models_until_the_expiry_is_lifted(
    stack: Stack, key: dict[str, Any]
) -> None:
    with _sdk(stack, key["key"]) as sdk:
        assert _chat(sdk)
        past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
        record = _patch(stack, key["id"], expires_at=past)
        assert record["expires_at"] is not None and record["expires_at"].endswith("Z")
        with pytest.raises(openai.AuthenticationError) as chat_error:
            _chat(sdk)
        assert chat_error.value.status_code == 401
        assert chat_error.value.body["message"] == "API key expired"  # type: ignore[index]
        assert chat_error.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError) as models_error:
            sdk.models.list()
        assert models_error.value.body["message"] == "API key expired"  # type: ignore[index]
        future = (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None).isoformat()
        assert _patch(stack, key["id"], expires_at=future)["expires_at"] is not None
        assert _chat(sdk)
        assert [m.id for m in sdk.models.list()]
        assert _patch(stack, key["id"], expires_at=None)["expires_at"] is None
        assert _chat(sdk)


def test_rotation_grace_keeps_the_old_secret_until_it_ends_then_refuses_it(
    stack: Stack, key: dict[str, Any]
) -> None:
    response = stack.admin.client.post(f"/admin/keys/{key['id']}/rotate", json={"grace_seconds": 2})
    assert response.status_code == 200, response.text
    rotated = response.json()
    assert rotated["previous_secret_valid_until"] is not None
    with _sdk(stack, key["key"]) as old, _sdk(stack, rotated["key"]) as new:
        assert _chat(old) and _chat(new)
        assert [m.id for m in old.models.list()]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the grace ends by itself, nobody acts
            try:
                _chat(old)
            except openai.AuthenticationError as exc:
                assert exc.body["message"] == "Invalid API key provided"  # type: ignore[index]
                break
            time.sleep(0.2)
        else:
            pytest.fail("the old secret still worked 10 s after a 2 s grace")
        with pytest.raises(openai.AuthenticationError):
            old.models.list()
        assert _chat(new)


def test_rotation_without_grace_refuses_the_old_secret_at_once(
    stack: Stack, key: dict[str, Any]
) -> None:
    response = stack.admin.client.post(f"/admin/keys/{key['id']}/rotate")
    assert response.status_code == 200, response.text
    assert response.json()["previous_secret_valid_until"] is None
    with _sdk(stack, key["key"]) as old, _sdk(stack, response.json()["key"]) as new:
        with pytest.raises(openai.AuthenticationError):
            _chat(old)
        assert _chat(new)


def test_restore_undoes_a_revoke(stack: Stack, key: dict[str, Any]) -> None:
    with _sdk(stack, key["key"]) as sdk:
        assert stack.admin.client.delete(f"/admin/keys/{key['id']}").json()["revoked"] is True
        with pytest.raises(openai.AuthenticationError):
            _chat(sdk)
        restored = stack.admin.client.post(f"/admin/keys/{key['id']}/restore")
        assert restored.status_code == 200, restored.text
        assert restored.json()["revoked"] is False
        assert _chat(sdk)


def test_allowed_model_globs_admit_matching_models_and_filter_the_model_list(
    stack: Stack,
) -> None:
    key = stack.admin.create_key(allowed_models=["gpt-4o-mi?i*", "text-embedding-3-small"])
    with _sdk(stack, key["key"]) as sdk:
        assert _chat(sdk, "gpt-4o-mini")
        with pytest.raises(openai.PermissionDeniedError):
            _chat(sdk, "gpt-4o")
        listed = {m.id for m in sdk.models.list()}
        assert "gpt-4o-mini" in listed
        assert "gpt-4o" not in listed
