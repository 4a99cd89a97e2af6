"""The operator CLI (`python -m proxy keys|credits|usage`) against the real Redis the running
proxy uses: `--json` prints exactly the admin API's answer, and changes take effect at once.
Every failure is one line on stderr: status 2 for a bad command line or setting, 1 for a
command that could not be carried out. `serve` also checks its CA file and descriptor limit;
`mock-upstream` answers a chat completion until SIGTERM.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin_client import Admin
from tests.integration.conftest import MESSAGES, Mock, Stack, new_request_id
from tests.servers import RedisServer, free_port, proxy_server, tollgate_env, wait_for

MODEL = "gpt-4o-mini"


def tollgate(*args: str, redis_url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    if redis_url is not None:
        env["TOLLGATE_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def cli_json(stack: Stack, *args: str) -> Any:
    done = tollgate(*args, "--json", redis_url=stack.redis.url)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chat(stack: Stack, api_key: str, request_id: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {api_key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return httpx.post(
        stack.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers=headers,
        timeout=20,
    )


@pytest.fixture
def created(stack: Stack) -> dict[str, Any]:
    """A key as `keys create` makes it (made through the admin API: one CLI start less)."""
    return stack.admin.create_key(name="cli-key", rpm=60, tpm=40000, credits=5)


def test_keys_create_json_prints_the_admin_record_with_a_working_key(stack: Stack) -> None:
    created = cli_json(
        stack, "keys", "create", "--name", "cli-key", "--rpm", "60", "--tpm", "40000",
        "--credits", "5",
    )  # fmt: skip
    via_api = stack.admin.create_key(name="api-key", rpm=60, tpm=40000, credits=5)

    assert set(created) == set(via_api)
    assert created["key"].startswith("sk-tg-")
    assert created["name"] == "cli-key"
    assert (created["rpm"], created["tpm"], created["max_concurrency"]) == (60, 40000, None)
    assert created["credits"] == 5.0
    assert created["reserved_credits"] == 0
    assert created["revoked"] is False
    assert {k: v for k, v in created.items() if k != "key"} == stack.admin.key(created["id"])
    response = chat(stack, created["key"])
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert response.headers["x-ratelimit-limit-tokens"] == "40000"


def test_keys_list_and_show_json_equal_the_admin_api(stack: Stack, created: dict[str, Any]) -> None:
    listing = cli_json(stack, "keys", "list")
    shown = cli_json(stack, "keys", "show", created["id"])

    assert listing == stack.admin.client.get("/admin/keys").json()
    assert created["id"] in [r["id"] for r in listing["data"]]
    assert all("key" not in r for r in listing["data"])
    assert shown == stack.admin.key(created["id"])
    assert "key" not in shown


def test_keys_update_json_changes_the_limit_the_proxy_enforces(
    stack: Stack, created: dict[str, Any]
) -> None:
    updated = cli_json(stack, "keys", "update", created["id"], "--rpm", "10")

    assert updated["rpm"] == 10
    assert updated["tpm"] == 40000
    assert updated == stack.admin.key(created["id"])
    response = chat(stack, created["key"])
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "10"


def test_keys_rotate_json_old_key_401_new_key_200(stack: Stack, created: dict[str, Any]) -> None:
    assert chat(stack, created["key"]).status_code == 200
    rotated = cli_json(stack, "keys", "rotate", created["id"])

    assert rotated["id"] == created["id"]
    assert rotated["key"] != created["key"]
    assert (rotated["rpm"], rotated["tpm"]) == (created["rpm"], created["tpm"])
    assert {k: v for k, v in rotated.items() if k != "key"} == stack.admin.key(created["id"])
    assert chat(stack, created["key"]).status_code == 401
    assert chat(stack, rotated["key"]).status_code == 200


def test_keys_revoke_json_then_key_is_401(stack: Stack, created: dict[str, Any]) -> None:
    assert chat(stack, created["key"]).status_code == 200
    revoked = cli_json(stack, "keys", "revoke", created["id"])

    assert revoked["revoked"] is True
    assert revoked == stack.admin.key(created["id"])
    response = chat(stack, created["key"])
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_credits_add_json_grows_the_balance(stack: Stack, created: dict[str, Any]) -> None:
    answer = cli_json(stack, "credits", "add", created["id"], "2.5")

    assert answer["credits"] == pytest.approx(7.5)
    assert answer == stack.admin.key(created["id"])


@pytest.fixture
def used_key(stack: Stack, since: float) -> tuple[dict[str, Any], list[str]]:
    """A key with two settled requests; returns it and their request ids."""
    key = stack.admin.create_key(name="cli-usage")
    request_ids = [new_request_id(), new_request_id()]
    for request_id in request_ids:
        assert chat(stack, key["key"], request_id).status_code == 200
    for request_id in request_ids:
        stack.admin.record(request_id, since=since)
    return key, request_ids


def test_usage_table_shows_requests_and_totals(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]]
) -> None:
    key, _ = used_key
    done = tollgate("usage", "--key", key["id"], "--format", "table", redis_url=stack.redis.url)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "day", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
    ]  # fmt: skip
    assert len(lines) == 3
    assert lines[-1].split()[:2] == ["total", "2"]


def test_usage_csv_has_a_header_and_one_row_per_group(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]]
) -> None:
    key, _ = used_key
    by_day = tollgate("usage", "--key", key["id"], "--format", "csv", redis_url=stack.redis.url)
    by_model = tollgate(
        "usage", "--key", key["id"], "--format", "csv", "--group-by", "model",
        redis_url=stack.redis.url,
    )  # fmt: skip

    assert by_day.returncode == 0, by_day.stderr
    rows = list(csv.DictReader(io.StringIO(by_day.stdout)))
    assert by_day.stdout.splitlines()[0] == (
        "day,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd"
    )
    assert len(rows) == 1
    assert rows[0]["requests"] == "2"
    assert int(rows[0]["total_tokens"]) == int(rows[0]["prompt_tokens"]) + int(
        rows[0]["completion_tokens"]
    )
    model_rows = list(csv.DictReader(io.StringIO(by_model.stdout)))
    assert [(r["model"], r["requests"]) for r in model_rows] == [(MODEL, "2")]


def test_usage_jsonl_lines_are_the_usage_records(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]], since: float
) -> None:
    key, request_ids = used_key
    done = tollgate("usage", "--key", key["id"], "--format", "jsonl", redis_url=stack.redis.url)

    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["client_request_id"] for r in records] == request_ids
    assert all(r["key_id"] == key["id"] and r["usage_source"] == "upstream" for r in records)
    assert records == [stack.admin.record(r, since=since) for r in request_ids]


def test_usage_json_equals_the_admin_usage_answer(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]]
) -> None:
    """`--until 2099-12-31` takes that day whole: the admin API's `until=2100-01-01`."""
    key, _ = used_key
    answer = cli_json(
        stack, "usage", "--key", key["id"], "--since", "2000-01-01", "--until", "2099-12-31"
    )

    via_api = stack.admin.client.get(
        f"/admin/keys/{key['id']}/usage", params={"since": "2000-01-01", "until": "2100-01-01"}
    ).json()
    assert answer == via_api
    assert answer["totals"]["requests"] == 2


