"""Folders as people leave them, which imgclf used to misread without a word: a test/ of
unlabelled images beside the class folders, Cat/ beside cat/, a LICENSE without extension in a
wrapper folder, images saved without an extension, one odd file among name-labelled images, an
empty --data, a device named as --data. Built from the packaged CIFAR-10 sample's real JPEGs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imgclf.data.sources import load_source
from imgclf.errors import UserError


def _copy(src: Path, dst: Path, n: int, prefix: str = "") -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.glob("*.jpg"))[:n]:
        out.append(dst / f"{prefix}{f.name}")
        shutil.copy(f, out[-1])
    return out


def _load(path: Path, tmp_path: Path, **kw):
    return load_source(str(path), val_split=0, cache_dir=tmp_path / "cache", **kw)


def test_a_test_folder_beside_the_class_folders_is_not_a_class(sample_dir, tmp_path):
    train = sample_dir / "train"
    root = tmp_path / "flat"
    for c in ("cat", "dog", "ship"):
        _copy(train / c, root / c, 6)
    _copy(sample_dir / "test" / "cat", root / "test", 4, "u")  # Kaggle's unlabelled test images
    src = _load(root, tmp_path)
    assert src.classes == ["cat", "dog", "ship"] and len(src.train) == 18 and src.test is None
    assert any("4 images without class folders" in p and "not a class" in p for p in src.problems)

    # a test/ (or val/) holding the same class folders is that split
    labelled = tmp_path / "labelled"
    for c in ("cat", "dog", "ship"):
        _copy(train / c, labelled / c, 6)
        _copy(sample_dir / "test" / c, labelled / "test" / c, 2)
        _copy(sample_dir / "test" / c, labelled / "Validation" / c, 1, "v")
    src = _load(labelled, tmp_path)
    assert src.classes == ["cat", "dog", "ship"]
    assert (len(src.train), len(src.val), len(src.test)) == (18, 3, 6)

    # two folders in all: 'test' may well be a class (test/ and prod/ screenshots)
    two = tmp_path / "two"
    _copy(train / "cat", two / "prod", 5)
    _copy(train / "dog", two / "test", 5)
    assert _load(two, tmp_path).classes == ["prod", "test"]


def test_class_folders_differing_only_in_case_are_named(sample_dir, tmp_path):
    root = tmp_path / "case"
    _copy(sample_dir / "train" / "cat", root / "Cat", 5)
    _copy(sample_dir / "train" / "cat", root / "cat", 5, "b")
    _copy(sample_dir / "train" / "dog", root / "dog", 5)
    src = _load(root, tmp_path)
    assert src.classes == ["Cat", "cat", "dog"]  # still two classes: merging is the user's call
    assert any("differ only in case" in p and "'Cat' and 'cat'" in p for p in src.problems)


def test_a_wrapper_folder_with_a_bare_license_file_is_read_through(sample_dir, tmp_path):
    root = tmp_path / "wrap"
    for c in ("cat", "dog"):
        _copy(sample_dir / "train" / c, root / "dataset" / c, 4)
    (root / "LICENSE").write_text("CC BY 4.0\n")
    (root / "README").write_text("photos\n")
    assert _load(root, tmp_path).classes == ["cat", "dog"]


def test_images_saved_without_an_extension_are_named_in_the_warning(sample_dir, tmp_path):
    root = tmp_path / "ext"
    for i, f in enumerate(_copy(sample_dir / "train" / "cat", tmp_path / "raw", 4)):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        shutil.move(f, root / "cat" / f"img{i}")
    for c in ("dog", "ship"):
        _copy(sample_dir / "train" / c, root / c, 4)
    src = _load(root, tmp_path)
    assert src.classes == ["dog", "ship"]
    assert any("has no images" in p and "4 file(s) without an extension, e.g. img0" in p for p in src.problems)


def test_one_odd_file_among_name_labelled_images_is_left_out_not_fatal(sample_dir, tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    for c in ("cat", "dog"):
        for i, f in enumerate(sorted((sample_dir / "train" / c).glob("*.jpg"))[:30]):
            shutil.copy(f, root / f"{c}.{i}.jpg")
    shutil.copy(next((sample_dir / "train" / "bird").glob("*.jpg")), root / "bird.0.jpg")
    shutil.copy(next((sample_dir / "train" / "ship").glob("*.jpg")), root / "preview.jpg")
    src = _load(root, tmp_path)
    assert src.classes == ["cat", "dog"] and len(src.train) == 60
    assert any("2 image(s) left out" in p and "bird.0.jpg" in p for p in src.problems)
    # past a few, the names are not a labelling
    for i in range(5):
        shutil.copy(next((sample_dir / "train" / "ship").glob("*.jpg")), root / f"{i}.jpg")
    with pytest.raises(UserError, match="holds no class folders"):
        _load(root, tmp_path)


def test_an_empty_data_option_or_a_device_is_one_line(sample_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(sample_dir)  # "" used to mean the working directory: this one would train
    for kw in (dict(), dict(val_data=" ")):
        with pytest.raises(UserError, match="is empty"):
            load_source("" if not kw else str(sample_dir), cache_dir=tmp_path / "c", **kw)
    with pytest.raises(UserError, match="not a file or folder"):
        load_source("/dev/null", cache_dir=tmp_path / "c")


def test_a_run_folder_or_the_runs_folder_is_not_data(tiny_run, tmp_path):
    """Its eval-*/ folders became classes and its charts the training images."""
    with pytest.raises(UserError, match="is an imgclf run folder, not data"):
        load_source(str(tiny_run), cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match="holds imgclf run folders"):
        load_source(str(tiny_run.parent), cache_dir=tmp_path / "c")
