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
    # the figures training wrote are embedded as they are, not drawn a second time
    import base64

    for png in ("curves.png", "confusion.png"):
        assert base64.b64encode((tiny_run / png).read_bytes()).decode() in doc, png


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


def test_report_shows_decoding_progress_when_the_cache_is_gone(tiny_run, tmp_path, monkeypatch, capfd):
    """A report of a run whose decoded images are gone (cache freed, run copied from another
    machine) decodes them again: minutes on a large set, so with a bar unless --no-progress."""
    from imgclf.cli import main

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "empty-cache"))
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "a.html"), "--device", "cpu"]) == 0
    assert "decoding test" in capfd.readouterr().err
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "another-empty-cache"))
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "b.html"), "--device", "cpu", "--no-progress"]) == 0
    assert "decoding test" not in capfd.readouterr().err
    assert '<section id="gradcam">' in (tmp_path / "b.html").read_text()


def test_names_that_are_not_utf8_are_shown_escaped(tiny_run, tmp_path):
    # a Latin-1 folder name arrives from os.listdir as a lone surrogate; the report used to fail
    # to encode and leave report.html.tmp behind
    run = _moved(tiny_run, tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["data"] = "/photos/caf\udce9"
    (run / "model.json").write_text(json.dumps(meta))
    doc = write_report(run, device="cpu").read_text(encoding="utf-8")
    assert "/photos/caf\\xe9" in doc
    assert [p.name for p in run.glob("report.html*")] == ["report.html"]


def _moved(tiny_run, tmp_path):
    """A copy of tiny_run whose data is gone: the report renders from the run folder alone (fast)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(tmp_path / "moved-away")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_run_without_held_out_split_is_not_called_test(tiny_run, tmp_path):
    # a run trained with --val-split 0 and no test/ folder has no metrics.json: its summary used to
    # be headed "Final metrics (test)"
    run = _moved(tiny_run, tmp_path)
    (run / "metrics.json").unlink()
    doc = write_report(run, device="cpu").read_text()
    assert "Final metrics (test)" not in doc and "(test)" not in doc
    assert "<h2>Run summary (no held-out evaluation)</h2>" in doc
    assert "imgclf evaluate RUN --data DIR" in doc


def test_val_metrics_warn_they_are_optimistic_and_missing_values_are_na(tiny_run, tmp_path):
    run = _moved(tiny_run, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["split"] = "val"
    metrics["nll"] = float("nan")
    metrics["per_class"][0]["precision"] = None  # as a multi-label class without positives has no AP
    (run / "metrics.json").write_text(json.dumps(metrics))
    summary = json.loads((run / "summary.json").read_text())
    summary["weights"] = "best (val_acc at epoch 1)"
    (run / "summary.json").write_text(json.dumps(summary))
    doc = write_report(run, device="cpu").read_text()
    assert "<h2>Final metrics (val)</h2>" in doc
    assert "Measured on the validation split, which the run also fitted to" in doc and "best on it" in doc
    assert ">nan<" not in doc and ">None<" not in doc
    assert re.search(r"<tr><td>nll \(log loss\)</td><td[^>]*>n/a</td>", doc)
    # metrics.json's terse keys read as words in the table
    assert re.search(rf"<tr><td>misclassified images</td><td[^>]*>{metrics['error_rate_n']}</td>", doc)
    assert "error_rate_n" not in doc
    assert re.search(r"<tr><td>airplane</td><td[^>]*>n/a</td>", doc)


def test_top_k_over_all_classes_is_left_out():
    # top2 of a 2-class model is 1.0 whatever it predicts: shown, it looked like a perfect score
    import torch

    from imgclf.evaluate.metrics import classification_metrics
    from imgclf.evaluate.report import section_metrics

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 1]), ["cat", "dog"])
    assert not any(k.startswith("top") and k != "top1" for k in m)  # not even computed now
    # the summary.json of a run made before that still holds it
    body = section_metrics({**m, "split": "test"}, {"top1": m["top1"], "top2": 1.0, "train_seconds": 12.34}, 2)
    assert "<td>top2</td>" not in body and "<td>top1</td>" in body
    assert body.count("top2 left out: with 2 classes") == 1
    assert "<td>12.3 s</td>" in body  # seconds, not 12.3400


def test_confusion_counts_table_matches_confusion_csv(tiny_run):
    import csv

    doc = (tiny_run / "report.html").read_text()
    section = doc.split('<section id="confusion">')[1].split("</section>")[0]
    with open(tiny_run / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    for k, row in enumerate(rows):
        counts = [int(v) for v in row[1:]]
        cells = "".join(f'<td class="num">{"<b>" if j == k else ""}{v}{"</b>" if j == k else ""}</td>'
                        for j, v in enumerate(counts))
        assert f"<tr><th>{k + 1}. {row[0]}</th>{cells}<td class=\"num\">{sum(counts)}</td></tr>" in section


def test_large_confusion_matrix_scrolls_at_full_size():
    import numpy as np
    import torch

    from imgclf.evaluate.metrics import classification_metrics
    from imgclf.evaluate.report import section_confusion

    classes = [f"plant_disease_{i:02d}" for i in range(40)]
    labels = torch.arange(80) % 40
    m = classification_metrics(torch.from_numpy(np.eye(40, dtype=np.float32)[(labels.numpy() * 7) % 40]), labels,
                               classes)
    body = section_confusion({**m, "split": "test"}, classes)
    assert '<div class="scroll"><img class="fig"' in body and "confusion.csv" in body


def test_thumbnail_captions_and_calibration_read_plainly(tiny_run):
    doc = (tiny_run / "report.html").read_text()
    # a caption wraps inside its thumbnail's width: long class names used to stretch every figure
    # to the caption's one-line width (nowrap under width:min-content), so ellipsis never applied
    assert "figcaption{margin-top:3px;width:0;min-width:100%;overflow-wrap:anywhere}" in doc
    assert "white-space:nowrap" not in doc
    cal = doc.split('<section id="calibration">')[1].split("</section>")[0]
    assert "<th>single view</th><th>with TTA (level 2)</th>" in cal
    assert "tta_level_tta" not in cal and "ece_before" not in cal
    assert "(single-view predictions)" in cal


def test_learning_curves_tick_whole_epochs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from imgclf.evaluate import plots

    figs = []
    monkeypatch.setattr(plots.plt, "close", figs.append)
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "train_acc": 0.3 * e, "val_acc": 0.3 * e,
                "lr": 0.1} for e in (1, 2)]
    plots.plot_curves(history, tmp_path / "curves.png")
    for ax in figs[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # was 1.0, 1.2, 1.4, ...
    plt.close(figs[0])


def test_report_shows_the_data_checks_warnings(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    findings = [
        {"kind": "layout", "severity": "info", "message": "channel order looks right"},
        {"kind": "imbalance", "severity": "warning",
         "message": "classes are imbalanced: 'cat' has 300 training images, 'deer' 6 (50x)"},
        {"kind": "conflict", "severity": "error", "message": "dog/a.jpg (dog) = cat/b.jpg (cat) <same file>"},
    ]
    (run / "check.json").write_text(json.dumps({"data": "photos/", "findings": findings}))
    doc = write_report(run, device="cpu").read_text()
    sec = re.search(r'<section id="data-check">(.*?)</section>', doc, re.S).group(1)
    assert "'deer' 6 (50x)" in sec.replace("&#x27;", "'") and "&lt;same file&gt;" in sec
    assert sec.index("conflict") < sec.index("imbalance")  # errors first
    assert "channel order" not in sec  # infos are left to 'imgclf check'
    assert 'href="#data-check"' in doc
    (run / "check.json").unlink()  # a run without one (made before the check existed): no section, no gap named
    doc = write_report(run, device="cpu").read_text()
    assert 'id="data-check"' not in doc and "Data check" not in doc