def test_usage_without_key_is_a_table_of_every_used_key_and_a_total(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]], since: float
) -> None:
    other = stack.admin.create_key(name="cli-usage-other")
    request_id = new_request_id()
    assert chat(stack, other["key"], request_id).status_code == 200
    stack.admin.record(request_id, since=since)
    done = tollgate("usage", redis_url=stack.redis.url)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "key", "name", "requests", "prompt_tokens", "completion_tokens", "total_tokens",
        "cost_usd",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[used_key[0]["id"]][1:3] == ["cli-usage", "2"]
    assert rows[other["id"]][1:3] == ["cli-usage-other", "1"]
    total = sum(int(row[2]) for key_id, row in rows.items() if key_id != "total")
    assert lines[-1].split()[:2] == ["total", str(total)]


@pytest.mark.parametrize("output", [(), ("--format", "jsonl"), ("--format", "csv", "--json")])
def test_usage_of_an_unknown_key_is_one_line_and_status_1(
    stack: Stack, output: tuple[str, ...]
) -> None:
    done = tollgate("usage", "--key", "nope", *output, redis_url=stack.redis.url)

    assert one_line_error(done, 1) == "tollgate: no key with id 'nope'"


def test_unknown_key_id_fails_with_one_line_on_stderr(stack: Stack) -> None:
    done = tollgate("keys", "show", "0123456789abcdef", redis_url=stack.redis.url)

    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [("keys", "list"), ("keys", "create", "--name", "x", "--json"), ("usage", "--key", "a")],
)
def test_without_redis_url_the_cli_exits_2_with_one_line(args: tuple[str, ...]) -> None:
    done = tollgate(*args, redis_url=None)

    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "TOLLGATE_REDIS_URL" in lines[0]


