"""The admin API of SPEC §6: its token, key records, their changes, credits and usage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from proxy.config import Settings
from proxy.errors import InvalidRequest
from tests.conftest import HELLO, Harness, HarnessFactory
from tests.servers import ADMIN_TOKEN

KEY_FORMAT = re.compile(r"^sk-tg-([0-9a-f]{16})_[A-Za-z0-9_-]{43}$")
RECORD_FIELDS = {
    "id",
    "name",
    "rpm",
    "tpm",
    "max_concurrency",
    "expires_at",
    "budget",
    "budget_spent",
    "budget_resets_at",
    "model_limits",
    "previous_secret_valid_until",
    "credits",
    "reserved_credits",
    "allowed_models",
    "metadata",
    "created_at",
    "revoked",
}
ADMIN_ROUTES = [
    ("POST", "/admin/keys"),
    ("GET", "/admin/keys"),
    ("GET", "/admin/keys/0123456789abcdef"),
    ("PATCH", "/admin/keys/0123456789abcdef"),
    ("DELETE", "/admin/keys/0123456789abcdef"),
    ("POST", "/admin/keys/0123456789abcdef/rotate"),
    ("POST", "/admin/keys/0123456789abcdef/credits"),
    ("GET", "/admin/keys/0123456789abcdef/usage"),
    ("GET", "/admin/usage/export"),
]


def create(harness: Harness, payload: dict[str, Any]) -> httpx.Response:
    return harness.admin("POST", "/admin/keys", json=payload)


def record_of(harness: Harness, key_id: str) -> dict[str, Any]:
    response = harness.admin("GET", f"/admin/keys/{key_id}")
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def assert_bad_request(response: httpx.Response, param: str | None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


def stored_strings(harness: Harness) -> list[str]:
    """Every key name and value the store holds, for secret hunting."""
    client = harness.gateway.store.client

    async def dump() -> list[str]:
        out: list[str] = []
        for name in await client.keys("*"):
            out.append(name)
            kind = await client.type(name)
            if kind == "hash":
                for field, value in (await client.hgetall(name)).items():
                    out += [field, value]
            elif kind == "string":
                out.append(await client.get(name))
            elif kind == "set":
                out += list(await client.smembers(name))
            elif kind == "zset":
                out += [m for m, _ in await client.zrange(name, 0, -1, withscores=True)]
            elif kind == "stream":
                for _id, fields in await client.xrange(name):
                    out += list(fields.values())
        return out

    result: list[str] = harness.run(dump)
    return result


# --- the admin token ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_api_is_404_without_admin_token(
    harness_factory: HarnessFactory, settings: Settings, method: str, path: str
) -> None:
    with harness_factory(settings, admin_token=None) as harness:
        for headers in (
            {},
            {"authorization": f"Bearer {ADMIN_TOKEN}"},
            {"authorization": "Bearer "},
        ):
            response = harness.client.request(method, path, headers=headers, json={"name": "x"})
            assert_not_found(response)
            assert response.json()["error"]["type"] == "invalid_request_error"


def test_admin_api_is_404_with_an_empty_admin_token(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    with harness_factory(settings, admin_token="") as harness:
        response = harness.client.get("/admin/keys", headers={"authorization": "Bearer "})
        assert_not_found(response)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Bearer wrong-token", id="wrong"),
        pytest.param(f"Bearer {ADMIN_TOKEN}x", id="longer"),
        pytest.param(f"Bearer {ADMIN_TOKEN[:-1]}", id="prefix"),
        pytest.param(f"Basic {ADMIN_TOKEN}", id="basic"),
        pytest.param(ADMIN_TOKEN, id="no-scheme"),
    ],
)
def test_admin_api_with_wrong_token_is_401(
    harness: Harness, method: str, path: str, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    response = harness.client.request(method, path, headers=headers, json={"name": "x"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["x-should-retry"] == "false"


def test_admin_token_with_non_ascii_bytes_is_401(harness: Harness) -> None:
    headers = [(b"authorization", "Bearer t\u00f6ken".encode("latin-1"))]
    response = harness.client.get("/admin/keys", headers=headers)
    assert response.status_code == 401


def test_client_api_key_is_not_an_admin_token(harness: Harness) -> None:
    key = harness.create_key()["key"]
    response = harness.client.get("/admin/keys", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 401


def test_admin_token_is_not_a_client_key(harness: Harness) -> None:
    assert harness.chat(ADMIN_TOKEN, HELLO).status_code == 401


# --- create ------------------------------------------------------------------------------------


def test_create_returns_201_with_the_record_and_the_key(harness: Harness) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    response = create(
        harness,
        {
            "name": "alice",
            "rpm": 60,
            "tpm": 40_000,
            "max_concurrency": 4,
            "credits": 5,
            "allowed_models": ["gpt-4o-mini", "gpt-4o"],
            "metadata": {"team": "search", "tier": 2},
        },
    )
    assert response.status_code == 201, response.text
    answer = response.json()
    assert set(answer) == RECORD_FIELDS | {"key"}
    match = KEY_FORMAT.match(answer["key"])
    assert match is not None, answer["key"]
    assert match.group(1) == answer["id"]
    assert answer["name"] == "alice"
    assert (answer["rpm"], answer["tpm"], answer["max_concurrency"]) == (60, 40_000, 4)
    assert answer["credits"] == 5
    assert answer["reserved_credits"] == 0
    assert answer["allowed_models"] == ["gpt-4o-mini", "gpt-4o"]
    assert answer["metadata"] == {"team": "search", "tier": 2}
    assert answer["revoked"] is False
    created = datetime.fromisoformat(answer["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None
    assert before <= created <= datetime.now(UTC) + timedelta(seconds=1)
    assert harness.chat(answer["key"], HELLO).status_code == 200


def test_create_with_only_a_name_is_unlimited(harness: Harness) -> None:
    response = create(harness, {"name": "bob"})
    assert response.status_code == 201
    answer = response.json()
    assert answer["rpm"] is None
    assert answer["tpm"] is None
    assert answer["max_concurrency"] is None
    assert answer["credits"] is None
    assert answer["reserved_credits"] == 0
    assert answer["allowed_models"] is None
    assert answer["metadata"] == {}
    chat = harness.chat(answer["key"], HELLO)
    assert chat.status_code == 200
    assert not [h for h in chat.headers if h.startswith("x-ratelimit-")]


def test_create_gives_every_key_its_own_id_and_secret(harness: Harness) -> None:
    records = [harness.create_key(name=f"k{i}") for i in range(20)]
    assert len({r["id"] for r in records}) == 20
    assert len({r["key"] for r in records}) == 20


def test_secret_appears_in_no_later_answer(harness: Harness) -> None:
    record = harness.create_key(name="secretive", credits=1)
    key, key_id = record["key"], record["id"]
    secret = key.split("_", 1)[1]
    assert harness.chat(key, HELLO).status_code == 200
    answers = [
        harness.admin("GET", "/admin/keys"),
        harness.admin("GET", f"/admin/keys/{key_id}"),
        harness.admin("PATCH", f"/admin/keys/{key_id}", json={"rpm": 10}),
        harness.admin("POST", f"/admin/keys/{key_id}/credits", json={"amount": 1}),
        harness.admin("GET", f"/admin/keys/{key_id}/usage"),
        harness.admin("GET", "/admin/usage/export"),
        harness.admin("DELETE", f"/admin/keys/{key_id}"),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert secret not in response.text
        assert key not in response.text
    listed = answers[0].json()["data"]
    assert [r["id"] for r in listed] == [key_id]
    assert set(listed[0]) == RECORD_FIELDS
    assert set(answers[1].json()) == RECORD_FIELDS


def test_store_holds_only_the_sha256_of_the_key(harness: Harness) -> None:
    record = harness.create_key(name="hashed")
    key, key_id = record["key"], record["id"]
    assert harness.chat(key, HELLO).status_code == 200
    stored = harness.run(harness.gateway.store.client.hgetall, f"tollgate:key:{{{key_id}}}")
    assert stored["hash"] == hashlib.sha256(key.encode()).hexdigest()
    secret = key.split("_", 1)[1]
    everything = stored_strings(harness)
    assert stored["hash"] in everything
    assert not [s for s in everything if secret in s]


def test_list_shows_every_key_in_creation_order(harness: Harness) -> None:
    ids = [harness.create_key(name=f"key-{i}")["id"] for i in range(3)]
    harness.admin("DELETE", f"/admin/keys/{ids[1]}")
    response = harness.admin("GET", "/admin/keys")
    assert response.status_code == 200
    data = response.json()["data"]
    assert sorted(r["id"] for r in data) == sorted(ids)
    assert {r["id"]: r["revoked"] for r in data} == {ids[0]: False, ids[1]: True, ids[2]: False}
    assert [r["created_at"] for r in data] == sorted(r["created_at"] for r in data)


# --- bad payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": None}, "name"),
        ({"name": 5}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"name": "x", "rpm": -1}, "rpm"),
        ({"name": "x", "rpm": 1.5}, "rpm"),
        ({"name": "x", "rpm": "10"}, "rpm"),
        ({"name": "x", "rpm": True}, "rpm"),
        ({"name": "x", "rpm": 10**30}, "rpm"),
        ({"name": "x", "tpm": -5}, "tpm"),
        ({"name": "x", "tpm": [1]}, "tpm"),
        ({"name": "x", "max_concurrency": -1}, "max_concurrency"),
        ({"name": "x", "max_concurrency": "2"}, "max_concurrency"),
        ({"name": "x", "credits": "5"}, "credits"),
        ({"name": "x", "credits": True}, "credits"),
        ({"name": "x", "credits": 1e13}, "credits"),
        ({"name": "x", "credits": [5]}, "credits"),
        ({"name": "x", "allowed_models": "gpt-4o"}, "allowed_models"),
        ({"name": "x", "allowed_models": [1]}, "allowed_models"),
        ({"name": "x", "allowed_models": [""]}, "allowed_models"),
        ({"name": "x", "allowed_models": ["a\nb"]}, "allowed_models"),
        ({"name": "x", "metadata": [1]}, "metadata"),
        ({"name": "x", "metadata": "x"}, "metadata"),
        ({"name": "x", "key": "sk-tg-mine"}, "key"),
        ({"name": "x", "id": "0123456789abcdef"}, "id"),
        ({"name": "x", "revoked": True}, "revoked"),
    ],
)
def test_create_with_a_bad_field_is_400_naming_it(
    harness: Harness, payload: dict[str, Any], param: str
) -> None:
    assert_bad_request(create(harness, payload), param)
    assert harness.admin("GET", "/admin/keys").json()["data"] == []


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[1]", b'"name"', b"\xff", b"[" * 60_000],
)
def test_create_with_a_body_that_is_not_an_object_is_400(harness: Harness, content: bytes) -> None:
    response = harness.admin("POST", "/admin/keys", content=content)
    assert_bad_request(response, None)


@pytest.mark.parametrize(
    "content",
    [
        b'{"name": "\\ud800"}',
        b'{"name": "x", "allowed_models": ["gpt\\udfff"]}',
        b'{"name": "x", "metadata": {"note": "\\ud800"}}',
        b'{"name": "x", "credits": NaN}',
        b'{"name": "x", "credits": Infinity}',
    ],
)
def test_create_with_unstorable_values_is_400(harness: Harness, content: bytes) -> None:
    response = harness.admin("POST", "/admin/keys", content=content)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert harness.admin("GET", "/admin/keys").json()["data"] == []


# --- update, revoke, rotate --------------------------------------------------------------------


def test_patch_changes_limits_name_models_and_metadata(harness: Harness) -> None:
    record = harness.create_key(name="before", metadata={"a": 1})
    key_id = record["id"]
    response = harness.admin(
        "PATCH",
        f"/admin/keys/{key_id}",
        json={
            "name": "after",
            "rpm": 30,
            "tpm": 1000,
            "max_concurrency": 2,
            "allowed_models": ["gpt-4o"],
            "metadata": {"b": [1, 2]},
        },
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == RECORD_FIELDS
    assert answer["name"] == "after"
    assert (answer["rpm"], answer["tpm"], answer["max_concurrency"]) == (30, 1000, 2)
    assert answer["allowed_models"] == ["gpt-4o"]
    assert answer["metadata"] == {"b": [1, 2]}
    assert record_of(harness, key_id) == answer

    assert harness.chat(record["key"], HELLO).status_code == 403
    chat = harness.chat(record["key"], {**HELLO, "model": "gpt-4o"})
    assert chat.status_code == 200
    assert chat.headers["x-ratelimit-limit-requests"] == "30"
    assert chat.headers["x-ratelimit-limit-tokens"] == "1000"


def test_patch_leaves_unmentioned_fields_alone(harness: Harness) -> None:
    record = harness.create_key(
        name="keep", rpm=5, tpm=500, allowed_models=["gpt-4o"], metadata={"k": "v"}, credits=2
    )
    answer = harness.admin("PATCH", f"/admin/keys/{record['id']}", json={"tpm": 700}).json()
    expected = {k: v for k, v in record.items() if k != "key"}
    assert answer == {**expected, "tpm": 700}


def test_patch_null_limits_mean_unlimited(harness: Harness) -> None:
    record = harness.create_key(rpm=1, tpm=10_000, max_concurrency=1)
    key_id = record["id"]
    assert harness.chat(record["key"], HELLO).status_code == 200
    assert harness.chat(record["key"], HELLO).status_code == 429
    answer = harness.admin(
        "PATCH", f"/admin/keys/{key_id}", json={"rpm": None, "tpm": None, "max_concurrency": None}
    ).json()
    assert (answer["rpm"], answer["tpm"], answer["max_concurrency"]) == (None, None, None)
    for _ in range(3):
        chat = harness.chat(record["key"], HELLO)
        assert chat.status_code == 200
        assert not [h for h in chat.headers if h.startswith("x-ratelimit-")]


def test_patch_null_or_empty_allowed_models_allows_every_model(harness: Harness) -> None:
    record = harness.create_key(allowed_models=["gpt-4o"])
    values: tuple[list[str] | None, ...] = (None, [])
    for value in values:
        harness.admin("PATCH", f"/admin/keys/{record['id']}", json={"allowed_models": ["gpt-4o"]})
        answer = harness.admin(
            "PATCH", f"/admin/keys/{record['id']}", json={"allowed_models": value}
        ).json()
        assert answer["allowed_models"] is None
        assert harness.chat(record["key"], HELLO).status_code == 200


def test_patch_metadata_null_clears_it(harness: Harness) -> None:
    record = harness.create_key(metadata={"a": 1})
    answer = harness.admin("PATCH", f"/admin/keys/{record['id']}", json={"metadata": None}).json()
    assert answer["metadata"] == {}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"rpm": -1}, "rpm"),
        ({"tpm": "many"}, "tpm"),
        ({"max_concurrency": 0.5}, "max_concurrency"),
        ({"allowed_models": "gpt-4o"}, "allowed_models"),
        ({"metadata": 3}, "metadata"),
        ({"credits": 10}, "credits"),
        ({"revoked": False}, "revoked"),
        ({"hash": "00"}, "hash"),
    ],
)
def test_patch_with_a_bad_field_is_400_and_changes_nothing(
    harness: Harness, payload: dict[str, Any], param: str
) -> None:
    record = harness.create_key(name="steady", rpm=5)
    response = harness.admin("PATCH", f"/admin/keys/{record['id']}", json=payload)
    assert_bad_request(response, param)
    assert record_of(harness, record["id"]) == {k: v for k, v in record.items() if k != "key"}


def test_delete_revokes_on_the_next_request(harness: Harness) -> None:
    record = harness.create_key(name="soon-gone")
    assert harness.chat(record["key"], HELLO).status_code == 200
    response = harness.admin("DELETE", f"/admin/keys/{record['id']}")
    assert response.status_code == 200
    assert response.json()["revoked"] is True
    assert record_of(harness, record["id"])["revoked"] is True
    assert harness.chat(record["key"], HELLO).status_code == 401
    again = harness.admin("DELETE", f"/admin/keys/{record['id']}")
    assert again.status_code == 200
    assert again.json()["revoked"] is True


def test_rotate_keeps_id_limits_balance_and_history(harness: Harness) -> None:
    record = harness.create_key(
        name="rotating", rpm=100, tpm=50_000, max_concurrency=3, credits=2,
        allowed_models=["gpt-4o-mini"], metadata={"owner": "ops"},
    )  # fmt: skip
    assert harness.chat(record["key"], HELLO).status_code == 200
    before = record_of(harness, record["id"])
    assert before["credits"] < 2

    response = harness.admin("POST", f"/admin/keys/{record['id']}/rotate")
    assert response.status_code == 200, response.text
    rotated = response.json()
    match = KEY_FORMAT.match(rotated["key"])
    assert match is not None and match.group(1) == record["id"]
    assert rotated["key"] != record["key"]
    assert {k: v for k, v in rotated.items() if k != "key"} == before
    assert record_of(harness, record["id"]) == before

    assert harness.chat(record["key"], HELLO).status_code == 401
    assert harness.chat(rotated["key"], HELLO).status_code == 200
    usage = harness.admin("GET", f"/admin/keys/{record['id']}/usage").json()
    assert usage["totals"]["requests"] == 2
    stored = harness.run(
        harness.gateway.store.client.hget, f"tollgate:key:{{{record['id']}}}", "hash"
    )
    assert stored == hashlib.sha256(rotated["key"].encode()).hexdigest()


def test_rotate_of_a_revoked_key_stays_revoked(harness: Harness) -> None:
    record = harness.create_key()
    harness.admin("DELETE", f"/admin/keys/{record['id']}")
    rotated = harness.admin("POST", f"/admin/keys/{record['id']}/rotate").json()
    assert rotated["revoked"] is True
    assert harness.chat(rotated["key"], HELLO).status_code == 401


# --- credits -----------------------------------------------------------------------------------


def test_credits_add_and_remove_in_usd(harness: Harness) -> None:
    record = harness.create_key(credits=1)
    path = f"/admin/keys/{record['id']}/credits"
    added = harness.admin("POST", path, json={"amount": 2.5})
    assert added.status_code == 200, added.text
    assert added.json()["credits"] == 3.5
    removed = harness.admin("POST", path, json={"amount": -0.75})
    assert removed.json()["credits"] == 2.75
    assert record_of(harness, record["id"])["credits"] == 2.75
    assert set(removed.json()) == RECORD_FIELDS


def test_credits_are_shown_with_up_to_six_decimals(harness: Harness) -> None:
    record = harness.create_key(credits=0.1234567)
    assert record["credits"] == 0.123457
    path = f"/admin/keys/{record['id']}/credits"
    answer = harness.admin("POST", path, json={"amount": 0.000001}).json()
    assert answer["credits"] == 0.123458
    assert answer["reserved_credits"] == 0
    raw = harness.admin("GET", f"/admin/keys/{record['id']}").text
    assert '"credits":0.123458' in raw.replace(" ", "")
    stored = harness.run(
        harness.gateway.store.client.hget, f"tollgate:key:{{{record['id']}}}", "credits"
    )
    assert stored == "123458"


def test_credits_after_charges_stay_at_six_decimals(harness: Harness) -> None:
    record = harness.create_key(credits=1)
    for _ in range(3):
        assert harness.chat(record["key"], HELLO).status_code == 200
    credits = record_of(harness, record["id"])["credits"]
    assert 0 < credits < 1
    assert credits == round(credits, 6)
    stored = harness.run(
        harness.gateway.store.client.hget, f"tollgate:key:{{{record['id']}}}", "credits"
    )
    assert round(credits * 1_000_000) == int(stored)


def test_credits_on_an_unlimited_key_start_a_balance(harness: Harness) -> None:
    record = harness.create_key()
    answer = harness.admin("POST", f"/admin/keys/{record['id']}/credits", json={"amount": 1})
    assert answer.json()["credits"] == 1


def test_credits_removed_below_zero_refuse_requests_with_402(harness: Harness) -> None:
    record = harness.create_key(credits=1)
    answer = harness.admin("POST", f"/admin/keys/{record['id']}/credits", json={"amount": -1.5})
    assert answer.json()["credits"] == -0.5
    response = harness.chat(record["key"], HELLO)
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "content",
    [
        b"{}",
        b'{"amount": null}',
        b'{"amount": "5"}',
        b'{"amount": true}',
        b'{"amount": [1]}',
        b'{"amount": NaN}',
        b'{"amount": Infinity}',
        b'{"amount": -Infinity}',
        b'{"amount": 1e13}',
    ],
)
def test_credits_with_a_bad_amount_is_400(harness: Harness, content: bytes) -> None:
    record = harness.create_key(credits=1)
    response = harness.admin("POST", f"/admin/keys/{record['id']}/credits", content=content)
    assert_bad_request(response, "amount")
    assert record_of(harness, record["id"])["credits"] == 1


@pytest.mark.parametrize("amount", [1e12, 1e9 + 0.000001, -1e9 - 0.000001, 2**63 / 1e6])
def test_credits_beyond_a_billion_usd_are_400_never_500(harness: Harness, amount: float) -> None:
    record = harness.create_key(credits=1)
    path = f"/admin/keys/{record['id']}/credits"
    for _ in range(10):
        assert_bad_request(harness.admin("POST", path, json={"amount": amount}), "amount")
    assert record_of(harness, record["id"])["credits"] == 1


def test_credits_that_would_push_the_balance_past_the_bound_are_400(harness: Harness) -> None:
    record = harness.create_key(credits=1e9)
    path = f"/admin/keys/{record['id']}/credits"
    assert_bad_request(harness.admin("POST", path, json={"amount": 0.000001}), "amount")
    for _ in range(2):
        assert harness.admin("POST", path, json={"amount": -1e9}).status_code == 200
    assert record_of(harness, record["id"])["credits"] == -1e9
    assert_bad_request(harness.admin("POST", path, json={"amount": -0.000001}), "amount")
    assert harness.admin("POST", path, json={"amount": 1e9}).json()["credits"] == 0
    assert record_of(harness, record["id"])["credits"] == 0


def test_credits_at_creation_beyond_a_billion_usd_are_400(harness: Harness) -> None:
    assert harness.create_key(credits=-1e9)["credits"] == -1e9
    for credits in (1e9 + 0.000001, -1e9 - 0.000001, 1e12):
        assert_bad_request(create(harness, {"name": "rich", "credits": credits}), "credits")


def test_racing_top_ups_never_together_pass_the_bound(harness: Harness) -> None:
    record = harness.create_key(credits=0)
    keyring = harness.gateway.keyring

    async def race() -> list[object]:
        top_ups = [keyring.add_credits(record["id"], 300_000_000 * 1_000_000) for _ in range(10)]
        results: list[object] = await asyncio.gather(*top_ups, return_exceptions=True)
        return results

    results = harness.run(race)
    refused = [r for r in results if isinstance(r, InvalidRequest)]
    assert len(refused) == 7, results
    assert {r.param for r in refused} == {"amount"}
    assert record_of(harness, record["id"])["credits"] == 900_000_000


def test_credits_on_a_key_that_does_not_exist_create_nothing(harness: Harness) -> None:
    answer = harness.run(harness.gateway.keyring.add_credits, "0123456789abcdef", 1_000_000)
    assert answer is None
    assert harness.run(harness.gateway.store.client.exists, "tollgate:key:{0123456789abcdef}") == 0


# --- bounds on admin payloads ------------------------------------------------------------------

BODY_ROUTES = [
    ("POST", "/admin/keys"),
    ("PATCH", "/admin/keys/{id}"),
    ("POST", "/admin/keys/{id}/credits"),
]


def _chunks(total: int) -> Iterator[bytes]:
    yield b'{"name": "big", "metadata": {"note": "'
    for _ in range(total // 65_536):
        yield b"x" * 65_536
    yield b'"}}'


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("chunked", [False, True])
def test_admin_body_over_64_kib_is_413(
    harness: Harness, method: str, path: str, chunked: bool
) -> None:
    record = harness.create_key(name="steady")
    url = path.format(id=record["id"])
    content = _chunks(5 * 1024 * 1024) if chunked else b"".join(_chunks(5 * 1024 * 1024))
    response = harness.admin(method, url, content=content)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    records = harness.admin("GET", "/admin/keys").json()["data"]
    assert records == [{k: v for k, v in record.items() if k != "key"}]


def test_admin_body_of_64_kib_is_read(harness: Harness) -> None:
    padding = " " * (64 * 1024 - len(b'{"name": "edge"}'))
    body = b'{"name": "edge"' + padding.encode() + b"}"
    assert len(body) == 64 * 1024
    assert harness.admin("POST", "/admin/keys", content=body).status_code == 201


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"metadata": {"note": "x" * 16_384}}, "metadata"),
        ({"metadata": {f"k{i}": i for i in range(2_000)}}, "metadata"),
        ({"allowed_models": ["m" * 257]}, "allowed_models"),
        ({"allowed_models": [f"model-{i}" for i in range(1_001)]}, "allowed_models"),
        ({"allowed_models": ["gpt-4o\n"]}, "allowed_models"),
        ({"name": "n" * 201}, "name"),
    ],
)
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_oversized_fields_are_400_naming_them(
    harness: Harness, payload: dict[str, Any], param: str, method: str
) -> None:
    record = harness.create_key(name="steady")
    if method == "POST":
        response = create(harness, {"name": "big", **payload})
    else:
        response = harness.admin("PATCH", f"/admin/keys/{record['id']}", json=payload)
    assert_bad_request(response, param)
    records = harness.admin("GET", "/admin/keys").json()["data"]
    assert records == [{k: v for k, v in record.items() if k != "key"}]


def test_fields_at_their_bounds_are_stored(harness: Harness) -> None:
    note = "x" * (16_384 - len('{"note": ""}'))
    models = ["m" * 256] + [f"model-{i}" for i in range(999)]
    record = harness.create_key(name="n" * 200, metadata={"note": note}, allowed_models=models)
    assert record_of(harness, record["id"])["metadata"] == {"note": note}
    assert record_of(harness, record["id"])["allowed_models"] == models


# --- usage -------------------------------------------------------------------------------------


def test_usage_groups_by_model_and_day(harness: Harness) -> None:
    record = harness.create_key()
    for model in ("gpt-4o-mini", "gpt-4o-mini", "gpt-4o"):
        assert harness.chat(record["key"], {**HELLO, "model": model}).status_code == 200
    by_model = harness.admin("GET", f"/admin/keys/{record['id']}/usage?group_by=model").json()
    assert by_model["key_id"] == record["id"]
    assert by_model["group_by"] == "model"
    assert [(g["model"], g["requests"]) for g in by_model["groups"]] == [
        ("gpt-4o", 1),
        ("gpt-4o-mini", 2),
    ]
    totals = by_model["totals"]
    assert totals["requests"] == 3
    assert totals["total_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"] > 0
    assert totals["cost_usd"] > 0
    by_day = harness.admin("GET", f"/admin/keys/{record['id']}/usage?group_by=day").json()
    today = datetime.now(UTC).date().isoformat()
    assert [(g["day"], g["requests"]) for g in by_day["groups"]] == [(today, 3)]
    assert by_day["totals"] == totals


def test_usage_export_is_json_lines(harness: Harness) -> None:
    record = harness.create_key(name="exported")
    response = harness.chat(record["key"], HELLO)
    export = harness.admin("GET", "/admin/usage/export")
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    [line] = export.text.splitlines()
    usage_record = json.loads(line)
    assert usage_record["request_id"] == response.headers["x-request-id"]
    assert usage_record["key_id"] == record["id"]
    assert usage_record["key_name"] == "exported"
    assert usage_record["model"] == "gpt-4o-mini"
    assert usage_record["status"] == 200
    assert usage_record["usage_source"] == "upstream"
    assert usage_record["total_tokens"] == response.json()["usage"]["total_tokens"]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("group_by=week", "group_by"),
        ("since=yesterday", "since/until"),
        ("until=not-a-date", "since/until"),
        ("since=2024-02-01&until=2024-01-01", "until"),
    ],
)
def test_usage_with_a_bad_query_is_400(harness: Harness, query: str, param: str) -> None:
    record = harness.create_key()
    response = harness.admin("GET", f"/admin/keys/{record['id']}/usage?{query}")
    assert_bad_request(response, param)


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES[2:-1])
@pytest.mark.parametrize("key_id", ["0123456789abcdef", "not-an-id", "ABCDEF0123456789"])
def test_unknown_key_id_is_404(harness: Harness, method: str, path: str, key_id: str) -> None:
    harness.create_key()
    payload = {"amount": 1} if path.endswith("/credits") else {"rpm": 1}
    response = harness.admin(method, path.replace("0123456789abcdef", key_id), json=payload)
    assert_not_found(response)
    assert len(harness.admin("GET", "/admin/keys").json()["data"]) == 1
