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
