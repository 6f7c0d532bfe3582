"""Multi-label sources (COCO JSON, YOLO folders, label CSVs), metrics and a short multi-label run.

The COCO tests run twice: on a COCO-format set built from CIFAR-10 photos (conftest.make_coco_like,
always there) and on the real coco128 (when the shared tarball sits beside the repository)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from imgclf.data.sources import load_source
from imgclf.errors import UserError
from imgclf.evaluate.multilabel_metrics import (
    average_precision,
    mean_average_precision,
    multilabel_metrics,
    per_class_ap,
    tune_thresholds,
)


def _coco_json(root: Path) -> Path:
    return root / "annotations" / "instances_train2017.json"


def _load(data, **kw):
    return load_source(str(data), val_split=0.0, cache_dir=Path("/nonexistent"), **kw)


# -- metrics on fixed predictions ------------------------------------------------------------


@pytest.fixture(scope="module")
def fixed_predictions():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 6)) < [0.05, 0.1, 0.2, 0.3, 0.5, 0.02]).astype(np.float32)
    y[0, 5] = 1  # every class has a positive
    # rounded scores: many ties, the case where AP implementations disagree
    s = np.round(np.clip(rng.normal(0.3 + 0.35 * y, 0.2), 0, 1), 2)
    return s, y


def test_ap_and_map_match_scikit_learn(fixed_predictions):
    s, y = fixed_predictions
    np.testing.assert_allclose(per_class_ap(s, y), average_precision_score(y, s, average=None), rtol=1e-10)
    assert mean_average_precision(s, y) == pytest.approx(average_precision_score(y, s, average="macro"), rel=1e-10)
    m = multilabel_metrics(s, y, list("abcdef"))
    assert m["map"] == pytest.approx(average_precision_score(y, s, average="macro"), rel=1e-10)
    assert m["map_micro"] == pytest.approx(average_precision_score(y, s, average="micro"), rel=1e-10)
    assert [r["ap"] for r in m["per_class"]] == pytest.approx(list(average_precision_score(y, s, average=None)))


def test_class_without_positives_is_left_out_of_map(fixed_predictions):
    s, y = fixed_predictions
    y = y.copy()
    y[:, 2] = 0
    assert np.isnan(average_precision(s[:, 2], y[:, 2]))
    keep = [0, 1, 3, 4, 5]
    assert mean_average_precision(s, y) == pytest.approx(average_precision_score(y[:, keep], s[:, keep]), rel=1e-10)
    assert multilabel_metrics(s, y, list("abcdef"))["per_class"][2]["ap"] is None


def test_thresholds_maximise_f1_and_metrics_use_them(fixed_predictions):
    s, y = fixed_predictions
    th = tune_thresholds(s, y)
    for c in range(y.shape[1]):
        best = max(f1_score(y[:, c], s[:, c] >= t) for t in np.unique(s[:, c]))
        assert f1_score(y[:, c], s[:, c] >= th[c]) == pytest.approx(best)
    m = multilabel_metrics(s, y, list("abcdef"), th)
    pred = s >= th
    assert m["exact_match"] == pytest.approx(float((pred == (y > 0.5)).all(1).mean()))
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert [r["f1"] for r in m["per_class"]] == pytest.approx(list(f1_score(y, pred, average=None)))


# -- sources ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_truth(coco):
    """Non-crowd and crowd objects per file stem, straight from the JSON."""
    root, _ = coco
    d = json.loads(_coco_json(root).read_text())
    names = {c["id"]: c["name"] for c in d["categories"]}
    stem = {im["id"]: Path(im["file_name"]).stem for im in d["images"]}
    objs: dict[str, list] = {s: [] for s in stem.values()}
    for a in d["annotations"]:
        objs[stem[a["image_id"]]].append((names[a["category_id"]], a["area"], a["iscrowd"]))
    return d, objs


def test_coco_json_and_yolo_labels_give_identical_targets(coco, coco_truth, tmp_path):
    root, facts = coco
    d, _ = coco_truth
    coco_src = _load(_coco_json(root))
    # YOLO class i is the i-th COCO category in id order (ids have gaps, and the JSON need not
    # list them in order): a data.yaml with the names in that order is what a YOLO export ships with.
    yolo_root = tmp_path / "yolo"
    yolo_root.mkdir()
    os.symlink(root / "images", yolo_root / "images")
    os.symlink(root / "labels", yolo_root / "labels")
    names = [c["name"] for c in sorted(d["categories"], key=lambda c: c["id"])]
    (yolo_root / "data.yaml").write_text(json.dumps({"names": names}))
    yolo = _load(yolo_root)
    assert coco_src.task == yolo.task == "multilabel"
    assert coco_src.classes == yolo.classes == names
    a = {Path(p).stem: row for p, row in zip(coco_src.train.paths, coco_src.train.labels)}
    b = {Path(p).stem: row for p, row in zip(yolo.train.paths, yolo.train.labels)}
    both = sorted(set(a) & set(b))
    assert len(both) == facts["n_images"]  # images without objects are kept as all-negative in both
    for s in both:
        np.testing.assert_array_equal(a[s], b[s], err_msg=s)
    assert coco_src.train.labels.dtype == np.float32
    assert coco_src.train.labels.shape == (facts["n_images"], facts["n_categories"])
    # label files without images and images without label files: one warning line each, with
    # the count and the names
    orphans = [p for p in yolo.problems if "have no image" in p]
    unlabelled = [p for p in yolo.problems if "have no label file" in p]
    assert len(orphans) == 1 and orphans[0].startswith(f"{len(facts['orphan_labels'])} label file(s)")
    assert all(s in orphans[0] for s in facts["orphan_labels"])
    assert len(unlabelled) == 1 and unlabelled[0].startswith(f"{len(facts['unlabelled'])} image(s)")
    assert all(s in unlabelled[0] for s in facts["unlabelled"])


def test_yolo_without_names_uses_numeric_classes(coco, tmp_path):
    root, _ = coco
    # images/ + labels/ alone: no names file, and no COCO JSON beside them to name the ids
    os.symlink(root / "images", tmp_path / "images")
    os.symlink(root / "labels", tmp_path / "labels")
    yolo = _load(tmp_path)
    assert yolo.classes[:3] == ["0", "1", "2"]
    k = 1 + max(int(line.split()[0]) for f in (root / "labels").glob("*.txt") for line in f.read_text().splitlines()
                if line.strip())
    assert len(yolo.classes) == k
    sub = _load(tmp_path, classes="0,2")  # --classes works with the numeric names too
    assert sub.classes == ["0", "2"] and sub.train.labels.shape[1] == 2
    full = {Path(p).stem: row for p, row in zip(yolo.train.paths, yolo.train.labels)}
    for p, row in zip(sub.train.paths, sub.train.labels):
        np.testing.assert_array_equal(row, full[Path(p).stem][[0, 2]])


def test_missing_image_files_are_reported_not_fatal(coco, tmp_path):
    root, _ = coco
    images = tmp_path / "images"
    images.mkdir()
    files = sorted((root / "images").glob("*.jpg"))
    for f in files[3:]:
        os.symlink(f, images / f.name)
    src = _load(_coco_json(root), images=str(images))
    assert len(src.train) == len(files) - 3
    msg = [p for p in src.problems if "are not in" in p]
    assert len(msg) == 1 and msg[0].startswith("3 image(s)") and files[0].name in msg[0]


def test_empty_images_kept_or_dropped(coco):
    root, facts = coco
    kept = _load(_coco_json(root))
    dropped = _load(_coco_json(root), keep_empty=False)
    n, empty = facts["n_images"], facts["n_empty"]
    assert (kept.train.labels.sum(1) == 0).sum() == empty
    assert len(dropped.train) == n - empty and (dropped.train.labels.sum(1) > 0).all()
    assert any(f"dropped {empty} image(s)" in p for p in dropped.problems)


def test_largest_mode_is_the_class_of_the_largest_object(coco, coco_truth):
    root, facts = coco
    _, objs = coco_truth
    src = _load(_coco_json(root), label_mode="largest")
    assert src.task == "single" and src.train.labels.dtype == np.int64
    assert len(src.train) == facts["n_images"] - facts["n_empty"]  # an image without objects has no single label
    crowd_decided = 0
    for p, label in zip(src.train.paths, src.train.labels):
        o = objs[Path(p).stem]
        single = [x for x in o if not x[2]] or o  # crowd regions only when nothing else is there
        assert src.classes[label] == max(single, key=lambda x: x[1])[0]
        crowd_decided += max(o, key=lambda x: x[1])[2] and single is not o
    assert crowd_decided > 0  # some image's largest region is a crowd, and it was passed over
    assert any("largest" in p for p in src.problems)


def test_classes_subset(coco, coco_truth):
    root, facts = coco
    _, objs = coco_truth
    three = facts["subset"]
    src = _load(_coco_json(root), classes=",".join(three))
    assert src.classes == three and src.train.labels.shape == (facts["n_images"], 3)
    for p, row in zip(src.train.paths, src.train.labels):
        present = {o[0] for o in objs[Path(p).stem]}
        assert [c in present for c in src.classes] == list(row > 0.5)
    only = _load(_coco_json(root), classes=",".join(three), keep_empty=False)
    assert (only.train.labels.sum(1) > 0).all()
    assert len(only.train) == int((src.train.labels.sum(1) > 0).sum())
    largest = _load(_coco_json(root), classes=",".join(three[1:]), label_mode="largest")
    assert set(largest.classes[i] for i in largest.train.labels) <= set(three[1:])
    with pytest.raises(UserError, match="zebra-ish"):
        _load(_coco_json(root), classes=f"{three[0]},zebra-ish")
    # a name written another way gets the one it most likely meant, not 8 names A-Z
    with pytest.raises(UserError, match=f"did you mean {three[0]}\\?"):
        _load(_coco_json(root), classes=three[0].upper())


def test_label_csv_source(coco, tmp_path):
    root, _ = coco
    rows = [("a.jpg", "person|dog"), ("b.jpg", "cat"), ("missing.jpg", "dog"), ("c.jpg", "")]
    for (name, _), f in zip(rows, sorted((root / "images").glob("*.jpg"))):
        if name != "missing.jpg":
            os.symlink(f, tmp_path / name)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows(rows)
    src = _load(tmp_path / "labels.csv")
    assert src.task == "multilabel" and src.classes == ["cat", "dog", "person"]
    np.testing.assert_array_equal(src.train.labels, [[0, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert any(p.startswith("1 image file(s)") and "missing.jpg" in p for p in src.problems)


def test_task_multilabel_on_class_folders(small_sample):
    src = load_source(str(small_sample), val_split=0.1, cache_dir=Path("/nonexistent"), task="multilabel")
    assert src.task == "multilabel" and src.train.labels.shape[1] == 10
    assert (src.train.labels.sum(1) == 1).all() and len(src.val) > 0


# -- a short multi-label run -----------------------------------------------------------------


@pytest.mark.slow
def test_coco_multilabel_run(coco, tmp_path):
    import imgclf

    root, facts = coco
    res = imgclf.train(data=str(_coco_json(root)), image_size=64, epochs=3, val_split=0.3, project=str(tmp_path),
                       name="ml", progress=False, tensorboard=False, mixup=0.2)
    run = res.run_dir
    m = json.loads((run / "metrics.json").read_text())
    val = load_source(str(_coco_json(root)), val_split=0.3, cache_dir=Path("/nonexistent")).val
    n_val = len(val)
    assert m["task"] == "multilabel" and m["split"] == "val" and m["n"] == n_val
    assert 0.25 * facts["n_images"] <= n_val <= 0.35 * facts["n_images"]
    assert 0 < m["map"] <= 1 and 0 < m["map_micro"] <= 1
    # scores that know nothing (one constant) get each class's prevalence as its AP
    pos = val.labels.sum(0)
    chance = float(np.mean(pos[pos > 0] / n_val))
    assert m["map"] > chance + 0.05  # measured +0.15 (CIFAR-built set) and +0.09 (coco128)
    aps = [r["ap"] for r in m["per_class"] if r["support"] > 0]
    assert len(aps) == m["classes_with_positives"] >= facts["min_classes_with_positives"]
    assert all(0 <= a <= 1 for a in aps)
    assert m["map"] == pytest.approx(np.mean(aps))
    with open(run / "metrics.csv") as f:
        hist = list(csv.DictReader(f))
    assert len(hist) == 3 and all(0 < float(r["val_map"]) <= 1 for r in hist)
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == facts["n_categories"]
    assert (run / "per_class.csv").exists() and (run / "pr_curves.png").exists()
    assert res.config.monitor == "val_map"

    clf = imgclf.load(run)
    img = sorted((root / "images").glob("*.jpg"))[0]
    p = clf.predict([img], top_k=3)[0]
    probs = clf.predict_proba(np.stack([clf.preprocess(img)]))[0]
    assert len(p["top"]) == 3
    assert [c for c, _ in p["labels"]] == [clf.classes[j] for j in np.argsort(-probs) if probs[j] >= meta["thresholds"][j]]
    # thresholds tuned for single-view scores (predict's default, the server, exports) and for the
    # run's TTA views (evaluate, predict --tta): each set of scores meets its own
    assert meta["tta_level"] == 2 and len(meta["thresholds_tta"]) == facts["n_categories"]
    assert meta["thresholds_tta"] != meta["thresholds"]
    p_tta = clf.predict([img], top_k=3, tta=True)[0]
    probs_tta = clf.predict_proba(np.stack([clf.preprocess(img)]), tta=True)[0]
    assert [c for c, _ in p_tta["labels"]] == [clf.classes[j] for j in np.argsort(-probs_tta)
                                                if probs_tta[j] >= meta["thresholds_tta"][j]]

    from imgclf.api import evaluate

    # with the run's label options, on its held-out split (the data has no test split): the
    # same images and scores as training's closing evaluation
    ev = evaluate(run, progress=False)
    assert ev["task"] == "multilabel" and ev["split"] == "val" and ev["n"] == n_val
    assert ev["map"] == pytest.approx(m["map"], abs=1e-6)
    # the same data given as --data: still the held-out split (was: the whole set, training images and all)
    assert evaluate(run, str(_coco_json(root)), progress=False)["n"] == n_val


@pytest.mark.parametrize("coco", ["built"], indirect=True)
def test_evaluate_a_multilabel_run_through_the_public_api(coco, tmp_path, capfd):
    # the default run's guard for evaluate on a multi-label run: its closing note once read the
    # single-label confusion matrix (KeyError 'confusion'), and only the slow COCO run above saw it
    import imgclf

    root, _ = coco
    res = imgclf.train(data=str(_coco_json(root)), image_size=32, epochs=1, val_split=0.3, project=str(tmp_path),
                       name="ml", progress=False, tensorboard=False)
    said = "".join(capfd.readouterr())
    # the closing mAP is scored with test-time views, the epochs' val_map without: it says so
    closing = next(ln for ln in said.splitlines() if "val mAP" in ln)
    assert "with test-time views (tta" in closing and "the epochs' val figures are without them" in closing
    ev = imgclf.evaluate(res.run_dir, progress=False)  # (said once: by training's own evaluation)
    assert ev["task"] == "multilabel" and "confusion" not in ev and 0 < ev["map"] <= 1
    # no test split: the val split's P/R/F1 are at thresholds fitted to it, and that is said
    assert ev["split"] == "val" and ev["thresholds_fitted_here"]
    assert "thresholds tuned on this val split, so they are optimistic" in said + capfd.readouterr().err
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert ev["n"] == m["n"] and ev["map"] == pytest.approx(m["map"], abs=1e-6)
    # a label CSV of the same images: another source, so its own folder, with every class scored
    cats = {c["id"]: c["name"] for c in json.loads(_coco_json(root).read_text())["categories"]}
    ann = json.loads(_coco_json(root).read_text())
    tags: dict[int, set[str]] = {}
    for a in ann["annotations"]:
        tags.setdefault(a["image_id"], set()).add(cats[a["category_id"]])
    table = tmp_path / "test.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        for im in ann["images"][:40]:
            w.writerow([str(root / "images" / im["file_name"]), "|".join(sorted(tags.get(im["id"], ())))])
    other = imgclf.evaluate(res.run_dir, str(table), progress=False)
    assert other["task"] == "multilabel" and other["n"] == 40 and "confusion" not in other
    assert "thresholds_fitted_here" not in other
    assert Path(other["out_dir"]).parent == res.run_dir and Path(other["out_dir"]).name.startswith("eval-test")
    assert json.loads((Path(other["out_dir"]) / "metrics.json").read_text())["n"] == 40
