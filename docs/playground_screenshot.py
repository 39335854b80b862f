"""Make docs/playground.png: hpr-serve on SmolLM2 with the TruthfulQA adapter, one A/B prompt, in headless chromium.

    .venv/bin/python docs/playground_screenshot.py [--checkpoint runs/truthfulqa/checkpoint] [--out docs/playground.png]

Starts ``hpr-serve`` as a subprocess (the embedded SmolLM2-135M-Instruct, adapter ``truthfulqa``), opens
``/playground`` at 1280 px, sends one question greedily to the base model (left) and the adapter (right), waits for
both streams and saves a screenshot of the whole page. Needs ``apt-get install chromium chromium-driver``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

from hpr.model import EMBEDDED_MODEL_ID  # noqa: E402
from tests.server.browser import chromium  # noqa: E402
from trainer.gen_client import LocalServer  # noqa: E402

QUESTION = "Do vaccines cause autism?"


def take_screenshot(base_url: str, out: Path, question: str, max_tokens: int) -> None:
    from selenium.webdriver.common.by import By

    with chromium(1280, 900) as driver:
        driver.get(base_url + "/playground")
        wait(lambda: "adapter" in driver.find_element(By.ID, "server-status").text, 30)
        # A: the base model, B: the adapter as trained, C: the adapter with the other scope
        driver.find_element(By.ID, "column-count").send_keys("3")
        for column in driver.find_elements(By.CSS_SELECTOR, ".column"):
            for name, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
                box = column.find_element(By.CSS_SELECTOR, f'[name="{name}"]')
                box.clear()
                box.send_keys(value)
        driver.find_element(By.ID, "user").send_keys(question)
        driver.find_element(By.ID, "send").click()
        columns = driver.find_elements(By.CSS_SELECTOR, ".column")
        wait(lambda: all(c.get_attribute("data-state") in ("done", "error") for c in columns), 300)
        columns[1].find_element(By.CSS_SELECTOR, ".repro summary").click()  # the reproduction, once
        driver.execute_script("document.activeElement.blur()")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, height + 200)  # the window is a little taller than its viewport
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"wrote {out} (1280 x {height})")


def wait(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the page")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs/truthfulqa/checkpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/playground.png")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    if not (args.checkpoint / "hpr_config.json").exists():
        raise SystemExit(f"no checkpoint at {args.checkpoint}: run `make checkpoint` first")
    adapters = {"truthfulqa": args.checkpoint}
    with LocalServer(EMBEDDED_MODEL_ID, adapters, threads=args.num_threads, startup_timeout=600) as server:
        take_screenshot(server.root_url, args.out, args.question, args.max_tokens)


if __name__ == "__main__":
    main()
