"""Review findings on session 33's inputs: a Kaggle test.csv for a run that named its label column
by position, a damaged .npz given to predict, and classes= beside multi-label name lists."""

from __future__ import annotations

import numpy as np
import pytest


def test_a_headed_test_csv_of_pixels_only_is_read_for_a_run_whose_label_column_is_a_position(tmp_path):
    # trained on pjreddie's header-less mnist_train.csv with --label-column 0 (config.yaml: '0'),
    # then Kaggle's test.csv (pixel0..pixel783, no label): pixel0 was dropped as the label and the
    # file refused as '783 pixel columns, not HxW'
    from imgclf.data.arrays import read_pixel_images

    x = np.random.default_rng(0).integers(0, 256, (4, 784))
    (tmp_path / "test.csv").write_text("\n".join([",".join(f"pixel{i}" for i in range(784)),
                                                  *(",".join(map(str, r)) for r in x)]) + "\n")
    for column in ("0", 0, "label"):
        images = read_pixel_images(tmp_path / "test.csv", label_column=column)
        assert images.shape == (4, 28, 28, 3) and np.array_equal(images[..., 0].reshape(4, -1), x), column
    # a labelled file with a header is still read without its label column, by name or position
    (tmp_path / "train.csv").write_text("\n".join(["label," + ",".join(f"pixel{i}" for i in range(784)),
                                                   *(f"{i % 3}," + ",".join(map(str, r)) for i, r in enumerate(x))]))
    for column in ("0", "label"):
        images = read_pixel_images(tmp_path / "train.csv", label_column=column)
        assert np.array_equal(images[..., 0].reshape(4, -1), x), column


def test_a_damaged_npz_is_one_row_of_predict_and_one_line_of_evaluate(tmp_path):
    # an .npz cut short (a download stopped) raised zipfile.BadZipFile out of predict and evaluate
    from imgclf.api import iter_sources
    from imgclf.data.npz import read_npz
    from imgclf.errors import UserError

    np.savez(tmp_path / "full.npz", x_test=np.zeros((3, 8, 8, 3), np.uint8), y_test=np.arange(3))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    ((name, src, err),) = list(iter_sources([str(tmp_path / "cut.npz")]))
    assert src is None and "not a readable" in err, err
    with pytest.raises(UserError, match="not a readable .npz"):
        read_npz(tmp_path / "cut.npz")


def test_classes_beside_multilabel_name_lists_is_no_traceback(tmp_path):
    # data=(x, [['cat'], ['cat', 'dog'], ...]) with classes=['cat', 'dog'] raised numpy's
    # 'inhomogeneous shape' ValueError from the check for index labels
    from imgclf.api import _arrays_as_files, _class_names_for_arrays

    x = np.zeros((3, 8, 8, 3), np.uint8)
    y = [["cat"], ["cat", "dog"], ["dog"]]
    assert _class_names_for_arrays((x, y), ["cat", "dog"]) is None
    opts = _arrays_as_files({"data": (x, y), "classes": ["cat", "dog"], "cache_dir": str(tmp_path)})
    assert opts["data"].endswith(".npz") and opts["classes"] == ["cat", "dog"]


def test_arrays_the_api_saved_keep_index_labels_beside_number_named_folders(tmp_path):
    # train(data=folder, test_data=(x, y)) read y by class name (2 -> '2') where evaluate(run, (x, y))
    # reads indices (2 -> '10', the third of 0, 1, 10, 2, ...): a test score evaluate could not repeat
    from PIL import Image

    from imgclf.data.npz import save_arrays
    from imgclf.data.sources import load_source

    for n in range(11):
        (tmp_path / "train" / str(n)).mkdir(parents=True)
        Image.new("RGB", (8, 8), (n, 0, 0)).save(tmp_path / "train" / str(n) / "a.png")
    x, y = np.zeros((4, 8, 8, 3), np.uint8), np.array([2, 2, 3, 0])
    saved = save_arrays((x, y), tmp_path / "cache", check="test_data")
    src = load_source(str(tmp_path / "train"), test_data=str(saved), val_split=0, cache_dir=tmp_path / "cache")
    assert [src.classes[i] for i in src.test.labels] == ["10", "10", "2", "0"]
    np.savez(tmp_path / "mine.npz", x=x, y=y)  # a user's file: the numbers name the classes (README)
    src = load_source(str(tmp_path / "train"), test_data=str(tmp_path / "mine.npz"), val_split=0,
                      cache_dir=tmp_path / "cache")
    assert [src.classes[i] for i in src.test.labels] == ["2", "2", "3", "0"]


def test_a_header_of_column_numbers_is_a_header(tmp_path):
    # pandas' DataFrame(np.column_stack([y, X])).to_csv(index=False) heads the columns 0..n-1: that
    # line was read as a 21st image (label 0, pixels 1..64) once header-less files were read
    from imgclf.data.arrays import read_pixel_csv

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 64)), np.arange(20) % 2
    rows = [",".join(map(str, [label, *r])) for label, r in zip(y, x)]
    for first in (0, 1):
        (tmp_path / "f.csv").write_text("\n".join([",".join(str(first + i) for i in range(65)), *rows]) + "\n")
        ds = read_pixel_csv(tmp_path / "f.csv", label_column=0)
        assert len(ds.train) == 20 and ds.train.labels.tolist() == y.tolist()
        assert np.array_equal(ds.train.images[..., 0].reshape(20, -1), x)
