"""What `tollgate keys` prints for people: a record as `field: value` lines and `keys list` as a
table, exactly, with no Python repr in sight (unlimited, never, none, yes/no, lists joined,
metadata as JSON); `--json` prints the admin API's record itself.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from proxy.cli.keys import keys_table
from proxy.cli.text import key_text, print_answer, value_text

NOW = datetime(2030, 1, 31, 12, 0, 0, tzinfo=UTC)
LIMITED: dict[str, Any] = {
    "id": "0123456789abcdef", "name": "team-a", "rpm": 60, "tpm": 40000, "max_concurrency": 4,
    "credits": 4.99873, "reserved_credits": 0.0015, "allowed_models": ["gpt-4o*", "o1-mini"],
    "metadata": {"team": "search", "tier": 2, "owners": ["ana", "bo"]},
    "created_at": "2030-01-01T08:00:00Z", "revoked": False,
    "budget": {"amount": 50.0, "period": "month"}, "budget_spent": 12.5,
    "budget_resets_at": "2030-02-01T00:00:00Z", "expires_at": "2030-03-02T12:00:00Z",
    "model_limits": {"gpt-4o": {"rpm": 10, "tpm": 20000}, "o1*": {"rpm": 2, "tpm": None},
                     "*": {"rpm": None, "tpm": None}},
    "previous_secret_valid_until": None,
}  # fmt: skip
OPEN: dict[str, Any] = {
    "id": "fedcba9876543210", "name": "everything", "rpm": None, "tpm": None,
    "max_concurrency": None, "credits": None, "reserved_credits": 0.0, "allowed_models": None,
    "metadata": {}, "created_at": "2030-01-02T09:30:00Z", "revoked": True, "budget": None,
    "budget_spent": 0.0, "budget_resets_at": None, "expires_at": None, "model_limits": None,
    "previous_secret_valid_until": None,
}  # fmt: skip


def test_key_text_of_a_limited_key() -> None:
    assert key_text(LIMITED, NOW) == (
        "id: 0123456789abcdef\n"
        "name: team-a\n"
        "rpm: 60\n"
        "tpm: 40000\n"
        "max_concurrency: 4\n"
        "credits: 4.99873 USD\n"
        "reserved_credits: 0.0015 USD\n"
        "allowed_models: gpt-4o*, o1-mini\n"
        'metadata: {"team": "search", "tier": 2, "owners": ["ana", "bo"]}\n'
        "created_at: 2030-01-01T08:00:00Z\n"
        "revoked: no\n"
        "budget: 50 USD per month, 12.5 USD spent, resets at 2030-02-01T00:00:00Z\n"
        "expires_at: 2030-03-02T12:00:00Z (in 30d)\n"
        "model_limits: gpt-4o rpm=10 tpm=20000; o1* rpm=2; * unlimited"
    )


def test_key_text_of_an_unlimited_revoked_key_says_unlimited_all_none_never_yes() -> None:
    assert key_text(OPEN, NOW) == (
        "id: fedcba9876543210\n"
        "name: everything\n"
        "rpm: unlimited\n"
        "tpm: unlimited\n"
        "max_concurrency: unlimited\n"
        "credits: unlimited\n"
        "reserved_credits: 0 USD\n"
        "allowed_models: all\n"
        "metadata: none\n"
        "created_at: 2030-01-02T09:30:00Z\n"
        "revoked: yes\n"
        "budget: none\n"
        "expires_at: never\n"
        "model_limits: none"
    )


def test_key_text_of_a_new_key_ends_with_its_secret_once() -> None:
    text = key_text({**OPEN, "revoked": False, "key": "sk-tg-secret"}, NOW)

    assert text.splitlines()[-1] == "key: sk-tg-secret   (shown only now: store it safely)"
    assert text.count("sk-tg-secret") == 1


def test_keys_list_table_aligns_numbers_right_and_says_unlimited_never_yes_no() -> None:
    assert keys_table([LIMITED, OPEN]) == (
        "id                name              rpm        tpm  max_concurrency    credits  budget    "
        "expires_at            revoked\n"
        "0123456789abcdef  team-a             60      40000                4    4.99873  50/month  "
        "2030-03-02T12:00:00Z  no\n"
        "fedcba9876543210  everything  unlimited  unlimited        unlimited  unlimited  none      "
        "never                 yes"
    )


def test_keys_list_without_keys_is_the_header_only() -> None:
    assert keys_table([]) == (
        "id  name  rpm  tpm  max_concurrency  credits  budget  expires_at  revoked"
    )


def test_json_prints_the_record_itself_on_one_line(capsys: Any) -> None:
    print_answer(LIMITED, True, key_text)

    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == LIMITED


def test_value_text_never_prints_a_python_repr() -> None:
    assert [value_text(v) for v in (None, True, False, ["a", "b"], [], {"k": "v"}, {}, 1.5e-05,
                                    "é")] == [
        "none", "yes", "no", "a, b", "none", '{"k": "v"}', "none", "0.000015", "é",
    ]  # fmt: skip
