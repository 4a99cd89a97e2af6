"""Expiry, rotation grace, restore, unlimited credits again and glob-allowed models: the
admission script on every store (time passed in) and the admin API's fields."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import store as keys_of
from proxy.keys import Keyring, glob_matches, parse_key
from proxy.store import Store
from tests.conftest import HELLO, Harness, bearer
from tests.test_limits import T0, Key, new_key, store  # noqa: F401  (store: the fixture)


@pytest.mark.anyio
async def test_key_is_refused_as_expired_from_its_expiry_on(store: Store) -> None:  # noqa: F811
    key = await new_key(store)
    await store.client.hset(keys_of.record_key(key.id), "expires_ms", str(T0))
    assert (await key.admit(T0 - 1)).verdict == "ok"
    expired = await key.admit(T0)
    assert (expired.verdict, expired.key_name) == ("expired", "k")
    assert await store.client.zcard(keys_of.inflight_key(key.id)) == 1  # nothing written


@pytest.mark.anyio
async def test_previous_secret_works_only_within_its_grace(store: Store) -> None:  # noqa: F811
    key = await new_key(store)
    keyring = Keyring(store)
    rotated = await keyring.rotate(key.id, grace_s=60)
    assert rotated is not None
    until = int(await store.client.hget(keys_of.record_key(key.id), "prev_until_ms"))
    new = Key(store, rotated)
    assert (await key.admit(until - 1)).verdict == "ok"
    assert (await new.admit(until - 1)).verdict == "ok"
    assert (await key.admit(until)).verdict == "unknown_key"
    assert (await new.admit(until)).verdict == "ok"
    again = await keyring.rotate(key.id)  # no grace: the previous secret is gone at once
    assert again is not None and again["previous_secret_valid_until"] is None
    assert (await new.admit(until - 1)).verdict == "unknown_key"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pattern", "model", "allowed"),
    [
        ("gpt-4o*", "gpt-4o-mini", True),
        ("gpt-4o*", "gpt-4o", True),
        ("gpt-4o*", "gpt-4", False),
        ("*mini", "gpt-4o-mini", True),
        ("*mini", "gpt-4o-mini-x", False),
        ("g?t-*-m*i", "gpt-4o-mini", True),
        ("a*b*c", "abbc", True),
        ("a*b*c", "acb", False),
        ("a*a*a*a*a*a*a*b", "a" * 250, False),
        ("x.%[]+-^$(", "x.%[]+-^$(", True),
        ("x.*", "xy-z", False),
        ("*", "anything", True),
        ("??", "abc", False),
    ],
)
async def test_allowed_models_are_globs_matched_alike_in_script_and_python(
    store: Store,  # noqa: F811
    pattern: str,
    model: str,
    allowed: bool,
) -> None:
    key = await new_key(store, models=[pattern])
    verdict = (await key.admit(T0, model=model)).verdict
    assert verdict == ("ok" if allowed else "model_not_allowed")
    assert glob_matches(pattern, model) is allowed


def test_create_and_patch_expires_at_shown_in_the_record(harness: Harness) -> None:
    record = harness.create_key(expires_at="2030-01-31T01:00:00+01:00")
    assert record["expires_at"] == "2030-01-31T00:00:00Z"
    patched = harness.admin("PATCH", f"/admin/keys/{record['id']}", json={"expires_at": None})
    assert patched.json()["expires_at"] is None
    naive = harness.admin(
        "PATCH", f"/admin/keys/{record['id']}", json={"expires_at": "2031-02-03T04:05:06"}
    )
    assert naive.json()["expires_at"] == "2031-02-03T04:05:06Z"


@pytest.mark.parametrize("value", ["tomorrow", 1234, "2030-13-01", "", True])
def test_bad_expires_at_is_400_naming_it(harness: Harness, value: Any) -> None:
    response = harness.admin("POST", "/admin/keys", json={"name": "x", "expires_at": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "expires_at"


def test_expired_key_is_401_api_key_expired_on_chat_and_models(harness: Harness) -> None:
    record = harness.create_key(expires_at="2001-01-01T00:00:00Z")
    for response in (
        harness.chat(record["key"], HELLO),
        harness.client.get("/v1/models", headers=bearer(record["key"])),
        harness.client.get("/v1/models/gpt-4o-mini", headers=bearer(record["key"])),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "API key expired"
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_restore_undoes_a_revoke_and_unknown_id_is_404(harness: Harness) -> None:
    record = harness.create_key()
    harness.admin("DELETE", f"/admin/keys/{record['id']}")
    assert harness.chat(record["key"], HELLO).status_code == 401
    restored = harness.admin("POST", f"/admin/keys/{record['id']}/restore")
    assert restored.status_code == 200
    assert restored.json()["revoked"] is False
    assert harness.chat(record["key"], HELLO).status_code == 200
    assert harness.admin("POST", "/admin/keys/0123456789abcdef/restore").status_code == 404


@pytest.mark.parametrize("body", [{"grace_seconds": -1}, {"grace_seconds": 2_592_001},
                                  {"grace_seconds": 1.5}, {"grace": 5}])  # fmt: skip
def test_bad_grace_is_400(harness: Harness, body: dict[str, Any]) -> None:
    record = harness.create_key()
    response = harness.admin("POST", f"/admin/keys/{record['id']}/rotate", json=body)
    assert response.status_code == 400
    assert harness.chat(record["key"], HELLO).status_code == 200  # not rotated


def test_rotate_with_grace_keeps_both_secrets_working(harness: Harness) -> None:
    record = harness.create_key()
    response = harness.admin(
        "POST", f"/admin/keys/{record['id']}/rotate", json={"grace_seconds": 3600}
    )
    assert response.status_code == 200
    assert response.json()["previous_secret_valid_until"] is not None
    assert harness.chat(record["key"], HELLO).status_code == 200
    assert harness.chat(response.json()["key"], HELLO).status_code == 200
    models = harness.client.get("/v1/models", headers=bearer(record["key"]))
    assert models.status_code == 200


def test_patch_credits_null_makes_the_balance_unlimited(harness: Harness) -> None:
    record = harness.create_key(credits=0)
    assert harness.chat(record["key"], HELLO).status_code == 402
    response = harness.admin("PATCH", f"/admin/keys/{record['id']}", json={"credits": None})
    assert response.status_code == 200
    assert response.json()["credits"] is None
    assert harness.chat(record["key"], HELLO).status_code == 200
    numeric = harness.admin("PATCH", f"/admin/keys/{record['id']}", json={"credits": 5})
    assert numeric.status_code == 400
    assert numeric.json()["error"]["param"] == "credits"


def test_allowed_models_refuse_more_than_64_globs(harness: Harness) -> None:
    response = harness.admin(
        "POST", "/admin/keys", json={"name": "x", "allowed_models": [f"m{i}*" for i in range(65)]}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "allowed_models"


def test_parse_key_of_rotated_secret_keeps_the_id(harness: Harness) -> None:
    record = harness.create_key()
    rotated = harness.admin("POST", f"/admin/keys/{record['id']}/rotate").json()
    presented = parse_key(rotated["key"])
    assert presented is not None and presented.key_id == record["id"]
