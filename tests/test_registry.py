"""The upstream registry: TOLLGATE_UPSTREAMS parsed, routes by dialect, model pattern and
priority, and each upstream's own credential header."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from proxy.config import ConfigError, Settings, load_settings
from proxy.metrics import Metrics
from proxy.registry import RegistryError, UpstreamConfig, load_upstreams
from proxy.routing import Registry
from proxy.surfaces.chat import ChatCompletions
from proxy.upstream import Upstream
from tests.answers import assert_error
from tests.conftest import HELLO, HarnessFactory

REGISTRY = """
[upstreams.openai]
url = "https://api.openai.example/v1/"
api_key_env = "OPENAI_KEY"
api = "openai"
models = ["gpt-*", "o3*"]
priority = 2

[upstreams.backup]
url = "http://backup.example/v1"
priority = 1
models = ["gpt-4o*"]

[upstreams.anthropic]
url = "https://api.anthropic.example"
api_key_env = "ANTHROPIC_KEY"
api = "anthropic"
models = ["claude-*"]
"""
ENV = {"OPENAI_KEY": "sk-openai", "ANTHROPIC_KEY": "sk-ant"}


class _Dialect:
    route = "x"

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect


def _registry() -> Registry:
    settings = Settings()
    metrics = Metrics(key_label=False, known_models=set())
    return Registry([Upstream(c, settings, metrics) for c in load_upstreams(REGISTRY, ENV)])


def test_the_registry_file_names_upstreams_dialects_models_and_secrets_by_variable() -> None:
    openai, backup, anthropic = load_upstreams(REGISTRY, ENV)
    assert (openai.name, openai.url, openai.api_key, openai.priority) == (
        "openai", "https://api.openai.example/v1", "sk-openai", 2,
    )  # fmt: skip
    assert (backup.api, backup.api_key, backup.models) == ("openai", None, ("gpt-4o*",))
    assert anthropic.api == "anthropic" and anthropic.serves("claude-3-5-sonnet")
    assert not anthropic.serves("gpt-4o")
    assert UpstreamConfig(name="any", url="http://x").serves("whatever")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("[other]\nx = 1", r"no \[upstreams"),
        ('[upstreams.a]\nurl = "ftp://x"', "url must start"),
        ('[upstreams.a]\nurl = "http://x"\napi = "gemini"', "api must be one of"),
        ('[upstreams.a]\nurl = "http://x"\nmodels = "gpt-*"', "models must be a list"),
        ('[upstreams.a]\nurl = "http://x"\napi_key_env = "MISSING"', "not set"),
        ('[upstreams.a]\nurl = "http://x"\nkey = "sk-inline"', "unknown field"),
        ('[upstreams."a b"]\nurl = "http://x"', "a name is"),
    ],
)
def test_a_bad_registry_is_one_line_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        load_upstreams(text, ENV)


def test_tollgate_upstreams_is_read_and_a_bad_file_stops_startup(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(REGISTRY)
    settings = load_settings({"TOLLGATE_UPSTREAMS": str(path), **ENV})
    assert [u.name for u in settings.upstream_configs()] == ["openai", "backup", "anthropic"]
    path.write_text('[upstreams.a]\nurl = "nope"')
    with pytest.raises(ConfigError, match="TOLLGATE_UPSTREAMS"):
        load_settings({"TOLLGATE_UPSTREAMS": str(path)})


def test_upstream_url_alone_is_one_openai_upstream_named_default() -> None:
    settings = load_settings(
        {"TOLLGATE_UPSTREAM_URL": "http://u/v1", "TOLLGATE_UPSTREAM_API_KEY": "k"}
    )
    [default] = settings.upstream_configs()
    assert (default.name, default.url, default.api, default.api_key) == (
        "default", "http://u/v1", "openai", "k",
    )  # fmt: skip


def test_candidates_follow_dialect_pattern_and_priority() -> None:
    registry = _registry()
    names = lambda dialect, model: [  # noqa: E731
        u.name for u in registry.route(_Dialect(dialect), model).candidates
    ]
    assert names("openai", "gpt-4o-mini") == ["backup", "openai"]
    assert names("openai", "o3-mini") == ["openai"]
    assert names("openai", "claude-3") == []
    assert names("anthropic", "claude-3") == ["anthropic"]
    assert names("anthropic", "gpt-4o") == []


def test_upstream_url_alone_also_serves_the_anthropic_route_and_a_file_only_what_it_says() -> None:
    settings = load_settings({"TOLLGATE_UPSTREAM_URL": "http://u/v1"})
    metrics = Metrics(key_label=False, known_models=set())
    default = Registry([Upstream(c, settings, metrics) for c in settings.upstream_configs()])
    [only] = default.route(_Dialect("anthropic"), "claude-3").candidates
    assert (only.name, only.base_url) == ("default", "http://u/v1")
    assert _registry().route(_Dialect("anthropic"), "gpt-4o").candidates == ()


def test_an_anthropic_url_is_the_sdks_base_and_paths_go_below_its_v1() -> None:
    [anthropic] = _registry().route(_Dialect("anthropic"), "claude-3").candidates
    assert anthropic.base_url == "https://api.anthropic.example/v1"
    explicit = UpstreamConfig(name="a", url="https://api.anthropic.example/v1", api="anthropic")
    metrics = Metrics(key_label=False, known_models=set())
    assert Upstream(explicit, Settings(), metrics).base_url == "https://api.anthropic.example/v1"


def test_each_dialect_gets_the_operators_key_in_its_own_header() -> None:
    registry = _registry()
    openai = registry.route(ChatCompletions(), "o3").candidates[0]
    sent = dict(openai.headers([(b"authorization", b"Bearer sk-tg-client")], request_id="r"))
    assert sent[b"authorization"] == b"Bearer sk-openai"
    assert b"x-api-key" not in sent
    anthropic = registry.route(_Dialect("anthropic"), "claude-3").candidates[0]
    sent = dict(anthropic.headers([(b"x-api-key", b"sk-tg-client")], request_id="r"))
    assert sent[b"x-api-key"] == b"sk-ant"
    assert sent[b"anthropic-version"] == b"2023-06-01"
    assert b"authorization" not in sent
    chosen = dict(anthropic.headers([(b"anthropic-version", b"2024-01-01")], request_id="r"))
    assert chosen[b"anthropic-version"] == b"2024-01-01"


def test_a_model_no_upstream_serves_is_404_without_an_upstream_call(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    only_gpt = (UpstreamConfig(name="up", url=settings.upstream_url, models=("gpt-*",)),)
    with harness_factory(settings, upstreams=only_gpt) as harness:
        record = harness.create_key(credits=1)
        response = harness.chat(record["key"], {**HELLO, "model": "claude-3-opus"})
        error = assert_error(response, 404, "invalid_request_error", "model_not_found")
        assert error["param"] == "model"
        assert harness.mock.requests == []
        assert harness.chat(record["key"], HELLO).status_code == 200
        after = harness.admin("GET", f"/admin/keys/{record['id']}").json()
        assert after["reserved_credits"] == 0


def test_the_model_list_merges_every_openai_upstream_that_answers(
    harness_factory: HarnessFactory, settings: Settings
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            raise httpx.ConnectError("refused", request=request)
        models = {"a.test": ["gpt-4o", "shared"], "b.test": ["shared", "o3"]}[request.url.host]
        data = [{"id": m, "object": "model", "owned_by": request.url.host} for m in models]
        return httpx.Response(200, json={"object": "list", "data": data})

    upstreams = tuple(
        UpstreamConfig(name=name, url=f"http://{name}.test/v1") for name in ("a", "down", "b")
    )
    transport = httpx.MockTransport(handler)
    with harness_factory(settings, upstream=transport, upstreams=upstreams) as harness:
        key = harness.create_key()["key"]
        answer = harness.client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        listed = [(m["id"], m["owned_by"]) for m in answer.json()["data"]]
        assert listed == [("gpt-4o", "a.test"), ("shared", "a.test"), ("o3", "b.test")]
        metrics = harness.client.get("/metrics").text
        assert 'tollgate_upstream_errors_total{reason="connect"}' in metrics