def one_line_error(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The command failed with `status`, printed nothing on stdout and one line on stderr."""
    assert (done.returncode, done.stdout) == (status, ""), done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("flag", [("--rpm", "none"), ("--rpm=none",), ("--rpm", "unlimited")])
def test_keys_update_rpm_none_makes_requests_unlimited(
    stack: Stack, created: dict[str, Any], flag: tuple[str, ...]
) -> None:
    updated = cli_json(stack, "keys", "update", created["id"], *flag)

    assert updated["rpm"] is None
    assert updated["tpm"] == 40000
    assert updated == stack.admin.key(created["id"])
    response = chat(stack, created["key"])
    assert response.status_code == 200
    assert "x-ratelimit-limit-requests" not in response.headers
    assert response.headers["x-ratelimit-limit-tokens"] == "40000"


def test_main_with_argv_rpm_none_makes_requests_unlimited(
    stack: Stack, created: dict[str, Any]
) -> None:
    """`main(argv)` reads only `argv` (here sys.argv is `["-c"]`, as when embedded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_REDIS_URL"] = stack.redis.url
    argv = ["keys", "update", created["id"], "--rpm=none", "--json"]
    done = subprocess.run(
        [sys.executable, "-c", f"from proxy.cli import main; raise SystemExit(main({argv!r}))"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rpm"] is None
    assert stack.admin.key(created["id"])["rpm"] is None
    assert "x-ratelimit-limit-requests" not in chat(stack, created["key"]).headers


def test_keys_update_without_a_limit_flag_keeps_the_limits(
    stack: Stack, created: dict[str, Any]
) -> None:
    updated = cli_json(stack, "keys", "update", created["id"], "--name", "renamed")

    assert (updated["name"], updated["rpm"], updated["tpm"]) == ("renamed", 60, 40000)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("keys", "create", "--name", "x", "--metadata", "not json"), "--metadata"),
        (("keys", "create", "--name", "x", "--metadata", "[1, 2]"), "--metadata"),
        (("keys", "update", "0123456789abcdef", "--metadata={"), "--metadata"),
        (("keys", "update", "0123456789abcdef", "--rpm", "-1"), "--rpm"),
        (("keys", "create", "--name", "x", "--credits", "nan"), "--credits"),
        (("credits", "add", "0123456789abcdef", "nan"), "amount"),
        (("credits", "add", "0123456789abcdef", "inf"), "amount"),
        (("credits", "add", "0123456789abcdef", "1e400"), "amount"),
        (("keys", "create", "--name", "x", "--rpm", str(10**20)), "rpm"),
        (("usage", "--key", "0123456789abcdef", "--since", "last tuesday"), "last tuesday"),
        (("keys", "frobnicate"), "frobnicate"),
    ],
)
def test_a_bad_argument_is_one_line_and_status_2(
    stack: Stack, args: tuple[str, ...], names: str
) -> None:
    line = one_line_error(tollgate(*args, redis_url=stack.redis.url), 2)

    assert line.startswith("tollgate")
    assert names in line


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("serve", "--workers", "0"), "--workers"),
        (("serve", "--port", "99999"), "--port"),
        (("serve", "--port", "0"), "--port"),
        (("demo", "--port", "70000"), "--port"),
    ],
)
def test_a_bad_server_flag_is_one_line_and_status_2(args: tuple[str, ...], names: str) -> None:
    done = tollgate(*args, redis_url=None)

    assert names in one_line_error(done, 2)


def test_an_unreachable_store_is_one_line_without_the_password() -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"

    line = one_line_error(tollgate("keys", "list", redis_url=url), 1)

    assert line.startswith(f"tollgate: the store at redis://127.0.0.1:{port}/0 is unreachable: ")
    assert "s3cret-pw" not in line


def test_unknown_key_for_credits_is_one_line_and_status_1(stack: Stack) -> None:
    done = tollgate("credits", "add", "0123456789abcdef", "1", redis_url=stack.redis.url)

    assert "0123456789abcdef" in one_line_error(done, 1)


