"""Raw request targets: which are refused, and the upstream path built from the raw one."""

from __future__ import annotations

import pytest

from proxy.paths import PassthroughPaths, refused_path, upstream_path


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/../admin/keys",
        b"/v1/./chat/completions",
        b"/v1/%2e%2e/%2e%2e/tenant-b/v1/files",
        b"/v1/%2E/chat/completions",
        b"/v1/.%2e/x",
        b"/v1/files%2fabc",
        b"/v1/files%2Fabc",
        b"/v1/foo%3Finjected=1",
        b"/v1/foo%23frag",
        b"/v1/foo%00",
        b"/v1/foo%5cbar",
        b"/v1/foo\\bar",
        b"/v1//chat/completions",
        b"/v1/..",
        b"v1/chat/completions",
    ],
)
def test_paths_that_could_leave_the_route_are_refused(raw: bytes) -> None:
    assert refused_path(raw) is not None


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/chat/completions",
        b"/v1/models/ft:gpt-4o:org:x",
        b"/v1/audio/speech/",
        b"/v1/files...x",
        b"/v1/a%20b",
        b"/v1/a%252f",
        b"/",
    ],
)
def test_ordinary_paths_pass(raw: bytes) -> None:
    assert refused_path(raw) is None


def test_upstream_path_keeps_the_raw_form_below_the_prefix() -> None:
    assert upstream_path(b"/v1/audio/speech", 1) == "/audio/speech"
    assert upstream_path(b"/api/v1/moder%61tions", 2) == "/moder%61tions"
    assert upstream_path(b"/v%31/files", 1) == "/files"


def test_passthrough_patterns_match_exact_paths_and_prefixes() -> None:
    allowed = PassthroughPaths(("/v1/moderations", "/v1/audio/*"))
    assert allowed.allows("/v1/moderations")
    assert allowed.allows("/v1/audio/speech")
    assert allowed.allows("/v1/audio/transcriptions/x")
    assert not allowed.allows("/v1/audio/")
    assert not allowed.allows("/v1/audio")
    assert not allowed.allows("/v1/moderations/x")
    assert not allowed.allows("/v1/audiox")
    assert not PassthroughPaths(()).allows("/v1/files")
