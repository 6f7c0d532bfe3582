"""Headless Chromium uploads a CIFAR-10 test image through the web page and reads the class."""

from __future__ import annotations

import contextlib
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


class _Stub:
    """A stand-in backend (no model to train): fixed metadata, probabilities from ``_probs``."""

    kind, source = "stub", "stub"
    classes = ["red", "green", "blue"]
    task, thresholds = "single", None

    @property
    def meta(self):
        return {"architecture": "stub", "classes": self.classes, "task": self.task, "image_size": 16,
                "resize": "stretch", "mean": [0.5] * 3, "std": [0.5] * 3, "temperature": 1.0,
                "thresholds": self.thresholds}

    def probs(self, images):
        import numpy as np

        means = images.reshape(len(images), -1, 3).mean(1) + 1.0  # the image's colour
        return (means / means.sum(1, keepdims=True)).astype(np.float32)


class _ManyLabels(_Stub):
    """Multi-label with 8 classes: the one predicted label, c6, ranks 7th by probability."""

    classes = [f"c{i}" for i in range(8)]
    task, thresholds = "multilabel", [0.95] * 6 + [0.1, 0.5]

    def probs(self, images):
        import numpy as np

        return np.tile(np.asarray([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.2, 0.1], np.float32), (len(images), 1))


def _solid_png(path: Path, rgb) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 16), rgb).save(path)
    return path


@contextlib.contextmanager
def _page(chromium: Path, backend, ready: str):
    """The web page of a server around ``backend``, loaded in Chromium, once its model line
    contains ``ready``."""
    from playwright.sync_api import sync_playwright

    from imgclf.deploy.server import ServeConfig, ServerThread, create_app

    with ServerThread(create_app(ServeConfig(model="stub"), backend=backend)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(f"document.getElementById('model').textContent.includes('{ready}')")
            yield page
        finally:
            browser.close()


def test_page_shows_a_bar_for_every_predicted_label_of_a_multilabel_model(chromium, tmp_path):
    image = _solid_png(tmp_path / "x.png", (10, 200, 30))
    with _page(chromium, _ManyLabels(), "multi-label") as page:
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.querySelectorAll('#results .row').length > 0", timeout=30_000)
        assert page.text_content("#top-class") == "c6"
        shown = page.eval_on_selector_all("#results .row", "rows => rows.map(r => [r.dataset.cls, r.className])")
    # the server returns the top 5 (c0-c4); the predicted label c6 gets its bar as well, marked a hit
    assert ["c6", "row hit"] in shown, shown
    assert [c for c, _ in shown] == ["c0", "c1", "c2", "c3", "c4", "c6"]


def test_page_ignores_the_answer_for_an_image_replaced_meanwhile(chromium, tmp_path):
    red, blue = _solid_png(tmp_path / "red.png", (250, 0, 0)), _solid_png(tmp_path / "blue.png", (0, 0, 250))
    held = []

    def hold_the_first(route):  # the first answer is fetched from the server but delivered late
        if not held:
            held.append((route, route.fetch()))
        else:
            route.continue_()

    with _page(chromium, _Stub(), "classes") as page:
        page.route("**/v1/predict", hold_the_first)
        page.set_input_files("#file", str(red))
        for _ in range(600):
            if held:
                break
            page.wait_for_timeout(50)
        assert held and held[0][1].json()["predictions"][0]["top"][0]["class"] == "red"
        page.set_input_files("#file", str(blue))
        page.wait_for_function("document.getElementById('top-class').textContent.length > 0", timeout=30_000)
        assert page.text_content("#top-class") == "blue"
        route, response = held[0]
        try:
            route.fulfill(response=response)  # the red answer arrives after the blue one
        except Exception:  # noqa: BLE001 - the page aborted that request: nothing to deliver
            pass
        page.wait_for_timeout(500)
        shown, error = page.text_content("#top-class"), page.text_content("#error")
        rows = page.eval_on_selector_all("#results .row", "rows => rows.map(r => r.dataset.cls)")
    assert shown == "blue" and rows[0] == "blue", (shown, rows)
    assert error == ""