def test_mock_upstream_answers_a_chat_completion_until_sigterm() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "mock-upstream", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        answers: list[httpx.Response] = []

        def answered() -> bool:
            body = {"model": MODEL, "messages": MESSAGES}
            answers.append(httpx.post(url + "/chat/completions", json=body, timeout=5))
            return answers[-1].status_code == 200

        wait_for(answered, what="the mock upstream")  # connection refused until it listens
        body = answers[-1].json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["total_tokens"] > 0
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0
    assert f"TOLLGATE_UPSTREAM_URL={url} tollgate serve" in out


def test_serve_pointed_at_mock_upstream_as_its_banner_says_answers_a_key(
    redis_store: RedisServer, tmp_path: Path
) -> None:
    mock_env = {"TOLLGATE_LOG_LEVEL": "warning"}
    mock_args = ["mock-upstream", "--port", "{port}"]
    with proxy_server(env=mock_env, args=mock_args, ready_path="/v1/models") as mock:
        upstream_url = mock.url + "/v1"
        assert f"TOLLGATE_UPSTREAM_URL={upstream_url} tollgate serve" in mock.output()
        env = tollgate_env(redis_url=redis_store.url, upstream_url=upstream_url,
                           spool_dir=tmp_path)  # fmt: skip
        with proxy_server(env=env) as proxy, Admin(proxy.url) as admin:
            key = admin.create_key(name="via-mock-upstream")
            response = httpx.post(
                proxy.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES},
                headers={"authorization": f"Bearer {key['key']}"},
                timeout=20,
            )

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("Hello from the")


def test_mock_upstream_on_a_busy_port_is_one_line_and_status_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = tollgate("mock-upstream", "--port", str(port), redis_url=None)

    assert one_line_error(done, 1).startswith(f"tollgate: cannot listen on 127.0.0.1:{port}: ")


