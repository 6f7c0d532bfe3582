"""Label CSVs as other tools write them: Kaggle Planet's space-separated tags, ';' and tab
delimiters, pandas' NaN and float labels, and one file on several rows. Each test builds its data
in tmp_path from the packaged CIFAR-10 sample's real photos."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from imgclf.data.sources import load_source

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "imgclf" / "sample" / "cifar10" / "train"


def _load(data, tmp_path, **kw):
    return load_source(str(data), val_split=0, cache_dir=tmp_path / "cache", **kw)


def _photos(root: Path, n: int, classes=("cat", "dog", "ship", "frog")) -> list[str]:
    """n real photos copied to root/imgs/<class>_<i>.jpg; their paths relative to root."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        c = classes[i % len(classes)]
        shutil.copy(sorted((SAMPLE / c).glob("*.jpg"))[i], root / "imgs" / f"{c}_{i}.jpg")
        out.append(f"imgs/{c}_{i}.jpg")
    return out


def _write(path: Path, rows, delimiter=",") -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def _problem(src, *words) -> str:
    hits = [p for p in src.problems if all(w in p for w in words)]
    assert len(hits) == 1, (words, src.problems)
    return hits[0]


# Planet-style tags: an atmosphere, then land-cover tags in varying combinations (its train_v2.csv
# has 449 combinations of 17 tags over 40,479 images)
PLANET = [" ".join([("clear", "haze", "partly_cloudy")[i % 3], "primary",
                    *(t for b, t in enumerate(("agriculture", "water", "road")) if i // 3 >> b & 1)])
          for i in range(24)] + ["cloudy"]


def _planet(root: Path, header=("image_name", "tags")) -> list[str]:
    """Kaggle Planet's layout: train_v2.csv (image_name,tags) beside train-jpg/train_<i>.jpg."""
    (root / "train-jpg").mkdir(parents=True)
    rows = []
    for i in range(30):
        c = ("cat", "dog", "ship", "frog")[i % 4]
        shutil.copy(sorted((SAMPLE / c).glob("*.jpg"))[i], root / "train-jpg" / f"train_{i}.jpg")
        rows.append((f"train_{i}", PLANET[i % len(PLANET)]))
    _write(root / "train_v2.csv", [header, *rows])
    return [t for _, t in rows]


def test_planet_space_separated_tags_are_multilabel(tmp_path):
    tags = _planet(tmp_path / "planet")
    for spec in (tmp_path / "planet" / "train_v2.csv", tmp_path / "planet"):  # the CSV or its folder
        src = _load(spec, tmp_path)
        # was one single-label class per combination ('clear primary', 'haze primary agriculture', ...)
        assert src.task == "multilabel", spec
        assert src.classes == sorted({w for t in PLANET for w in t.split()})
        got = [{src.classes[k] for k in np.flatnonzero(y)} for y in src.train.labels]
        assert got == [set(t.split()) for t in tags]
    # --task single: each combination one class, as before
    single = _load(tmp_path / "planet" / "train_v2.csv", tmp_path, task="single")
    assert single.task == "single" and "clear primary agriculture" in single.classes


def test_space_tags_under_another_column_name(tmp_path):
    tags = _planet(tmp_path / "p", header=("image_name", "labels"))
    src = _load(tmp_path / "p" / "train_v2.csv", tmp_path)
    # a single-label read, but said: the words recur across labels as tags do
    assert src.task == "single" and "clear primary" in src.classes
    msg = _problem(src, "hold spaces")
    assert "pass --task multilabel" in msg and "'clear|primary'" in msg
    ml = _load(tmp_path / "p" / "train_v2.csv", tmp_path, task="multilabel")
    assert ml.task == "multilabel" and "primary" in ml.classes and "clear primary" not in ml.classes
    got = [{ml.classes[k] for k in np.flatnonzero(y)} for y in ml.train.labels]
    assert got == [set(t.split()) for t in tags]


def test_class_names_with_spaces_stay_whole(tmp_path):
    names = ["golden retriever", "german shepherd", "border collie", "bull terrier", "yorkshire terrier",
             "beagle", "pug", "boston terrier"]
    files = _photos(tmp_path, 24)
    rows = [("path", "label"), *((f, names[i % 8]) for i, f in enumerate(files))]
    csv_path = _write(tmp_path / "labels.csv", rows)
    for task in ("auto", "multilabel"):
        src = _load(csv_path, tmp_path, task=task)
        assert src.classes == sorted(names), task
        assert not any("spaces" in p for p in src.problems)
    assert src.train.labels.sum(1).tolist() == [1.0] * 24  # multi-label: one name per image, not two words


@pytest.mark.parametrize("delimiter,suffix", [(";", ".csv"), ("\t", ".csv"), ("\t", ".tsv")])
def test_semicolon_and_tab_delimiters(tmp_path, delimiter, suffix):
    root = tmp_path / "set"
    files = _photos(root, 8)
    rows = [("path", "label"), *((f, f.split("/")[1].split("_")[0]) for f in files)]
    data = _write(root / f"labels{suffix}", rows, delimiter)
    # was "no label column 'label' (columns found: 'path;label')"
    src = _load(data, tmp_path)
    assert src.task == "single" and src.classes == ["cat", "dog", "frog", "ship"]
    assert [src.classes[y] for y in src.train.labels] == [r[1] for r in rows[1:]]
    assert _load(root, tmp_path).classes == ["cat", "dog", "frog", "ship"]  # as the label table of a folder
    # Excel's ';' CSV with multi-label cells and a comma in a name
    rows = [("path", "labels"), (files[0], "cat|dog"), (files[1], "dog"), (files[2], "tench, Tinca tinca")]
    multi = _write(root / f"multi{suffix}", rows, delimiter)
    src = _load(multi, tmp_path)
    assert src.task == "multilabel" and src.classes == ["cat", "dog", "tench, Tinca tinca"]


def test_nan_cells_are_missing_labels_and_float_ids_are_ints(tmp_path):
    files = _photos(tmp_path, 8)
    ids = {"cat": 0, "dog": 1, "ship": 2, "frog": 3}
    truth = [ids[f.split("/")[1].split("_")[0]] for f in files]
    # pandas' to_csv of an int column holding a NaN: floats, and the NaN as text after astype(str)
    cells = [f"{y}.0" for y in truth]
    cells[2], cells[5] = "nan", "NaN"
    src = _load(_write(tmp_path / "floats.csv", [("path", "label"), *zip(files, cells)]), tmp_path)
    # were classes '0.0', '1.0', ... and 'NaN', 'nan'
    assert src.task == "single" and src.classes == ["0", "1", "2", "3"]
    assert len(src.train) == 6 and [int(src.classes[y]) for y in src.train.labels] == \
        [y for i, y in enumerate(truth) if i not in (2, 5)]
    assert "2 row(s) have no label" in _problem(src, "have no label")
    assert "'nan'/'NaN', a missing value" in _problem(src, "missing value")
    # the same classes as an int column (a val CSV of ints against float training labels)
    val = _write(tmp_path / "val.csv", [("path", "label"), *zip(files, map(str, truth))])
    assert _load(tmp_path / "floats.csv", tmp_path, val_data=str(val)).val.labels.tolist() == truth
    for na in ("None", "null", "NA", "<NA>"):
        src = _load(_write(tmp_path / "na.csv", [("path", "label"), *zip(files, ["cat", na] * 4)]), tmp_path)
        assert src.classes == ["cat"] and len(src.train) == 4, na
    # not every label an integral float: names as written
    versions = _write(tmp_path / "versions.csv", [("path", "label"), *zip(files, ["1.0", "1.5"] * 4)])
    src = _load(versions, tmp_path)
    assert src.classes == ["1.0", "1.5"]


def test_a_file_on_two_rows(tmp_path):
    files = _photos(tmp_path, 8)
    rows = [("path", "label"), *((f, f.split("/")[1].split("_")[0]) for f in files)]
    rows.insert(5, (files[0], "dog"))  # line 6: cat_0 again, with another label
    rows.append((files[1], "dog"))  # an exact repeat of line 3
    src = _load(_write(tmp_path / "labels.csv", rows), tmp_path)
    # was a 9th and 10th image, then 'imgs/cat_0.jpg = imgs/cat_0.jpg ... delete the extra copies'
    assert src.task == "single" and len(src.train) == 8
    assert sorted(src.train.paths) == sorted(str(tmp_path / f) for f in files)
    assert src.classes[src.train.labels[src.train.paths.index(str(tmp_path / files[0]))]] == "cat"
    msg = _problem(src, "two labels")
    assert msg.startswith("labels.csv: lines 2 and 6 give imgs/cat_0.jpg two labels (cat, dog): "
                          "the first is used")
    assert len(src.problems) == 1  # the exact repeat says nothing

    # one row per (image, label), as some tools write multi-label CSVs: merged
    cat, dog, ship, frog = files[:4]
    pairs = [("image", "label"), (cat, "cat"), (cat, "dog"), (dog, "dog"), (ship, "ship"), (dog, "cat"),
             (frog, "frog")]
    ml = _load(_write(tmp_path / "pairs.csv", pairs), tmp_path, task="multilabel")
    assert ml.task == "multilabel" and ml.classes == ["cat", "dog", "frog", "ship"] and len(ml.train) == 4
    want = {f: {c for g, c in pairs[1:] if g == f} for f in files[:4]}
    got = {str(Path(p).relative_to(tmp_path)): {ml.classes[k] for k in np.flatnonzero(y)}
           for p, y in zip(ml.train.paths, ml.train.labels)}
    assert got == want and got["imgs/cat_0.jpg"] == {"cat", "dog"}
    assert "2 image(s) are on several rows" in _problem(ml, "merged")
    # '|' lists in some rows make it multi-label without --task: the repeats are merged too
    bar = _write(tmp_path / "bar.csv", [("path", "labels"), (files[0], "cat|ship"), (files[1], "dog"),
                                        (files[0], "frog")])
    src = _load(bar, tmp_path)
    assert src.task == "multilabel" and len(src.train) == 2
    assert src.train.labels[0].tolist() == [1, 0, 1, 1]


def test_no_change_for_plain_csvs(tmp_path):
    files = _photos(tmp_path, 8)
    rows = [("path", "label"), *((f, f.split("/")[1].split("_")[0]) for f in files)]
    src = _load(_write(tmp_path / "labels.csv", rows), tmp_path)
    assert src.classes == ["cat", "dog", "frog", "ship"] and len(src.train) == 8 and not src.problems
    assert src.train.paths == [str(tmp_path / f) for f in files]
