"""The operator console at /admin/ as an operator uses it, in headless Chromium: signing in,
creating, editing, topping up, revoking, restoring and rotating keys, the usage charts and
the export, each checked against what the admin API and the proxy then do."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select

from tests.browser.conftest import Console, Tollgate, wait_for_requests

CSV_HEADER = (
    "request_id,client_request_id,ts,key_id,key_name,model,route,path,stream,status,"
    "prompt_tokens,completion_tokens,total_tokens,cost_usd,usage_source,latency_ms,ttft_ms,"
    "upstream,attempts"
)


def test_console_page_is_served_with_a_strict_content_security_policy(tollgate: Tollgate) -> None:
    response = httpx.get(f"{tollgate.url}/admin/", timeout=10)
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_wrong_token_shows_an_error_and_the_right_one_lists_the_keys(
    console: Console, tollgate: Tollgate
) -> None:
    record = tollgate.admin.create_key(name="listed-before-sign-in")
    console.open()
    assert not console.find("app").is_displayed()

    console.sign_in("not-the-admin-token")
    console.wait.until(ec.visibility_of_element_located((By.ID, "login-error")))
    assert "refused" in console.find("login-error").text
    assert not console.find("app").is_displayed()
    assert console.driver.execute_script("return sessionStorage.length") == 0

    console.sign_in()
    console.wait.until(ec.visibility_of_element_located((By.ID, "app")))
    assert not console.find("login").is_displayed()
    assert console.cell(record["id"], "rpm") == "unlimited"

    # Asked once: a reload in the same tab keeps the session.
    console.driver.refresh()
    console.wait.until(ec.visibility_of_element_located((By.ID, "app")))
    assert not console.find("login").is_displayed()
    console.row(record["id"])

    # A kept token that stops working (the admin token was changed) asks again, saying why.
    console.driver.execute_script("sessionStorage.setItem('tollgate.adminToken', 'stale')")
    console.driver.refresh()
    console.wait.until(ec.visibility_of_element_located((By.ID, "login-error")))
    assert "refused" in console.find("login-error").text
    assert console.driver.execute_script("return sessionStorage.length") == 0


def test_created_key_is_listed_and_its_secret_shown_once_works(
    console: Console, tollgate: Tollgate
) -> None:
    console.signed_in()
    console.driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": tollgate.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    console.fill("create-form", name="alice", rpm="60", tpm="40000", credits="5")
    console.submit("create-form")
    secret = console.secret()
    match = re.fullmatch(r"sk-tg-([0-9a-f]{16})_[A-Za-z0-9_-]+", secret)
    assert match, secret
    key_id = match.group(1)
    console.status_is(f"Created key alice ({key_id})")
    assert console.cell(key_id, "rpm") == "60"
    assert console.cell(key_id, "tpm") == "40,000"
    assert console.cell(key_id, "balance") == "$5.00"

    console.find("copy-secret").click()
    console.wait.until(ec.text_to_be_present_in_element((By.ID, "copy-state"), "Copied"))
    copied = console.driver.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0]('!' + e))"
    )
    assert copied == secret

    assert tollgate.chat(secret).status_code == 200
    record = tollgate.admin.key(key_id)
    assert (record["name"], record["rpm"], record["tpm"]) == ("alice", 60, 40000)

    console.find("dismiss-secret").click()
    assert not console.find("secret-panel").is_displayed()
    assert console.find("secret-value").get_attribute("value") == ""
    assert secret not in console.driver.page_source


def test_edited_limits_reach_the_admin_api(console: Console, tollgate: Tollgate) -> None:
    record = tollgate.admin.create_key(name="bob", rpm=10, tpm=1000)
    console.signed_in()
    console.open_key(record["id"])
    console.fill(
        "edit-form",
        name="bob-renamed",
        rpm="120",
        tpm="",
        max_concurrency="3",
        budget_amount="5",
        budget_period="day",
    )
    console.submit("edit-form")
    console.status_is("Saved the limits of bob-renamed.")
    stored = tollgate.admin.key(record["id"])
    assert stored["name"] == "bob-renamed"
    assert (stored["rpm"], stored["tpm"], stored["max_concurrency"]) == (120, None, 3)
    assert stored["budget"] == {"amount": 5.0, "period": "day"}
    assert console.cell(record["id"], "rpm") == "120"
    assert console.cell(record["id"], "tpm") == "unlimited"
    assert console.cell(record["id"], "budget") == "$0.00 of $5.00 / day"

    console.fill("edit-form", budget_amount="")
    console.submit("edit-form")
    console.until(lambda: tollgate.admin.key(record["id"])["budget"] is None, "budget removed")


def test_top_up_adds_to_the_balance(console: Console, tollgate: Tollgate) -> None:
    record = tollgate.admin.create_key(name="carol", credits=1)
    console.signed_in()
    console.open_key(record["id"])
    assert console.find("detail-balance").text == "$1.00"
    console.fill("topup-form", amount="2.5")
    console.submit("topup-form")
    console.status_is("Added $2.50 to carol.")
    assert tollgate.admin.key(record["id"])["credits"] == 3.5
    assert console.find("detail-balance").text == "$3.50"
    assert console.cell(record["id"], "balance") == "$3.50"

    console.fill("topup-form", amount="-0.5")
    console.submit("topup-form")
    console.status_is("Added -$0.50 to carol.")
    assert tollgate.admin.key(record["id"])["credits"] == 3.0

    # What the API refuses is shown as it says it.
    console.fill("topup-form", amount="2000000000")
    console.submit("topup-form")
    console.wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert "amount must be a number of USD" in console.find("error").text
    assert tollgate.admin.key(record["id"])["credits"] == 3.0


def test_revoke_then_restore(console: Console, tollgate: Tollgate) -> None:
    record = tollgate.admin.create_key(name="dave")
    secret = record["key"]
    console.signed_in()
    console.open_key(record["id"])
    assert not console.find("restore").is_displayed()

    console.find("revoke").click()
    console.status_is("Revoked dave.")
    assert tollgate.admin.key(record["id"])["revoked"] is True
    assert tollgate.chat(secret).status_code == 401
    assert console.row(record["id"]).find_element(By.CSS_SELECTOR, ".badge").text == "revoked"
    assert console.find("detail-status").text == "revoked"

    console.find("restore").click()
    console.status_is("Restored dave.")
    assert tollgate.admin.key(record["id"])["revoked"] is False
    assert tollgate.chat(secret).status_code == 200
    assert console.row(record["id"]).find_element(By.CSS_SELECTOR, ".badge").text == "active"


def test_rotate_with_grace_keeps_the_old_secret_working_then_without(
    console: Console, tollgate: Tollgate
) -> None:
    record = tollgate.admin.create_key(name="erin")
    first = record["key"]
    console.signed_in()
    console.open_key(record["id"])

    console.fill("rotate-form", grace_seconds="3600")
    console.submit("rotate-form")
    console.status_is("Rotated the secret of erin.")
    second = console.secret()
    assert second != first and second.startswith(f"sk-tg-{record['id']}_")
    assert tollgate.admin.key(record["id"])["previous_secret_valid_until"] is not None
    assert "previous secret works until" in console.find("detail-grace").text
    assert tollgate.chat(first).status_code == 200
    assert tollgate.chat(second).status_code == 200

    console.find("dismiss-secret").click()
    console.fill("rotate-form", grace_seconds="0")
    console.submit("rotate-form")
    console.until(
        lambda: console.find("secret-value").get_attribute("value") not in ("", second),
        "the third secret",
    )
    third = console.secret()
    assert tollgate.chat(second).status_code == 401
    assert tollgate.chat(first).status_code == 401
    assert tollgate.chat(third).status_code == 200
    assert console.find("detail-grace").text == "Only the current secret works."


def test_usage_charts_draw_the_totals_of_the_requests_made(
    console: Console, tollgate: Tollgate
) -> None:
    since = time.time()
    record = tollgate.admin.create_key(name="search-team", credits=20, rpm=600)
    made = {"gpt-4o-mini": 3, "gpt-4o": 2}
    tokens = 0
    for model, n in made.items():
        for _ in range(n):
            response = tollgate.chat(record["key"], model)
            assert response.status_code == 200
            tokens += response.json()["usage"]["total_tokens"]
    usage = wait_for_requests(tollgate.admin, record["id"], 5, since)
    assert usage["totals"]["requests"] == 5
    cost = usage["totals"]["cost_usd"]
    assert cost > 0

    console.signed_in()
    console.open_key(record["id"])
    day_chart = 'svg.chart[data-kind="day"][data-metric="requests"]'
    chart = console.wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, day_chart)))
    assert chart.get_attribute("data-total") == "5"
    days = chart.find_elements(By.CSS_SELECTOR, "rect.bar")
    assert len(days) == 30
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert days[-1].get_attribute("data-label") == today
    assert days[-1].get_attribute("data-value") == "5"
    assert float(days[-1].get_attribute("height") or 0) > 0
    assert {d.get_attribute("data-value") for d in days[:-1]} == {"0"}
    bars = console.css('svg.chart[data-kind="model"]').find_elements(By.CSS_SELECTOR, "rect.bar")
    assert {
        b.get_attribute("data-label"): int(b.get_attribute("data-value") or -1) for b in bars
    } == made
    assert console.find("usage-totals").text.startswith("5 requests")

    Select(console.find("metric")).select_by_value("total_tokens")
    chart = console.wait.until(
        ec.presence_of_element_located(
            (By.CSS_SELECTOR, 'svg.chart[data-kind="day"][data-metric="total_tokens"]')
        )
    )
    assert int(chart.get_attribute("data-total") or -1) == tokens
    Select(console.find("metric")).select_by_value("cost_usd")
    chart = console.wait.until(
        ec.presence_of_element_located(
            (By.CSS_SELECTOR, 'svg.chart[data-kind="model"][data-metric="cost_usd"]')
        )
    )
    assert abs(float(chart.get_attribute("data-total") or -1) - cost) < 1e-9
    console.until(lambda: console.cell(record["id"], "spend") not in ("", "…"), "the spend")
    assert (
        float(
            console.css(f'tr[data-key-id="{record["id"]}"] td.spend').get_attribute("data-cost-usd")
            or -1
        )
        == cost
    )

    _screenshot(console)


def test_export_downloads_every_record_as_jsonl_and_csv(
    console: Console, tollgate: Tollgate, downloads: Path
) -> None:
    record = tollgate.admin.create_key(name="export-me")
    since = time.time()
    assert tollgate.chat(record["key"]).status_code == 200
    wait_for_requests(tollgate.admin, record["id"], 1, since)
    expected = tollgate.admin.export(since=0)
    assert any(r["key_id"] == record["id"] for r in expected)

    console.signed_in()
    console.find("export-jsonl").click()
    console.wait.until(
        ec.text_to_be_present_in_element(
            (By.ID, "export-state"), f"{len(expected)} records exported."
        )
    )
    name = console.find("export-link").get_attribute("download") or ""
    assert name.endswith(".jsonl")
    jsonl = _downloaded(console, downloads / name)
    assert [json.loads(line) for line in jsonl.splitlines()] == expected

    console.find("export-csv").click()
    name = name.removesuffix(".jsonl") + ".csv"
    console.until(lambda: console.find("export-link").get_attribute("download") == name, "the CSV")
    lines = _downloaded(console, downloads / name).splitlines()
    assert lines[0] == CSV_HEADER
    assert len(lines) == len(expected) + 1
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(
        r["request_id"] for r in expected
    )


def test_names_are_shown_as_text_never_as_markup(console: Console, tollgate: Tollgate) -> None:
    name = '<img src=x onerror="document.title=1">&amp;'
    record = tollgate.admin.create_key(name=name)
    console.signed_in()
    button = console.row(record["id"]).find_element(By.CSS_SELECTOR, "button.link")
    assert button.text == name
    assert console.driver.find_elements(By.CSS_SELECTOR, "#keys-body img") == []
    console.open_key(record["id"])
    assert console.find("detail-name").text == name
    assert console.driver.title == "Tollgate console"


def test_console_fits_a_phone_and_breaks_no_policy(console: Console) -> None:
    console.signed_in()
    console.driver.set_window_size(390, 844)
    width = console.driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert width[0] <= width[1], width
    header = console.css("#keys-table thead")
    assert not header.is_displayed()  # each key is a card whose cells are labelled
    console.driver.set_window_size(1280, 900)
    assert header.is_displayed()
    violations = [
        entry["message"]
        for entry in console.driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]
    assert violations == []


def _downloaded(console: Console, path: Path) -> str:
    """The file the console's export link saved (the browser clicks it for the operator)."""
    console.until(path.is_file, f"the download {path.name}")
    return path.read_text()


def _screenshot(console: Console) -> None:
    """The console at 1280 px wide, its whole height, saved where TOLLGATE_CONSOLE_SCREENSHOT
    says (`TOLLGATE_CONSOLE_SCREENSHOT=docs/console.png` renews the README's)."""
    target = os.environ.get("TOLLGATE_CONSOLE_SCREENSHOT")
    console.driver.execute_script("window.scrollTo(0, 0)")
    height = console.driver.execute_script("return document.documentElement.scrollHeight")
    console.driver.set_window_size(1280, min(int(height) + 100, 4000))
    png = console.driver.get_screenshot_as_png()
    assert png.startswith(b"\x89PNG")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(png)
    console.driver.set_window_size(1280, 900)