def test_a_reader_that_goes_away_stops_the_cli_quietly(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]]
) -> None:
    """`tollgate usage --format jsonl | head -0`: the pipe is closed before anything is written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_REDIS_URL"] = stack.redis.url
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "usage", "--format", "jsonl"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    try:
        stderr = process.stderr.read()
        status = process.wait(timeout=30)
    finally:
        process.kill()
        process.stderr.close()

    assert stderr == b""
    assert status == 1


def test_usage_jsonl_piped_into_head_prints_one_record_and_no_error(
    stack: Stack, used_key: tuple[dict[str, Any], list[str]]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env["TOLLGATE_REDIS_URL"] = stack.redis.url
    done = subprocess.run(
        ["sh", "-c", f"{sys.executable} -m proxy usage --format jsonl | head -1"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1
    assert json.loads(done.stdout)["key_id"]


def _open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


@contextmanager
def serving_with_nofile(
    mock: Mock, *, soft: int, hard: int, max_connections: int
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`tollgate serve` started with RLIMIT_NOFILE (soft, hard); yields it and its log once
    /healthz answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_UPSTREAM_URL=mock.url, TOLLGATE_MAX_CONNECTIONS=str(max_connections),
               TOLLGATE_LOG_LEVEL="warning")  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="tollgate-nofile-", suffix=".txt")[1])

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
        )  # fmt: skip
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
            timeout_s=30, what="tollgate serve",
        )  # fmt: skip
        yield process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.unlink(missing_ok=True)


def test_serve_raises_the_open_files_limit_the_connection_cap_needs(mock: Mock) -> None:
    with serving_with_nofile(mock, soft=512, hard=8192, max_connections=1000) as (process, log):
        assert _open_files_limit(process.pid) == 2 * 1000 + 256
        assert "open-files limit" not in log.read_text()


def test_serve_warns_once_when_the_hard_limit_is_too_low(mock: Mock) -> None:
    with serving_with_nofile(mock, soft=512, hard=1024, max_connections=2048) as (process, log):
        assert _open_files_limit(process.pid) == 1024
        warnings = [line for line in log.read_text().splitlines() if "open-files limit" in line]
        assert len(warnings) == 1
        assert "WARNING" in warnings[0] and "1024" in warnings[0] and "4352" in warnings[0]


def test_serve_with_a_ca_file_that_is_not_pem_is_one_line_and_status_2(
    mock: Mock, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    env.update(TOLLGATE_UPSTREAM_URL=mock.url, TOLLGATE_UPSTREAM_CA_FILE=str(ca_file))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    line = one_line_error(done, 2)
    assert "TOLLGATE_UPSTREAM_CA_FILE" in line and str(ca_file) in line


def iso_seconds(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_keys_create_expires_in_sets_expires_at_then_update_expires_and_clears_it(
    stack: Stack,
) -> None:
    before = time.time()
    created = cli_json(stack, "keys", "create", "--name", "expiring", "--expires-in", "1h")
    after = time.time()

    assert before + 3600 - 1 <= iso_seconds(created["expires_at"]) <= after + 3600 + 1
    assert created["expires_at"].endswith("Z")
    assert chat(stack, created["key"]).status_code == 200

    expired = cli_json(
        stack, "keys", "update", created["id"], "--expires-at", "2001-02-03T04:05:06Z"
    )
    assert expired["expires_at"] == "2001-02-03T04:05:06Z"
    assert expired == stack.admin.key(created["id"])
    response = chat(stack, created["key"])
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "API key expired"

    cleared = cli_json(stack, "keys", "update", created["id"], "--expires-at", "none")
    assert cleared["expires_at"] is None
    assert chat(stack, created["key"]).status_code == 200


def test_keys_rotate_grace_json_keeps_the_old_key_working_until_the_time_shown(
    stack: Stack, created: dict[str, Any]
) -> None:
    before = time.time()
    rotated = cli_json(stack, "keys", "rotate", created["id"], "--grace", "1h")
    after = time.time()

    assert rotated["key"] != created["key"]
    until = iso_seconds(rotated["previous_secret_valid_until"])
    assert before + 3600 - 1 <= until <= after + 3600 + 1
    assert {k: v for k, v in rotated.items() if k != "key"} == stack.admin.key(created["id"])
    assert chat(stack, created["key"]).status_code == 200
    assert chat(stack, rotated["key"]).status_code == 200


def test_keys_rotate_grace_text_says_until_when_the_old_key_works(
    stack: Stack, created: dict[str, Any]
) -> None:
    done = tollgate("keys", "rotate", created["id"], "--grace", "2h", redis_url=stack.redis.url)

    assert done.returncode == 0, done.stderr
    until = stack.admin.key(created["id"])["previous_secret_valid_until"]
    lines = done.stdout.splitlines()
    assert f"old key works until: {until} (in 1h 59m)" in lines
    assert lines[-1].startswith("key: sk-tg-")


def test_keys_rotate_without_grace_stops_the_old_key_at_once(
    stack: Stack, created: dict[str, Any]
) -> None:
    rotated = cli_json(stack, "keys", "rotate", created["id"])

    assert rotated["previous_secret_valid_until"] is None
    assert chat(stack, created["key"]).status_code == 401
    assert chat(stack, rotated["key"]).status_code == 200


def test_keys_restore_json_brings_a_revoked_key_back(stack: Stack, created: dict[str, Any]) -> None:
    cli_json(stack, "keys", "revoke", created["id"])
    assert chat(stack, created["key"]).status_code == 401

    restored = cli_json(stack, "keys", "restore", created["id"])

    assert restored["revoked"] is False
    assert restored == stack.admin.key(created["id"])
    assert chat(stack, created["key"]).status_code == 200


def test_credits_unlimited_json_removes_the_balance(stack: Stack, created: dict[str, Any]) -> None:
    answer = cli_json(stack, "credits", "unlimited", created["id"])

    assert answer["credits"] is None
    assert (answer["rpm"], answer["tpm"]) == (60, 40000)
    assert answer == stack.admin.key(created["id"])
    assert chat(stack, created["key"]).status_code == 200


@pytest.mark.parametrize(
    "args",
    [("keys", "restore"), ("keys", "rotate"), ("credits", "unlimited")],
)
def test_new_commands_on_an_unknown_key_are_one_line_and_status_1(
    stack: Stack, args: tuple[str, ...]
) -> None:
    done = tollgate(*args, "0123456789abcdef", redis_url=stack.redis.url)

    assert "0123456789abcdef" in one_line_error(done, 1)


def next_month_start(moment: datetime) -> str:
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return f"{year:04d}-{month:02d}-01T00:00:00Z"


def test_keys_create_budget_json_shows_the_budget_its_spend_and_reset(stack: Stack) -> None:
    before = datetime.now(UTC)
    created = cli_json(stack, "keys", "create", "--name", "budgeted", "--budget", "50/month")
    after = datetime.now(UTC)

    assert created["budget"] == {"amount": 50, "period": "month"}
    assert created["budget_spent"] == 0
    assert created["budget_resets_at"] in {next_month_start(before), next_month_start(after)}
    assert chat(stack, created["key"]).status_code == 200
    wait_for(lambda: stack.admin.key(created["id"])["budget_spent"] > 0, what="budget spend")

    shown = cli_json(stack, "keys", "show", created["id"])
    assert shown == stack.admin.key(created["id"])
    assert 0 < shown["budget_spent"] < 50


def test_keys_show_text_says_budget_spent_and_reset(stack: Stack) -> None:
    created = stack.admin.create_key(name="budget-text", budget={"amount": 2.5, "period": "day"})
    assert chat(stack, created["key"]).status_code == 200
    wait_for(lambda: stack.admin.key(created["id"])["budget_spent"] > 0, what="budget spend")

    done = tollgate("keys", "show", created["id"], redis_url=stack.redis.url)

    assert done.returncode == 0, done.stderr
    record = stack.admin.key(created["id"])
    spent = f"{record['budget_spent']:.6f}".rstrip("0").rstrip(".")
    resets = record["budget_resets_at"]
    expected = f"budget: 2.5 USD per day, {spent} USD spent, resets at {resets}"
    assert expected in done.stdout.splitlines()


def test_keys_update_budget_too_small_gets_402_then_none_removes_it(
    stack: Stack, created: dict[str, Any]
) -> None:
    tight = cli_json(stack, "keys", "update", created["id"], "--budget", "0.000001/day")

    assert tight["budget"] == {"amount": 0.000001, "period": "day"}
    response = chat(stack, created["key"])
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "budget_exceeded"

    removed = cli_json(stack, "keys", "update", created["id"], "--budget", "none")
    assert removed["budget"] is None
    assert removed == stack.admin.key(created["id"])
    assert chat(stack, created["key"]).status_code == 200


def test_keys_model_limit_json_gives_matching_models_their_own_bucket(stack: Stack) -> None:
    created = cli_json(
        stack, "keys", "create", "--name", "per-model", "--rpm", "100",
        "--model-limit", "gpt-4o-mini*:rpm=1", "--model-limit", "*:tpm=1000000",
    )  # fmt: skip

    assert list(created["model_limits"]) == ["gpt-4o-mini*", "*"]
    assert created["model_limits"]["gpt-4o-mini*"]["rpm"] == 1
    first = chat(stack, created["key"])
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert chat(stack, created["key"]).status_code == 429

    cleared = cli_json(stack, "keys", "update", created["id"], "--model-limit", "none")
    assert cleared["model_limits"] is None
    assert cleared == stack.admin.key(created["id"])
    response = chat(stack, created["key"])
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "100"


def test_keys_list_table_has_budget_and_expiry_columns(stack: Stack) -> None:
    created = stack.admin.create_key(
        name="listed", budget={"amount": 7, "period": "week"}, expires_at="2031-01-01T00:00:00Z"
    )

    done = tollgate("keys", "list", redis_url=stack.redis.url)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "id", "name", "rpm", "tpm", "max_concurrency", "credits", "budget", "expires_at",
        "revoked",
    ]  # fmt: skip
    row = next(line.split() for line in lines if line.startswith(created["id"]))
    assert row[2:] == [
        "unlimited", "unlimited", "unlimited", "unlimited", "7/week", "2031-01-01T00:00:00Z", "no",
    ]  # fmt: skip


def test_serve_with_workers_removes_the_metrics_directory_it_made_on_exit(
    redis_store: RedisServer, mock: Mock, tmp_path: Path
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = tollgate_env(
        redis_url=redis_store.url, upstream_url=mock.url, TMPDIR=str(scratch),
        PROMETHEUS_MULTIPROC_DIR="",  # unset: serve makes its own under TMPDIR
    )  # fmt: skip
    args = ["serve", "--host", "127.0.0.1", "--port", "{port}", "--workers", "2"]
    with proxy_server(env=env, args=args) as proxy:
        made = list(scratch.glob("tollgate-metrics-*"))
        assert len(made) == 1 and made[0].is_dir()
        assert httpx.get(proxy.url + "/metrics", timeout=5).status_code == 200
        assert proxy.process is not None
        proxy.signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=30) == 0
    assert list(scratch.glob("tollgate-metrics-*")) == []
