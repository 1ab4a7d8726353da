"""Screenshots of `promptcontrol app` (one per tab) on the embedded model, and the inspect round trip, timed.

    .venv/bin/python scripts/make_app_screenshots.py [--out docs/img] [--rounds 5]

Serves the page on a free localhost port, drives headless Chromium (selenium + Debian's chromium-driver; `bash
scripts/setup_app.sh` installs both) through each tab as a person would, and writes docs/img/app_inspect.png,
app_emphasise.png and app_edit.png. Then it times the inspect round trip (request sent → image and first map
back) through gradio_client and in the browser (click → image shown), and prints the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left and a blue square on the right"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        sys.exit("make_app_screenshots: no chromium / chromedriver: run bash scripts/setup_app.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1300", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def type_into(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, selector)
    box.clear()
    box.send_keys(text)


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()
    time.sleep(0.5)


def wait_for(driver, selector: str, count: int = 1, timeout: float = 300):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: len(found := d.find_elements(By.CSS_SELECTOR, selector)) >= count and found)


def click_word(driver, word: str) -> None:
    from selenium.webdriver.common.by import By

    for label in driver.find_elements(By.CSS_SELECTOR, "#inspect-words label"):
        if label.text.strip() == word:
            label.click()
            return
    raise RuntimeError(f"no word chip {word!r}")


def shoot(driver, path: Path) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(1.0)  # images fade in
    driver.save_screenshot(str(path))
    print("wrote", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def inspect_tab(driver, out: Path) -> float:
    """Run an inspect, click "circle"; returns the seconds from the click to the image on the page."""
    from selenium.webdriver.common.by import By

    type_into(driver, "#inspect-prompt textarea", PROMPT)
    started = time.perf_counter()
    driver.find_element(By.ID, "inspect-run").click()
    wait_for(driver, "#inspect-map img")
    seconds = time.perf_counter() - started
    click_word(driver, "circle")
    time.sleep(2)
    shoot(driver, out / "app_inspect.png")
    return seconds


def emphasise_tab(driver, out: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_tab(driver, "Emphasise")
    type_into(driver, "#emphasise-prompt textarea", "a red circle and a (blue:2) square")
    type_into(driver, "#emphasise-compare input", "blue")
    driver.find_element(By.CSS_SELECTOR, "#emphasise-compare input").send_keys(Keys.ENTER)
    type_into(driver, "#emphasise-values textarea, #emphasise-values input", "0.5, 1")
    time.sleep(1)
    driver.find_element(By.ID, "emphasise-run").click()
    wait_for(driver, "#emphasise-gallery img", 3)
    shoot(driver, out / "app_emphasise.png")


def edit_tab(driver, out: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_tab(driver, "Edit")
    type_into(driver, "#edit-source textarea", PROMPT)
    type_into(driver, "#edit-edits textarea", "a green circle on the left and a blue square on the right\n"
                                             "a yellow circle on the left and a blue square on the right")
    type_into(driver, "#edit-blend textarea, #edit-blend input", "circle")
    type_into(driver, "#edit-threshold input[type=number]", "0.6")  # this model's 4x4 maps are diffuse
    driver.find_element(By.CSS_SELECTOR, "#edit-threshold input[type=number]").send_keys(Keys.TAB)
    driver.find_element(By.ID, "edit-run").click()
    wait_for(driver, "#edit-gallery img", 3)
    wait_for(driver, "#edit-masks img", 2)
    shoot(driver, out / "app_edit.png")


def client_round_trips(url: str, rounds: int) -> list[float]:
    """Seconds per inspect request through gradio_client (image, words and the first map come back)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        client.predict(PROMPT, i, 20, 7.5, False, "word", api_name="/inspect")
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--rounds", type=int, default=5, help="timed inspect requests through gradio_client")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from promptcontrol.app.launch import make_runner, serve

    runner = make_runner(device="cpu")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = serve(runner, port=port, block=False)
    driver = browser()
    try:
        driver.get(url)
        wait_for(driver, "#inspect-run")
        browser_seconds = [inspect_tab(driver, args.out)]
        emphasise_tab(driver, args.out)
        edit_tab(driver, args.out)
        times = client_round_trips(url, args.rounds)
    finally:
        driver.quit()
        demo.close()
    print(f"inspect round trip, embedded model, 20 steps, {os.cpu_count()} CPU(s), torch threads "
          f"{__import__('torch').get_num_threads()}:")
    print(f"  browser (click → image shown, first request): {browser_seconds[0]:.2f} s")
    print(f"  gradio_client, {len(times)} requests: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
