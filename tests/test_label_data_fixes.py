"""Reading multi-label / COCO / YOLO / CSV label data: what used to go wrong without a word.

Each test builds a few tiny label files (and blank images) in tmp_path, except the one that checks
the COCO names of YOLO labels on the COCO-format sets of conftest (the built one and coco128)."""

from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import multilabel
from imgclf.data.sources import load_source
from imgclf.errors import UserError


def _load(data, **kw):
    return load_source(str(data), val_split=0.0, cache_dir=Path("/nonexistent"), **kw)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 120, 150)).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    for r in rows:
        _image(path.parent / r[0])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _yolo(root: Path, labels: dict[str, str], split: str | None = None, layout: str = "flat") -> Path:
    """root/images + root/labels (flat), images/<split> + labels/<split>, or <split>/images +
    <split>/labels (Roboflow's export)."""
    if layout == "roboflow":
        img, lab = root / split / "images", root / split / "labels"
    else:
        img, lab = (root / "images", root / "labels") if split is None else (root / "images" / split,
                                                                            root / "labels" / split)
    lab.mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        _image(img / f"{stem}.jpg")
        (lab / f"{stem}.txt").write_text(text)
    return root


def _problem(src, *words) -> str:
    hits = [p for p in src.problems if all(w in p for w in words)]
    assert len(hits) == 1, (words, src.problems)
    return hits[0]


# -- 1. val CSV labels the training data does not have ------------------------------------------


def test_val_csv_labels_the_training_lacks_are_reported(tmp_path):
    tr = _csv(tmp_path / "tr.csv", ["path", "labels"],
              [[f"t{i}.png", "person|dog" if i % 2 else "cat"] for i in range(6)])
    va = _csv(tmp_path / "va.csv", ["path", "labels"],
              [["v0.png", "persn|dgo"], ["v1.png", "cat"], ["v2.png", "dgo"], ["v3.png", "persn|cat"]])
    src = _load(tr, val_data=str(va))
    assert src.classes == ["cat", "dog", "person"]
    np.testing.assert_array_equal(src.val.labels, [[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]])
    # was dropped without a word: two of four images became all-negative
    msg = _problem(src, "training data does not have")
    assert "'dgo' (2 row(s); training has 'dog')" in msg and "'persn' (2 row(s); training has 'person')" in msg
    assert "2 of 4 row(s) are left with no label" in msg


def test_single_label_val_csv_rows_of_unknown_classes_are_reported(tmp_path):
    tr = _csv(tmp_path / "tr.csv", ["path", "label"], [[f"t{i}.png", ["cat", "dog"][i % 2]] for i in range(4)])
    va = _csv(tmp_path / "va.csv", ["path", "label"], [["v0.png", "cat"], ["v1.png", "Dog"], ["v2.png", "dog"]])
    src = _load(tr, val_data=str(va))
    assert src.task == "single" and list(src.val.labels) == [0, 1]
    assert "1 of 3 row(s) are dropped" in _problem(src, "'Dog' (1 row(s); training has 'dog')")


def test_one_label_per_row_val_csv_beside_multilabel_training_is_multi_hot(tmp_path):
    # the val CSV alone reads as single-label: its class ids sat beside the training's multi-hot rows
    tr = _csv(tmp_path / "tr.csv", ["path", "labels"], [["t0.png", "cat|dog"], ["t1.png", "dog"]])
    va = _csv(tmp_path / "va.csv", ["path", "labels"], [["v0.png", "dog"], ["v1.png", "cat"]])
    src = _load(tr, val_data=str(va))
    assert src.task == "multilabel" and src.val.labels.dtype == np.float32
    np.testing.assert_array_equal(src.val.labels, [[0, 1], [1, 0]])


# -- 2. training CSV names that are one class written twice, or another separator -------------


def test_training_csv_names_written_differently_are_reported(tmp_path):
    rows = [[f"p{i}.png", "person|dog" if i % 3 else "person"] for i in range(12)]
    rows += [["x0.png", "Person"], ["x1.png", "persn|dog"], ["x2.png", "cat"]]
    src = _load(_csv(tmp_path / "a.csv", ["path", "labels"], rows))
    assert "Person" in src.classes and "persn" in src.classes  # still read as written
    msg = _problem(src, "written differently")
    assert "'Person' (1 row(s)) beside 'person' (12)" in msg and "'persn' (1 row(s)) beside 'person' (12)" in msg
    assert "cat" not in msg and "'dog'" not in msg


COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush").split()
CIFAR_NAMES = (
    "airplane automobile bird cat deer dog frog horse ship truck apple aquarium_fish baby bear beaver bed bee "
    "beetle bicycle bottle bowl boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee "
    "clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster "
    "house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain "
    "mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake "
    "spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()


@pytest.mark.parametrize("names", [COCO_NAMES, CIFAR_NAMES], ids=["coco80", "cifar10+100"])
def test_usual_class_lists_raise_no_name_warning(names, tmp_path):
    names = [n.replace("_", " ") for n in names]
    assert len(set(names)) == len(names)
    # whatever the frequencies: no two names count as one written differently
    assert not [(a, b) for a, b in itertools.permutations(names, 2) if multilabel._one_edit(a, b)]
    # as a CSV where every other class is 50x more frequent: no warning
    labels = [[n] for i, n in enumerate(names) for _ in range(50 if i % 2 else 1)]
    assert multilabel._name_problems(tmp_path / "x.csv", labels, training=True) == []


def test_other_separator_than_pipe_is_reported(tmp_path):
    src = _load(_csv(tmp_path / "semi.csv", ["path", "labels"], [[f"s{i}.png", "person;dog"] for i in range(3)]))
    assert "'person;dog' is read as one class; write 'person|dog'" in _problem(src, "hold ';'")
    # a comma inside a name (ImageNet's 'tench, Tinca tinca') is not taken for a separator...
    names = [["a.png", "tench, Tinca tinca"], ["b.png", "goldfish, Carassius auratus"]]
    assert not [p for p in _load(_csv(tmp_path / "imnet.csv", ["path", "label"], names)).problems if "hold" in p]
    # ...but it is when its pieces are labels of their own
    rows = [["c.png", "person,dog"], ["d.png", "dog"], ["e.png", "person"]]
    assert "write 'person|dog'" in _problem(_load(_csv(tmp_path / "comma.csv", ["path", "label"], rows)), "hold ','")


# -- 3. Roboflow's YOLO export: train/images + train/labels, valid/..., test/..., data.yaml ----


def test_roboflow_yolo_layout(tmp_path):
    root = tmp_path / "rf"
    _yolo(root, {"a": "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n", "b": "1 0.5 0.5 0.4 0.4\n"}, "train", "roboflow")
    _yolo(root, {"c": "0 0.5 0.5 0.2 0.2\n"}, "valid", "roboflow")
    _yolo(root, {"d": "1 0.5 0.5 0.2 0.2\n", "e": ""}, "test", "roboflow")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: {0: cat, 1: dog}\n")
    src = _load(root)
    # was read as class folders: "class folder rf/train/labels has no images", one class 'images'
    assert src.task == "multilabel" and src.classes == ["cat", "dog"]
    assert [Path(p).stem for p in src.train.paths] == ["a", "b"] and [Path(p).stem for p in src.test.paths] == ["d", "e"]
    np.testing.assert_array_equal(src.train.labels, [[1, 1], [0, 1]])
    np.testing.assert_array_equal(src.val.labels, [[1, 0]])
    np.testing.assert_array_equal(src.test.labels, [[0, 1], [0, 0]])
    assert not [p for p in src.problems if "class folder" in p]
    (root / "data.yaml").write_text("names: ['cat', 'dog']\n")  # names as a list
    assert _load(root).classes == ["cat", "dog"]
    (root / "data.yaml").write_text("names: {0: cat, 2: dog}\n")  # a gap would shift the names
    with pytest.raises(UserError, match="not 0..1"):
        _load(root)


def test_ultralytics_coco_split_folders(tmp_path):
    # Ultralytics' coco.yaml layout: images/train2017 + images/val2017 were read as one training set
    _yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.4 0.4\n"}, "train2017")
    _yolo(tmp_path, {"c": "0 0.5 0.5 0.2 0.2\n"}, "val2017")
    src = _load(tmp_path)
    assert [Path(p).stem for p in src.train.paths] == ["a", "b"] and [Path(p).stem for p in src.val.paths] == ["c"]


# -- 4. YOLO lines that are not boxes -----------------------------------------------------------


def test_yolo_lines_with_bad_boxes_are_skipped_and_reported(tmp_path):
    lines = ["0 0.5 0.5 0.1 0.1",  # small cat
             "1 0.5 0.5 1.5 0.9",  # a width past the image: the largest, were it read
             "1 0.5",  # two fields
             "1 0.5 0.5 -0.9 0.9",  # negative width
             "2 0.1 0.1 0.9 0.1 0.5 0.8",  # a segment polygon: its bounding box is 0.8 x 0.7
             "0 0.5 0.5 1.000004 0.2"]  # rounding past 1: fine
    _yolo(tmp_path, {"a": "\n".join(lines) + "\n", "b": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    src = _load(tmp_path)
    np.testing.assert_array_equal(src.train.labels, [[1, 0, 1], [1, 1, 0]])  # a: no dog, whose boxes were bad
    msg = _problem(src, "skipped, not YOLO boxes")
    assert "3 of 8 label line(s)" in msg and "a.txt:2" in msg and "a.txt:3" in msg and "a.txt:4" in msg
    largest = _load(tmp_path, label_mode="largest")
    assert [largest.classes[i] for i in largest.train.labels] == ["bird", "cat"]  # not the bogus 1.5-wide dog
    # labels in pixels, not fractions: every line bad is an error, not a set of empty images
    _yolo(tmp_path / "px", {"a": "0 320 240 50 60\n", "b": "1 100 80 20 20\n0 0.5 0.5 0.1 0.1\n"})
    with pytest.raises(UserError, match="2 of 3 label lines are not YOLO boxes: coordinates outside 0..1"):
        _load(tmp_path / "px")


# -- 5. YOLO class ids without a names file ----------------------------------------------------


def test_yolo_ids_with_a_gap_are_reported(tmp_path):
    labels = {f"i{k}": f"{k % 3} 0.5 0.5 0.2 0.2\n" for k in range(6)}
    labels["i5"] += "200 0.5 0.5 0.1 0.1\n"  # one wrong id: 201 classes
    src = _load(_yolo(tmp_path, labels))
    assert len(src.classes) == 201
    msg = _problem(src, "class ids run to 200")
    assert "(in the labels of i5.jpg)" in msg and "only 4 distinct ids" in msg and "ids 3-199 never appear" in msg
    assert "names file" in msg
    ok = _load(_yolo(tmp_path / "ok", {k: v for k, v in labels.items() if k != "i5"}))
    assert ok.classes == ["0", "1", "2"] and not [p for p in ok.problems if "class ids" in p]


def test_negative_yolo_class_id_is_named_as_such(tmp_path):
    _yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(UserError, match=r"a\.txt:2: class id -1 is negative"):  # was "outside the 0 class names"
        _load(tmp_path)


# -- 6. a COCO JSON whose first listed image is missing ----------------------------------------


def test_coco_image_folder_found_when_the_first_image_is_missing(tmp_path):
    names = ["gone.jpg", "b.jpg", "c.jpg"]
    for n in names[1:]:
        _image(tmp_path / "images" / n)
    data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
            "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    src = _load(tmp_path / "annotations" / "instances_train2017.json")  # was "cannot find its image folder"
    assert [Path(p).name for p in src.train.paths] == ["b.jpg", "c.jpg"]
    assert "gone.jpg" in _problem(src, "are not in")


# -- 7. one-hot CSV: one 0/1 column per class ----------------------------------------------------


def test_one_hot_csv_columns_are_classes(tmp_path):
    rows = [["a.png", "1", "0", "1"], ["b.png", "0", "0", "0"], ["c.png", "0", "1", ""], ["d.png", "1", "1", "1"]]
    src = _load(_csv(tmp_path / "oh.csv", ["path", "person", "dog", "cat"], rows))
    # was "no label column (name one of labels, label, tags, classes)"
    assert src.task == "multilabel" and src.classes == ["person", "dog", "cat"]  # the columns' order
    np.testing.assert_array_equal(src.train.labels, [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    one = _load(_csv(tmp_path / "one.csv", ["path", "cat", "dog"], [["a.png", "1", "0"], ["b.png", "0", "1"]]))
    assert one.task == "single" and list(one.train.labels) == [0, 1]  # exactly one 1 per row
    with pytest.raises(UserError, match="not one 0/1 column per class either.*width"):
        _load(_csv(tmp_path / "x.csv", ["path", "person", "width"], [["a.png", "1", "640"]]))


# -- 8. YOLO labels beside a COCO JSON that names their class ids ------------------------------


def test_yolo_labels_beside_coco_json_take_its_names(coco, capsys):
    root, _ = coco  # images/ + labels/ + annotations/instances_train2017.json, no names file
    yolo = _load(root)
    coco_src = _load(root / "annotations" / "instances_train2017.json")
    assert yolo.classes == coco_src.classes  # was '0', '1', ...
    a = {Path(p).stem: row for p, row in zip(yolo.train.paths, yolo.train.labels)}
    b = {Path(p).stem: row for p, row in zip(coco_src.train.paths, coco_src.train.labels)}
    for s in set(a) & set(b):
        np.testing.assert_array_equal(a[s], b[s], err_msg=s)
    assert "class names taken from" in capsys.readouterr().err


def test_coco_json_of_another_numbering_is_not_used_for_names(tmp_path):
    _yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n"})
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2}, {"id": 2, "image_id": 2, "category_id": 1}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (tmp_path / "annotations").mkdir()
    jp = tmp_path / "annotations" / "instances_train2017.json"
    jp.write_text(json.dumps(data))
    src = _load(tmp_path)
    assert src.classes == ["0", "1"]
    assert f"--data {jp}" in _problem(src, "match the class ids on only 0 of 2 images")
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 2, "category_id": 2}]
    jp.write_text(json.dumps(data))
    os.utime(tmp_path)
    assert _load(tmp_path).classes == ["cat", "dog"]
