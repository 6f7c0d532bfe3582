"""Inputs a new user brings (session 33): pixel CSVs evaluated as the run read them, classes named by
number, integer labels that skip a number, class folders grouped under folders."""

from __future__ import annotations

import numpy as np
import pytest


def _pixel_csv(path, n_per_class: int, seed: int, label: str = "target") -> None:
    """A planar RGB pixel CSV (CIFAR's row layout) of 16x16 images, 3 classes told apart by colour."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, name in enumerate(("red", "green", "blue")):
        for _ in range(n_per_class):
            img = rng.integers(0, 80, (16, 16, 3))
            img[..., k] += 150
            rows.append(f"{name}," + ",".join(map(str, img.transpose(2, 0, 1).reshape(-1))))
    header = f"{label}," + ",".join(f"p{i}" for i in range(3 * 16 * 16))
    path.write_text("\n".join([header, *rows]) + "\n")


def test_evaluate_and_calibrate_read_a_pixel_csv_as_the_run_trained_on_it(tmp_path):
    # evaluate read --data (and the run's own data) without the run's --csv-layout, --csv-shape
    # and --label-column: a run trained on a planar CSV with --label-column target could not be
    # evaluated at all ("no label column 'label'", then "channel order cannot be guessed: pass
    # --csv-layout", an option evaluate does not have)
    import imgclf
    from imgclf.deploy.export import _run_images
    from imgclf.evaluate.calibrate import calibrate_run

    _pixel_csv(tmp_path / "train.csv", 12, 0)
    _pixel_csv(tmp_path / "test.csv", 4, 1)
    res = imgclf.train(data=str(tmp_path / "train.csv"), csv_layout="planar", label_column="target", epochs=1,
                       image_size=16, project=str(tmp_path / "runs"), progress=False, tensorboard=False, tta=False)
    own = imgclf.evaluate(res.run_dir, progress=False)  # the run's held-out split of train.csv
    assert own["n"] == res.test["n"] == 3  # 10% of each class: the split training held out
    other = imgclf.evaluate(res.run_dir, str(tmp_path / "test.csv"), progress=False)
    assert other["n"] == 12 and [r["class"] for r in other["per_class"]] == ["blue", "green", "red"]
    with pytest.raises(imgclf.UserError, match="too few to fit a temperature"):  # read, then refused for its size
        calibrate_run(res.run_dir, str(tmp_path / "test.csv"), progress=False)
    images, origin = _run_images(res.run_dir, 4, 16, "stretch")  # export's parity images: the run's own
    assert len(images) == 4 and "train.csv" in origin
    # a CSV whose label column is another (GTSRB's Test.csv: ClassId): the refusal told to pass
    # --label-column, which evaluate did not take
    from imgclf.cli import main

    _pixel_csv(tmp_path / "other.csv", 2, 2, label="ClassId")
    with pytest.raises(imgclf.UserError, match="no label column 'target'"):
        imgclf.evaluate(res.run_dir, str(tmp_path / "other.csv"), progress=False)
    assert main(["evaluate", str(res.run_dir), "--data", str(tmp_path / "other.csv"), "--label-column", "ClassId",
                 "--no-progress"]) == 0


def test_integer_labels_of_val_and_test_files_are_the_numbers_that_name_the_classes(tmp_path):
    # class folders named by number (GTSRB's Train/0..42) sort as text: 0, 1, 10, 11, 2, ...; a
    # --test-data pixel CSV or .npz labelled 2 had its rows put in the third class, '10' (evaluate
    # read the same file by name), so most test labels were silently wrong
    from PIL import Image

    from imgclf.data.sources import load_source

    numbers = range(12)
    rng = np.random.default_rng(0)
    for n in numbers:
        (tmp_path / "train" / str(n)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / str(n) / f"{i}.png")
    x = rng.integers(0, 255, (len(numbers), 8, 8, 3), dtype=np.uint8)
    y = np.array(numbers)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    rows = [f"{label}," + ",".join(map(str, img.reshape(-1))) for img, label in zip(x, y)]
    (tmp_path / "test.csv").write_text("\n".join(["label," + ",".join(f"p{i}" for i in range(192)), *rows]) + "\n")
    for test, kw in (("test.npz", {}), ("test.csv", {"csv_layout": "interleaved"})):
        src = load_source(str(tmp_path / "train"), test_data=str(tmp_path / test), val_split=0,
                          cache_dir=tmp_path / "cache", **kw)
        assert src.classes[:4] == ["0", "1", "10", "11"]
        assert [src.classes[i] for i in src.test.labels] == [str(n) for n in numbers], test
    # classes named 0..K-1 in order, or by words: integer labels stay indices
    np.savez(tmp_path / "idx.npz", x=x[:2], y=np.array([0, 1]))
    for d in ("ant", "bee"):
        (tmp_path / "words" / d).mkdir(parents=True)
        Image.fromarray(x[0]).save(tmp_path / "words" / d / "a.png")
    src = load_source(str(tmp_path / "words"), test_data=str(tmp_path / "idx.npz"), val_split=0,
                      cache_dir=tmp_path / "cache")
    assert [src.classes[i] for i in src.test.labels] == ["ant", "bee"]


def test_integer_labels_that_skip_a_number_are_said_to_do_so_not_to_need_images(tmp_path):
    # a pixel CSV labelled 1..3 (EMNIST letters count from 1) made class '0' with no image, and the
    # check told the user to 'add images or remove the class', a class the file never names
    import json

    from imgclf.cli import main

    rng = np.random.default_rng(0)
    rows = [f"{1 + i % 3}," + ",".join(map(str, rng.integers(0, 255, 64))) for i in range(60)]
    (tmp_path / "letters.csv").write_text("\n".join(["label," + ",".join(f"p{i}" for i in range(64)), *rows]) + "\n")
    assert main(["check", "--data", str(tmp_path / "letters.csv"), "--out", str(tmp_path / "out")]) in (0, 1)
    findings = json.loads((tmp_path / "out" / "check.json").read_text())["findings"]
    assert [f["kind"] for f in findings if f["kind"] in ("few_images", "unused_labels")] == ["unused_labels"]
    unused = next(f for f in findings if f["kind"] == "unused_labels")
    assert unused["details"]["classes"] == ["0"] and "subtract 1" in unused["message"]


def test_class_folders_grouped_under_folders_say_which_are_the_classes(tmp_path):
    # train/animals/cat, train/animals/dog, train/vehicles/ship: two classes, animals and
    # vehicles, and the data check found 'no problems'. Subfolders every class has (dates) are not
    # a hierarchy, and say nothing.
    from PIL import Image

    from imgclf.data.sources import load_source

    def make(root, tree):
        for group, subs in tree.items():
            for sub in subs:
                (root / group / sub).mkdir(parents=True)
                for i in range(3):
                    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / group / sub / f"{i}.png")

    make(tmp_path / "grouped", {"animals": ["cat", "dog"], "vehicles": ["ship", "truck"]})
    src = load_source(str(tmp_path / "grouped"), val_split=0, cache_dir=tmp_path / "cache")
    assert src.classes == ["animals", "vehicles"]
    said = [p for p in src.problems if "subfolders" in p]
    assert len(said) == 1 and "animals/cat, animals/dog, vehicles/ship, ..." in said[0], src.problems
    make(tmp_path / "dated", {"cat": ["2019", "2020"], "dog": ["2019", "2020"]})
    src = load_source(str(tmp_path / "dated"), val_split=0, cache_dir=tmp_path / "cache")
    assert src.classes == ["cat", "dog"] and not [p for p in src.problems if "subfolders" in p]


def test_predict_reads_the_rows_of_a_pixel_csv_and_numpy_files_as_the_run_read_its_data(tmp_path):
    # Kaggle's test.csv (an id column, pixels, no label), x_test.npy and an .npz were refused by
    # predict ('not an image file'), and an .npz holding only x_test/y_test by evaluate ('no
    # training arrays'): each row is now an image named file#row, read with the run's CSV layout
    import json

    import imgclf
    from imgclf.cli import main

    _pixel_csv(tmp_path / "train.csv", 12, 0)
    res = imgclf.train(data=str(tmp_path / "train.csv"), csv_layout="planar", label_column="target", epochs=1,
                       image_size=16, project=str(tmp_path / "runs"), progress=False, tensorboard=False, tta=False)
    _pixel_csv(tmp_path / "labelled.csv", 3, 1)
    lines = (tmp_path / "labelled.csv").read_text().splitlines()
    planar = np.array([[int(v) for v in line.split(",")[1:]] for line in lines[1:]], dtype=np.uint8)
    images = planar.reshape(-1, 3, 16, 16).transpose(0, 2, 3, 1)  # the rows as HxWx3 images
    # the Kaggle layout: an id column first, no label
    kaggle = ["id," + lines[0].split(",", 1)[1]] + [f"{i + 1}," + line.split(",", 1)[1] for i, line in enumerate(lines[1:])]
    (tmp_path / "test.csv").write_text("\n".join(kaggle) + "\n")
    np.save(tmp_path / "x_test.npy", images.transpose(0, 3, 1, 2))  # channels first, as torch users save them
    np.savez(tmp_path / "test.npz", x_test=images, y_test=np.repeat(["red", "green", "blue"], 3))
    clf = imgclf.load(res.run_dir)
    want = [p["top"] for p in clf.predict(list(images), top_k=3)]
    for name in ("test.csv", "labelled.csv", "x_test.npy", "test.npz"):
        out = tmp_path / f"{name}.json"
        assert main(["predict", str(res.run_dir), str(tmp_path / name), "--top-k", "3", "--output", str(out)]) == 0
        got = json.loads(out.read_text())
        assert [r["input"].rsplit("#", 1)[1] for r in got] == [str(i) for i in range(len(images))], name
        assert all("error" not in r for r in got), (name, got[0])
        for r, w in zip(got, want):
            assert [c for c, _ in r["top"]] == [c for c, _ in w], name
            assert [p for _, p in r["top"]] == pytest.approx([p for _, p in w], abs=1e-5), name
    m = imgclf.evaluate(res.run_dir, str(tmp_path / "test.npz"), progress=False)
    assert m["n"] == len(images) and [r["support"] for r in m["per_class"]] == [3, 3, 3]
    # a label CSV (file names, labels) is not read as pixels: predict says what to give it instead
    (tmp_path / "labels.csv").write_text("filename,label\na.jpg,red\nb.png,blue\n")
    (r,) = clf.predict([str(tmp_path / "labels.csv")])
    assert "image file names" in r["error"] and "imgclf predict RUN -" in r["error"]
    (tmp_path / "paths.csv").write_text("a.jpg\nb.png\n")  # a bare list of paths, no header
    (r,) = clf.predict([str(tmp_path / "paths.csv")])
    assert "image file names" in r["error"]


def test_a_pixel_csv_without_a_header_row_is_read_with_the_label_column_by_position(tmp_path):
    # pjreddie's mnist_train.csv has no header row: it was refused even with --label-column 0,
    # asking for 785 column names; now the column is said by position, and predict reads a
    # header-less file of pixels only (its test set) with the run's options
    import imgclf

    rng = np.random.default_rng(0)
    rows, images = [], []
    for i in range(60):
        k = i % 3
        img = rng.integers(0, 60, (12, 12))
        img[4 * k:4 * k + 4] += 180
        images.append(img.astype(np.uint8))
        rows.append(f"{k}," + ",".join(map(str, img.reshape(-1))))
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(r.split(",", 1)[1] for r in rows[:6]) + "\n")
    with pytest.raises(imgclf.UserError, match="no header row.*--label-column 0"):
        imgclf.train(data=str(tmp_path / "train.csv"), epochs=1, project=str(tmp_path / "runs"), progress=False)
    res = imgclf.train(data=str(tmp_path / "train.csv"), label_column=0, val_split=0.1, epochs=1, image_size=12,
                       project=str(tmp_path / "runs"), progress=False, tensorboard=False, tta=False)
    assert res.config.epochs == 1 and len(res.history) == 1
    from imgclf.data.sources import load_source

    src = load_source(str(tmp_path / "train.csv"), label_column="0", val_split=0.0, cache_dir=tmp_path / "cache")
    assert len(src.train) == 60 and src.classes == ["0", "1", "2"]  # the first line is a row, not a header
    assert src.train.labels.tolist() == [i % 3 for i in range(60)]
    assert np.array_equal(src.train.images[5][..., 0], images[5])
    clf = imgclf.load(res.run_dir)
    got = clf.predict([str(tmp_path / "test.csv")])
    assert [r["input"].rsplit("#", 1)[1] for r in got] == [str(i) for i in range(6)] and "error" not in got[0]
    assert [r["top"][0] for r in got] == [r["top"][0] for r in clf.predict(images[:6])]
