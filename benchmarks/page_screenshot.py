"""A screenshot of the evidence page of ``citebacktrack serve``, answered by the embedded
model (SmolLM2-135M-Instruct on llama.cpp) over the bundled sample documents.

It starts ``citebacktrack serve`` (the console script of this Python's environment) on a
free port of 127.0.0.1, waits for ``/health`` to answer 200, opens the page in Debian's
Chromium (headless, through Selenium; Selenium Manager is not used, so nothing is
downloaded), asks the question, waits for the answer to finish, opens its first citation
and saves the page as a PNG:

    flock /tmp/llama.lock python benchmarks/page_screenshot.py [--out docs/images/serve-page.png]

Needs the ``serve`` and ``llamacpp`` extras, ``selenium``, and
``apt-get install chromium chromium-driver``. Only public tools are used: the CLI, HTTP and
the browser.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "When was the Eiffel Tower built, and how tall is it?"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def health(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_ready(process: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while health(port) != 200:
        if process.poll() is not None:
            sys.exit(f"citebacktrack serve exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            sys.exit(f"citebacktrack serve was not ready in {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.5)


def screenshot(port: int, out: Path, question: str, width: int, height: int, timeout: float) -> str:
    """Asks ``question`` on the page, opens the first citation, saves ``out``; returns the
    answer text as the page shows it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        # The viewport itself width x height (the window size includes the browser's frame).
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        browser.get(f"http://127.0.0.1:{port}/")
        box = browser.find_element(By.ID, "question")
        box.send_keys(question)
        started = time.monotonic()
        browser.find_element(By.ID, "ask").click()
        state = WebDriverWait(browser, timeout, poll_frequency=0.2).until(
            lambda b: b.execute_script(
                "const s = document.body.dataset.state;"
                "return s === 'done' || s === 'error' ? s : null"
            )
        )
        elapsed = time.monotonic() - started
        if state != "done":
            message = browser.find_element(By.ID, "error").text
            sys.exit(f"the page shows an error: {message}")
        citations = browser.find_elements(By.CSS_SELECTOR, "#answer button.cite")
        if citations:
            citations[0].click()
            WebDriverWait(browser, 10).until(
                lambda b: b.find_element(By.ID, "panel").is_displayed()
            )
        else:
            print("note: the answer has no citation to open", file=sys.stderr)
        browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(0.3)  # the status dot's animation and the layout settle
        out.parent.mkdir(parents=True, exist_ok=True)
        if not browser.save_screenshot(str(out)):
            sys.exit(f"could not save {out}")
        answer = browser.execute_script("return document.getElementById('answer').textContent")
        status = browser.find_element(By.ID, "done-status").text
        print(f"answer in {elapsed:.1f} s ({status}): {answer}", file=sys.stderr)
        return str(answer)
    finally:
        browser.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/serve-page.png"))
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the answer")
    args = parser.parse_args()
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing: apt-get install chromium chromium-driver")
    cli = Path(sys.executable).with_name("citebacktrack")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [str(cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                wait_ready(process, port, log, timeout=180)
                screenshot(port, args.out, args.question, args.width, args.height, args.timeout)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
