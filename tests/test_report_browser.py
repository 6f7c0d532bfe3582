"""A headless Chromium opens the run report from disk: every image renders, nothing is fetched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("IMGCLF_NO_BROWSER") == "1":
        pytest.skip("IMGCLF_NO_BROWSER=1: browser tests disabled")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium), "
                    "or set IMGCLF_NO_BROWSER=1 to skip the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_report_renders_offline_with_every_image(browser, tiny_run):
    page = browser.new_page()
    requests: list[str] = []
    failed: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: failed.append(r.url[:80]))
    page.goto((tiny_run / "report.html").resolve().as_uri(), wait_until="load")
    images = page.evaluate("""() => Array.from(document.images).map(i => ({
        ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, src: i.src.slice(0, 30)}))""")
    assert len(images) > 60
    broken = [i for i in images if not i["ok"]]
    assert not broken, broken[:3]
    assert not failed, failed
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), [u[:80] for u in requests
                                                                                  if not u.startswith(("file:", "data:"))]
    sections = page.evaluate("() => Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert {"curves", "confusion", "gradcam", "calibration", "top-losses"} <= set(sections)
    assert page.title().startswith("imgclf report")
    page.close()
