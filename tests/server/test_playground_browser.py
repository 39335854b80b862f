"""The A/B playground in a real browser (Debian's headless chromium) against a real ``hpr-serve``: the continuous-
batching engine on the tiny model with the adapter ``tiny`` (trained layers 0-3, selected 0-1).

What the page sent is checked on the server side: the engine's requests (their resolved edit) and its observer
hooks (first token, finish) are recorded. Every test saves a screenshot into ``$HPR_SCREENSHOT_DIR`` (default: a
pytest temp directory). Without chromium the module is skipped with one line saying how to install it; under
``CI=true`` a missing chromium is an error (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.settings import ServerSettings
from tests.server.browser import INSTALL_HINT, chromium, find_chromium, requested_urls
from tests.server.live_server import LiveServer, run_server

if find_chromium() is None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs chromium for the playground tests: {INSTALL_HINT}", pytrace=False)
    pytest.skip(f"playground browser tests need chromium: {INSTALL_HINT}", allow_module_level=True)

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

PROMPT = "Hello there"  # greedy: the base model stops after 3 tokens, the tiny adapter runs to the context's end
KEY = "s3cret-key"


class EngineRecorder:
    """Wraps a live engine: records every request it is given and, per request id, first-token and finish times."""

    def __init__(self, live: LiveServer) -> None:
        self.engine = live.engine
        self.requests: list[Any] = []
        self.first_token: dict[str, float] = {}
        self.finished: dict[str, int] = {}  # request id -> completion tokens when it finished or was cancelled
        self.lock = threading.Lock()
        self._generate = self.engine.generate
        self._observer = self.engine.observer
        self.engine.generate = self.generate
        self.engine.observer = self

    def restore(self) -> None:
        self.engine.generate = self._generate
        self.engine.observer = self._observer

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.first_token.clear()
            self.finished.clear()

    def generate(self, request: Any) -> Any:
        with self.lock:
            self.requests.append(request)
        return self._generate(request)

    def edited(self) -> Any:
        return next(r for r in self.requests if r.edit is not None)

    def unedited(self) -> Any:
        return next(r for r in self.requests if r.edit is None)

    # EngineObserver: record, then pass on to the server's metrics
    def on_first_token(self, request_id: str, seconds: float) -> None:
        with self.lock:
            self.first_token[request_id] = time.perf_counter()
        self._observer.on_first_token(request_id, seconds)

    def on_finish(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.finished[request_id] = completion_tokens
        self._observer.on_finish(request_id, prompt_tokens, completion_tokens)

    def __getattr__(self, name: str) -> Any:  # on_step, on_token, on_edit
        return getattr(self._observer, name)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = os.environ.get("HPR_SCREENSHOT_DIR")
    path = Path(directory) if directory else tmp_path_factory.mktemp("playground-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tiny_settings: ServerSettings) -> Iterator[tuple[LiveServer, EngineRecorder]]:
    with run_server(tiny_settings.model_copy(update={"max_batch_size": 8})) as live:
        recorder = EngineRecorder(live)
        try:
            yield live, recorder
        finally:
            recorder.restore()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(1280, 900) as driver:
        yield driver


@pytest.fixture
def recorder(server: tuple[LiveServer, EngineRecorder]) -> EngineRecorder:
    server[1].clear()
    return server[1]


# ---- page helpers ---------------------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_page(driver: Any, live: LiveServer, width: int = 1280) -> None:
    driver.set_window_size(width, 900)
    driver.get("about:blank")
    requested_urls(driver)  # drain the log: what follows is the page's own
    driver.get(live.base_url + "/playground")


def wait_models(driver: Any) -> None:
    wait_for(lambda: "adapter" in status(driver), what="the model list")


def open_playground(driver: Any, live: LiveServer, width: int = 1280) -> None:
    """Open the page and wait until it lists the models."""
    open_page(driver, live, width)
    wait_models(driver)


def status(driver: Any) -> str:
    return str(driver.find_element(By.ID, "server-status").text)


def column(driver: Any, index: int) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'.column[data-column="{index}"]')


def field(driver: Any, index: int, name: str) -> Any:
    return column(driver, index).find_element(By.CSS_SELECTOR, f'[name="{name}"]')


def set_value(driver: Any, element: Any, value: str) -> None:
    element.clear()
    element.send_keys(value)


def set_sampling(driver: Any, index: int, temperature: str = "0", max_tokens: str = "8") -> None:
    set_value(driver, field(driver, index, "temperature"), temperature)
    set_value(driver, field(driver, index, "max-tokens"), max_tokens)


def send(driver: Any, prompt: str = PROMPT) -> None:
    box = driver.find_element(By.ID, "user")
    box.clear()
    box.send_keys(prompt)
    box.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut; the button is tested elsewhere


def state(driver: Any, index: int) -> str:
    return str(column(driver, index).get_attribute("data-state") or "")


def wait_done(driver: Any, *indices: int, timeout: float = 30) -> None:
    for i in indices:
        wait_for(lambda i=i: state(driver, i) in ("done", "error", "stopped"), timeout, f"column {i} to finish")


def greedy(driver: Any, max_tokens: str = "8") -> None:
    """Columns A and B: temperature 0, at most `max_tokens`."""
    for i in (0, 1):
        set_sampling(driver, i, max_tokens=max_tokens)


def send_greedy(driver: Any, max_tokens: str = "8", wait: bool = True) -> None:
    """Greedy A and B (`greedy`), send the prompt with Ctrl+Enter and, with `wait`, wait until both have finished."""
    greedy(driver, max_tokens)
    send(driver)
    if wait:
        wait_done(driver, 0, 1)


def running_gauge(live: LiveServer) -> float:
    for line in httpx.get(live.base_url + "/metrics").text.splitlines():
        if line.startswith("hpr_running_requests "):
            return float(line.split()[1])
    raise AssertionError("no hpr_running_requests in /metrics")


# ---- tests -----------------------------------------------------------------------------------------------------------


def test_page_loads_lists_adapters_fast_small_and_offline(
    server: tuple[LiveServer, EngineRecorder], browser: Any, screenshots: Path
) -> None:
    live, _ = server
    open_playground(browser, live)
    options = [o.get_attribute("value") for o in field(browser, 1, "adapter").find_elements(By.TAG_NAME, "option")]
    assert options == ["", "tiny"]
    assert field(browser, 0, "adapter").get_attribute("value") == ""  # A: the base model
    assert field(browser, 1, "adapter").get_attribute("value") == "tiny"  # B: the adapter, its selected layers
    bars = column(browser, 1).find_elements(By.CSS_SELECTOR, ".chart .bar")
    assert [b.get_attribute("data-layer") for b in bars] == ["0", "1", "2", "3"]
    assert [b.get_attribute("aria-pressed") for b in bars] == ["true", "true", "false", "false"]
    assert ["selected" in (b.get_attribute("class") or "") for b in bars] == [True, True, False, False]
    # taller bar = higher probe accuracy (the tiny adapter's accuracies rise with the layer)
    heights = [b.find_element(By.CLASS_NAME, "fill").size["height"] for b in bars]
    assert heights == sorted(heights) and heights[0] < heights[-1]

    paint = browser.execute_script(
        "return performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"
    )
    assert paint is not None and paint <= 1000, f"first contentful paint {paint} ms"
    weight = browser.execute_script(
        "const entries = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')];"
        "return entries.filter(e => !new URL(e.name).pathname.startsWith('/v1'))"
        ".reduce((sum, e) => sum + e.encodedBodySize, 0)"
    )
    assert 0 < weight <= 150 * 1024, f"page weight {weight} B"
    urls = requested_urls(browser)
    assert urls and all(u.startswith(live.base_url + "/") for u in urls), urls
    browser.save_screenshot(str(screenshots / "page-loaded.png"))
    print(f"\nplayground: first contentful paint {paint:.0f} ms, page weight {weight} B")


def test_layers_and_alpha_change_what_the_edited_column_sends(
    server: tuple[LiveServer, EngineRecorder], recorder: EngineRecorder, browser: Any, screenshots: Path
) -> None:
    live, _ = server
    open_playground(browser, live)
    bars = {b.get_attribute("data-layer"): b for b in column(browser, 1).find_elements(By.CSS_SELECTOR, ".chart .bar")}
    bars["3"].click()  # on
    bars["0"].click()  # off
    assert field(browser, 1, "layers").get_attribute("value") == "1,3"
    alpha = field(browser, 1, "alpha")
    for _ in range(10):  # keyboard: +0.05 per arrow press, from the default 1.0
        alpha.send_keys(Keys.ARROW_RIGHT)
    assert field(browser, 1, "alpha-value").text == "1.50"
    browser.execute_script("arguments[0].value = '2.5'; arguments[0].dispatchEvent(new Event('input'))", alpha)
    scope = field(browser, 1, "scope")
    scope.send_keys("generated")
    field(browser, 1, "edit-tokens").send_keys("4")
    send_greedy(browser)
    assert state(browser, 0) == "done" and state(browser, 1) == "done"

    edit = recorder.edited().edit  # what the server resolved from the page's request
    assert (edit.adapter, edit.layers, edit.alpha, edit.scope, edit.tokens) == ("tiny", (1, 3), 2.5, "generated", 4)
    assert recorder.edited().return_stats
    assert recorder.unedited().sampling.max_tokens == 8
    applied = column(browser, 1).find_element(By.CLASS_NAME, "applied").text
    assert "layers [1, 3]" in applied and "α 2.5" in applied and "generated" in applied and "first 4 tokens" in applied
    stats_layers = [e.text for e in column(browser, 1).find_elements(By.CSS_SELECTOR, ".stats-grid > span:not(.head)")]
    assert stats_layers[0::5] == ["L1", "L3"]
    assert column(browser, 0).find_element(By.CLASS_NAME, "stats").get_attribute("hidden") is not None
    column(browser, 1).find_element(By.CSS_SELECTOR, ".repro summary").click()
    curl = column(browser, 1).find_element(By.CSS_SELECTOR, "code.curl").text
    python = column(browser, 1).find_element(By.CSS_SELECTOR, "code.python").text
    assert '"layers": "1,3"' in curl and '"alpha": 2.5' in curl and live.base_url in curl
    assert '"layers": "1,3"' in python and "extra_body" in python
    browser.save_screenshot(str(screenshots / "layers-and-alpha.png"))


def test_both_columns_stream_and_start_together(
    server: tuple[LiveServer, EngineRecorder], recorder: EngineRecorder, browser: Any, screenshots: Path
) -> None:
    live, _ = server
    open_playground(browser, live)
    greedy(browser, max_tokens="24")
    browser.find_element(By.ID, "user").send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    wait_done(browser, 0, 1)
    for i in (0, 1):
        assert state(browser, i) == "done"
        assert column(browser, i).find_element(By.CLASS_NAME, "output").text.strip()
        assert column(browser, i).find_element(By.CLASS_NAME, "ttft").text.startswith("TTFT ")
        assert "tokens" in column(browser, i).find_element(By.CLASS_NAME, "tokens").text
    ids = [r.request_id for r in recorder.requests]
    assert len(ids) == 2
    offset = abs(recorder.first_token[ids[0]] - recorder.first_token[ids[1]])
    assert offset <= 0.2, f"the two streams started {offset * 1000:.0f} ms apart"
    browser.save_screenshot(str(screenshots / "both-streams.png"))
    print(f"\nplayground: the two streams' first tokens {offset * 1000:.1f} ms apart (server side)")


def test_stop_cancels_the_stream_and_frees_the_slot(
    server: tuple[LiveServer, EngineRecorder], recorder: EngineRecorder, browser: Any, screenshots: Path
) -> None:
    live, _ = server
    runner = live.engine.runner
    decode = runner.decode

    def slow_decode(batch: Any) -> Any:  # a slow model, so the stream is still running when Stop is pressed
        time.sleep(0.03)
        return decode(batch)

    runner.decode = slow_decode
    try:
        open_playground(browser, live)
        send_greedy(browser, max_tokens="240", wait=False)
        output = column(browser, 1).find_element(By.CLASS_NAME, "output")
        wait_for(lambda: len(output.text) > 5 and state(browser, 1) == "running", what="column B to stream")
        column(browser, 1).find_element(By.CLASS_NAME, "stop").click()
        wait_for(lambda: state(browser, 1) == "stopped", what="column B to stop")
        assert "[stopped]" in output.text
        edited_id = recorder.edited().request_id
        cut = wait_for(lambda: recorder.finished.get(edited_id), what="the server to cancel column B's request")
        assert cut < 200  # cancelled, not finished: the tiny adapter runs to the end of the context unstopped
        browser.find_element(By.ID, "stop-all").click()
        wait_done(browser, 0)
        wait_for(lambda: live.engine.running + live.engine.queue_depth == 0, 10, "the engine's slots to free")
        assert running_gauge(live) == 0
        browser.save_screenshot(str(screenshots / "stopped.png"))
    finally:
        runner.decode = decode


def test_a_bad_layer_shows_the_servers_400_and_breaks_nothing(
    server: tuple[LiveServer, EngineRecorder], recorder: EngineRecorder, browser: Any, screenshots: Path
) -> None:
    live, _ = server
    open_playground(browser, live)
    set_value(browser, field(browser, 1, "layers"), "1,9")
    assert "invalid" in (field(browser, 1, "layers").get_attribute("class") or "")
    send_greedy(browser)
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": PROMPT}],
        "hpr": {"adapter": "tiny", "layers": "1,9"},
    }
    expected = httpx.post(live.api_base + "/chat/completions", json=body).json()["error"]["message"]
    error = column(browser, 1).find_element(By.CLASS_NAME, "error")
    assert state(browser, 1) == "error" and error.is_displayed()
    assert error.text.startswith("400") and expected in error.text
    assert state(browser, 0) == "done"  # the other column is unaffected
    browser.save_screenshot(str(screenshots / "error-400.png"))
    column(browser, 1).find_element(By.CSS_SELECTOR, '[data-pick="selected"]').click()
    send_greedy(browser)
    assert state(browser, 1) == "done" and not error.is_displayed()


def test_a_wrong_key_shows_401_and_the_key_stays_out_of_urls(tiny_settings: ServerSettings, screenshots: Path) -> None:
    with run_server(tiny_settings.model_copy(update={"api_key": [KEY]})) as live, chromium(1280, 900) as driver:
        open_page(driver, live)
        wait_for(lambda: "401" in status(driver), what="the 401 of /v1/models")
        key = driver.find_element(By.ID, "api-key")
        key.send_keys("wrong-key", Keys.ENTER)
        wait_for(lambda: "invalid API key" in status(driver), what="the wrong key's 401")
        send_greedy(driver)
        error = column(driver, 0).find_element(By.CLASS_NAME, "error")
        assert error.text.startswith("401") and "invalid API key" in error.text
        driver.save_screenshot(str(screenshots / "error-401.png"))

        key.clear()
        key.send_keys(KEY, Keys.ENTER)
        wait_models(driver)
        assert driver.execute_script("return sessionStorage.getItem('hpr-playground-api-key')") == KEY
        driver.refresh()  # the key survives a reload of the tab
        wait_models(driver)
        send_greedy(driver)
        assert state(driver, 0) == state(driver, 1) == "done"
        column(driver, 1).find_element(By.CSS_SELECTOR, ".repro summary").click()
        curl = column(driver, 1).find_element(By.CSS_SELECTOR, "code.curl").text
        assert "$HPR_API_KEY" in curl and KEY not in curl
        assert all(KEY not in u and "wrong-key" not in u for u in requested_urls(driver))
        assert KEY not in driver.current_url


@pytest.mark.parametrize("width", [1280, 390])
def test_layout_fits_and_every_control_is_labelled_and_focusable(
    server: tuple[LiveServer, EngineRecorder], browser: Any, screenshots: Path, width: int
) -> None:
    live, _ = server
    open_playground(browser, live, width=width)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    problems = browser.execute_script(
        """
        const out = [];
        for (const el of document.querySelectorAll('input, select, textarea, button, summary')) {
          if (!el.checkVisibility()) continue;  // hidden (a closed <details>, the base column's edit controls)
          const name = (el.labels && [...el.labels].map(l => l.textContent).join(' ').trim())
            || el.getAttribute('aria-label') || el.textContent.trim();
          if (!name) out.push('no label: ' + el.outerHTML.slice(0, 80));
          if (el.disabled || el.tabIndex < 0) continue;  // roving bars: one tab stop, arrows for the rest
          el.focus();
          if (document.activeElement !== el) out.push('not focusable: ' + el.outerHTML.slice(0, 80));
        }
        return out;
        """
    )
    assert problems == []
    # the chart is one tab stop; the arrow keys move along it
    first = column(browser, 1).find_element(By.CSS_SELECTOR, ".chart .bar")
    first.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-layer") == "1"
    browser.switch_to.active_element.send_keys(Keys.SPACE)
    assert field(browser, 1, "layers").get_attribute("value") == "0"
    browser.save_screenshot(str(screenshots / f"layout-{width}.png"))


def test_a_json_schema_constrains_its_column_and_the_page_says_whether_it_parses(
    server: tuple[LiveServer, EngineRecorder], recorder: EngineRecorder, browser: Any, screenshots: Path
) -> None:
    """Issue 30 §6: the schema box of a column becomes its response_format; the answer is checked for JSON."""
    live, _ = server
    open_playground(browser, live)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    column(browser, 0).find_element(By.CSS_SELECTOR, ".structured summary").click()
    box = field(browser, 0, "json-schema")
    set_value(browser, box, json.dumps(schema))
    send_greedy(browser, max_tokens="40")
    constrained = next(r for r in recorder.requests if r.constraint is not None)
    assert json.loads(constrained.constraint.schema) == schema
    assert sum(r.constraint is None for r in recorder.requests) == 1  # column B: free text
    output = column(browser, 0).find_element(By.CLASS_NAME, "output").text
    assert json.loads(output) in ({"ok": True}, {"ok": False})
    check = column(browser, 0).find_element(By.CLASS_NAME, "json-check")
    assert check.get_attribute("data-parses") == "yes" and "parses as JSON" in check.text
    assert column(browser, 1).find_element(By.CLASS_NAME, "json-check").get_attribute("hidden") is not None
    column(browser, 0).find_element(By.CSS_SELECTOR, ".repro summary").click()
    assert '"response_format"' in column(browser, 0).find_element(By.CSS_SELECTOR, "code.curl").text
    browser.save_screenshot(str(screenshots / "json-schema.png"))

    recorder.clear()  # a box that is not JSON: the column says why and sends nothing; the other column runs
    set_value(browser, box, "{not json")
    send_greedy(browser, max_tokens="40")
    assert state(browser, 0) == "error" and "the JSON schema is not JSON" in column(browser, 0).text
    assert len(recorder.requests) == 1 and recorder.requests[0].constraint is None
    set_value(browser, box, "")
