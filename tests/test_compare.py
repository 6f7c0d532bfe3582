"""imgclf compare: overlaid curves per metric and a table of final figures and differing config."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml

from imgclf.errors import UserError
from imgclf.evaluate.compare import compare_runs


@pytest.fixture()
def two_runs(tiny_run, tmp_path):
    a = tmp_path / "p" / "a"
    b = tmp_path / "p" / "b"
    for r in (a, b):
        shutil.copytree(tiny_run, r, ignore=shutil.ignore_patterns("*.safetensors", "last.pt", "report.html"))
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["lr"], cfg["name"] = cfg["lr"] * 2, "b"
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = list(csv.DictReader(open(b / "metrics.csv")))
    for r in rows:
        r["val_acc"] = str(float(r["val_acc"]) + 0.1)
    with open(b / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return a, b


def test_compare_overlays_curves_and_tabulates_differences(two_runs, tmp_path):
    a, b = two_runs
    res = compare_runs([a, b], tmp_path / "cmp")
    names = {p.name for p in res["figures"]}
    assert {"train_loss.png", "val_loss.png", "val_acc.png", "train_acc.png", "lr.png"} <= names
    assert "seconds.png" not in names
    assert res["differing"] == ["lr"]  # the name differs too, but it labels the rows
    header, rows = res["header"], res["rows"]
    assert [r[0] for r in rows] == ["a", "b"]
    best = header.index("best_val_acc")
    assert rows[1][best] == pytest.approx(rows[0][best] + 0.1)
    assert "test_top1" in header and "temperature" in header
    with open(tmp_path / "cmp" / "compare.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == header and len(table) == 3
    doc = (tmp_path / "cmp" / "compare.html").read_text()
    assert doc.count("<img") == len(names)
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'src="([^"]*)"', doc))


def test_compare_command_prints_a_table(two_runs, tmp_path, capsys):
    from imgclf.cli import main

    a, b = two_runs
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "a", "b"]
    assert any(line.startswith("lr ") for line in lines) and "compare.html" in out


def test_same_named_runs_are_told_apart(tiny_run, tmp_path):
    a, b = tmp_path / "x" / "tiny", tmp_path / "y" / "tiny"
    for r in (a, b):
        shutil.copytree(tiny_run, r, ignore=shutil.ignore_patterns("*.safetensors", "last.pt", "report.html"))
    res = compare_runs([a, b], tmp_path / "o")
    assert [r[0] for r in res["rows"]] == ["x/tiny", "y/tiny"] and res["differing"] == []


def test_compare_needs_two_real_runs(tiny_run, tmp_path):
    with pytest.raises(UserError, match="at least two"):
        compare_runs([tiny_run])
    with pytest.raises(UserError, match="no such run folder"):
        compare_runs([tiny_run, tmp_path / "missing"])


def test_compare_takes_the_runs_folder_and_passes_over_its_own_output(two_runs, capfd):
    # 'compare runs/a runs/b' wrote runs/compare; 'compare runs/*' then failed on it ("not an imgclf
    # run folder"), and 'compare runs' was "needs at least two run folders"
    a, b = two_runs
    first = compare_runs([a, b])
    assert Path(first["out_dir"]) == a.parent / "compare"
    again = compare_runs(sorted(a.parent.iterdir()))  # the shell's runs/*: a, b, compare
    assert [r[0] for r in again["rows"]] == ["a", "b"]
    assert f"{a.parent / 'compare'} holds a comparison, not a run: left out" in capfd.readouterr().err
    assert [r[0] for r in compare_runs([a.parent])["rows"]] == ["a", "b"]
    with pytest.raises(UserError, match=r"cmp.html: the folder for the figures.*name a folder"):
        compare_runs([a, b], a.parent / "cmp.html")
    assert not (a.parent / "cmp.html").exists()


def test_a_multilabel_runs_label_accuracy_has_its_own_column(two_runs, tmp_path):
    # one best_val_acc row held single-label top-1 (0.61) beside per-label accuracy (0.79)
    import json

    a, b = two_runs
    meta = json.loads((b / "model.json").read_text())
    (b / "model.json").write_text(json.dumps({**meta, "task": "multilabel"}))
    res = compare_runs([a, b], tmp_path / "o")
    header, (ra, rb) = res["header"], res["rows"]
    acc, label_acc = header.index("best_val_acc"), header.index("best_val_label_acc")
    assert ra[acc] is not None and ra[label_acc] is None and rb[acc] is None and rb[label_acc] is not None


def test_a_temperature_fitted_on_test_images_is_not_labelled_val(two_runs, tmp_path):
    # `imgclf calibrate RUN --data test/` records "test split of ..."; compare called its ECE val_ece
    import json

    a, b = two_runs
    meta = json.loads((b / "model.json").read_text())
    assert meta["calibration"]["split"] == "val"  # what training records
    meta["calibration"]["split"] = f"test split of {tmp_path / 'data'}"
    (b / "model.json").write_text(json.dumps(meta))
    res = compare_runs([a, b], tmp_path / "cmp")
    header, rows = res["header"], res["rows"]
    assert "val_ece_after" in header and "test_ece_after" in header
    assert rows[0][header.index("test_ece_after")] in ("", None, "-")  # a: fitted on val only
    assert rows[1][header.index("val_ece_after")] in ("", None, "-")
