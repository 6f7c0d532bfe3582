"""Inputs a new user brings that the happy path never sees: arrays in other layouts and scales,
output paths that cannot be written, run folders that are damaged or half made, a run name with
a slash, classes that change under --resume. Each is read correctly or refused in one line,
before any work is wasted and without losing what exists."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

import imgclf
from imgclf.cli import main
from imgclf.errors import UserError


def _one_image(sample_dir):
    from PIL import Image

    f = sorted((sample_dir / "test").glob("*/*.jpg"))[5]
    return f, np.asarray(Image.open(f).convert("RGB"))


def _top(r):
    return [c for c, _ in r["top"]], np.array([p for _, p in r["top"]])


def test_tensors_channels_first_grey_batches_and_nested_lists_predict_like_the_file(tiny_run, sample_dir):
    f, rgb = _one_image(sample_dir)
    clf = imgclf.load(tiny_run)
    ref_c, ref_p = _top(clf.predict([f])[0])
    chw = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255  # torchvision's ToTensor layout
    cases = {
        "tensor CxHxW": clf.predict(chw),
        "tensor NxCxHxW": clf.predict(torch.stack([chw, chw])),
        "numpy NxCxHxW": clf.predict(np.stack([rgb, rgb]).transpose(0, 3, 1, 2)),
        "nested lists": clf.predict(rgb.tolist()),  # int64 values 0..255
        "float -1..1": clf.predict(rgb / 127.5 - 1.0),  # Keras' 'tf' preprocess_input
    }
    for what, out in cases.items():
        assert out and all("error" not in r for r in out), (what, out)
        c, p = _top(out[0])
        assert c == ref_c and np.allclose(p, ref_p, atol=0.02), what
    grey = rgb.mean(2).astype(np.uint8)
    assert len(clf.predict(np.stack([grey] * 5))) == 5  # N x H x W: MNIST's x_test
    with pytest.raises(UserError, match="ambiguous"):
        clf.predict(np.stack([grey] * 3))  # 3 grey images, or one channels-first image?
    # one grey image as (1, H, W) reads the same either way: x_test[:1] was refused as ambiguous
    one = clf.predict(grey[None])
    (c1, p1), (c5, p5) = _top(one[0]), _top(clf.predict(np.stack([grey] * 5))[0])
    assert len(one) == 1 and c1 == c5 and np.allclose(p1, p5, atol=1e-5)


def test_normalised_floats_and_bad_top_k_are_refused_not_guessed(tiny_run, sample_dir):
    _, rgb = _one_image(sample_dir)
    clf = imgclf.load(tiny_run)
    imagenet = (rgb / 255.0 - 0.45) / 0.225  # mean/std normalised: the statistics are unknown here
    out = clf.predict(imagenet)
    assert "undo any mean/std normalisation" in out[0]["error"]
    with pytest.raises(ValueError, match="top_k"):
        clf.predict(rgb, top_k=0)


def test_predict_proba_converts_what_it_is_given_like_predict(tiny_run, sample_dir):
    from PIL import Image

    f, rgb = _one_image(sample_dir)
    clf = imgclf.load(tiny_run)
    ref = clf.predict_proba(rgb[None])
    assert ref.shape == (1, len(clf.classes))
    np.testing.assert_allclose(clf.predict_proba(rgb / 255.0), ref, atol=0.02)  # float, one image
    big = np.asarray(Image.fromarray(rgb).resize((96, 96), Image.BICUBIC))  # not the model's 32 px
    np.testing.assert_allclose(clf.predict_proba(big[None]), clf.predict_proba(clf.preprocess(big)[None]), atol=1e-6)
    with pytest.raises(ValueError, match="undo any mean/std"):
        clf.predict_proba((rgb / 255.0 - 0.5) / 0.2)
    with pytest.raises(imgclf.UserError, match="undo any mean/std"):  # was a ValueError only
        clf.predict_proba((rgb / 255.0 - 0.5) / 0.2)


def test_predict_output_is_checked_before_any_image_is_classified(tiny_run, sample_dir, tmp_path, capsys,
                                                                  monkeypatch):
    f, _ = _one_image(sample_dir)
    calls = []
    real = imgclf.api.Classifier.predict
    monkeypatch.setattr(imgclf.api.Classifier, "predict", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    (tmp_path / "adir").mkdir()
    for bad, why in ((tmp_path / "adir", "is a folder"), (tmp_path / "p.txt", ".csv or .json"),
                     (tmp_path / "afile" / "p.csv", "cannot write there")):
        (tmp_path / "afile").write_text("x")
        assert main(["predict", str(tiny_run), str(f), "--output", str(bad)]) == 2
        assert why in capsys.readouterr().err
    assert not calls
    out = tmp_path / "new" / "deeper" / "p.csv"  # a missing folder is made
    assert main(["predict", str(tiny_run), str(f), "--output", str(out)]) == 0
    assert out.read_text().splitlines()[0].startswith("input,error,class1,prob1")
    with pytest.raises(SystemExit):
        main(["predict", str(tiny_run), str(f), "--top-k", "-2"])
    assert "expected a whole number >= 1" in capsys.readouterr().err


def test_damaged_and_half_made_run_folders_say_what_they_are(tiny_run, tmp_path, sample_dir):
    f, _ = _one_image(sample_dir)
    cut = tmp_path / "cut"
    shutil.copytree(tiny_run, cut)
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 3])
    with pytest.raises(UserError, match="damaged or incomplete"):
        imgclf.load(cut)
    nokeys = tmp_path / "nokeys"
    shutil.copytree(tiny_run, nokeys)
    meta = json.loads((nokeys / "model.json").read_text())
    del meta["architecture"]
    (nokeys / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="incomplete: no architecture"):
        imgclf.load(nokeys)
    early = tmp_path / "early"  # killed while decoding: a config, no checkpoint
    early.mkdir()
    shutil.copy(tiny_run / "config.yaml", early / "config.yaml")
    with pytest.raises(UserError, match="before its first checkpoint") as e:
        imgclf.load(early)
    assert "--resume" not in str(e.value) and "--exist-ok" not in str(e.value)  # the same command does it
    with pytest.raises(UserError, match="not a run folder"):
        imgclf.load(f)  # an image given where the run goes


def test_run_names_and_project_folders_are_checked_before_decoding(small_sample, tmp_path, monkeypatch):
    import imgclf.api as api

    monkeypatch.setattr(api, "_cache_splits", lambda *a, **k: pytest.fail("decoded before the check"))
    for name in ("../x", "a/b"):
        with pytest.raises(UserError, match="one folder name"):
            imgclf.train(data=str(small_sample), project=str(tmp_path / "runs"), name=name)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is not a folder"):
        imgclf.train(data=str(small_sample), project=str(tmp_path / "afile" / "runs"))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(small_sample, tmp_path):
    project = tmp_path / "runs"
    with pytest.raises(UserError, match="widht"):
        imgclf.train(data=str(small_sample), project=str(project), name="r", epochs=1, progress=False,
                     tensorboard=False, model_args={"widht": 2})
    assert not (project / "r").exists()  # the same command, corrected, is not told the name exists
    res = imgclf.train(data=str(small_sample), project=str(project), name="r", epochs=1, progress=False,
                       tensorboard=False)
    assert (res.run_dir / "model.safetensors").exists()


class _KillAtEpoch:
    """Stops training as a kill would, once ``epoch`` epochs are checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_start(self, t): ...
    def on_step_end(self, t): ...
    def on_epoch_end(self, t, row): ...
    def on_train_end(self, t): ...
    def state_dict(self): return {}
    def load_state_dict(self, state): ...

    def on_epoch_start(self, t, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_after_a_class_was_added_names_it_and_time_counts_every_epoch(small_sample, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(small_sample, data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(data="data", project="runs", name="k", epochs=3, progress=False, tensorboard=False,
                     callbacks=[_KillAtEpoch(2)])
    run = tmp_path / "runs" / "k"
    assert (run / "last.pt").exists()  # a stop after a checkpoint keeps the folder
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(data)  # relative --data stored absolute: later commands run from anywhere
    first = sorted(p.name for p in (data / "train").iterdir())[0]
    shutil.copytree(data / "train" / first, data / "train" / "emu")
    with pytest.raises(UserError, match="classes changed.*added emu"):
        imgclf.train(resume=run)
    shutil.rmtree(data / "train" / "emu")
    monkeypatch.chdir(run)  # resumed from elsewhere: the stored path still finds the data
    imgclf.train(resume=run)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    epoch_s = sum(float(r["seconds"]) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_seconds"] >= epoch_s, (summary, epoch_s)  # the epochs before the stop count too


def test_val_split_beside_a_val_folder_is_reported_unused(small_sample, tmp_path):
    from imgclf.data.sources import load_source

    data = tmp_path / "d"
    shutil.copytree(small_sample / "train", data / "train")
    shutil.copytree(small_sample / "test", data / "val")
    src = load_source(str(data), val_split=0.3, cache_dir=tmp_path / "cache")
    assert len(src.val) == len(list((data / "val").rglob("*.jpg")))
    assert any("--val-split 0.3 is not used" in p for p in src.problems)
    assert not any("--val-split" in p for p in load_source(str(data), cache_dir=tmp_path / "cache").problems)  # the default says nothing


def test_evaluate_names_the_model_class_a_misnamed_folder_means(tiny_run, sample_dir, tmp_path):
    classes = json.loads((tiny_run / "model.json").read_text())["classes"]
    data = tmp_path / "t"
    for c, as_ in ((classes[0], classes[0].capitalize()), (classes[1], classes[1] + "s"), (classes[2], "zebra")):
        shutil.copytree(sample_dir / "test" / c, data / as_)
    with pytest.raises(UserError) as info:
        imgclf.evaluate(tiny_run, str(data), progress=False)
    msg = str(info.value)
    assert f"{classes[0].capitalize()} (the model has {classes[0]})" in msg
    assert f"{classes[1]}s (the model has {classes[1]})" in msg
    assert "zebra," not in msg and "zebra;" in msg and "\n" not in msg  # no near name: listed as it is


def test_run_folders_on_a_file_system_without_locks_still_train(tmp_path, monkeypatch):
    # some NFS mounts answer flock with ENOLCK: that is no lock to take, not a run in progress
    import errno
    import fcntl
    import os

    from imgclf.runs import _HELD, hold_run, release_runs

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    hold_run(tmp_path)
    assert not _HELD
    monkeypatch.undo()
    hold_run(tmp_path)
    assert list(_HELD) == [os.path.realpath(tmp_path)]
    release_runs()
    assert not _HELD
