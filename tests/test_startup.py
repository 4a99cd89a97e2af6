"""What a starting process logs (SPEC §6): one line naming the upstreams, the store, the fail
mode, the workers and the admin API, never a secret; a warning for each unknown TOLLGATE_*
variable, naming the known one it resembles. And TOLLGATE_ACCESS_LOG's values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, load_settings
from proxy.registry import UpstreamConfig
from proxy.startup import startup_line, unknown_variable_warning
from tests.conftest import HarnessFactory

REGISTRY = """
[upstreams.openai]
url = "https://user:url-password@api.openai.com/v1"
api_key_env = "TOLLGATE_OPENAI_KEY"

[upstreams.local]
url = "http://10.0.0.7:8000/v1"
"""


def test_startup_line_names_upstream_hosts_and_the_store_without_secrets() -> None:
    settings = Settings(
        upstreams=(
            UpstreamConfig(
                name="openai", url="https://user:url-password@api.openai.com/v1", api_key="sk-a"
            ),
            UpstreamConfig(name="local", url="http://[::1]:8000/v1?token=query-secret"),
        ),
        redis_url="redis://default:redis-password@redis.internal:6380/2",
        admin_token="admin-secret",
        fail_open=True,
        workers=4,
    )
    line = startup_line(settings)
    assert "upstreams openai (api.openai.com), local ([::1]:8000); " in line
    assert "store redis redis.internal:6380; fail mode open; workers 4; " in line
    assert "admin API on at /admin; access log json" in line
    for secret in ("url-password", "query-secret", "sk-a", "redis-password", "admin-secret"):
        assert secret not in line
    assert "user" not in line and "default" not in line and "/v1" not in line


@pytest.mark.parametrize(
    ("redis_url", "cluster", "shown"),
    [
        (None, False, "store in-process (this process only); fail mode closed"),
        ("rediss://:pw@cache.example:6379/0", False, "store redis cache.example:6379 (TLS);"),
        ("redis://:pw@seed:7000", True, "store redis cluster seed:7000;"),
        ("unix:///run/redis.sock?password=pw", False, "store redis unix socket /run/redis.sock;"),
    ],
)
def test_startup_line_names_every_kind_of_store(
    redis_url: str | None, cluster: bool, shown: str
) -> None:
    settings = Settings(upstream_url="https://api.openai.com/v1", redis_url=redis_url,
                        redis_cluster=cluster)  # fmt: skip
    line = startup_line(settings)
    assert shown in line and "pw" not in line
    assert "upstreams default (api.openai.com);" in line
    assert "admin API off (no TOLLGATE_ADMIN_TOKEN)" in line


def test_unknown_variables_are_found_and_the_registrys_key_variables_are_not(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "upstreams.toml"
    registry.write_text(REGISTRY)
    settings = load_settings(
        {
            "TOLLGATE_UPSTREAMS": str(registry),
            "TOLLGATE_OPENAI_KEY": "sk-openai",
            "TOLLGATE_REDIS_ULR": "redis://localhost:6379",
            "TOLLGATE_ADMIN_TOKEN": "t",
            "TOLLGATE_SHINY": "1",
            "TOLLGATE_MOCK_TAG": "a",
            "OTHER_REDIS_ULR": "x",
        }
    )
    assert settings.unknown_variables == ("TOLLGATE_REDIS_ULR", "TOLLGATE_SHINY")
    assert settings.redis_url is None


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        (
            "TOLLGATE_REDIS_ULR",
            "TOLLGATE_REDIS_ULR is not a Tollgate setting and is ignored; "
            "did you mean TOLLGATE_REDIS_URL?",
        ),
        ("TOLLGATE_FAILMODE", "TOLLGATE_FAILMODE is not a Tollgate setting and is ignored; "
         "did you mean TOLLGATE_FAIL_MODE?"),
        ("TOLLGATE_ACCESSLOG", "TOLLGATE_ACCESSLOG is not a Tollgate setting and is ignored; "
         "did you mean TOLLGATE_ACCESS_LOG?"),
        ("TOLLGATE_SHINY", "TOLLGATE_SHINY is not a Tollgate setting and is ignored"),
    ],
)  # fmt: skip
def test_the_warning_names_the_known_variable_a_misspelt_one_resembles(
    name: str, warning: str
) -> None:
    assert unknown_variable_warning(name) == warning


def test_a_starting_app_logs_the_startup_line_and_the_warnings_once(
    harness_factory: HarnessFactory, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tollgate")
    with harness_factory(settings, unknown_variables=("TOLLGATE_REDIS_ULR",)) as harness:
        assert harness.client.get("/healthz").status_code == 200
    records = [r for r in caplog.records if r.name == "tollgate"]
    startup = [r for r in records if r.getMessage().startswith("tollgate starting")]
    assert len(startup) == 1 and startup[0].levelno == logging.INFO
    line = startup[0].getMessage()
    assert "upstreams default (upstream.test); store in-process" in line
    assert "admin API on at /admin" in line
    assert settings.upstream_api_key is not None and settings.upstream_api_key not in line
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warnings == [
        "TOLLGATE_REDIS_ULR is not a Tollgate setting and is ignored; "
        "did you mean TOLLGATE_REDIS_URL?"
    ]


@pytest.mark.parametrize(("raw", "value"), [("json", "json"), (" TEXT ", "text"), ("off", "off")])
def test_access_log_format_is_read(raw: str, value: str) -> None:
    assert load_settings({}).access_log == "json"
    assert load_settings({"TOLLGATE_ACCESS_LOG": raw}).access_log == value


def test_an_unknown_access_log_format_stops_startup() -> None:
    with pytest.raises(ConfigError, match=r"^TOLLGATE_ACCESS_LOG must be json, text or off"):
        load_settings({"TOLLGATE_ACCESS_LOG": "yaml"})
