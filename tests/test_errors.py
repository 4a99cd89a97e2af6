"""The error tree's answers that depend on a value: the upstream timeout names its limit."""

from __future__ import annotations

import pytest

from proxy.config import Settings
from proxy.errors import UpstreamTimeout


@pytest.mark.parametrize(
    ("timeout_s", "message"),
    [
        (180, "Request timed out (3-minute upstream limit)"),
        (180.0, "Request timed out (3-minute upstream limit)"),
        (30, "Request timed out (30-second upstream limit)"),
        (600, "Request timed out (600-second upstream limit)"),
        (2.5, "Request timed out (2.5-second upstream limit)"),
    ],
)
def test_upstream_timeout_message_names_the_limit(timeout_s: float, message: str) -> None:
    error = UpstreamTimeout(timeout_s)
    assert error.status_code == 504
    assert error.message == message
    assert error.body()["error"] == {
        "message": message,
        "type": "upstream_timeout",
        "param": None,
        "code": "upstream_timeout",
    }


def test_default_settings_have_the_3_minute_limit(settings: Settings) -> None:
    assert UpstreamTimeout(Settings().upstream_timeout_s).message == (
        "Request timed out (3-minute upstream limit)"
    )
