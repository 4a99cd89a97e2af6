"""The `tollgate` command line in-process: the admin API body each `keys` flag stands for, the
one-line status-2 errors of bad values (before any store is reached) and the text for people.
The same commands against a real store and proxy are in tests/integration/test_cli.py.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.cli import main
from proxy.cli.arguments import build_parser, parse_args
from proxy.cli.keys import key_payload, rotate_payload
from proxy.cli.text import key_text
from tests.servers import free_port

NOW = datetime(2030, 1, 31, 12, 0, 0, tzinfo=UTC)
KEY_ID = "0123456789abcdef"


def payload(*argv: str) -> dict[str, Any]:
    return key_payload(parse_args(list(argv)), now=NOW)


def test_keys_create_with_every_new_flag_sends_the_admin_api_body() -> None:
    body = payload(
        "keys", "create", "--name", "team-a", "--budget", "50/month", "--expires-in", "30d",
        "--model-limit", "gpt-4o:rpm=10,tpm=20000", "--model-limit", "o1*:rpm=2",
        "--allowed-models", "gpt-4o*,o1-mini",
    )  # fmt: skip

    assert body == {
        "name": "team-a",
        "allowed_models": ["gpt-4o*", "o1-mini"],
        "budget": {"amount": 50.0, "period": "month"},
        "expires_at": "2030-03-02T12:00:00Z",
        "model_limits": {"gpt-4o": {"rpm": 10, "tpm": 20000}, "o1*": {"rpm": 2}},
    }


def test_keys_update_without_new_flags_sends_none_of_the_new_fields() -> None:
    assert payload("keys", "update", KEY_ID, "--name", "renamed") == {"name": "renamed"}


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (("--budget", "none"), "budget"),
        (("--expires-at", "none"), "expires_at"),
        (("--expires-at=null",), "expires_at"),
        (("--model-limit", "none"), "model_limits"),
    ],
)
def test_keys_update_none_sends_null_to_remove_the_field(
    flags: tuple[str, ...], field: str
) -> None:
    assert payload("keys", "update", KEY_ID, *flags) == {field: None}


@pytest.mark.parametrize(
    ("raw", "budget"),
    [
        ("50/month", {"amount": 50.0, "period": "month"}),
        ("$2.5/day", {"amount": 2.5, "period": "day"}),
        ("0.01/Week", {"amount": 0.01, "period": "week"}),
        (" 7 / day ", {"amount": 7.0, "period": "day"}),
    ],
)
def test_budget_flag_becomes_amount_and_period(raw: str, budget: dict[str, Any]) -> None:
    assert payload("keys", "update", KEY_ID, "--budget", raw) == {"budget": budget}


@pytest.mark.parametrize(
    ("raw", "expires_at"),
    [
        ("90s", "2030-01-31T12:01:30Z"),
        ("30m", "2030-01-31T12:30:00Z"),
        ("12h", "2030-02-01T00:00:00Z"),
        ("30d", "2030-03-02T12:00:00Z"),
        ("2w", "2030-02-14T12:00:00Z"),
        ("1d12h", "2030-02-02T00:00:00Z"),
    ],
)
def test_expires_in_becomes_an_absolute_utc_expires_at(raw: str, expires_at: str) -> None:
    assert payload("keys", "create", "--name", "x", "--expires-in", raw) == {
        "name": "x",
        "expires_at": expires_at,
    }


@pytest.mark.parametrize(
    ("raw", "expires_at"),
    [
        ("2030-01-31T12:00:00Z", "2030-01-31T12:00:00Z"),
        ("2030-01-31T12:00:00+02:00", "2030-01-31T10:00:00Z"),
        ("2030-01-31T12:00:00", "2030-01-31T12:00:00Z"),  # no offset = UTC
        ("2030-01-31", "2030-01-31T00:00:00Z"),
        ("2030-01-31T12:00:00.250-05:30", "2030-01-31T17:30:00.250000Z"),
    ],
)
def test_expires_at_is_sent_as_utc(raw: str, expires_at: str) -> None:
    assert payload("keys", "update", KEY_ID, "--expires-at", raw) == {"expires_at": expires_at}


@pytest.mark.parametrize(
    ("raw", "limits"),
    [
        ("gpt-4o:rpm=10,tpm=20000", {"gpt-4o": {"rpm": 10, "tpm": 20000}}),
        ("gpt-4o*:tpm=5", {"gpt-4o*": {"tpm": 5}}),
        ("*:rpm=none", {"*": {"rpm": None}}),
        # the pattern is everything before the last colon: fine-tuned names have colons
        ("ft:gpt-4o:acme:abc123:rpm=1", {"ft:gpt-4o:acme:abc123": {"rpm": 1}}),
        ("ft:*:RPM=3, TPM=4", {"ft:*": {"rpm": 3, "tpm": 4}}),
    ],
)
def test_model_limit_flag_becomes_pattern_and_limits(raw: str, limits: dict[str, Any]) -> None:
    assert payload("keys", "update", KEY_ID, "--model-limit", raw) == {"model_limits": limits}


def test_repeated_model_limits_keep_their_order() -> None:
    """The first matching pattern applies, so the order given is the order sent."""
    body = payload(
        "keys", "update", KEY_ID, "--model-limit", "z*:rpm=1", "--model-limit", "a*:rpm=2",
        "--model-limit", "*:tpm=3",
    )  # fmt: skip

    assert list(body["model_limits"].items()) == [
        ("z*", {"rpm": 1}), ("a*", {"rpm": 2}), ("*", {"tpm": 3}),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        ((), {}),
        (("--grace", "1h"), {"grace_seconds": 3600}),
        (("--grace", "0"), {"grace_seconds": 0}),
        (("--grace=90s",), {"grace_seconds": 90}),
        (("--grace", "30d"), {"grace_seconds": 2_592_000}),
    ],
)
def test_keys_rotate_grace_becomes_grace_seconds(flags: tuple[str, ...], body: Any) -> None:
    assert rotate_payload(parse_args(["keys", "rotate", KEY_ID, *flags])) == body


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "restore", KEY_ID, "--json"],
        ["credits", "unlimited", KEY_ID, "--json"],
    ],
)
def test_restore_and_credits_unlimited_take_a_key_id(argv: list[str]) -> None:
    args = parse_args(argv)

    assert (args.id, args.json) == (KEY_ID, True)


CREATE = ("keys", "create", "--name", "x")
UPDATE = ("keys", "update", KEY_ID)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        ((*CREATE, "--budget", "50"), "--budget"),
        ((*CREATE, "--budget", "50/year"), "--budget"),
        ((*UPDATE, "--budget", "0/month"), "--budget"),
        ((*UPDATE, "--budget=-5/day"), "--budget"),
        ((*UPDATE, "--budget", "nan/day"), "--budget"),
        ((*UPDATE, "--budget", "inf/month"), "--budget"),
        ((*UPDATE, "--budget", "lots/month"), "--budget"),
        ((*CREATE, "--expires-in", "30"), "--expires-in"),
        ((*CREATE, "--expires-in", "0"), "--expires-in"),
        ((*CREATE, "--expires-in", "30x"), "--expires-in"),
        ((*CREATE, "--expires-in", "1d-2h"), "--expires-in"),
        ((*CREATE, "--expires-in", "none"), "--expires-in"),
        ((*CREATE, "--expires-in", "9999999w"), "--expires-in"),
        ((*UPDATE, "--expires-at", "tomorrow"), "--expires-at"),
        ((*UPDATE, "--expires-at", "2030-13-01"), "--expires-at"),
        ((*UPDATE, "--expires-at", "9999-12-31T23:00:00-05:00"), "--expires-at"),
        ((*UPDATE, "--expires-in", "1d", "--expires-at", "2030-01-01"), "--expires-at"),
        ((*UPDATE, "--model-limit", "gpt-4o"), "--model-limit"),
        ((*UPDATE, "--model-limit", "gpt-4o:rpm"), "--model-limit"),
        ((*UPDATE, "--model-limit", "gpt-4o:rps=1"), "--model-limit"),
        ((*UPDATE, "--model-limit", ":rpm=1"), "--model-limit"),
        ((*UPDATE, "--model-limit", "gpt-4o:rpm=1,rpm=2"), "--model-limit"),
        ((*UPDATE, "--model-limit", "gpt-4o:rpm=-1"), "--model-limit"),
        (
            (*UPDATE, "--model-limit", "gpt-4o:rpm=1", "--model-limit", "gpt-4o:tpm=2"),
            "--model-limit",
        ),
        ((*UPDATE, "--model-limit", "none", "--model-limit", "a:rpm=1"), "--model-limit"),
        ((*UPDATE, "--model-limit", "a:rpm=1", "--model-limit", "none"), "--model-limit"),
        (("keys", "rotate", KEY_ID, "--grace", "31d"), "--grace"),
        (("keys", "rotate", KEY_ID, "--grace", "1y"), "--grace"),
        (("keys", "rotate", KEY_ID, "--grace", "60"), "--grace"),
        (("keys", "restore"), "id"),
        (("credits", "unlimited"), "id"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_and_status_2_without_the_store(
    argv: tuple[str, ...], flag: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # Nothing listens there: a command that reached the store would fail with status 1.
    monkeypatch.setenv("TOLLGATE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--json"])

    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tollgate {argv[0]} {argv[1]}: ")
    assert flag in lines[0]


RECORD: dict[str, Any] = {
    "id": KEY_ID,
    "name": "team-a",
    "rpm": 60,
    "credits": None,
    "budget": {"amount": 50.0, "period": "month"},
    "budget_spent": 12.345678,
    "budget_resets_at": "2030-02-01T00:00:00Z",
    "expires_at": "2030-03-02T12:00:00Z",
    "model_limits": {"gpt-4o": {"rpm": 10, "tpm": 20000}, "o1*": {"rpm": 2}},
    "previous_secret_valid_until": None,
    "revoked": False,
}


def test_key_text_shows_budget_expiry_and_model_limits_in_words() -> None:
    assert key_text(RECORD, NOW).splitlines() == [
        f"id: {KEY_ID}",
        "name: team-a",
        "rpm: 60",
        "credits: unlimited",
        "budget: 50 USD per month, 12.345678 USD spent, resets at 2030-02-01T00:00:00Z",
        "expires_at: 2030-03-02T12:00:00Z (in 30d)",
        "model_limits: gpt-4o rpm=10 tpm=20000; o1* rpm=2",
        "revoked: no",
    ]


def test_key_text_of_a_key_without_the_new_limits_says_none_and_never() -> None:
    record = {**RECORD, "budget": None, "budget_spent": 0, "budget_resets_at": None,
              "expires_at": None, "model_limits": None}  # fmt: skip

    lines = key_text(record, NOW).splitlines()

    assert "budget: none" in lines
    assert "expires_at: never" in lines
    assert "model_limits: none" in lines
    assert not any(line.startswith("old key") for line in lines)


def test_key_text_of_an_expired_key_says_expired() -> None:
    record = {**RECORD, "expires_at": "2030-01-31T11:59:59Z"}

    assert "expires_at: 2030-01-31T11:59:59Z (expired)" in key_text(record, NOW).splitlines()


def test_key_text_after_rotate_with_grace_says_until_when_the_old_key_works() -> None:
    rotated = {**RECORD, "previous_secret_valid_until": "2030-01-31T13:30:00Z", "key": "sk-tg-x"}

    lines = key_text(rotated, NOW).splitlines()

    assert lines[-2:] == [
        "old key works until: 2030-01-31T13:30:00Z (in 1h 30m)",
        "key: sk-tg-x   (shown only now: store it safely)",
    ]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        ((*UPDATE, "--expires-at", "1969-07-20T20:17:00Z"), "--expires-at"),
        ((*CREATE, "--budget", "1e12/month"), "--budget"),
        ((*CREATE, "--rpm", str(10**13)), "--rpm"),
        ((*UPDATE, "--name", " "), "--name"),
        ((*UPDATE, "--allowed-models", ",".join(f"m{i}*" for i in range(65))), "--allowed-models"),
    ],
)
def test_a_value_the_admin_api_refuses_is_one_line_naming_the_flag_and_status_2(
    argv: tuple[str, ...], flag: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The admin API's own checks run before the store is touched (nothing listens at the
    store's URL: reaching it would be status 1)."""
    monkeypatch.setenv("TOLLGATE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    status = main([*argv, "--json"])

    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tollgate {argv[0]} {argv[1]}: argument {flag}: ")


def test_key_text_after_the_grace_says_when_the_old_key_stopped_working() -> None:
    record = {**RECORD, "previous_secret_valid_until": "2030-01-31T11:55:00Z"}

    lines = key_text(record, NOW).splitlines()

    assert lines[-1] == "old key stopped working at: 2030-01-31T11:55:00Z (5m ago)"


def command_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser, by its words after `tollgate`."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_parsers(sub, (*path, name))


COMMANDS = [
    (), ("serve",), ("demo",), ("mock-upstream",), ("keys",), ("keys", "create"),
    ("keys", "update"), ("keys", "list"), ("keys", "show"), ("keys", "revoke"),
    ("keys", "rotate"), ("keys", "restore"), ("credits",), ("credits", "add"),
    ("credits", "unlimited"), ("usage",),
]  # fmt: skip


def test_every_option_and_command_has_help() -> None:
    parsers = dict(command_parsers(build_parser()))

    assert sorted(parsers) == sorted(COMMANDS)
    missing = []
    for path, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                named = {a.dest: a.help for a in action._choices_actions}
                missing += [(*path, n) for n in action.choices if not named.get(n)]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append((*path, action.dest))
    assert missing == []


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "tollgate")
def test_help_of_every_command_exits_0_and_explains_each_option(
    path: tuple[str, ...], capsys: Any
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*path, "--help"])

    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert out.startswith(" ".join(["usage: tollgate", *path]))
    parser = dict(command_parsers(build_parser()))[path]
    for action in parser._actions:
        for option in action.option_strings:
            assert option in out
        if action.help and not isinstance(action, argparse._SubParsersAction):
            assert " ".join(action.help.split()[:3]) in " ".join(out.split())


def test_serve_without_an_upstream_is_one_line_pointing_at_mock_upstream(
    monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    for name in [n for n in os.environ if n.startswith("TOLLGATE_")]:
        monkeypatch.delenv(name)

    status = main(["serve", "--port", str(free_port())])

    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err == (
        "tollgate: TOLLGATE_UPSTREAM_URL or TOLLGATE_UPSTREAMS is required for serve "
        "(`tollgate mock-upstream` runs a fake one to try it with)\n"
    )


def test_a_store_command_names_a_misspelled_variable_before_asking_for_the_store(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("TOLLGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOLLGATE_REDIS_ULR", "redis://127.0.0.1:1")
    assert main(["keys", "list"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "tollgate: warning: TOLLGATE_REDIS_ULR is not a Tollgate setting and is ignored; "
        "did you mean TOLLGATE_REDIS_URL?",
        "tollgate: set TOLLGATE_REDIS_URL to the store the server uses",
    ]
