"""Upstream selection: `name/model` picks one upstream of the surface's dialect, other models go
to the upstreams whose patterns match by priority, pass-through to the first openai upstream; the
route cache is bounded. Also the registry's per-upstream timeouts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.config import Settings
from proxy.metrics import Metrics
from proxy.registry import RegistryError, UpstreamConfig, load_upstreams
from proxy.routing import MAX_CACHED_ROUTES, Registry, Route
from proxy.upstream import Upstream


@dataclass
class Surface:
    """What routing reads of an API surface."""

    route: str
    dialect: str


CHAT = Surface(route="chat_completions", dialect="openai")
EMBEDDINGS = Surface(route="embeddings", dialect="openai")
MESSAGES = Surface(route="messages", dialect="anthropic")
PASSTHROUGH = Surface(route="passthrough", dialect="openai")


def registry(*configs: UpstreamConfig) -> Registry:
    metrics = Metrics(key_label=False, known_models=set())
    return Registry([Upstream(c, Settings(), metrics) for c in configs])


def two_dialects() -> Registry:
    """Listed out of priority order on purpose."""
    return registry(
        UpstreamConfig(name="openai", url="http://openai.test/v1", models=("gpt-*",), priority=2),
        UpstreamConfig(name="router", url="http://router.test/v1", priority=3),  # any model
        UpstreamConfig(name="backup", url="http://backup.test/v1", models=("gpt-4o*",), priority=1),
        UpstreamConfig(name="claude", url="http://c.test", api="anthropic", models=("claude-*",)),
    )  # fmt: skip


def names(route: Route) -> list[str]:
    return [u.name for u in route.candidates]


def test_candidates_are_the_matching_upstreams_of_the_dialect_by_priority() -> None:
    routes = two_dialects()
    gpt = routes.route(CHAT, "gpt-4o-mini")
    assert (gpt.model, names(gpt)) == ("gpt-4o-mini", ["backup", "openai", "router"])
    assert names(routes.route(CHAT, "gpt-3.5-turbo")) == ["openai", "router"]
    assert names(routes.route(CHAT, "mistral-large")) == ["router"]
    assert names(routes.route(MESSAGES, "claude-3-5-sonnet")) == ["claude"]
    assert names(routes.route(MESSAGES, "gpt-4o")) == []


def test_equal_priorities_keep_the_order_of_the_registry_file() -> None:
    routes = registry(
        UpstreamConfig(name="z", url="http://z.test/v1", priority=1),
        UpstreamConfig(name="a", url="http://a.test/v1", priority=1),
        UpstreamConfig(name="first", url="http://f.test/v1", priority=0),
    )
    assert names(routes.route(CHAT, "m")) == ["first", "z", "a"]


def test_name_slash_model_goes_to_that_upstream_alone_with_the_rest_as_model() -> None:
    routes = two_dialects()
    named = routes.route(CHAT, "openai/gpt-4o")
    assert (named.model, names(named)) == ("gpt-4o", ["openai"])
    # the named upstream is chosen even when a better-priority one serves the model
    assert names(routes.route(CHAT, "router/gpt-4o")) == ["router"]
    # naming an upstream addresses it directly: its model patterns are not consulted
    direct = routes.route(CHAT, "backup/o3-mini")
    assert (direct.model, names(direct)) == ("o3-mini", ["backup"])
    # the rest is sent as it is, slashes included
    deep = routes.route(CHAT, "router/meta-llama/llama-3-70b")
    assert (deep.model, names(deep)) == ("meta-llama/llama-3-70b", ["router"])
    claude = routes.route(MESSAGES, "claude/claude-3-opus")
    assert (claude.model, names(claude)) == ("claude-3-opus", ["claude"])


def test_a_prefix_that_names_no_upstream_is_part_of_the_model_name() -> None:
    routes = two_dialects()
    llama = routes.route(CHAT, "meta-llama/llama-3")
    assert (llama.model, names(llama)) == ("meta-llama/llama-3", ["router"])
    only_gpt = registry(UpstreamConfig(name="o", url="http://o.test/v1", models=("gpt-*",)))
    assert only_gpt.route(CHAT, "meta-llama/llama-3") == Route("meta-llama/llama-3", ())
    slashed = registry(UpstreamConfig(name="o", url="http://o.test/v1", models=("org/*",)))
    org = slashed.route(CHAT, "org/model-1")
    assert (org.model, names(org)) == ("org/model-1", ["o"])


def test_an_upstream_of_the_other_dialect_is_not_selected_by_name() -> None:
    routes = two_dialects()
    # `claude` speaks anthropic: on an openai surface its name is just part of the model
    on_chat = routes.route(CHAT, "claude/claude-3-opus")
    assert (on_chat.model, names(on_chat)) == ("claude/claude-3-opus", ["router"])
    on_messages = routes.route(MESSAGES, "openai/claude-3-opus")
    assert (on_messages.model, names(on_messages)) == ("openai/claude-3-opus", [])


def test_a_name_with_nothing_after_the_slash_is_a_plain_model() -> None:
    routes = two_dialects()
    bare = routes.route(CHAT, "openai/")
    assert (bare.model, names(bare)) == ("openai/", ["router"])


def test_passthrough_goes_to_the_first_openai_upstream_alone() -> None:
    routes = two_dialects()
    # `backup` serves only gpt-4o*; pass-through paths follow no model pattern
    files = routes.route(PASSTHROUGH, "whisper-1")
    assert (files.model, names(files)) == ("whisper-1", ["backup"])
    assert names(routes.route(PASSTHROUGH, "gpt-3.5-turbo")) == ["backup"]
    assert names(routes.route(PASSTHROUGH, "router/x")) == ["backup"]
    anthropic_first = registry(
        UpstreamConfig(name="claude", url="http://c.test", api="anthropic", priority=0),
        UpstreamConfig(name="late", url="http://l.test/v1", models=("none",), priority=5),
    )
    assert names(anthropic_first.route(PASSTHROUGH, "-")) == ["late"]
    assert registry(
        UpstreamConfig(name="claude", url="http://c.test", api="anthropic")
    ).route(PASSTHROUGH, "-") == Route("-", ())  # fmt: skip


def test_repeated_routes_give_the_same_answer() -> None:
    routes = two_dialects()
    first = routes.route(CHAT, "openai/gpt-4o")
    assert routes.route(CHAT, "openai/gpt-4o") is first
    assert routes.route(CHAT, "openai/gpt-4o") == Route("gpt-4o", first.candidates)
    # the cache tells surfaces apart: same model, other dialect or route, other answer
    assert routes.route(MESSAGES, "openai/gpt-4o") == Route("openai/gpt-4o", ())
    assert names(routes.route(PASSTHROUGH, "openai/gpt-4o")) == ["backup"]
    assert routes.route(EMBEDDINGS, "openai/gpt-4o") == first
    same_route = [Surface(route="x", dialect=d) for d in ("openai", "anthropic", "openai")]
    answers = [names(routes.route(s, "claude-3")) for s in same_route]
    assert answers == [["router"], ["claude"], ["router"]]


def test_the_route_cache_stays_bounded() -> None:
    routes = two_dialects()
    for i in range(MAX_CACHED_ROUTES + 50):
        routes.route(CHAT, f"client-chosen-{i}")
        assert len(routes._routes) <= MAX_CACHED_ROUTES
    assert names(routes.route(CHAT, "gpt-4o")) == ["backup", "openai", "router"]
    assert names(routes.route(CHAT, "client-chosen-0")) == ["router"]


def _one(extra: str) -> UpstreamConfig:
    [config] = load_upstreams(f'[upstreams.a]\nurl = "http://a.test/v1"\n{extra}', {})
    return config


def test_timeouts_are_unset_unless_the_registry_gives_them() -> None:
    config = _one("")
    assert (config.connect_timeout_s, config.attempt_timeout_s) == (None, None)
    upstream = Upstream(config, Settings(upstream_attempt_timeout_s=42.0), Metrics(
        key_label=False, known_models=set()
    ))  # fmt: skip
    assert upstream.attempt_timeout_s == 42.0


@pytest.mark.parametrize(("value", "seconds"), [("5", 5.0), ("0.5", 0.5), ("120", 120.0)])
def test_connect_and_attempt_timeouts_are_seconds(value: str, seconds: float) -> None:
    config = _one(f"connect_timeout = {value}\nattempt_timeout = {value}")
    assert (config.connect_timeout_s, config.attempt_timeout_s) == (seconds, seconds)
    assert isinstance(config.connect_timeout_s, float)
    assert isinstance(config.attempt_timeout_s, float)
    metrics = Metrics(key_label=False, known_models=set())
    assert Upstream(config, Settings(), metrics).attempt_timeout_s == seconds


def test_each_timeout_is_read_on_its_own() -> None:
    config = _one("connect_timeout = 2\nattempt_timeout = 7.5")
    assert (config.connect_timeout_s, config.attempt_timeout_s) == (2.0, 7.5)


@pytest.mark.parametrize("field", ["connect_timeout", "attempt_timeout"])
@pytest.mark.parametrize(
    "value", ["0", "0.0", "-1", "-0.5", "true", "false", '"5"', "[5]", "nan", "inf", "-inf"]
)
def test_a_timeout_that_is_not_a_positive_number_names_its_field(field: str, value: str) -> None:
    with pytest.raises(RegistryError, match=rf"\[upstreams\.a\]: {field} must be a number"):
        _one(f"{field} = {value}")
