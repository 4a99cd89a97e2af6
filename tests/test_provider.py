"""The request's `provider` object: validated with the offending field as `param`, it narrows and
reorders the operator's candidates (never adds one) and is removed before forwarding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.errors import InvalidRequest
from proxy.provider import Preferences, preferences, without_provider

CANDIDATES = ["a", "b", "c", "d"]  # by the operator's priority


def refused(provider: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        preferences({"model": "m", "provider": provider})
    assert caught.value.status_code == 400
    assert caught.value.error_type == "invalid_request_error"
    return caught.value


@pytest.mark.parametrize("provider", ["openai", ["openai"], 1, True, False, 0])
def test_a_provider_that_is_not_an_object_is_400_naming_provider(provider: Any) -> None:
    assert refused(provider).param == "provider"


@pytest.mark.parametrize("field", ["order", "only", "ignore"])
@pytest.mark.parametrize(
    "value",
    [
        "a",  # not a list
        {"a": 1},
        1,
        True,
        ["a", 1],  # not strings
        ["a", None],
        [["a"]],
        ["a", ""],  # an empty name
        ["n"] * 65,  # too many
        ["a", "x" * 65],  # too long
    ],
    ids=["string", "object", "number", "bool", "int-entry", "null-entry", "list-entry",
         "empty-entry", "65-entries", "65-chars"],
)  # fmt: skip
def test_a_bad_name_list_is_400_naming_its_field(field: str, value: Any) -> None:
    assert refused({field: value}).param == f"provider.{field}"


@pytest.mark.parametrize("field", ["order", "only", "ignore"])
def test_a_name_list_may_hold_64_names_of_64_characters(field: str) -> None:
    names = [f"{i:02d}".ljust(64, "x") for i in range(64)]
    found = preferences({"provider": {field: names}})
    assert found is not None
    assert getattr(found, field) == tuple(names)


@pytest.mark.parametrize("value", ["false", 0, 1, [], {}])
def test_allow_fallbacks_that_is_not_a_boolean_is_400_naming_it(value: Any) -> None:
    assert refused({"allow_fallbacks": value}).param == "provider.allow_fallbacks"


def test_a_bad_field_is_named_even_beside_good_ones() -> None:
    assert refused({"order": ["a"], "ignore": "b"}).param == "provider.ignore"


def test_absent_or_null_provider_is_none() -> None:
    assert preferences({"model": "m"}) is None
    assert preferences({"model": "m", "provider": None}) is None


def test_null_fields_are_as_if_absent_and_allow_fallbacks_defaults_to_true() -> None:
    nulls = {"order": None, "only": None, "ignore": None, "allow_fallbacks": None}
    assert preferences({"provider": nulls}) == Preferences()
    assert preferences({"provider": {}}) == Preferences(
        order=(), only=None, ignore=(), allow_fallbacks=True
    )
    assert Preferences().apply(CANDIDATES) == CANDIDATES


def test_unknown_fields_of_openrouters_shape_are_accepted_and_ignored() -> None:
    found = preferences(
        {"provider": {"sort": "price", "data_collection": "deny", "quantizations": ["fp8"]}}
    )
    assert found == Preferences()


def test_valid_fields_are_read() -> None:
    raw = {"order": ["b"], "only": ["a", "b"], "ignore": ["c"], "allow_fallbacks": False}
    found = preferences({"model": "m", "provider": raw})
    assert found == Preferences(order=("b",), only=("a", "b"), ignore=("c",), allow_fallbacks=False)


def test_only_keeps_the_named_in_priority_order() -> None:
    assert Preferences(only=("d", "b", "zz")).apply(CANDIDATES) == ["b", "d"]
    assert Preferences(only=()).apply(CANDIDATES) == []


def test_ignore_drops_the_named() -> None:
    assert Preferences(ignore=("b", "zz")).apply(CANDIDATES) == ["a", "c", "d"]
    assert Preferences(only=("a", "b"), ignore=("a",)).apply(CANDIDATES) == ["b"]


def test_order_puts_the_named_first_and_the_rest_after_by_priority() -> None:
    assert Preferences(order=("c", "a")).apply(CANDIDATES) == ["c", "a", "b", "d"]
    assert Preferences(order=("d",)).apply(CANDIDATES) == ["d", "a", "b", "c"]


def test_order_ignores_unknown_names_and_duplicates() -> None:
    assert Preferences(order=("zz", "c", "c", "zz", "b")).apply(CANDIDATES) == ["c", "b", "a", "d"]
    assert Preferences(order=("b", "c", "b")).apply(CANDIDATES) == ["b", "c", "a", "d"]


def test_order_does_not_bring_back_an_ignored_or_excluded_name() -> None:
    assert Preferences(order=("c", "a"), ignore=("c",)).apply(CANDIDATES) == ["a", "b", "d"]
    assert Preferences(order=("d", "a"), only=("a", "b")).apply(CANDIDATES) == ["a", "b"]


def test_no_fallbacks_with_order_tries_only_the_ordered() -> None:
    no_fallbacks = Preferences(order=("c", "zz", "a"), allow_fallbacks=False)
    assert no_fallbacks.apply(CANDIDATES) == ["c", "a"]
    assert Preferences(order=("zz",), allow_fallbacks=False).apply(CANDIDATES) == []


def test_no_fallbacks_without_order_tries_only_the_first_candidate() -> None:
    assert Preferences(allow_fallbacks=False).apply(CANDIDATES) == ["a"]
    assert Preferences(ignore=("a",), allow_fallbacks=False).apply(CANDIDATES) == ["b"]
    assert Preferences(allow_fallbacks=False).apply([]) == []


@pytest.mark.parametrize(
    "prefs",
    [
        Preferences(order=("x", "y", "a"), only=("x", "a", "b"), ignore=("y",)),
        Preferences(order=("x",), allow_fallbacks=False),
        Preferences(only=("x", "y")),
        Preferences(order=("y", "x", "b"), allow_fallbacks=True),
    ],
)
def test_preferences_never_add_an_upstream(prefs: Preferences) -> None:
    applied = prefs.apply(["a", "b"])
    assert set(applied) <= {"a", "b"}
    assert len(applied) == len(set(applied))


def test_without_provider_removes_it_and_keeps_every_other_field() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "héllo ✓"}],
        "stream": True,
        "temperature": 0.5,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "provider": {"order": ["a"]},
        "extra": None,
    }
    sent = json.loads(without_provider(body))
    assert sent == {k: v for k, v in body.items() if k != "provider"}
    assert "provider" in body  # the caller's dict is left as it was


def test_without_provider_rewrites_the_model_when_given() -> None:
    body = {"model": "openai/gpt-4o", "messages": [], "provider": {"only": ["openai"]}, "n": 2}
    sent = json.loads(without_provider(body, model="gpt-4o"))
    assert sent == {"model": "gpt-4o", "messages": [], "n": 2}
    assert body["model"] == "openai/gpt-4o"


def test_without_provider_carries_a_lone_surrogate_from_a_json_escape() -> None:
    body = json.loads('{"model":"m","a":"\\ud800","provider":{}}')
    encoded = without_provider(body)
    assert json.loads(encoded) == {"model": "m", "a": "\ud800"}
