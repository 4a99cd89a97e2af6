"""Settings from TOLLGATE_* (SPEC §2): defaults, overrides, and bad values that stop startup
with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, load_settings
from proxy.credits import Price

REPO = Path(__file__).resolve().parent.parent
# Should a bad value ever slip through, `serve` fails at once instead of listening.
UNBINDABLE = ("--host", "256.0.0.1", "--port", "1")


def test_defaults_match_the_spec() -> None:
    settings = load_settings({})
    assert settings.upstream_url == ""
    assert settings.upstream_api_key is None
    assert settings.redis_url is None
    assert settings.redis_cluster is False
    assert settings.admin_token is None
    assert settings.upstream_timeout_s == 180
    assert settings.fail_open is False
    assert settings.max_body_bytes == 10_485_760
    assert settings.metrics_key_label is True
    assert settings.inject_stream_usage is True
    assert settings.default_max_tokens == 1024
    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert settings.workers == 1
    assert settings.prices.price("gpt-4o-mini") == Price(
        150_000, 600_000, cached_input_micros_per_m=75_000
    )
    assert settings.prices.default is not None


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "TOLLGATE_UPSTREAM_URL": "https://api.example.com/v1/",
            "TOLLGATE_UPSTREAM_API_KEY": "sk-up",
            "TOLLGATE_REDIS_URL": "redis://redis:6379/0",
            "TOLLGATE_REDIS_CLUSTER": "true",
            "TOLLGATE_ADMIN_TOKEN": "admin",
            "TOLLGATE_UPSTREAM_TIMEOUT": "30.5",
            "TOLLGATE_FAIL_MODE": "open",
            "TOLLGATE_MAX_BODY_BYTES": "2048",
            "TOLLGATE_METRICS_KEY_LABEL": "false",
            "TOLLGATE_SPOOL_DIR": "/var/spool/tollgate",
            "TOLLGATE_INJECT_STREAM_USAGE": "false",
            "TOLLGATE_DEFAULT_MAX_TOKENS": "256",
            "TOLLGATE_WORKERS": "4",
            "TOLLGATE_PASSTHROUGH_PATHS": "/v1/moderations, /v1/audio/*",
            "TOLLGATE_MAX_HEADER_BYTES": "32768",
            "TOLLGATE_MAX_HEADERS": "50",
            "TOLLGATE_HEADER_TIMEOUT": "2.5",
            "TOLLGATE_MAX_CONNECTIONS": "100",
            "TOLLGATE_FORWARD_HEADERS": "X-Gateway-Route, helicone-auth",
            "UNRELATED": "ignored",
        }
    )
    assert settings.upstream_url == "https://api.example.com/v1"
    assert settings.upstream_api_key == "sk-up"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.redis_cluster is True
    assert settings.admin_token == "admin"
    assert settings.upstream_timeout_s == 30.5
    assert settings.fail_open is True
    assert settings.max_body_bytes == 2048
    assert settings.metrics_key_label is False
    assert settings.spool_dir == Path("/var/spool/tollgate")
    assert settings.inject_stream_usage is False
    assert settings.default_max_tokens == 256
    assert settings.workers == 4
    assert settings.passthrough_paths == ("/v1/moderations", "/v1/audio/*")
    assert settings.max_header_bytes == 32768
    assert settings.max_headers == 50
    assert settings.header_timeout_s == 2.5
    assert settings.max_connections == 100
    assert settings.forward_headers == ("x-gateway-route", "helicone-auth")


def test_fail_mode_closed_and_empty_values_keep_defaults() -> None:
    settings = load_settings({"TOLLGATE_FAIL_MODE": "Closed", "TOLLGATE_UPSTREAM_TIMEOUT": ""})
    assert settings.fail_open is False
    assert settings.upstream_timeout_s == 180


def test_flags_override_the_environment() -> None:
    settings = load_settings(
        {"TOLLGATE_PORT": "9000", "TOLLGATE_HOST": "127.0.0.1"},
        {"port": 9100, "host": None, "workers": None},
    )
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"
    assert settings.workers == 1


def test_secrets_are_not_in_the_repr() -> None:
    settings = Settings(
        upstream_api_key="sk-upstream-hidden",
        admin_token="admin-hidden",
        redis_url="redis://:pw-hidden@redis:6379",
    )
    text = repr(settings)
    assert "sk-upstream-hidden" not in text
    assert "admin-hidden" not in text
    assert "pw-hidden" not in text


def test_custom_price_file_is_loaded(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."my-model"]\ninput = 3.0\noutput = 15\n', encoding="utf-8")
    settings = load_settings({"TOLLGATE_PRICES": str(prices)})
    assert settings.prices.price("my-model") == Price(3_000_000, 15_000_000)
    assert settings.prices.price("gpt-4o-mini") is None
    assert settings.prices.default is None


BAD_VALUES = [
    ("TOLLGATE_UPSTREAM_TIMEOUT", "abc"),
    ("TOLLGATE_UPSTREAM_TIMEOUT", "0"),
    ("TOLLGATE_UPSTREAM_TIMEOUT", "-5"),
    ("TOLLGATE_UPSTREAM_TIMEOUT", "nan"),
    ("TOLLGATE_UPSTREAM_TIMEOUT", "inf"),
    ("TOLLGATE_FAIL_MODE", "maybe"),
    ("TOLLGATE_FAIL_MODE", "open\nclosed"),
    ("TOLLGATE_PRICES", "/nonexistent/prices.toml"),
    ("TOLLGATE_MAX_BODY_BYTES", "-1"),
    ("TOLLGATE_MAX_BODY_BYTES", "0"),
    ("TOLLGATE_MAX_BODY_BYTES", "1.5"),
    ("TOLLGATE_MAX_BODY_BYTES", "10MB"),
    ("TOLLGATE_REDIS_CLUSTER", "perhaps"),
    ("TOLLGATE_METRICS_KEY_LABEL", "2"),
    ("TOLLGATE_INJECT_STREAM_USAGE", "nope"),
    ("TOLLGATE_DEFAULT_MAX_TOKENS", "0"),
    ("TOLLGATE_DEFAULT_MAX_TOKENS", "many"),
    ("TOLLGATE_UPSTREAM_URL", "api.openai.com/v1"),
    ("TOLLGATE_REDIS_URL", "localhost:6379"),
    ("TOLLGATE_WORKERS", "zero"),
    ("TOLLGATE_PORT", "-80"),
]


def assert_one_line_naming(exc: ConfigError, variable: str) -> None:
    message = str(exc)
    assert variable in message
    assert "\n" not in message and "\r" not in message
    assert message.strip() == message and message


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_raises_one_line_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value})
    assert_one_line_naming(caught.value, variable)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[default\ninput = 1", id="bad-toml"),
        pytest.param("[default]\ninput = 'one'\noutput = 2\n", id="string-price"),
        pytest.param("[default]\ninput = -1\noutput = 2\n", id="negative-price"),
        pytest.param("[default]\ninput = 1\n", id="missing-output"),
        pytest.param("default = 3\n", id="default-not-a-table"),
        pytest.param("models = 3\n", id="models-not-a-table"),
        pytest.param('[models."m"]\ninput = true\noutput = 1\n', id="boolean-price"),
    ],
)
def test_bad_price_file_raises_one_line_naming_the_variable(tmp_path: Path, text: str) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings({"TOLLGATE_PRICES": str(prices)})
    assert_one_line_naming(caught.value, "TOLLGATE_PRICES")


def test_price_file_that_is_not_utf8_or_a_directory_fails(tmp_path: Path) -> None:
    binary = tmp_path / "prices.toml"
    binary.write_bytes(b"\xff\xfe[default]")
    for path in (binary, tmp_path):
        with pytest.raises(ConfigError) as caught:
            load_settings({"TOLLGATE_PRICES": str(path)})
        assert_one_line_naming(caught.value, "TOLLGATE_PRICES")


def test_workers_above_one_without_redis_fails() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"TOLLGATE_WORKERS": "2"})
    assert_one_line_naming(caught.value, "TOLLGATE_REDIS_URL")
    with pytest.raises(ConfigError):
        load_settings({}, {"workers": 3})
    settings = load_settings({"TOLLGATE_REDIS_URL": "redis://localhost:6379"}, {"workers": 3})
    assert settings.workers == 3


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    clean.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        env={**clean, "TOLLGATE_UPSTREAM_URL": "http://127.0.0.1:9/v1", **env},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOLLGATE_UPSTREAM_TIMEOUT", "abc"),
        ("TOLLGATE_FAIL_MODE", "maybe"),
        ("TOLLGATE_PRICES", "/nonexistent/prices.toml"),
        ("TOLLGATE_MAX_BODY_BYTES", "-1"),
        ("TOLLGATE_REDIS_CLUSTER", "perhaps"),
    ],
)
def test_serve_with_a_bad_value_exits_2_with_one_line(variable: str, value: str) -> None:
    result = run_cli("serve", *UNBINDABLE, env={variable: value})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert result.stdout == ""


def test_serve_with_workers_but_no_redis_exits_2_with_one_line() -> None:
    result = run_cli("serve", "--workers", "2", *UNBINDABLE, env={})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "TOLLGATE_REDIS_URL" in lines[0]


def test_serve_without_an_upstream_exits_2_with_one_line() -> None:
    result = run_cli("serve", *UNBINDABLE, env={"TOLLGATE_UPSTREAM_URL": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "TOLLGATE_UPSTREAM_URL" in lines[0]


@pytest.mark.parametrize(
    "patterns",
    ["/v2/files", "/v1/", "/v1/a/../b", "/v1/*x", "/v1/a%2fb", "/v1//a", "/v1/a?b", "files"],
)
def test_passthrough_patterns_outside_v1_or_with_odd_segments_are_refused(patterns: str) -> None:
    with pytest.raises(ConfigError, match="TOLLGATE_PASSTHROUGH_PATHS"):
        load_settings({"TOLLGATE_PASSTHROUGH_PATHS": patterns})


@pytest.mark.parametrize("name", ["authorization", "x-api-key", "cookie", "x-request-id", "a b"])
def test_forward_headers_never_include_credentials_or_hop_fields(name: str) -> None:
    with pytest.raises(ConfigError, match="TOLLGATE_FORWARD_HEADERS"):
        load_settings({"TOLLGATE_FORWARD_HEADERS": f"x-fine, {name}"})


def test_upstream_ca_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOLLGATE_UPSTREAM_CA_FILE"):
        load_settings({"TOLLGATE_UPSTREAM_CA_FILE": str(tmp_path / "missing.pem")})
