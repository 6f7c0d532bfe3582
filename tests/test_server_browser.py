"""Headless Chromium uploads a CIFAR-10 test image through the web page and reads the class."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]



@pytest.fixture(scope="module")
def chromium() -> Path:
    if os.environ.get("IMGCLF_NO_BROWSER") == "1":
        pytest.skip("IMGCLF_NO_BROWSER=1: browser test switched off")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) "
                    "or set IMGCLF_NO_BROWSER=1 to skip this test")
    return CHROMIUM


def test_page_uploads_an_image_and_shows_the_predicted_class(chromium, tiny_run, sample_dir):
    from playwright.sync_api import sync_playwright

    import imgclf
    from imgclf.deploy.server import ServeConfig, ServerThread, create_app

    # an image this (2-epoch) model gets right, so the page's answer can be checked against the truth
    clf = imgclf.load(tiny_run, "cpu")
    candidates = sorted((sample_dir / "test").glob("*/*.jpg"))[::37]
    image = next(p for p, r in zip(candidates, clf.predict(candidates, top_k=1)) if r["top"][0][0] == p.parent.name)
    truth = image.parent.name

    with ServerThread(create_app(ServeConfig(model=str(tiny_run)))) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((url, "blob:", "data:")) else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('top-class').textContent.length > 0", timeout=30_000)
            shown = page.text_content("#top-class")
            bars = page.locator("#results .row")
            assert bars.count() == 5
            assert page.locator("#results .row .label").first.text_content() == shown
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 32  # the image is shown
            assert page.text_content("#error") == ""
        finally:
            browser.close()
    assert shown == truth, f"page shows {shown!r} for a {truth} image"
    assert outside == [], f"the page reached beyond the server: {outside}"
