"""The app in a real browser: `workbench app` (a real `streamlit run`) serves the demo stores
on free localhost ports, Debian's Chromium (driven by Playwright) opens every page, each
plotly chart must render as an SVG, and a screenshot of each page goes to docs/screenshots/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.app_stores import demo_stores

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "screenshots"
#: (url path, screenshot name, plotly charts the page draws on its store)
DENSE_PAGES = [("", "overview", 0), ("lazy_neurons", "lazy_neurons", 3), ("attention_sinks", "attention_sinks", 5),
               ("sae_features", "sae_features", 2), ("sae_comparison", "sae_comparison", 4)]  # fmt: skip
MOE_PAGES = [("super_experts", "super_experts", 2), ("routing", "routing", 6), ("lazy_neurons", "lazy_neurons_moe", 3)]
#: MiniLM's store: an encoder's [CLS] and [SEP] heatmaps, and a pattern the app computes with the model
ENCODER_PAGES = [("attention_sinks", "attention_sinks_minilm", 6)]

# Under CI (.ci/run installs Chromium) a missing browser fails the test instead of skipping it.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(store: Path, saes: list[Path], log: Path, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """`workbench app --store ... EXTRA` in its own process group; yields its URL once healthy."""
    port = free_port()
    argv = [sys.executable, "-m", "workbench.cli", "app", "--store", str(store), "--port", str(port), *extra]
    for folder in saes:
        argv += ["--sae", str(folder)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, f"app did not start: {log.read_text()}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def check_pages(browser, url: str, pages: list[tuple[str, str, int]]) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    for path, name, charts in pages:
        page.goto(f"{url}/{path}")
        page.wait_for_selector("h1", timeout=60_000)
        if charts:
            page.wait_for_function("n => document.querySelectorAll('.js-plotly-plot .main-svg').length >= n", arg=charts, timeout=60_000)
        page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
        page.wait_for_timeout(500)
        assert not page.locator("[data-testid='stException']").count(), f"{name}: exception on the page"
        plots = page.locator(".js-plotly-plot")
        assert plots.count() == charts, f"{name}: {plots.count()} charts, expected {charts}"
        for i in range(charts):
            assert plots.nth(i).locator("svg.main-svg").count() >= 1, f"{name}: chart {i} has no svg"
        # streamlit scrolls inside its main block: grow the viewport to the content to shoot it whole
        height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
        page.set_viewport_size({"width": 1400, "height": min(max(int(height), 1000), 8000)})
        page.wait_for_timeout(800)
        page.screenshot(path=str(SHOTS / f"{name}.png"))
        page.set_viewport_size({"width": 1400, "height": 1000})
    page.close()


def test_every_page_renders_in_chromium(tmp_path_factory, tmp_path):
    from playwright.sync_api import sync_playwright

    demo = demo_stores(tmp_path_factory.getbasetemp())
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            with serving(demo.dense, demo.saes, tmp_path / "dense.log") as url:
                check_pages(browser, url, DENSE_PAGES)
            with serving(demo.moe, [], tmp_path / "moe.log") as url:
                check_pages(browser, url, MOE_PAGES)
            with serving(demo.minilm, [], tmp_path / "minilm.log") as url:
                check_pages(browser, url, ENCODER_PAGES)
        finally:
            browser.close()
    assert {p.stem for p in SHOTS.glob("*.png")} >= {name for _, name, _ in DENSE_PAGES + MOE_PAGES + ENCODER_PAGES}
