"""Notebook-shaped inputs to imgclf.train / imgclf.evaluate: bare arrays, (x, y) as the first
argument, tag lists, ragged images, file paths, bad labels of arrays (one line naming the option,
nothing left in the cache), integer val labels past the training ones, and duck-typed callbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.data.cache import cache_root
from imgclf.errors import UserError

FAST = dict(epochs=1, progress=False, tensorboard=False)
CLASSES = ("airplane", "cat", "ship")


@pytest.fixture(scope="module")
def arrays(sample_dir) -> tuple[np.ndarray, np.ndarray]:
    """3 classes x 20 CIFAR-10 photos of the packaged sample, 32x32 RGB uint8, labels 0..2."""
    xs, ys = [], []
    for i, c in enumerate(CLASSES):
        for f in sorted((sample_dir / "train" / c).glob("*.jpg"))[:20]:
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(i)
    return np.stack(xs), np.asarray(ys, np.int64)


def _tags(y: np.ndarray) -> list[list[str]]:
    # airplane and ship are also "vehicle": some images have two labels
    return [[CLASSES[k]] + (["vehicle"] if k != 1 and j % 2 else []) for j, k in enumerate(y)]


class KerasStyle:
    """A callback that does not subclass imgclf.Callback and defines on_epoch_end only."""

    def __init__(self):
        self.rows = []

    def on_epoch_end(self, trainer, row):
        self.rows.append(row["epoch"])


@pytest.fixture(scope="module")
def tag_run(arrays, tmp_path_factory):
    """(x, tag lists) as train's first argument, with one duck-typed callback not in a list."""
    x, y = arrays
    cb = KerasStyle()
    res = imgclf.train((x, _tags(y)), callbacks=cb, project=str(tmp_path_factory.mktemp("runs")), name="tags",
                       final_eval=False, **FAST)
    return res, cb


def _arrays_in_cache() -> set[Path]:
    folder = cache_root() / "arrays"
    return set(folder.iterdir()) if folder.is_dir() else set()


def _refused(match: str, **kw) -> str:
    """imgclf.train(**kw) refused before training: one line, no cache file named or left behind."""
    before = _arrays_in_cache()
    with pytest.raises(UserError, match=match) as e:
        imgclf.train(**kw)
    msg = str(e.value)
    assert "\n" not in msg and ".npz" not in msg and len(msg) < 300, msg
    assert _arrays_in_cache() == before
    return msg


def test_a_bare_array_as_data_is_refused_in_one_line(arrays, tmp_path):
    x, y = arrays
    _refused(r"^data: an array of shape \(60, 32, 32, 3\) without labels: .* data=\(x_train, y_train\)$",
             data=x, project=str(tmp_path), **FAST)
    _refused(r"^val_data: .* val_data=\(x_val, y_val\)$", data=(x, y), val_data=x, project=str(tmp_path), **FAST)


def test_arrays_as_the_first_argument_are_the_data(arrays, tmp_path, tag_run):
    x, y = arrays
    # read as data=(x, y): its labels are checked as the data's
    with pytest.raises(UserError, match=r"^data: 55 labels \(shape \(55,\)\) for 60 images"):
        imgclf.train((x, y[:-5]), project=str(tmp_path), **FAST)
    with pytest.raises(UserError, match=r"^the first argument .* and data= is given too: pass the data once"):
        imgclf.train((x, y), data=(x, y), project=str(tmp_path), **FAST)
    with pytest.raises(UserError, match=r"^the first argument is a YAML config file, not int"):
        imgclf.train(3, project=str(tmp_path), **FAST)
    with pytest.raises(UserError, match=r"not a dict of options: pass them as keywords, imgclf.train\(\*\*options\)$"):
        imgclf.train({"data": "photos/", "epochs": 3})
    res, _ = tag_run
    assert (res.run_dir / "model.safetensors").exists()


def test_tag_lists_train_and_evaluate_a_multi_label_model(arrays, tag_run):
    x, y = arrays
    res, _ = tag_run
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == ["airplane", "cat", "ship", "vehicle"]
    m = imgclf.evaluate(res, (x[::2], _tags(y)[::2]), progress=False)
    assert m["n"] > 0 and "map" in m
    with pytest.raises(UserError, match=r"^evaluation arrays: labels not among the classes given: dog$"):
        imgclf.evaluate(res, (x[:4], [["dog"], ["cat"], ["cat"], ["ship"]]), progress=False)


