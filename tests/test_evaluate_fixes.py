"""Evaluation and prediction agree with training: TTA views, splits scored, metrics, caches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import imgclf
from imgclf.config import make_config
from imgclf.data.augment import tta_views
from imgclf.errors import UserError
from imgclf.evaluate.metrics import classification_metrics

FAST = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def test_tta_views_leave_out_mirrors_for_models_trained_without_flips():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    for level, n_flip, n_plain in ((1, 2, 1), (2, 6, 3)):
        with_flip, without = tta_views(x, level), tta_views(x, level, flip=False)
        assert (len(with_flip), len(without)) == (n_flip, n_plain)
        assert sum(w for _, w in with_flip) == pytest.approx(1) and sum(w for _, w in without) == pytest.approx(1)
        assert any(torch.equal(v, x.flip(3)) for v, _ in with_flip)
        assert not any(torch.equal(v, x.flip(3)) for v, _ in without)


def test_a_run_without_flips_is_evaluated_and_predicted_without_mirrors(small_sample, tmp_path, monkeypatch):
    from imgclf.evaluate import inference

    res = imgclf.train(data=str(small_sample), project=str(tmp_path), flip=False, **FAST)
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert meta["tta_flip"] is False and meta["tta_level"] == 2
    seen = []
    real = inference.tta_views
    monkeypatch.setattr(inference, "tta_views", lambda x, level, flip=True: seen.append(flip) or real(x, level, flip))
    imgclf.evaluate(res.run_dir, str(small_sample), progress=False)
    imgclf.load(res.run_dir).predict(sorted((small_sample / "test" / "cat").glob("*.jpg"))[:2], tta=True)
    assert seen and not any(seen)


def test_predict_tta_on_a_run_trained_without_tta_matches_evaluate(tiny_run, sample_dir, tmp_path):
    from imgclf.api import _tta_level_for

    assert [_tta_level_for({"tta_level": 0}, t) for t in (None, True, False)] == [0, 1, 0]
    assert [_tta_level_for({"tta_level": 2}, t) for t in (None, True, False)] == [2, 2, 0]
    # a run trained with --no-tta (model.json's tta_level 0): predict --tta and evaluate --tta
    # take the same views, so they score the test split alike, and differently from one view
    run = tmp_path / "no-tta"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "tta_level": 0}))
    m = imgclf.evaluate(run, str(sample_dir), tta=True, progress=False)
    files = sorted((sample_dir / "test").glob("*/*.jpg"))
    clf = imgclf.load(run, precision="auto")  # evaluate's precision (predict's default is fp32)
    with_tta, plain = clf.predict(files, top_k=1, tta=True), clf.predict(files, top_k=1)
    hits = np.mean([r["top"][0][0] == f.parent.name for r, f in zip(with_tta, files)])
    assert m["n"] == len(files) and hits == pytest.approx(m["top1"], abs=2 / len(files))
    assert any(a["top"][0][1] != pytest.approx(b["top"][0][1], abs=1e-4) for a, b in zip(with_tta, plain))


def test_macro_f1_counts_predicted_classes_that_have_no_test_images():
    labels = np.array([0, 0, 1, 1, 0])
    pred = np.array([2, 0, 1, 1, 0])  # one class-0 image called class 2, which has no test images
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 3).float()
    m = classification_metrics(logits, torch.from_numpy(labels), ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["macro_f1"] < 0.65  # the old mean over classes with test images said 0.9


def test_evaluate_data_with_a_val_folder_but_no_test_scores_val(tiny_run, sample_dir, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(sample_dir / "test", data / "train")
    shutil.copytree(sample_dir / "test", data / "val")
    for f in sorted((data / "val").glob("*/*.jpg"))[::2]:
        f.unlink()  # val keeps half the images: the count says which split was scored
    m = imgclf.evaluate(tiny_run, str(data), progress=False)
    assert m["split"] == "val" and m["n"] == len(list((data / "val").glob("*/*.jpg")))


def test_evaluate_with_no_readable_image_is_one_line_error(tiny_run, tmp_path):
    data = tmp_path / "broken"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        (data / c / "x.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(UserError, match="no readable images to evaluate"):
        imgclf.evaluate(tiny_run, str(data), progress=False)


def test_evaluate_reuses_the_cache_folder_the_run_trained_with(small_sample, tmp_path, monkeypatch):
    cache = tmp_path / "own-cache"
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), cache_dir=str(cache), **FAST)
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "default-cache"))
    before = sorted(p.name for p in (cache / "images").iterdir())
    imgclf.evaluate(res.run_dir, progress=False)  # its own test split, already decoded in its cache
    assert sorted(p.name for p in (cache / "images").iterdir()) == before
    assert not (tmp_path / "default-cache").exists()


def test_yaml_class_list_is_taken_like_the_flag(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(f"data: {tmp_path}\nclasses: [person, dog]\n")
    assert make_config(y).classes == "person,dog"


def test_explain_gives_each_image_its_own_file(tiny_run, sample_dir, tmp_path):
    from imgclf.evaluate.explain import explain

    f = sorted((sample_dir / "test" / "cat").glob("*.jpg"))[0]
    copies = []
    for split in ("train", "val", "test"):
        d = tmp_path / "in" / split / "cat"
        d.mkdir(parents=True)
        shutil.copy(f, d / f.name)
        copies.append(d / f.name)
    out = explain(tiny_run, copies, out=tmp_path / "out")
    assert len({r["output"] for r in out}) == 3


def test_an_unwritable_evaluate_out_is_one_line_before_any_image_is_scored(tiny_run, sample_dir, tmp_path, monkeypatch):
    import imgclf.api as api

    scored = []
    monkeypatch.setattr(api, "_evaluate_cached", lambda *a, **k: scored.append(1))
    taken = tmp_path / "results.json"
    taken.write_text("{}")  # --out names a folder: an existing file there was a traceback after the scoring
    with pytest.raises(UserError, match=r"--out .*results.json: cannot write the evaluation there \(.* not a folder"):
        imgclf.evaluate(tiny_run, str(sample_dir / "test"), out=taken, progress=False)
    with pytest.raises(UserError, match=r"--out /proc/imgclf: cannot write the evaluation there"):
        imgclf.evaluate(tiny_run, str(sample_dir / "test"), out="/proc/imgclf", progress=False)
    assert not scored and taken.read_text() == "{}"


def test_evaluate_says_which_classes_the_data_has_no_images_of(tiny_run, sample_dir, tmp_path, capfd):
    """Three of ten classes: seven rows of support 0, and a macro F1 far under top-1 when the
    model predicts absent classes; one line says why."""
    data = tmp_path / "three"
    for c in ("cat", "dog", "ship"):
        shutil.copytree(sample_dir / "test" / c, data / c)
    m = imgclf.evaluate(tiny_run, str(data), progress=False)
    err = capfd.readouterr().err
    assert "7 of the model's 10 classes have no images in" in err and "airplane, automobile, bird" in err
    predicted = np.asarray(m["confusion"]).sum(0)
    wrong = sum(1 for i, r in enumerate(m["per_class"]) if r["support"] == 0 and predicted[i] > 0)
    assert (f"{wrong} of them were predicted" in err) == (wrong > 0)
