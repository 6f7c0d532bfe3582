"""Folder layouts and settings users bring that are not train/val/test + class folders, and the
run-level checks around them: split folders named Training/ or seg_train/, a data set wrapped in
one more folder, one class, --classes with separate val data, macOS debris, evaluate on a run
without a test split. Built from the packaged CIFAR-10 sample's real photos."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import imgclf
from imgclf.data.sources import load_source
from imgclf.errors import UserError

QUICK = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def _copy_classes(src: Path, dst: Path, classes: list[str], n: int) -> None:
    for c in classes:
        (dst / c).mkdir(parents=True)
        for f in sorted((src / c).glob("*.jpg"))[:n]:
            shutil.copy(f, dst / c / f.name)


@pytest.mark.parametrize("train_name,test_name", [("Training", "Test"), ("Training", "Testing"),
                                                  ("seg_train", "seg_test")])
def test_split_folders_with_other_names_are_splits_not_classes(small_sample, tmp_path, train_name, test_name):
    root = tmp_path / "set"
    _copy_classes(small_sample / "train", root / train_name, ["cat", "dog", "ship"], 8)
    _copy_classes(small_sample / "test", root / test_name, ["cat", "dog", "ship"], 3)
    (root / "seg_pred").mkdir()  # Intel scenes' unlabelled images
    shutil.copy(next((small_sample / "test" / "cat").glob("*.jpg")), root / "seg_pred" / "x.jpg")
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog", "ship"]
    assert len(src.train) == 24 and len(src.test) == 9
    assert all(f"/{train_name}/" in p for p in src.train.paths)
    assert any("seg_pred" in p and "ignored" in p for p in src.problems)


def test_a_class_named_train_is_a_class(small_sample, tmp_path):
    # a vehicles set whose classes include "train": that folder holds images, not class folders
    root = tmp_path / "vehicles"
    _copy_classes(small_sample / "train", root, ["automobile", "truck"], 5)
    (root / "train").mkdir()
    for f in sorted((small_sample / "train" / "ship").glob("*.jpg"))[:5]:
        shutil.copy(f, root / "train" / f.name)
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["automobile", "train", "truck"] and src.test is None


def _named_copies(src: Path, dst: Path, names: dict[str, str], n: int) -> None:
    """``n`` photos of each class folder in ``names``, copied flat into ``dst`` as the name
    pattern says (``"cat.{i}.jpg"``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for c, pattern in names.items():
        for i, f in enumerate(sorted((src / c).glob("*.jpg"))[:n]):
            shutil.copy(f, dst / pattern.format(i=i))


def test_images_whose_names_name_their_classes_need_no_class_folders(small_sample, tmp_path):
    # Kaggle's dogs-vs-cats: train/cat.0.jpg, train/dog.0.jpg and an unlabelled test1/1.jpg;
    # before, train/ and test1/ were read as two classes named "train" and "test1"
    root = tmp_path / "dogs-vs-cats"
    _named_copies(small_sample / "train", root / "train", {"cat": "cat.{i}.jpg", "dog": "dog.{i}.jpg"}, 6)
    _named_copies(small_sample / "test", root / "test1", {"cat": "{i}.jpg"}, 3)
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog"] and len(src.train) == 12 and src.test is None
    assert [os.path.basename(p) for p, y in zip(src.train.paths, src.train.labels) if y == 1][:2] == \
        ["dog.0.jpg", "dog.1.jpg"]
    assert any("2 classes read from the image names (e.g. cat.0.jpg -> cat)" in p for p in src.problems)
    assert any("folder(s) test1 ignored (not a train/val/test split)" in p for p in src.problems)
    # Oxford-IIIT Pets: one folder, the breed before the number, cats capitalised
    pets = tmp_path / "pets"
    _named_copies(small_sample / "train", pets, {"cat": "Abyssinian_{i}.jpg", "dog": "american_bulldog_{i}.jpg",
                                                 "horse": "great_pyrenees ({i}).jpg"}, 4)
    res = imgclf.train(data=str(pets), project=str(tmp_path / "runs"), val_split=0.25, **QUICK)
    assert res.config is not None and imgclf.load(res.run_dir).classes == ["Abyssinian", "american_bulldog",
                                                                          "great_pyrenees"]
    # a camera's IMG_0001.jpg...: one name, so no labelling; the error says what was looked for
    cam = tmp_path / "camera"
    _named_copies(small_sample / "train", cam, {"cat": "IMG_{i}.jpg"}, 4)
    with pytest.raises(UserError, match=r"holds no class folders.*its 4 images are not in class folders, and their "
                                        r"names do not name classes as cat.1.jpg or cat_1.jpg do"):
        load_source(str(cam), val_split=0, cache_dir=tmp_path / "c")


def test_one_wrapping_folder_is_looked_through(small_sample, tmp_path):
    # Kaggle's cats-vs-dogs: PetImages/{Cat,Dog} next to a licence pdf and a readme
    root = tmp_path / "kaggle"
    _copy_classes(small_sample / "train", root / "PetImages", ["cat", "dog"], 6)
    (root / "readme[1].txt").write_text("hello")
    (root / "MSR-LA - 3467.pdf").write_bytes(b"%PDF-1.4")
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog"] and len(src.train) == 12


def test_one_class_is_a_one_line_error_before_any_work(small_sample, tmp_path):
    root = tmp_path / "only"
    _copy_classes(small_sample / "train", root, ["cat"], 6)
    with pytest.raises(UserError, match="only one class .cat.") as e:
        imgclf.train(data=str(root), project=str(tmp_path / "runs"), **QUICK)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_classes_subset_with_separate_val_data(small_sample, tmp_path):
    _copy_classes(small_sample / "train", tmp_path / "tr", ["bird", "cat", "dog", "ship"], 6)
    _copy_classes(small_sample / "test", tmp_path / "va", ["bird", "cat", "dog", "ship"], 3)
    src = load_source(str(tmp_path / "tr"), val_data=str(tmp_path / "va"), classes="ship,cat",
                      cache_dir=tmp_path / "c")
    assert src.classes == ["ship", "cat"]
    assert len(src.val) == 6
    # labels follow the training data's (subset) order, by name
    for p, y in zip(src.val.paths, src.val.labels):
        assert Path(p).parent.name == src.classes[y]
    # a val folder missing one of the classes is a warning, not an error
    shutil.rmtree(tmp_path / "va" / "cat")
    src = load_source(str(tmp_path / "tr"), val_data=str(tmp_path / "va"), classes="ship,cat",
                      cache_dir=tmp_path / "c")
    assert len(src.val) == 3 and (src.val.labels == 0).all()
    assert any("no images of class(es): cat" in p for p in src.problems)


def test_label_csv_with_a_blank_row_stays_single_label(small_sample, tmp_path):
    files = sorted((small_sample / "train" / "cat").glob("*.jpg"))[:3] + \
        sorted((small_sample / "train" / "dog").glob("*.jpg"))[:3]
    rows = [(str(f), f.parent.name) for f in files]
    rows[2] = (rows[2][0], "")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    src = load_source(str(tmp_path / "labels.csv"), val_split=0, cache_dir=tmp_path / "c")
    assert src.task == "single" and src.classes == ["cat", "dog"]
    assert src.train.labels.tolist() == [0, 0, 1, 1, 1]
    assert any("1 row(s) have no label" in p for p in src.problems)
    ml = load_source(str(tmp_path / "labels.csv"), val_split=0, cache_dir=tmp_path / "c", task="multilabel")
    assert ml.task == "multilabel" and len(ml.train) == 6 and ml.train.labels[2].sum() == 0
    with pytest.raises(UserError, match="--label-mode largest keeps each image's largest object, and a label CSV"):
        load_source(str(tmp_path / "labels.csv"), val_split=0, cache_dir=tmp_path / "c", label_mode="largest")


def _kaggle_set(small_sample: Path, root: Path, classes=("cat", "dog", "ship"), n=6) -> dict[str, str]:
    """Kaggle's competition layout: train_labels.csv (id,label) naming the flat train/ folder's
    images by id without extension (some .png, some .jpg), an unlabelled test/ whose file names
    repeat train's, and a sample_submission.csv that also names images by id."""
    from PIL import Image

    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    truth = {}
    for c in classes:
        for i, f in enumerate(sorted((small_sample / "train" / c).glob("*.jpg"))[:n]):
            key = f"{c[0]}{i:03d}9f3e"  # ids carry no class: the CSV is the only labelling
            if i % 2:
                Image.open(f).save(root / "train" / f"{key}.png")
            else:
                shutil.copy(f, root / "train" / f"{key}.jpg")
            truth[key] = c
    for key in list(truth)[:4]:  # test images named as train ones, other pictures
        shutil.copy(next((small_sample / "test" / "frog").glob("*.jpg")), root / "test" / f"{key}.jpg")
    with open(root / "train_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *sorted(truth.items()), ("gone0000", "cat")])
    with open(root / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *((k, "cat") for k in list(truth)[:4])])
    return truth


def test_a_kaggle_label_csv_names_its_images_by_id(small_sample, tmp_path):
    root = tmp_path / "histo"
    truth = _kaggle_set(small_sample, root)
    for spec in (root / "train_labels.csv", root):  # the CSV, or the folder it sits in
        src = load_source(str(spec), val_split=0, cache_dir=tmp_path / "c")
        # read as class folders the folder made two classes, 'test' and 'train'
        assert src.task == "single" and src.classes == ["cat", "dog", "ship"], spec
        got = {Path(p).stem: src.classes[y] for p, y in zip(src.train.paths, src.train.labels)}
        assert got == truth
        assert all(Path(p).parent == root / "train" for p in src.train.paths)  # not test/'s namesakes
        assert any("1 image file(s) named in train_labels.csv do not exist: gone0000" in p for p in src.problems)

    # paths written on another machine: Windows, relative or absolute, or another Linux box
    files = sorted((root / "train").iterdir())
    for cells in ([f"train\\{f.name}" for f in files], [f"C:\\Users\\me\\histo\\train\\{f.name}" for f in files],
                  [f"/kaggle/input/histo/train/{f.name}" for f in files]):
        with open(root / "moved.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *((c, truth[Path(c.replace("\\", "/")).stem]) for c in cells)])
        src = load_source(str(root / "moved.csv"), val_split=0, cache_dir=tmp_path / "c")
        assert sorted(src.train.paths) == [str(f) for f in files], cells[0]
    (root / "moved.csv").unlink()

    # a Kaggle zip unpacked as train/train/, ids with their extension, a label column by another
    # name among other columns
    nested = tmp_path / "cactus"
    (nested / "train").mkdir(parents=True)
    shutil.copytree(root / "train", nested / "train" / "train")
    names = sorted(p.name for p in (nested / "train" / "train").iterdir())
    with open(nested / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_name", "site", "target"), *((n, "x", truth[n.split(".")[0]]) for n in names)])
    src = load_source(str(nested), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog", "ship"] and len(src.train) == len(truth)
    by_site = load_source(str(nested / "train.csv"), val_split=0, cache_dir=tmp_path / "c", label_column="site")
    assert by_site.classes == ["x"]
    with pytest.raises(UserError, match="--label-column sight: no such column"):
        load_source(str(nested / "train.csv"), val_split=0, cache_dir=tmp_path / "c", label_column="sight")

    # ids whose images are elsewhere: --images says where; without it, the error says to
    moved = tmp_path / "labels-only"
    moved.mkdir()
    shutil.copy(root / "train_labels.csv", moved)
    with pytest.raises(UserError, match="names no image file .* pass their folder with --images"):
        load_source(str(moved / "train_labels.csv"), val_split=0, cache_dir=tmp_path / "c")
    src = load_source(str(moved / "train_labels.csv"), val_split=0, cache_dir=tmp_path / "c",
                      images=str(root / "train"))
    assert len(src.train) == len(truth)


def test_class_folders_beside_a_metadata_csv_stay_class_folders(small_sample, tmp_path):
    root = tmp_path / "set"
    _copy_classes(small_sample / "train", root / "train", ["cat", "dog"], 5)
    with open(root / "meta.csv", "w", newline="") as f:  # names the images, but labels nothing
        csv.writer(f).writerows([("path", "width", "height"),
                                 *((str(p.relative_to(root)), 32, 32) for p in sorted(root.rglob("*.jpg")))])
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog"] and len(src.train) == 10
    # images named by class, flat, beside such a table: still named by class
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(root.rglob("*.jpg")):
        shutil.copy(p, flat / f"{p.parent.name}.{p.stem}.jpg")
    with open(flat / "meta.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "width", "height"), *((p.name, 32, 32) for p in sorted(flat.glob("*.jpg")))])
    src = load_source(str(flat), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog"] and len(src.train) == 10


def test_a_roboflow_export_reads_each_splits_classes_csv(small_sample, tmp_path):
    # train/, valid/, test/, each with its images and a _classes.csv (filename, then a 0/1 column
    # per class, headers with a leading space): read as class folders, the splits became classes
    root = tmp_path / "rf"
    classes = ["cat", "dog", "ship"]
    for split, (a, b) in {"train": (0, 8), "valid": (8, 11), "test": (11, 13)}.items():
        (root / split).mkdir(parents=True)
        rows = [["filename"] + [f" {c}" for c in classes]]
        for k, c in enumerate(classes):
            for f in sorted((small_sample / "train" / c).glob("*.jpg"))[a:b]:
                name = f"{f.stem}_jpg.rf.{k}{f.stem}.jpg"
                shutil.copy(f, root / split / name)
                rows.append([name] + [" 1" if j == k else " 0" for j in range(3)])
        with open(root / split / "_classes.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    src = load_source(str(root), val_split=0.5, cache_dir=tmp_path / "c")
    assert src.classes == classes and src.task == "single"
    assert (len(src.train), len(src.val), len(src.test)) == (24, 9, 6)
    for split in (src.train, src.val, src.test):
        k = np.asarray([int(Path(p).name.split(".rf.")[1][0]) for p in split.paths])
        np.testing.assert_array_equal(split.labels, k)


def test_predict_on_a_folder_skips_macos_debris(tiny_run, small_sample, tmp_path):
    from imgclf.api import expand_inputs

    d = tmp_path / "photos"
    (d / "__MACOSX").mkdir(parents=True)
    good = sorted((small_sample / "test" / "cat").glob("*.jpg"))[:2]
    for f in good:
        shutil.copy(f, d / f.name)
        (d / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a resource fork
        (d / "__MACOSX" / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07")
    assert [p.name for p in expand_inputs([d])] == [f.name for f in good]
    rows = imgclf.load(tiny_run).predict([d])
    assert len(rows) == 2 and all(not r.get("error") for r in rows)


def test_evaluate_without_a_test_split_scores_the_held_out_val_split(small_sample, tmp_path, capfd):
    flat = tmp_path / "flat"
    _copy_classes(small_sample / "train", flat, ["cat", "dog", "ship"], 20)
    res = imgclf.train(data=str(flat), project=str(tmp_path / "runs"), name="r", val_split=0.25, **QUICK)
    m = imgclf.evaluate(res.run_dir, progress=False)
    held = load_source(str(flat), val_split=0.25, split_seed=res.config.split_seed, cache_dir=tmp_path / "c").val
    assert m["split"] == "val" and m["n"] == len(held) == 15
    # the same folder named with --data: was scored whole, 45 of its 60 images ones the model learned
    capfd.readouterr()
    m = imgclf.evaluate(res.run_dir, str(flat), progress=False)
    assert m["split"] == "val" and m["n"] == 15
    assert "is the data r trained on, with no test split: evaluating on the run's validation split (15 images)" \
        in capfd.readouterr().err
    none = imgclf.train(data=str(flat), project=str(tmp_path / "runs"), name="n", val_split=0, **QUICK)
    with pytest.raises(UserError, match="no test split"):
        imgclf.evaluate(none.run_dir, progress=False)
    # a run that held nothing out: scored whole, and said to be optimistic
    capfd.readouterr()
    assert imgclf.evaluate(none.run_dir, str(flat), progress=False)["split"] == "all"
    assert "every image scored here was a training image" in capfd.readouterr().err
    # another folder with no splits is scored whole, as before, and nothing is said
    shutil.copytree(flat, tmp_path / "other")
    assert imgclf.evaluate(res.run_dir, str(tmp_path / "other"), progress=False)["split"] == "all"
    assert "trained on" not in capfd.readouterr().err


def test_settings_that_need_validation_data_say_so(small_sample, tmp_path):
    for bad, match in ((dict(early_stopping=3), "--early-stopping"), (dict(schedule="plateau"), "plateau"),
                       (dict(monitor="val_map", val_split=0.2), "multi-label")):
        kw = {**dict(val_split=0), **bad}
        with pytest.raises(UserError, match=match):
            imgclf.train(data=str(small_sample / "train"), project=str(tmp_path / "runs"), **{**QUICK, **kw})


def test_resume_with_new_options_is_refused(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(UserError, match="drop: epochs"):
        imgclf.train(resume=run, epochs=30)


def test_killed_cache_builds_are_cleaned_up(small_sample, tmp_path):
    from imgclf.data.cache import build_cache

    root = tmp_path / "cache"
    root.mkdir()
    dead = root / "0123abcd.999999999.tmp.npy"  # no such pid
    young = root / "4567ef01.999999999.tmp.npy"
    for f in (dead, young):
        f.write_bytes(b"x" * 1000)
    os.utime(dead, (1e9, 1e9))  # 2001
    src = load_source(str(small_sample / "test"), val_split=0, cache_dir=tmp_path)
    build_cache(src.train, 32, "stretch", root, progress=False)
    assert not dead.exists() and young.exists()  # a young one may be another machine's build


def test_large_in_memory_arrays_resize_into_a_disk_cache(monkeypatch, tmp_path):
    from imgclf.data import cache
    from imgclf.data.sources import Split

    rng = np.random.default_rng(0)
    split = Split(labels=np.arange(6) % 2, images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    small = cache.build_cache(split, 48, "stretch", tmp_path / "a", progress=False)
    monkeypatch.setattr(cache, "ARRAYS_IN_RAM", 1000)
    big = cache.build_cache(split, 48, "stretch", tmp_path / "b", progress=False)
    assert isinstance(big.images, np.memmap) and not isinstance(small.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(big.images), small.images)
    assert len(list((tmp_path / "b").glob("*.npy"))) == 1
    calls = []
    monkeypatch.setattr(cache, "resize_rgb", lambda *a: calls.append(1))
    again = cache.build_cache(split, 48, "stretch", tmp_path / "b", progress=False)  # reused, not resized
    assert not calls and np.array_equal(np.asarray(again.images), small.images)
