"""Headless Debian chromium driven by Selenium, for the playground's browser tests and its docs screenshot.

Nothing is downloaded: the browser and the driver are the system's (``apt-get install chromium chromium-driver``),
and the driver's path is passed explicitly so selenium-manager never looks for one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INSTALL_HINT = "apt-get install -y chromium chromium-driver"
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def find_chromium() -> tuple[str, str] | None:
    """``(browser, driver)`` paths of the system chromium, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A fresh headless chromium (its own profile directory) as a Selenium ``WebDriver``; quits on exit.

    Network requests are logged (``performance`` log) so a test can list every URL the page asked for.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = find_chromium()
    if paths is None:
        raise RuntimeError(f"chromium or chromedriver is missing: {INSTALL_HINT}")
    browser, driver_path = paths
    with tempfile.TemporaryDirectory(prefix="hpr-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        env = {**os.environ, "SE_AVOID_STATS": "true"}
        service = Service(executable_path=driver_path, env=env)
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_window_size(width, height)
            yield driver
        finally:
            driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser sent a request for since the last call (from the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
