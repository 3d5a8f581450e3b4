"""The sink's dashboard in a real headless browser (Debian's chromium, driven by Playwright):
its numbers move while records flow, written as the CLI writes them.

Skipped where Playwright or chromium is not installed, unless ZFAN_REQUIRE_BROWSER is set (CI
sets it, having installed both: there a missing browser is a failure, not a skip)."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from tests.helpers import wait_for
from zfan import Producer, Sink, Worker

pytestmark = pytest.mark.timeout(90)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():  # the import is here so that a machine without Playwright collects the rest
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "Playwright is not installed (pip install '.[browser]')"
        sync_playwright = None
    if why is None and CHROMIUM is None:
        why = "chromium is not installed (apt-get install chromium)"
    if why is not None:
        if os.environ.get("ZFAN_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


def double(records: list) -> list:
    return [{"v": r["v"] * 2} for r in records]


def test_the_dashboard_shows_the_numbers_moving_as_records_flow(ipc, tmp_path):
    sync_playwright = _browser_or_skip()
    stop = threading.Event()
    with Sink(ledger=str(tmp_path / "z.db"), http="127.0.0.1:0", **ipc) as sink:
        with Worker(double, control=ipc["control"], name="w-dash") as worker:
            wait_for(worker.connected.is_set, what="the worker to join")

            def produce() -> None:
                with Producer(intake=ipc["intake"], control=ipc["control"], batch_size=500, topic="room.1") as prod:
                    while not stop.is_set():
                        prod.send_many([{"v": i} for i in range(500)])
                        stop.wait(0.05)
                    prod.flush(20)

            producer = threading.Thread(target=produce)
            producer.start()
            try:
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                    try:
                        page = browser.new_page(viewport={"width": 1280, "height": 900})
                        page.goto(sink.http)
                        page.wait_for_function("document.getElementById('state').textContent === 'live'")
                        first = wait_for(lambda: _number(page, "records-in"), what="records in on the page")
                        # The page polls by itself: the same page, not a reload, shows more.
                        later = wait_for(
                            lambda: (n := _number(page, "records-in")) > first + 1000 and n,
                            timeout=20,
                            what="the number of records in to grow on the page",
                        )
                        assert later > first
                        wait_for(lambda: _number(page, "records-out") > 0, what="records out on the page")
                        text = page.inner_text("#records-in")
                        assert "," in text, f"{text!r} is not written as 20,000 is"
                        assert "w-dash" in page.inner_text("#workers")
                        assert "room.1" in page.inner_text("#topics")
                    finally:
                        browser.close()
            finally:
                stop.set()
                producer.join(30)


def _number(page, element_id: str) -> int:
    text = page.inner_text(f"#{element_id}")
    return 0 if text == "–" else int(text.replace(",", ""))
