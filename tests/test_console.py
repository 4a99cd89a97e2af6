"""The console's files at /admin/: served without the token, with strict headers, and only
where the admin API exists (its behaviour in a real browser is tests/browser/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.admin import CONSOLE_PATHS
from proxy.config import Settings
from tests.conftest import Harness, HarnessFactory

CONSOLE = Path(__file__).resolve().parent.parent / "proxy" / "console"


@pytest.mark.parametrize("path", list(CONSOLE_PATHS))
def test_console_files_load_without_a_token_with_strict_headers(
    harness: Harness, path: str
) -> None:
    response = harness.client.get(path)
    assert response.status_code == 200
    assert response.content == (CONSOLE / CONSOLE_PATHS[path][0]).read_bytes()
    assert response.headers["content-type"] == CONSOLE_PATHS[path][1]
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_console_page_has_no_inline_script_or_style_and_nothing_from_elsewhere() -> None:
    page = (CONSOLE / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", page) == ['<script src="console.js" defer>']
    assert "<style" not in page
    assert " style=" not in page
    assert not re.search(r"<[^>]+\son[a-z]+=", page)  # no inline event handlers
    for source in (
        page,
        (CONSOLE / "console.js").read_text(),
        (CONSOLE / "console.css").read_text(),
    ):
        assert "http://" not in source.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in source
        assert "innerHTML" not in source


def test_admin_without_slash_redirects_to_the_console_by_path(harness: Harness) -> None:
    response = harness.client.get("/admin", follow_redirects=False, headers={"host": "evil.test"})
    assert response.status_code == 308
    assert response.headers["location"] == "/admin/"


@pytest.mark.parametrize("path", ["/admin", *CONSOLE_PATHS])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_console_is_404_without_admin_token(
    harness_factory: HarnessFactory, settings: Settings, path: str, method: str
) -> None:
    with harness_factory(settings, admin_token=None) as harness:
        response = harness.client.request(method, path, follow_redirects=False)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert "content-security-policy" not in response.headers


@pytest.mark.parametrize("path", list(CONSOLE_PATHS))
def test_console_files_only_answer_get(harness: Harness, path: str) -> None:
    response = harness.client.post(path)
    assert response.status_code == 405


def test_console_does_not_shadow_unknown_admin_paths(harness: Harness) -> None:
    response = harness.admin("GET", "/admin/index.html")
    assert response.status_code == 404
    assert harness.admin("GET", "/admin/keys").status_code == 200