def test_evaluate_refuses_an_array_without_labels(arrays, tag_run):
    x, _ = arrays
    with pytest.raises(UserError, match=r"^evaluate needs labels: .* data=\(x_test, y_test\)"):
        imgclf.evaluate(tag_run[0], x, progress=False)


def test_images_of_several_sizes_and_file_paths_are_refused_before_saving(arrays, tmp_path, sample_dir):
    x, y = arrays
    mixed = [x[0], x[1, :16], x[2]]
    _refused(r"^data: the images are not all one size \(32x32x3, 16x32x3\): arrays must share one size",
             data=(mixed, [0, 1, 2]), project=str(tmp_path), **FAST)
    files = [str(f) for f in sorted((sample_dir / "train" / "cat").glob("*.jpg"))]
    for n in (2, 5):  # two of each: not read as Keras' ((x_train, y_train), (x_test, y_test))
        _refused(r"^data: the images are file paths, not arrays: pass their folder .* label CSV of path,label rows",
                 data=(files[:n], [0, 1] * (n // 2) + [0] * (n % 2)), project=str(tmp_path), **FAST)
    _refused(r"^data: labels of several lengths", data=(x[:3], [[0], [1, 2], [2]]), project=str(tmp_path), **FAST)


@pytest.mark.parametrize("case, match", [
    ("short", r"^data: 55 labels \(shape \(55,\)\) for 60 images; pass one label per image"),
    ("float", r"^data: float labels that are not whole numbers"),
    ("one class", r"^data: one class only \(0\)"),
    ("val count", r"^val_data: 7 labels \(shape \(7,\)\) for 10 images"),
    ("normalised", r"^data: float image values span .*undo any mean/std normalisation"),
])
def test_bad_training_arrays_name_the_option_and_leave_no_cache_file(arrays, tmp_path, case, match):
    x, y = arrays
    kw = {"short": dict(data=(x, y[:-5])), "float": dict(data=(x, y + 0.5)), "one class": dict(data=(x, y * 0)),
          "val count": dict(data=(x, y), val_data=(x[:10], y[:7])),
          "normalised": dict(data=((x - 120.0) / 60.0, y))}[case]
    _refused(match, project=str(tmp_path), **kw, **FAST)


def test_integer_val_labels_past_the_training_ones_are_refused(arrays, tmp_path):
    x, y = arrays
    _refused(r"^val_data: label 3 but the training labels are 0\.\.2 \(off by one\?\)",
             data=(x, y), val_data=(x[::3], y[::3] + 1), project=str(tmp_path), **FAST)
    _refused(r"^test_data: label 3 but the training labels are 0\.\.2",
             data=(x, y), test_data=(x[::3], y[::3] + 1), project=str(tmp_path), **FAST)


def test_a_callback_need_not_subclass_callback_nor_be_in_a_list(tag_run):
    _, cb = tag_run
    assert cb.rows == [1]  # its on_epoch_end was called; the hooks it lacks were not


@pytest.mark.parametrize("bad, match", [
    (lambda t, row: None, r"^callbacks: the function <lambda> is not a callback: give an object with "
                          r"on_epoch_end\(self, trainer, row\)"),
    (KerasStyle, r"^callbacks: KerasStyle is a class: pass an instance, KerasStyle\(\)$"),
    ("print", r"^callbacks: a str is not a callback"),
])
def test_a_function_class_or_other_object_is_refused_as_a_callback(arrays, tmp_path, bad, match):
    x, y = arrays
    _refused(match, data=(x, y), callbacks=[bad], project=str(tmp_path), **FAST)
    assert not any(tmp_path.iterdir())  # refused before the run folder was made


def test_a_hook_with_the_wrong_arguments_is_refused_before_training(arrays, tmp_path):
    class OneArg:
        def on_epoch_end(self, logs):  # imgclf passes (trainer, row)
            pass

    x, y = arrays
    _refused(r"^callbacks: OneArg.on_epoch_end cannot take \(trainer, row\), .* on_epoch_end\(self, trainer, row\)$",
             data=(x, y), callbacks=OneArg(), project=str(tmp_path), **FAST)


def test_callback_is_exported_and_documents_its_hooks():
    from imgclf.engine.callbacks import Callback

    assert imgclf.Callback is Callback and "Callback" in dir(imgclf)
    for hook in ("on_train_start(t)", "on_epoch_start(t, epoch)", "on_step_end(t)", "on_epoch_end(t, row)",
                 "on_train_end(t)", "t.stop"):
        assert hook in Callback.__doc__
