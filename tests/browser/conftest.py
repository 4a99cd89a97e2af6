"""The console in a real browser: Debian's headless Chromium driven by Selenium, against a
real `tollgate serve` on a real redis-server and the mock upstream.

Nothing is downloaded: the driver and the browser are Debian's (`chromium`,
`chromium-driver`, installed by scripts/test.sh) and both paths are given to Selenium, so
Selenium Manager never runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.admin_client import Admin
from tests.servers import (
    ADMIN_TOKEN,
    ProxyServer,
    mock_upstream_server,
    proxy_server,
    redis_server,
    tollgate_env,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 10


@dataclass
class Tollgate:
    proxy: ProxyServer
    admin: Admin

    @property
    def url(self) -> str:
        return self.proxy.url

    def chat(self, secret: str, model: str = "gpt-4o-mini") -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {secret}"},
            json={"model": model, "messages": [{"role": "user", "content": "Say hello"}]},
            timeout=10,
        )


@pytest.fixture(scope="module")
def tollgate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    spool = tmp_path_factory.mktemp("spool")
    with redis_server() as redis, mock_upstream_server() as upstream_url:
        env = tollgate_env(redis_url=redis.url, upstream_url=upstream_url, spool_dir=spool)
        with proxy_server(env=env) as proxy, Admin(proxy.url) as admin:
            yield Tollgate(proxy=proxy, admin=admin)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the test machine may run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    chrome.set_page_load_timeout(WAIT_S)
    chrome.set_script_timeout(WAIT_S)
    try:
        yield chrome
    finally:
        chrome.quit()


class Console:
    """The console page in the browser, with the steps an operator takes."""

    def __init__(self, driver: webdriver.Chrome, tollgate: Tollgate) -> None:
        self.driver = driver
        self.tollgate = tollgate
        self.wait = WebDriverWait(driver, WAIT_S)

    def open(self) -> None:
        """The page afresh, signed out (this tab's sessionStorage emptied)."""
        self.driver.set_window_size(1280, 900)
        self.driver.get(f"{self.tollgate.url}/admin/")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(f"{self.tollgate.url}/admin/")
        self.wait.until(ec.visibility_of_element_located((By.ID, "login")))

    def sign_in(self, token: str = ADMIN_TOKEN) -> None:
        field = self.find("token")
        field.clear()
        field.send_keys(token)
        self.find("login-form").submit()

    def signed_in(self) -> None:
        self.open()
        self.sign_in()
        self.wait.until(ec.visibility_of_element_located((By.ID, "app")))

    def find(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def css(self, selector: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def text(self, element_id: str) -> str:
        return str(
            self.driver.execute_script(
                f"return document.getElementById('{element_id}').textContent"
            )
        )

    def status_is(self, message: str) -> None:
        self.wait.until(ec.text_to_be_present_in_element((By.ID, "status"), message))

    def fill(self, form_id: str, **values: str) -> None:
        form = self.find(form_id)
        for name, value in values.items():
            field = form.find_element(By.NAME, name)
            if field.tag_name == "select":
                Select(field).select_by_value(value)
            else:
                field.clear()
                if value:
                    field.send_keys(value)

    def submit(self, form_id: str) -> None:
        self.find(form_id).find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    def row(self, key_id: str) -> WebElement:
        return self.wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-key-id="{key_id}"]'))
        )

    def cell(self, key_id: str, column: str) -> str:
        return str(self.row(key_id).find_element(By.CSS_SELECTOR, f"td.{column}").text)

    def open_key(self, key_id: str) -> None:
        self.row(key_id).find_element(By.CSS_SELECTOR, "button.link").click()
        self.wait.until(ec.text_to_be_present_in_element((By.ID, "detail-id"), key_id))

    def secret(self) -> str:
        field = self.wait.until(ec.visibility_of_element_located((By.ID, "secret-value")))
        self.wait.until(lambda _: field.get_attribute("value"))
        return str(field.get_attribute("value"))

    def until(self, check: Any, what: str) -> Any:
        return self.wait.until(lambda _: check(), message=f"waiting for {what}")


@pytest.fixture
def console(driver: webdriver.Chrome, tollgate: Tollgate) -> Console:
    return Console(driver, tollgate)


def wait_for_requests(admin: Admin, key_id: str, requests: int, since: float) -> dict[str, Any]:
    """The key's usage by model once all `requests` have settled (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        answer = admin.usage(key_id, since=since)
        if answer["totals"]["requests"] >= requests or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)
