"""The admin page in a real headless Chromium against a real sidecar process: log in, read the
overview, change a weight and see the next 400 requests follow it (chi-square over the counts
of two real mock upstreams), drain a target, unload and load the embedded engine, flush the
cache, log out. Each page's screenshot is saved under the test's temporary directory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.auth_helpers import Issuer, jwt_config, make_issuer
from tests.support.browser import browser_missing, start_chromium
from tests.support.sidecar import Sidecar, base_config, start_sidecar
from tests.support.upstream_mock import MockUpstream

pytestmark = pytest.mark.skipif((why := browser_missing()) is not None, reason=why or "")

# chi-square with one degree of freedom: 10.83 is exceeded by chance once in a thousand.
CHI_SQUARE_P001 = 10.83
BUILTIN = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return make_issuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[MockUpstream]:
    mock = MockUpstream()
    mock.start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def sidecar(mock_upstream: MockUpstream, second_upstream: MockUpstream, issuer: Issuer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    config = base_config(mock_upstream, extra=f"""
[providers.second]
kind = "openai"
base_url = "{second_upstream.base_url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[providers.local]
kind = "local"
engine = "transformers"
max_seq_len = 256
max_batch_size = 1

[models."split"]
targets = [ {{ provider = "mock", model = "first", weight = 1 }},
            {{ provider = "second", model = "second", weight = 1 }} ]

[models."local"]
targets = [ {{ provider = "local" }} ]

