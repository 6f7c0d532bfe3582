"""Multi-label sources and metrics, as a user with multi-object photos meets them (session 30):
bad label files end in one line naming the file, a class folder is never read as YOLO, and the
metrics agree with scikit-learn on hand-checkable cases."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_coco_like

from imgclf.errors import UserError


def _load(path, **kw):
    from imgclf.data.sources import load_source

    return load_source(str(path), cache_dir=Path(os.environ["IMGCLF_CACHE"]), **kw)


def _tiny_coco(root: Path, sample_dir: Path) -> dict:
    """Two real photos and a COCO instances dict describing them."""
    (root / "images").mkdir(parents=True)
    for i, c in enumerate(("cat", "ship")):
        shutil.copy(sorted((sample_dir / "train" / c).glob("*.jpg"))[0], root / "images" / f"{i}.jpg")
    return {"images": [{"id": 1, "file_name": "0.jpg"}, {"id": 2, "file_name": "1.jpg"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]},
                            {"id": 11, "image_id": 2, "category_id": 7, "bbox": [0, 0, 5, 5]}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "ship"}]}


@pytest.mark.parametrize("section,index,key", [("annotations", 0, "category_id"), ("annotations", 1, "image_id"),
                                               ("images", 0, "file_name"), ("categories", 1, "name")])
def test_coco_entry_without_a_needed_key_is_one_line_naming_the_file(tmp_path, sample_dir, section, index, key):
    # before: KeyError tracebacks ('category_id', 'file_name', 'name') from read_coco
    data = _tiny_coco(tmp_path, sample_dir)
    del data[section][index][key]
    jp = tmp_path / "instances.json"
    jp.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        _load(jp, images=str(tmp_path / "images"))
    msg = str(e.value)
    assert str(jp) in msg and f"{section}[{index}]" in msg and repr(key) in msg and "\n" not in msg


def test_coco_annotation_of_an_unknown_image_is_reported(tmp_path, sample_dir):
    data = _tiny_coco(tmp_path, sample_dir)
    data["annotations"].append({"id": 99, "image_id": 12345, "category_id": 3, "bbox": [0, 0, 5, 5]})
    jp = tmp_path / "instances.json"
    jp.write_text(json.dumps(data))
    src = _load(jp, images=str(tmp_path / "images"), val_split=0)
    assert src.task == "multilabel" and src.train.labels.tolist() == [[1, 0], [0, 1]]
    assert any("image_id" in p and "99" in p for p in src.problems), src.problems


@pytest.mark.parametrize("layout", ["flat", "roboflow"])
def test_class_folders_named_images_and_labels_stay_single_label(tmp_path, sample_dir, layout):
    # a class-folder set whose two classes are 'images' and 'labels' was read as YOLO: a multi-label
    # set of 0 classes (its labels/ holds photos, no .txt file)
    base = tmp_path / "d" / ("train" if layout == "roboflow" else "")
    for cls, src_cls in (("images", "cat"), ("labels", "ship")):
        (base / cls).mkdir(parents=True)
        for f in sorted((sample_dir / "train" / src_cls).glob("*.jpg"))[:6]:
            os.symlink(f, base / cls / f.name)
    src = _load(tmp_path / "d", val_split=0)
    assert src.task == "single" and src.classes == ["images", "labels"] and src.train.labels.ndim == 1
    assert sorted(np.bincount(src.train.labels).tolist()) == [6, 6]


def test_yolo_id_beyond_the_matching_coco_categories_names_the_label_file(tmp_path, sample_dir):
    # before: the COCO JSON beside the labels was dropped and every class became a number
    # ('0'..'12'), a warning among others; the id is a wrong label: say which file and line
    root = tmp_path / "coco-like"
    make_coco_like(root, sample_dir, n_images=24)
    lf = sorted((root / "labels").glob("*.txt"))[3]
    n_lines = len(lf.read_text().splitlines())
    with open(lf, "a") as f:
        f.write("12 0.5 0.5 0.2 0.2\n")
    with pytest.raises(UserError) as e:
        _load(root)
    msg = str(e.value)
    assert f"{lf}:{n_lines + 1}" in msg and "class id 12" in msg and "12 categories" in msg and "\n" not in msg


def test_yolo_with_matching_coco_json_keeps_names(tmp_path, sample_dir):
    root = tmp_path / "coco-like"
    make_coco_like(root, sample_dir, n_images=24)
    src = _load(root, val_split=0)
    assert src.task == "multilabel" and "airplane" in src.classes and src.train.labels.ndim == 2


def test_label_csv_unmatched_quote_is_an_error_naming_the_line(tmp_path, sample_dir):
    # before: the csv module read on to the end of the file, and the swallowed rows became
    # dozens of class names such as 'cat\n/x/0010.jpg,airplane', silently
    imgs = sorted((sample_dir / "train" / "cat").glob("*.jpg"))[:8]
    lines = ["path,labels"] + [f"{p},cat|dog" for p in imgs]
    lines[3] = f'{imgs[2]},"cat|dog'
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        _load(csv_path, val_split=0)
    msg = str(e.value)
    assert f"{csv_path}:4" in msg and "quote" in msg and "\n" not in msg


def test_label_csv_multiline_free_text_column_is_fine(tmp_path, sample_dir):
    imgs = sorted((sample_dir / "train" / "cat").glob("*.jpg"))[:2]
    (tmp_path / "l.csv").write_text(f'path,labels,note\n{imgs[0]},cat|dog,"two\nlines"\n{imgs[1]},cat,x\n')
    src = _load(tmp_path / "l.csv", val_split=0)
    assert src.task == "multilabel" and src.classes == ["cat", "dog"] and len(src.train) == 2


def test_metrics_match_scikit_learn_on_a_hand_checked_case():
    from sklearn.metrics import average_precision_score, f1_score

    from imgclf.evaluate.multilabel_metrics import multilabel_metrics, tune_thresholds

    s = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.1], [0.3, 0.7, 0.2], [0.3, 0.1, 0.4]])
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    m = multilabel_metrics(s, y, ["a", "b", "c"])
    # class a: ranks 1 (pos), 2 (neg), 3-4 tied (one pos) -> AP = 1/2 * 1 + 1/2 * 2/4 = 0.75
    assert m["per_class"][0]["ap"] == pytest.approx(0.75) == pytest.approx(average_precision_score(y[:, 0], s[:, 0]))
    assert m["per_class"][1]["ap"] == pytest.approx(average_precision_score(y[:, 1], s[:, 1]))
    assert m["per_class"][2]["ap"] is None and m["classes_with_positives"] == 2
    assert m["map"] == pytest.approx(np.mean([average_precision_score(y[:, c], s[:, c]) for c in (0, 1)]))
    assert m["map_micro"] == pytest.approx(average_precision_score(y.ravel(), s.ravel()))
    assert m["f1_micro"] == pytest.approx(f1_score(y, s >= 0.5, average="micro"))
    th = tune_thresholds(s, y)
    for c in (0, 1):
        best = max(f1_score(y[:, c], s[:, c] >= t) for t in np.unique(s[:, c]))
        assert f1_score(y[:, c], s[:, c] >= th[c]) == pytest.approx(best)
    assert th[2] == 0.5


def test_coco_json_without_annotations_cannot_train(tmp_path, sample_dir):
    # before: COCO's image_info_test2017.json (images and categories, no annotations) trained an
    # all-negative model on every image, the data check's per-class errors the only sign
    data = _tiny_coco(tmp_path, sample_dir)
    del data["annotations"]
    jp = tmp_path / "image_info_test.json"
    jp.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        _load(jp, images=str(tmp_path / "images"))
    assert str(jp) in str(e.value) and "nothing to learn" in str(e.value)


def test_yolo_labels_all_empty_cannot_train(tmp_path, sample_dir):
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for f in sorted((sample_dir / "train" / "cat").glob("*.jpg"))[:4]:
        os.symlink(f, root / "images" / f.name)
        (root / "labels" / f"{f.stem}.txt").write_text("")
    with pytest.raises(UserError, match="nothing to learn"):
        _load(root)
