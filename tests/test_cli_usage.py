"""`tollgate usage` on fixed usage in the in-process store: the exact table, CSV, JSON Lines and
`--json` an operator gets, across every key and of one; `--until` taking a date whole; an
unknown key and a bad window as one line on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from proxy.cli import main
from proxy.cli.arguments import parse_args
from proxy.cli.operations import operate
from proxy.config import Settings
from proxy.metering import Usage
from proxy.settlement import record, settlement
from tests.conftest import Harness, HarnessFactory
from tests.servers import free_port

# (key name, request id, request time (UTC), model, prompt, completion, cost in micro-dollars)
REQUESTS = [
    ("alice", "req-a1", "2025-03-10T09:00:00", "gpt-4o-mini", 100, 20, 27),
    ("alice", "req-a2", "2025-03-10T15:30:00", "gpt-4o", 200, 50, 1000),
    ("alice", "req-a3", "2025-03-31T23:59:59", "gpt-4o-mini", 10, 5, 5),
    ("bob", "req-b1", "2025-03-11T12:00:00", "gpt-4o-mini", 40, 10, 12),
    ("bob", "req-b2", "2025-04-01T00:00:00", "gpt-4o-mini", 1, 1, 1),  # after the window
]
MARCH = ("--since", "2025-03-01", "--until", "2025-03-31")


@pytest.fixture
def harness(settings: Settings, harness_factory: HarnessFactory) -> Iterator[Harness]:
    """Raw records kept ten years, so that those of the fixed days of 2025 stay readable."""
    with harness_factory(settings, usage_retention_days=3650) as harness:
        yield harness


@pytest.fixture
def ids(harness: Harness) -> dict[str, str]:
    """Keys alice, bob and carol (never used), their requests settled at fixed times; the
    ids by name."""
    ids = {name: harness.create_key(name=name)["id"] for name in ("carol", "bob", "alice")}
    limiter = harness.gateway.admission.limiter
    for name, request_id, ts, model, prompt, completion, cost in REQUESTS:
        settled = settlement(
            request_id=request_id, client_request_id=None,
            ts=datetime.fromisoformat(ts + "+00:00").timestamp(), key_id=ids[name],
            key_name=name, model=model, route="chat_completions", path="/v1/chat/completions",
            stream=False, status=200, usage=Usage(prompt, completion, "upstream"),
            cost_micros=cost, latency_s=0.25, ttft_s=None, upstream="openai", attempts=1,
        )  # fmt: skip
        assert harness.run(record, limiter, settled)
    return ids


def tollgate(harness: Harness, capsys: Any, *argv: str) -> tuple[int, str, str]:
    """The command run on the harness' store: its status, stdout and stderr."""
    capsys.readouterr()
    args = parse_args(list(argv))
    status = harness.run(operate, harness.gateway.settings, args, store=harness.gateway.store)
    out, err = capsys.readouterr()
    return status, out, err