[cache]
enabled = true
""") + jwt_config(f'public_key_file = "{issuer.public_path}"')
    instance = start_sidecar(config, tmp_path_factory.mktemp("browser-sidecar"))
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver: Any = start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: Any, sidecar: Sidecar, issuer: Issuer, tmp_path: Path) -> Iterator[Browsing]:
    yield Browsing(browser, sidecar.url, issuer, tmp_path)


class Browsing:
    def __init__(self, driver: Any, url: str, issuer: Issuer, shots: Path) -> None:
        self.driver = driver
        self.url = url
        self.issuer = issuer
        self.shots = shots

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)
        if self.driver.current_url.endswith("/admin/login"):
            self.log_in()
            self.driver.get(self.url + path)

    def log_in(self) -> None:
        token = self.issuer.token(scope="sidecar:admin", sub="operator")
        self.driver.find_element("id", "token").send_keys(token)
        self.shot("login")
        self.submit(self.driver.find_element("id", "login"))
        assert self.driver.current_url == self.url + "/admin/", self.driver.page_source

    def submit(self, button: Any, *, keys: str | None = None) -> None:
        """Click a form's button (or type `keys` into a field) and wait for the page it
        leads to."""
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.wait import WebDriverWait

        old = self.driver.find_element("tag name", "html")

        def left(_: Any) -> bool:
            try:
                old.is_enabled()
            except StaleElementReferenceException:
                return True
            except WebDriverException as exc:
                # Asked in the middle of the navigation, chromium may say so in other words.
                if "does not belong to the document" in str(exc.msg):
                    return True
                raise
            return False

        if keys is None:
            button.click()
        else:
            button.send_keys(keys)
        WebDriverWait(self.driver, 240).until(left)
        WebDriverWait(self.driver, 240).until(
            lambda d: d.execute_script("return document.readyState") == "complete")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 1000
        return path

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element("id", element_id).text)

    def route_form(self, model: str) -> Any:
        return self.driver.find_element(
            "xpath", f"//form[input[@name='model' and @value='{model}']]")

    def admin_api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = self.issuer.token(scope="sidecar:admin")
        return httpx.request(method, self.url + path, timeout=30,
                             headers={"Authorization": f"Bearer {token}"}, **kwargs)

    def chat(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.issuer.token(),
                             max_retries=0)


def counts(first: MockUpstream, second: MockUpstream, client: openai.OpenAI,
           requests: int) -> tuple[int, int]:
    first.reset()
    second.reset()
    for i in range(requests):
        client.chat.completions.create(model="split", messages=[
            {"role": "user", "content": f"request {i}"}])
    return first.count(), second.count()


def chi_square(seen: tuple[int, int], shares: tuple[float, float]) -> float:
    total = sum(seen)
    return sum((o - total * s) ** 2 / (total * s) for o, s in zip(seen, shares, strict=True))


def test_log_in_and_read_the_overview(page: Browsing) -> None:
    page.driver.delete_all_cookies()
    page.driver.get(page.url + "/admin/")
    assert page.driver.current_url == page.url + "/admin/login"
    page.log_in()
    table = page.text("routes-table")
    assert "split" in table and "mock/first" in table and "second/second" in table
    assert "serving" in table
    assert "Log out" in page.driver.page_source
    page.shot("overview")


def test_the_script_refreshes_the_numbers_in_place(page: Browsing) -> None:
    page.open("/admin/")
    page.driver.execute_script("window.notReloaded = true;")
    row = "//tr[td[normalize-space()='mock/mock-gpt']][th[normalize-space()='gpt-test']]"
    before = page.driver.find_element("xpath", row).text
    client = page.chat()
    for i in range(5):
        client.chat.completions.create(model="gpt-test", messages=[
            {"role": "user", "content": f"counted {i}"}])
    deadline = time.monotonic() + 15  # the script refreshes every 5 s
    while page.driver.find_element("xpath", row).text == before:
        assert time.monotonic() < deadline, "the numbers were not refreshed"
        time.sleep(0.25)
    assert page.driver.execute_script("return window.notReloaded === true;")
    assert "<polyline" in page.driver.page_source  # the sparkline, drawn by the server
    page.shot("overview-refreshed")


def test_a_weight_changed_on_the_page_steers_the_next_400_requests(
        page: Browsing, mock_upstream: MockUpstream, second_upstream: MockUpstream) -> None:
    page.open("/admin/routing")
    form = page.route_form("split")
    for name, value in (("weight_0", "1"), ("weight_1", "3")):
        field = form.find_element("name", name)
        field.clear()
        field.send_keys(value)
    # Enter in a weight field saves the form (it does not press the first Drain button).
    page.submit(field, keys="\n")
    assert page.text("notice") == "Saved."
    assert "changed" in page.route_form("split").text
    page.shot("routing")
    seen = counts(mock_upstream, second_upstream, page.chat(), 400)
    assert sum(seen) == 400
    assert chi_square(seen, (0.25, 0.75)) < CHI_SQUARE_P001, seen
    assert chi_square(seen, (0.5, 0.5)) > CHI_SQUARE_P001, seen  # not the old 1:1
    # Back to config: the TOML's 1:1 again, and the marker gone.
    page.submit(page.route_form("split").find_element(
        "css selector", "button[name=action][value=reset]"))
    assert "changed" not in page.route_form("split").text


def test_drain_a_target(page: Browsing, mock_upstream: MockUpstream,
                        second_upstream: MockUpstream) -> None:
    page.open("/admin/routing")
    page.submit(page.route_form("split").find_element(
        "css selector", "button[name=drain][value='1']"))
    assert page.text("notice") == "Saved."
    weights = [t["weight"] for t in page.admin_api("GET", "/admin/api/routes").json()[
        "models"]["split"]]
    assert weights == [1.0, 0.0]
    assert counts(mock_upstream, second_upstream, page.chat(), 40) == (40, 0)
    page.shot("routing-drained")
    page.submit(page.route_form("split").find_element(
        "css selector", "button[name=action][value=reset]"))


def engine_state(page: Browsing) -> str:
    return str(page.admin_api("GET", "/admin/api/engines").json()["engines"]["local"]["state"])


def engine_action(page: Browsing, action: str, model: str = "") -> None:
    page.open("/admin/engines")
    if model:
        field = page.driver.find_element("id", "model-1")
        field.clear()
        field.send_keys(model)
    page.submit(page.driver.find_element("css selector",
                                         f"button[name=action][value={action}]"))
    assert "/admin/engines/confirm" in page.driver.current_url
    page.shot(f"engine-confirm-{action}")
    page.submit(page.driver.find_element("id", "confirm"))  # once the change is done
    errors = page.driver.find_elements("id", "error")
    assert not errors, errors[0].text
    assert page.text("notice") == f"{action.capitalize()} done."


def test_unload_and_load_the_embedded_engine(page: Browsing) -> None:
    deadline = time.monotonic() + 180
    while engine_state(page) != "ready":  # the model loads in the background at start
        assert time.monotonic() < deadline, "the embedded model did not load"
        time.sleep(0.5)
    engine_action(page, "unload")
    assert engine_state(page) == "empty"
    assert "empty" in page.text("engine-1")
    engine_action(page, "load", BUILTIN)
    assert engine_state(page) == "ready"
    assert "ready" in page.text("engine-1")
    # SmolLM2-135M's parameters: 513 MiB in float32, 257 MiB in bfloat16.
    assert " MiB (" in page.text("engine-1")
    page.shot("engines")
    answer = page.chat().chat.completions.create(
        model="local", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "Say hi."}])
    assert answer.choices[0].message.content


def test_flush_the_cache(page: Browsing) -> None:
    client = page.chat()
    for _ in range(2):
        client.chat.completions.create(model="gpt-test", temperature=0, messages=[
            {"role": "user", "content": "kept for the flush"}])
    page.open("/admin/cache")
    assert int(page.text("cache-entries")) >= 1
    page.submit(page.driver.find_element("id", "flush"))
    assert page.text("notice").startswith("Flushed:")
    assert page.text("cache-entries") == "0"
    page.shot("cache")


def test_the_audit_page_and_log_out(page: Browsing) -> None:
    page.open("/admin/audit")
    rows = page.text("audit")
    assert "operator" in rows and "routes changed" in rows
    page.shot("audit")
    page.submit(page.driver.find_element("id", "logout"))
    assert page.driver.current_url == page.url + "/admin/login"
    page.driver.get(page.url + "/admin/routing")
    assert page.driver.current_url == page.url + "/admin/login"
