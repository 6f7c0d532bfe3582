"""The Python API as a notebook uses it: one long-lived process, imgclf imported once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.errors import UserError


@pytest.fixture(scope="module")
def small_result(small_sample, tmp_path_factory):
    return imgclf.train(data=str(small_sample), project=str(tmp_path_factory.mktemp("nb-runs")), name="nb", epochs=1,
                        batch_size=64, progress=False, tensorboard=False, final_eval=False)


def test_import_is_light_and_the_namespace_is_the_api():
    # torch (1-2 s) is loaded when the API is first used, not by `import imgclf`, which the
    # command line pays on every start, --help included
    code = (
        "import json, sys, importlib.metadata as md, imgclf\n"
        "out = {'torch': 'torch' in sys.modules, 'dir': dir(imgclf), 'version': imgclf.__version__ == md.version('imgclf')}\n"
        "train = imgclf.train\n"  # imports imgclf.api, which loads the imgclf.evaluate sub-package
        "out['same'] = [getattr(imgclf, n) is getattr(imgclf.api, n) for n in ('train', 'predict', 'load')]\n"
        # imgclf.evaluate: the function's signature, and still the package its modules are imported from
        "import inspect, imgclf.evaluate.metrics as m\n"
        "out['evaluate'] = [str(inspect.signature(imgclf.evaluate)) == str(inspect.signature(imgclf.api.evaluate)),\n"
        "                   callable(imgclf.evaluate), m.__name__, imgclf.evaluate.metrics is m]\n"
        "out['errors'] = imgclf.UserError is imgclf.errors.UserError\n"
        "from imgclf import Classifier, TrainResult\n"
        "try:\n"
        "    imgclf.nonexistent\n"
        "except AttributeError as e:\n"
        "    out['missing'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["torch"] is False
    assert out["dir"] == sorted(["Callback", "Classifier", "SweepResult", "TrainResult", "UserError", "__version__",
                                 "evaluate", "load", "predict", "sweep", "train"])
    assert out["version"] and out["same"] == [True] * 3 and out["errors"]
    assert out["evaluate"] == [True, True, "imgclf.evaluate.metrics", True]
    assert out["missing"] == "module 'imgclf' has no attribute 'nonexistent'"


def test_load_takes_what_train_returned(small_result, small_sample):
    path = sorted((small_sample / "test" / "frog").glob("*.jpg"))[0]
    by_result = imgclf.load(small_result).predict_proba([path])
    by_folder = imgclf.load(small_result.run_dir).predict_proba([path])
    assert by_result.shape == (1, 10) and np.array_equal(by_result, by_folder)
    assert imgclf.predict(small_result, [path], top_k=1)[0]["top"][0][0] == imgclf.load(small_result).classes[
        int(by_result.argmax())]


@pytest.mark.parametrize("bad", [42, None, ["runs/x"]])
def test_a_run_that_is_not_a_folder_is_one_line(bad):
    with pytest.raises(UserError, match=r"^a run is given as its folder \(a str or Path, or what imgclf.train "
                                        rf"returned\), not {type(bad).__name__}$"):
        imgclf.load(bad)


def test_notebook_inputs_to_predict(small_result, small_sample):
    clf = imgclf.load(small_result)
    paths = sorted((small_sample / "test" / "cat").glob("*.jpg"))[:3]
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    ref = clf.predict_proba(paths)
    for x in (arr, arr / 255.0, [Image.open(p) for p in paths], [str(paths[0]), arr[1], Image.open(paths[2])]):
        assert np.allclose(clf.predict_proba(x), ref, atol=1e-5)
    assert clf.predict_proba([]).shape == (0, 10) and clf.predict([]) == []
    with pytest.raises(UserError, match="no such file"):
        clf.predict([Path(paths[0]).with_name("missing.jpg")])


def test_a_notebook_call_leaves_the_process_as_it_was_and_speaks_python(small_sample, tmp_path, capsys):
    import torch

    from imgclf.engine.callbacks import Callback

    class CtrlC(Callback):  # after epoch 1's checkpoint, as a user's interrupt of the kernel
        def on_epoch_end(self, t, row):
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    precision = torch.get_float32_matmul_precision()
    with pytest.raises(KeyboardInterrupt):  # pathlib paths, as a notebook builds them
        imgclf.train(data=Path(small_sample), project=tmp_path, name="cut", epochs=2, batch_size=64,
                     progress=False, tensorboard=False, callbacks=[CtrlC()])
    # the notebook's own random numbers go on as if train had not run (it seeds everything)
    assert np.random.rand() == expected and torch.get_float32_matmul_precision() == precision
    assert f"stopped: continue with imgclf.train(resume='{tmp_path / 'cut'}')" in capsys.readouterr().err
    res = imgclf.train(resume=tmp_path / "cut", progress=False)
    assert repr(res) == f"TrainResult(run_dir='{tmp_path / 'cut'}', epochs=2, test top-1 {res.test['top1']:.4f} (n=100))"
    clf = imgclf.load(res)
    assert repr(clf).startswith("Classifier(fastnet, 10 classes [airplane, automobile, bird, cat, deer, ...], 32px")
    assert re.search(r", precision=(fp32|bfloat16|float16)\)$", repr(clf)), repr(clf)  # not Precision(dtype=None)
    assert imgclf.evaluate(res, data=Path(small_sample), progress=False)["n"] == 100

    paths = sorted(str(p) for p in (small_sample / "test" / "cat").glob("*.jpg"))[:3]
    assert [r["input"] for r in clf.predict(np.array(paths))] == paths  # a DataFrame column's .values
    with pytest.raises(UserError, match="predict takes files, .* not int"):
        clf.predict(42)
    normalised = [np.random.default_rng(i).normal(size=(32, 32, 3)).astype(np.float32) for i in range(12)]
    capsys.readouterr()
    out = clf.predict(normalised)
    assert all("error" in r for r in out)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[-1] == ("imgclf: warning: 7 more of the 12 inputs could not be read "
                                         "(their results hold an 'error' entry)")
    with pytest.raises(UserError, match=r"is a folder: the first argument is a YAML config; pass the data as "
                                        r"imgclf.train\(data="):
        imgclf.train(str(small_sample))


def test_the_result_names_its_run_wherever_the_notebook_goes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = imgclf.TrainResult(Path("runs") / "x", [])  # as train makes it for the default project, runs/
    monkeypatch.chdir("/")
    assert res.run_dir == tmp_path / "runs" / "x"