def test_usage_without_key_is_a_table_by_key_of_every_used_key(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, err = tollgate(harness, capsys, "usage", *MARCH)

    assert (status, err) == (0, "")
    assert out == (
        "key               name   requests  prompt_tokens  completion_tokens  total_tokens  cost_usd\n"  # noqa: E501
        f"{ids['alice']}  alice         3            310                 75           385  0.001032\n"  # noqa: E501
        f"{ids['bob']}  bob           1             40                 10            50  0.000012\n"
        "total                           4            350                 85           435  0.001044\n"  # noqa: E501
    )


def test_usage_by_model_as_csv_has_one_row_per_model_and_no_total(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", *MARCH, "--group-by", "model",
                              "--format", "csv")  # fmt: skip

    assert status == 0
    assert out == (
        "model,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd\n"
        "gpt-4o,1,200,50,250,0.001000\n"
        "gpt-4o-mini,3,150,35,185,0.000044\n"
    )


def test_usage_by_key_as_csv_names_each_key(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", *MARCH, "--format", "csv")

    assert status == 0
    assert out == (
        "key,name,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd\n"
        f"{ids['alice']},alice,3,310,75,385,0.001032\n"
        f"{ids['bob']},bob,1,40,10,50,0.000012\n"
    )


def test_usage_by_day_json_across_keys_has_the_admin_answer_shape_without_a_key(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", *MARCH, "--group-by", "day", "--json")

    assert status == 0
    assert out == (
        '{"key_id": null, "since": "2025-03-01T00:00:00Z", "until": "2025-04-01T00:00:00Z", '
        '"group_by": "day", "groups": ['
        '{"day": "2025-03-10", "requests": 2, "prompt_tokens": 300, "completion_tokens": 70, '
        '"total_tokens": 370, "cost_usd": 0.001027}, '
        '{"day": "2025-03-11", "requests": 1, "prompt_tokens": 40, "completion_tokens": 10, '
        '"total_tokens": 50, "cost_usd": 1.2e-05}, '
        '{"day": "2025-03-31", "requests": 1, "prompt_tokens": 10, "completion_tokens": 5, '
        '"total_tokens": 15, "cost_usd": 5e-06}], '
        '"totals": {"requests": 4, "prompt_tokens": 350, "completion_tokens": 85, '
        '"total_tokens": 435, "cost_usd": 0.001044}}\n'
    )


def test_usage_of_one_key_by_day_is_a_table_with_a_total_row(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", "--key", ids["alice"], *MARCH)

    assert status == 0
    assert out == (
        "day         requests  prompt_tokens  completion_tokens  total_tokens  cost_usd\n"
        "2025-03-10         2            300                 70           370  0.001027\n"
        "2025-03-31         1             10                  5            15  0.000005\n"
        "total              3            310                 75           385  0.001032\n"
    )


def test_usage_of_one_key_json_is_the_admin_answer_for_the_next_day_as_until(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    """`--until 2025-03-31` is the admin API's `until=2025-04-01`: the last day counts whole."""
    status, out, _ = tollgate(harness, capsys, "usage", "--key", ids["bob"], *MARCH,
                              "--group-by", "model", "--json")  # fmt: skip

    via_api = harness.admin(
        "GET", f"/admin/keys/{ids['bob']}/usage?since=2025-03-01&until=2025-04-01&group_by=model"
    )
    assert status == 0
    assert out == (
        f'{{"key_id": "{ids["bob"]}", "since": "2025-03-01T00:00:00Z", '
        '"until": "2025-04-01T00:00:00Z", "group_by": "model", "groups": ['
        '{"model": "gpt-4o-mini", "requests": 1, "prompt_tokens": 40, "completion_tokens": 10, '
        '"total_tokens": 50, "cost_usd": 1.2e-05}], '
        '"totals": {"requests": 1, "prompt_tokens": 40, "completion_tokens": 10, '
        '"total_tokens": 50, "cost_usd": 1.2e-05}}\n'
    )
    assert via_api.json() == json.loads(out)


def test_usage_of_one_key_as_jsonl_prints_its_records_in_the_window(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", "--key", ids["bob"], *MARCH,
                              "--format", "jsonl")  # fmt: skip

    assert status == 0
    assert out == (
        '{"request_id":"req-b1","client_request_id":null,"ts":"2025-03-11T12:00:00.000+00:00",'
        f'"key_id":"{ids["bob"]}","key_name":"bob","model":"gpt-4o-mini",'
        '"route":"chat_completions","path":"/v1/chat/completions","stream":false,"status":200,'
        '"prompt_tokens":40,"completion_tokens":10,"total_tokens":50,"cost_usd":1.2e-05,'
        '"usage_source":"upstream","latency_ms":250.0,"ttft_ms":null,"upstream":"openai",'
        '"attempts":1}\n'
    )


def test_usage_jsonl_without_key_prints_every_keys_records(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", *MARCH, "--format", "jsonl")

    records = [json.loads(line) for line in out.splitlines()]
    assert status == 0
    assert sorted(r["request_id"] for r in records) == ["req-a1", "req-a2", "req-a3", "req-b1"]


@pytest.mark.parametrize(
    ("until", "requests"),
    [
        ("2025-03-31", 4),  # a date: the whole of March 31
        ("2025-03-31T23:59:59Z", 3),  # a time: the window ends there, exclusive
        ("2025-04-01T00:00:00Z", 4),
        ("2025-03-30", 3),
    ],
)
def test_until_a_date_counts_the_whole_day_and_a_time_ends_the_window(
    harness: Harness, ids: dict[str, str], capsys: Any, until: str, requests: int
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", "--since", "2025-03-01",
                              "--until", until, "--json")  # fmt: skip

    assert status == 0
    assert json.loads(out)["totals"]["requests"] == requests


def test_usage_group_by_key_of_one_key_is_one_row(
    harness: Harness, ids: dict[str, str], capsys: Any
) -> None:
    status, out, _ = tollgate(harness, capsys, "usage", "--key", ids["carol"], *MARCH,
                              "--group-by", "key")  # fmt: skip

    assert status == 0
    assert out == (
        "key    name  requests  prompt_tokens  completion_tokens  total_tokens  cost_usd\n"
        "total               0              0                  0             0  0.000000\n"
    )


@pytest.mark.parametrize("key_id", ["nope", "0123456789abcdef"])
@pytest.mark.parametrize("output", [(), ("--format", "jsonl"), ("--json",), ("--format", "csv")])
def test_usage_of_an_unknown_key_is_one_line_and_status_1(
    harness: Harness, capsys: Any, key_id: str, output: tuple[str, ...]
) -> None:
    status, out, err = tollgate(harness, capsys, "usage", "--key", key_id, *output)

    assert (status, out) == (1, "")
    assert err == f"tollgate: no key with id {key_id!r}\n"


@pytest.mark.parametrize(
    ("window", "message"),
    [
        (("--since", "yesterday"), "tollgate usage: argument --since: not an ISO 8601"),
        (("--until", "2025-02-30"), "tollgate usage: argument --until: not an ISO 8601"),
        (("--since", "2025-03-02", "--until", "2025-03-01"),
         "tollgate usage: argument --until: must be later than --since"),
        (("--until", "9999-12-31"), "tollgate usage: argument --until: too late"),
    ],
)  # fmt: skip
def test_a_bad_window_is_one_line_naming_the_flag_and_status_2_without_the_store(
    window: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # Nothing listens there: a command that reached the store would fail with status 1.
    monkeypatch.setenv("TOLLGATE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    status = main(["usage", *window])

    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith(message)
