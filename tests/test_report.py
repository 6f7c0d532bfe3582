"""The run report: written by train, self-contained, every section present, user strings escaped."""

from __future__ import annotations

import json
import re
import shutil

import yaml

from imgclf.evaluate.report import write_report

SECTIONS = ("config", "curves", "metrics", "per-class", "confusion", "confused-pairs", "top-losses", "gradcam",
            "calibration")


def _srcs(doc: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', doc)


def test_train_writes_a_self_contained_report(tiny_run):
    doc = (tiny_run / "report.html").read_text()
    for s in SECTIONS:
        assert f'<section id="{s}">' in doc, s
    srcs = _srcs(doc)
    assert len(srcs) == doc.count("<img")
    # curves, confusion, reliability + 6 pairs x 4 + 2 x 12 top losses + 8 x 2 Grad-CAM
    assert len(srcs) >= 3 + 20 + 24 + 16
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    # nothing to fetch: no scripts, stylesheets, fonts or links out of the page
    assert "<script" not in doc and "<link" not in doc and "@import" not in doc and "url(" not in doc
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', doc))
    assert not re.search(r"(src|href)=\"(https?:|//)", doc)


def test_report_shows_metrics_calibration_and_top_losses(tiny_run):
    doc = (tiny_run / "report.html").read_text()
    meta = json.loads((tiny_run / "model.json").read_text())
    cal = meta["calibration"]
    assert f"{cal['ece_before']:.4f}" in doc and f"{cal['ece_after']:.4f}" in doc
    assert re.search(r"ECE \(15 bins\) on 1000 test images: before [0-9.]+, after temperature scaling [0-9.]+", doc)
    assert "<h3>train (2000 images scored)</h3>" in doc and "<h3>test (1000 images scored)</h3>" in doc
    assert "predicted as" in doc and "airplane" in doc
    # hovering a thumbnail names its file
    assert "/train/" in doc and ".jpg" in doc


def test_user_strings_are_escaped(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    evil = '<script>alert("x")</script>'
    meta["classes"][0] = evil
    (run / "model.json").write_text(json.dumps(meta))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["per_class"][0]["class"] = evil
    (run / "metrics.json").write_text(json.dumps(metrics))
    out = write_report(run, device="cpu")
    doc = out.read_text()
    assert evil not in doc and "<script" not in doc
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in doc


def test_report_degrades_when_pieces_are_missing(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for f in ("metrics.csv", "metrics.json"):
        (run / f).unlink()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(tmp_path / "moved-away")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    doc = write_report(run, device="cpu").read_text()
    for s in ("config", "calibration"):
        assert f'<section id="{s}">' in doc
    for s in ("curves", "per-class", "confusion", "top-losses", "gradcam"):
        assert f'<section id="{s}">' not in doc
    assert "image-level sections left out" in doc and "moved-away" in doc


def test_report_command(tiny_run, tmp_path, capsys):
    from imgclf.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(tiny_run), "--out", str(out), "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    assert '<section id="gradcam">' in out.read_text()


def test_names_that_are_not_utf8_are_shown_escaped(tiny_run, tmp_path):
    # a Latin-1 folder name arrives from os.listdir as a lone surrogate; the report used to fail
    # to encode and leave report.html.tmp behind
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["data"] = "/photos/caf\udce9"
    (run / "model.json").write_text(json.dumps(meta))
    doc = write_report(run, device="cpu").read_text(encoding="utf-8")
    assert "/photos/caf\\xe9" in doc
    assert [p.name for p in run.glob("report.html*")] == ["report.html"]
