"""The evidence page of ``citebacktrack serve`` (``GET /``), driven in a real browser:
Debian's Chromium, headless, through Selenium, against a real uvicorn server whose model is
scripted (MockBackend) over the bundled sample documents.

Needs ``apt-get install chromium chromium-driver`` (skipped without them); Selenium
Manager is never used (the driver's path is given), so nothing is downloaded."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from citebacktrack import Citeformer, MockBackend
from citebacktrack.render import renumbered_text
from citebacktrack.retrieval import PassageIndex, load_passages, sample_docs_path
from citebacktrack.serve import create_app
from citebacktrack.serve._app import page_html
from citebacktrack.types import Answer, Source
from serving import RunningServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
QUESTION = "When was the Eiffel Tower built, and how tall is it?"
K = 5
# Cites passage 2 first, then passage 1: the page shows reference numbers ([1], [2] by
# first use), as ``renumbered_text`` does, not the request's numbers written in the text.
SCRIPT = "The tower is 330 metres tall [2]. It was built from 1887 to 1889 [1]."
WAIT_S = 30


def test_the_page_has_no_external_references() -> None:
    """One self-contained file: nothing is fetched from anywhere else (works offline)."""
    html = page_html()
    assert html.startswith("<!doctype html>")
    assert not re.search(r"https?://", html, re.IGNORECASE)
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html, re.IGNORECASE)
    assert not re.search(r"<link\b", html, re.IGNORECASE)
    assert not re.search(r"<(img|iframe|object|embed|video|audio|source)\b", html, re.IGNORECASE)
    assert not re.search(r"\b(src|href|action)\s*=\s*[\"']?//", html, re.IGNORECASE)
    assert "@import" not in html
    assert "url(" not in html
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html  # text from the server goes in as text nodes, never markup
    assert 'fetch("/v1/answers"' in html  # the API of the same origin, nothing else


# --- the browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(
            f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = RunningServer(
        create_app(Citeformer(MockBackend([SCRIPT] * 20)), documents=sample_docs_path())
    )
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def expected() -> tuple[Answer, list[Source]]:
    """The answer the library gives for the same question over the same retrieved passages."""
    sources = list(PassageIndex(load_passages(sample_docs_path())).search(QUESTION, K))
    answer = Citeformer(MockBackend([SCRIPT])).generate(QUESTION, sources)
    return answer, sources


def open_page(browser: Any, server: RunningServer) -> None:
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait(browser, lambda b: state(b) == "idle")


def ask(browser: Any, question: str, k: str | None = None) -> str:
    """Types ``question`` (and ``k``), clicks Ask and waits for the page to finish; returns
    the final state (``done`` or ``error``)."""
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    if k is not None:
        field = browser.find_element(By.ID, "k")
        field.clear()
        field.send_keys(k)
    browser.find_element(By.ID, "ask").click()
    wait(browser, lambda b: state(b) in ("done", "error"))
    return state(browser)


def state(browser: Any) -> str:
    return str(browser.execute_script("return document.body.dataset.state"))


def text_of(browser: Any, element_id: str) -> str:
    return str(
        browser.execute_script(f"return document.getElementById('{element_id}').textContent")
    )


def wait(browser: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def test_the_answer_streams_in_with_citations_that_open_their_evidence(
    driver: Any, server: RunningServer, expected: tuple[Answer, list[Source]]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    answer, sources = expected
    open_page(driver, server)
    # Record the answer as it grows, to see it arrive in more than one piece.
    driver.execute_script(
        """
        window.__seen = [];
        const answer = document.getElementById('answer');
        new MutationObserver(() => window.__seen.push(answer.textContent))
          .observe(answer, {childList: true, characterData: true, subtree: true});
        """
    )
    assert ask(driver, QUESTION) == "done", text_of(driver, "error")

    # The text as the library renders it: markers renumbered by first use.
    shown = text_of(driver, "answer")
    assert shown == renumbered_text(answer)
    assert shown == "The tower is 330 metres tall [1]. It was built from 1887 to 1889 [2]."
    seen = [s for s in driver.execute_script("return window.__seen") if s]
    assert any(s and s != shown and shown.startswith(s) for s in seen), seen

    # The retrieved passages, in request order, the cited ones marked.
    titles = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#sources .source .ref-title")]
    assert titles == [s.title for s in sources]
    assert "cited as [1]" in driver.find_elements(By.CSS_SELECTOR, "#sources .source")[1].text

    # The references, numbered by first use.
    refs = driver.find_elements(By.CSS_SELECTOR, "#references li")
    assert [r.get_attribute("data-number") for r in refs] == ["1", "2"]
    for item, ref in zip(refs, answer.references, strict=True):
        assert f"[{ref.number}]" in item.text
        assert ref.title in item.text
        assert ref.source_id in item.text
    status = text_of(driver, "done-status")
    assert "stop reason: end" in status
    assert "2 citations" in status

    # Each citation opens its passage with the evidence span marked.
    buttons = driver.find_elements(By.CSS_SELECTOR, "#answer button.cite")
    assert [b.text for b in buttons] == ["[1]", "[2]"]
    for button, citation in zip(buttons, answer.citations, strict=True):
        assert citation.evidence is not None
        button.click()
        wait(driver, lambda b: b.find_element(By.ID, "panel").is_displayed())
        mark = driver.find_element(By.CSS_SELECTOR, "#panel-passage mark")
        assert mark.get_property("textContent") == citation.evidence.text
        source = sources[citation.evidence.source_index - 1]
        assert text_of(driver, "panel-passage") == source.text
        assert source.title in text_of(driver, "panel-title")
        assert text_of(driver, "panel-claim") == citation.claim
        assert button.get_attribute("aria-expanded") == "true"

    # Keyboard: Escape closes the panel and gives the focus back to the citation; Enter on
    # a focused citation opens it again.
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(driver, lambda b: not b.find_element(By.ID, "panel").is_displayed())
    assert driver.switch_to.active_element == buttons[1]
    buttons[0].send_keys(Keys.ENTER)
    wait(driver, lambda b: b.find_element(By.ID, "panel").is_displayed())
    assert answer.citations[0].evidence is not None
    assert text_of(driver, "panel-passage").count(answer.citations[0].evidence.text) == 1


def test_an_empty_question_shows_the_servers_message(driver: Any, server: RunningServer) -> None:
    open_page(driver, server)
    assert ask(driver, "") == "error"
    message = text_of(driver, "error")
    assert message.startswith("question:"), message
    assert "at least 1 character" in message
    assert not driver.find_element(
        "css selector", "#answer-card"
    ).is_displayed()  # nothing half-shown


def test_a_bad_number_of_passages_shows_the_servers_message(
    driver: Any, server: RunningServer
) -> None:
    open_page(driver, server)
    assert ask(driver, QUESTION, k="50") == "error"
    message = text_of(driver, "error")
    assert message.startswith("k:"), message
    assert "20" in message


def test_a_failing_model_shows_the_stream_error(driver: Any) -> None:
    """The model fails after ``started``: the 200 stream ends on an ``error`` event."""
    failing = RunningServer(create_app(Citeformer(MockBackend([])), documents=sample_docs_path()))
    try:
        failing.wait_ready()
        open_page(driver, failing)
        assert ask(driver, QUESTION) == "error"
        message = text_of(driver, "error")
        assert "scripted responses" in message, message
    finally:
        failing.stop()


def test_a_citation_without_evidence_shows_the_passage_unmarked(driver: Any) -> None:
    """``scorer=None`` checks ids only: its citations carry no evidence span."""
    from selenium.webdriver.common.by import By

    unscored = RunningServer(
        create_app(Citeformer(MockBackend([SCRIPT]), scorer=None), documents=sample_docs_path())
    )
    try:
        unscored.wait_ready()
        open_page(driver, unscored)
        assert ask(driver, QUESTION) == "done", text_of(driver, "error")
        driver.find_elements(By.CSS_SELECTOR, "#answer button.cite")[0].click()
        wait(driver, lambda b: b.find_element(By.ID, "panel").is_displayed())
        assert not driver.find_elements(By.CSS_SELECTOR, "#panel-passage mark")
        assert "no evidence span" in text_of(driver, "panel-note")
        sources = list(PassageIndex(load_passages(sample_docs_path())).search(QUESTION, K))
        assert text_of(driver, "panel-passage") == sources[1].text  # the first marker: [2]
    finally:
        unscored.stop()
