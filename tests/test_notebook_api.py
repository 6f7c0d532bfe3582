"""The Python API as a notebook uses it: one long-lived process, imgclf imported once."""

from __future__ import annotations

import json
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
        "out['same'] = [getattr(imgclf, n) is getattr(imgclf.api, n) for n in ('train', 'evaluate', 'predict', 'load')]\n"
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
    assert out["dir"] == sorted(["Classifier", "TrainResult", "UserError", "__version__", "evaluate", "load",
                                 "predict", "train"])
    assert out["version"] and out["same"] == [True] * 4 and out["errors"]
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
