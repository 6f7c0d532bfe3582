"""The Python API as a Keras/fastai notebook uses it (s33): arrays reach lr-find and a sweep's study
dict as they reach train, and Ctrl-C while a run finishes says how to resume it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import imgclf

TINY = {"channels": [8], "dense": [16]}


@pytest.fixture(scope="module")
def arrays(small_sample) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """x_train (N x 32 x 32 x 3 uint8), y_train (indices) and the class names, as a notebook loads them."""
    classes = sorted(p.name for p in (small_sample / "train").iterdir())
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted((small_sample / "train" / c).glob("*.jpg"))[:20]:
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(i)
    return np.stack(xs), np.array(ys), classes


def test_find_lr_takes_arrays(arrays):
    from imgclf.engine.lr_find import NoDescentError
    from imgclf.models.commands import find_lr

    x, y, classes = arrays
    # was "option 'data': Input should be a valid string (got (array([[[[...": the whole array printed
    try:
        res = find_lr(data=(x, y, classes), model="plaincnn", model_args=TINY, batch_size=32, steps=6, out=None,
                      progress=False)
    except NoDescentError as e:  # 6 steps may well be noise: the sweep ran on the arrays all the same
        res = e.result
    assert len(res.lrs) >= 5
    with pytest.raises(imgclf.UserError, match=r"data: 3 labels \(shape \(3,\)\) for 200 images"):
        find_lr(data=(x, y[:3]), model="plaincnn", steps=6, out=None, progress=False)


def test_sweep_study_dict_takes_arrays(arrays, tmp_path):
    x, y, classes = arrays
    study = {"name": "arr", "directory": str(tmp_path / "studies"),
             "base": {"data": (x, y, classes), "model": "plaincnn", "model_args": TINY, "epochs": 1,
                      "batch_size": 32, "progress": False, "tensorboard": False},
             "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
             "sampler": {"type": "random"}, "pruner": "none", "n_trials": 1, "seed": 0}
    # was refused with the arrays' printed text ("Input should be a valid string (got ['[[[[245 ...")
    res = imgclf.sweep(study)
    assert res.best_value is not None and (res.best_run / "model.safetensors").is_file()
    assert imgclf.load(res.best_run).classes == classes
    assert isinstance(study["base"]["data"], tuple)  # the caller's dict is as it was


def test_ctrl_c_while_finishing_says_how_to_resume(arrays, tmp_path, monkeypatch, capsys):
    import imgclf.api

    x, y, classes = arrays

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(imgclf.api, "_evaluate_cached", interrupted)  # Ctrl-C in the closing evaluation
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(data=(x, y, classes), model="plaincnn", model_args=TINY, epochs=1, batch_size=32,
                     project=str(tmp_path), name="r", progress=False, tensorboard=False)
    run = tmp_path / "r"
    assert f"stopped: continue with imgclf.train(resume={str(run)!r})" in capsys.readouterr().err
    monkeypatch.undo()
    res = imgclf.train(resume=run)  # the advice works: the ending is done again
    assert res.test is not None and (run / "summary.json").is_file()


def test_classes_name_the_index_labels_of_arrays_and_keras_names_are_pointed_to(arrays, tmp_path):
    # classes=[...] beside data=(x, y) (a Keras user's class_names) was taken for --classes, a subset,
    # and refused as 'not in .../arrays-<hash>.npz'; x=, verbose=, val= were only 'unknown option'
    x, y, classes = arrays
    res = imgclf.train(data=(x, y), classes=classes, model="plaincnn", model_args=TINY, epochs=1, batch_size=32,
                       project=str(tmp_path), progress=False, tensorboard=False, tta=False)
    assert imgclf.load(res.run_dir).classes == classes
    onehot = np.eye(len(classes), dtype=np.float32)[y]
    res = imgclf.train(data=(x, onehot), classes=",".join(classes), model="plaincnn", model_args=TINY, epochs=1,
                       batch_size=32, project=str(tmp_path), progress=False, tensorboard=False, tta=False)
    assert imgclf.load(res.run_dir).classes == classes
    for key, said in (("x", r"data'=\(x_train, y_train\)"), ("verbose", "did you mean 'progress'"),
                      ("val", "did you mean 'val_data'")):
        with pytest.raises(imgclf.UserError, match=f"unknown option '{key}'.*{said}"):
            imgclf.train(data=(x, y), project=str(tmp_path), progress=False, **{key: 1})


def test_confused_pair_examples_are_ordered_by_the_probability_their_captions_show(sample_dir):
    # the examples were sorted by the softmax at temperature 1 but captioned at the run's: a run
    # with temperature 10 listed 'pred dog 0.14' above 'pred dog 0.51'
    import torch

    from imgclf.evaluate.report import SplitSample, section_confused_pairs

    classes = sorted(p.name for p in (sample_dir / "test").iterdir())
    cat, dog = classes.index("cat"), classes.index("dog")
    files = sorted((sample_dir / "test" / "cat").glob("*.jpg"))[:2]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    logits = torch.full((2, len(classes)), -300.0)
    logits[0, cat], logits[0, dog] = 0.0, 0.5  # a narrow margin over one class: 0.51 at temperature 10
    logits[1] = 0.0
    logits[1, dog] = 4.0  # a wide margin over nine: first at temperature 1 (0.86), 0.14 at temperature 10
    s = SplitSample("test", images, np.full(2, cat), logits, [str(f) for f in files])
    s.of = 2
    body = section_confused_pairs(None, s, classes, 10.0)
    assert "pred dog 0.51" in body and "pred dog 0.14" in body
    assert body.index(str(files[0])) < body.index(str(files[1]))


def test_classes_may_name_a_last_class_without_images_and_sweep_takes_data_arrays(arrays, tmp_path):
    # y = 0..8 with ten names was refused as '--classes: ... not in .../arrays-<hash>.npz'; and
    # imgclf.sweep(study, data=(x, y)) was 'File name too long' with the arrays printed
    from imgclf.api import _class_names_for_arrays

    x, y, classes = arrays
    assert _class_names_for_arrays((x, y[y < 9]), classes) == classes
    assert _class_names_for_arrays((x, y), ["0", "1"]) is None  # label values: a subset, as --classes means
    study = {"name": "kw", "directory": str(tmp_path / "studies"),
             "base": {"model": "plaincnn", "model_args": TINY, "epochs": 1, "batch_size": 32, "progress": False,
                      "tensorboard": False},
             "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
             "sampler": {"type": "random"}, "pruner": "none", "n_trials": 1, "seed": 0}
    res = imgclf.sweep(study, data=(x, y, classes))
    assert res.best_value is not None and imgclf.load(res.best_run).classes == classes
