"""Temperature scaling and ECE: the maths on known cases, and a real run's validation logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from imgclf.evaluate.calibrate import (
    calibration_record,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    softmax_np,
    source_from_config,
    split_logits,
)


def test_ece_of_perfectly_calibrated_and_overconfident_predictions():
    # 80% confident and right 80% of the time: calibrated
    probs = np.tile([[0.8, 0.2]], (100, 1))
    labels = np.array([0] * 80 + [1] * 20)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)
    # 99% confident, right half the time: gap 0.49
    probs = np.tile([[0.99, 0.01]], (100, 1))
    labels = np.array([0] * 50 + [1] * 50)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.49, abs=1e-9)
    b = reliability_bins(probs, labels)
    assert b["count"].sum() == 100 and b["count"][-1] == 100


def test_fit_temperature_recovers_the_temperature_that_made_logits_overconfident():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]  # labels drawn from softmax(z)
    t = fit_temperature(z * 3, labels)  # a model 3x too sharp
    assert t == pytest.approx(3.0, rel=0.1)
    rec = calibration_record(z * 3, labels, t, "val")
    assert rec["ece_after"] < rec["ece_before"] / 3 and rec["nll_after"] < rec["nll_before"]


def _eval_splits(run):
    from imgclf.config import make_config
    from imgclf.data.cache import build_cache, cache_root
    from imgclf.runs import load_model

    model, meta = load_model(run)
    cfg = make_config(run / "config.yaml")
    root = cache_root(cfg.cache_dir)
    src = source_from_config(cfg, root)
    out = {}
    for k in ("val", "test"):
        cs = build_cache(src.splits()[k], meta["image_size"], meta["resize"], root / "images", progress=False)
        out[k] = split_logits(model, meta, cs, torch.device("cpu"))
    return meta, out


def test_training_stores_a_temperature_that_lowers_ece_on_real_logits(tiny_run):
    meta = json.loads((tiny_run / "model.json").read_text())
    cal = meta["calibration"]
    assert cal["split"] == "val" and cal["n"] == 300 and cal["bins"] == 15
    assert meta["temperature"] == cal["temperature"] != 1.0
    assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] < cal["nll_before"]

    # recomputed independently from the run's own validation images; and it carries to the test split
    meta, logits = _eval_splits(tiny_run)
    t = meta["temperature"]
    for split in ("val", "test"):
        z, y = logits[split]
        before = expected_calibration_error(softmax_np(z), y.numpy())
        after = expected_calibration_error(softmax_np(z, t), y.numpy())
        assert after < before, (split, before, after)
    z, y = logits["val"]
    assert fit_temperature(z, y) == pytest.approx(t, rel=1e-3)


def test_predict_divides_logits_by_the_stored_temperature(tiny_run, sample_dir):
    import imgclf

    clf = imgclf.load(tiny_run, device="cpu")
    t = clf.meta["temperature"]
    img = clf.preprocess(sorted((sample_dir / "test" / "cat").glob("*.jpg"))[0])[None]
    p = clf.predict_proba(img)
    clf.meta = {**clf.meta, "temperature": 1.0}
    p1 = clf.predict_proba(img)
    assert p.argmax() == p1.argmax()
    assert (p.max() > p1.max()) == (t < 1.0)  # T < 1 sharpens, T > 1 softens


def test_calibrate_command_refits_and_rewrites_model_json(tiny_run, tmp_path, capsys):
    from imgclf.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["temperature"], meta["calibration"] = 1.0, None
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["calibrate", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "temperature" in out and "ECE" in out
    new = json.loads((run / "model.json").read_text())
    assert new["temperature"] == pytest.approx(json.loads((tiny_run / "model.json").read_text())["temperature"], rel=1e-3)


def test_calibrate_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    from imgclf.cli import main

    assert main(["calibrate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and len(err.strip().splitlines()) == 1


def test_tta_scores_get_their_own_temperature(tiny_run, sample_dir, tmp_path):
    # averaging test-time views shrinks the logits: a run with TTA fits a second temperature on
    # its val split's averaged views, and evaluate (the run's views) and predict --tta use it
    import imgclf
    from imgclf.api import temperature_for
    from imgclf.config import make_config
    from imgclf.data.cache import build_cache
    from imgclf.evaluate.calibrate import run_cache_root
    from imgclf.runs import load_model

    meta = json.loads((tiny_run / "model.json").read_text())
    assert meta["tta_level"] == 2 and meta["calibration"]["tta_level"] == 2
    assert meta["temperature_tta"] == meta["calibration"]["temperature_tta"] != meta["temperature"]
    assert meta["calibration"]["ece_after_tta"] < meta["calibration"]["ece_before_tta"]
    assert "tta_level_tta" not in meta["calibration"]  # the TTA record's own level-0 field, not a figure
    model, meta = load_model(tiny_run, torch.device("cpu"))
    src = source_from_config(make_config(tiny_run / "config.yaml"), run_cache_root(tiny_run))
    cs = build_cache(src.val, meta["image_size"], meta["resize"], run_cache_root(tiny_run) / "images", progress=False)
    z, y = split_logits(model, meta, cs, torch.device("cpu"), tta_level=2)
    assert fit_temperature(z, y) == pytest.approx(meta["temperature_tta"], rel=1e-3)
    assert [temperature_for(meta, level) for level in (0, 1, 2)] == \
        [meta["temperature"], meta["temperature"], meta["temperature_tta"]]  # level 1 was not fitted
    # evaluate's NLL is that of the TTA logits divided by the TTA temperature
    m = imgclf.evaluate(tiny_run, str(sample_dir), progress=False, out=tmp_path)
    test = build_cache(src.test, meta["image_size"], meta["resize"], run_cache_root(tiny_run) / "images",
                       progress=False)
    zt, yt = split_logits(model, meta, test, torch.device("cpu"), tta_level=2)
    nll = torch.nn.functional.cross_entropy(zt / meta["temperature_tta"], yt).item()
    assert m["tta_level"] == 2 and m["nll"] == pytest.approx(nll, rel=2e-3)


def test_tta_temperature_is_fitted_on_a_bounded_sample(tiny_run, tmp_path, monkeypatch):
    # views x images is paid for inside a --time-limit budget: the TTA fit takes at most
    # TTA_FIT_LIMIT val images, evenly spaced; the single-view fit keeps them all
    from imgclf.evaluate import calibrate

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(calibrate, "TTA_FIT_LIMIT", 100)
    rec = calibrate.calibrate_run(run, device="cpu", progress=False)
    assert rec["n"] == 300 and rec["n_tta"] == 100 and rec["temperature_tta"] > 0


def _copy_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def test_calibrate_data_fits_on_its_val_else_its_test_split_not_the_training_images(tiny_run, sample_dir, tmp_path,
                                                                                   capsys):
    # the sample has train/ (what the run learned) and test/: the temperature is fitted on test/
    from imgclf.cli import main
    from imgclf.evaluate.calibrate import calibrate_run

    run = _copy_run(tiny_run, tmp_path)
    assert main(["calibrate", str(run), "--data", str(sample_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"fitted on test split of {sample_dir} (n=1000)" in out
    # a val/ folder is preferred to test/: that is what a temperature is fitted on
    root = tmp_path / "with_val"
    for cdir in sorted((sample_dir / "test").iterdir()):
        (root / "val" / cdir.name).mkdir(parents=True)
        for f in sorted(cdir.glob("*.jpg"))[:10]:
            shutil.copy(f, root / "val" / cdir.name / f.name)
    for split in ("train", "test"):
        (root / split).symlink_to(sample_dir / split, target_is_directory=True)
    rec = calibrate_run(run, str(root), device="cpu", progress=False)
    assert rec["split"] == f"val split of {root}" and rec["n"] == 100
    assert json.loads((run / "model.json").read_text())["calibration"]["split"] == rec["split"]


def test_calibrate_on_the_runs_own_training_data_uses_its_held_out_split_or_warns(tiny_run, sample_dir, tmp_path,
                                                                                 capsys):
    import yaml

    from imgclf.evaluate.calibrate import calibrate_run

    run = _copy_run(tiny_run, tmp_path)
    (run / "report.html").unlink(missing_ok=True)  # (its own 'report is stale' warning is tested above)
    train = sample_dir / "train"  # class folders only: no val/ or test/ to fall back on
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(train)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    # the run held out 10% for validation: that part is what calibration gets, as evaluate does
    rec = calibrate_run(run, str(train), device="cpu", progress=False)
    assert rec["split"] == f"the run's validation split of {train}" and rec["n"] == 300
    assert "warning" not in capsys.readouterr().err
    # held out nothing: every image is a training image; it goes ahead, saying so on one line
    cfg["val_split"] = 0.0
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rec = calibrate_run(run, str(train), device="cpu", progress=False)
    assert rec["split"] == f"all of {train}" and rec["n"] == 3000
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "trained on" in err[0] and "training images" in err[0]


def test_calibrate_removes_the_runs_exports_that_hold_the_old_temperature(tiny_run, sample_dir, tmp_path, capsys):
    from imgclf.cli import main
    from imgclf.deploy.export import export, read_onnx_metadata

    run = _copy_run(tiny_run, tmp_path)
    export(run, "onnx", parity_images=4, verbose=False)
    old = read_onnx_metadata(run / "model.onnx")["temperature"]
    elsewhere = tmp_path / "kept.onnx"  # an export outside the run folder is the user's to manage
    elsewhere.write_bytes(b"an export elsewhere")
    (run / "model.torchscript.pt").write_bytes(b"a TorchScript export")
    (run / "report.html").write_text("<html>temperature 1.0000</html>")  # made before calibrating
    assert main(["calibrate", str(run), "--data", str(sample_dir), "--device", "cpu"]) == 0
    new = json.loads((run / "model.json").read_text())["temperature"]
    assert new != pytest.approx(old, rel=1e-3)  # the stale file would have served the old one
    assert not [p.name for p in run.iterdir() if p.name.startswith(("model.onnx", "model.torchscript"))]
    assert elsewhere.exists()
    lines = capsys.readouterr().err.splitlines()
    err = [line for line in lines if "removed" in line]
    assert len(err) == 1 and "model.onnx" in err[0] and "model.torchscript.pt" in err[0] and "imgclf export" in err[0]
    # the report is not rewritten (Grad-CAM and decoding take a while) but said to be stale
    assert any("report.html shows the old temperature: run 'imgclf report" in line for line in lines)


def test_the_lower_bound_warning_names_flat_scores_when_the_split_is_not_easy():
    # a short grey-array run (61% right on val) hit the lower bound and was told "nearly every image
    # there is classified correctly"
    from imgclf.evaluate.calibrate import T_MIN, fit_warnings

    rec = {"temperature": T_MIN, "n": 500, "split": "val", "ece_before": 0.3, "ece_after": 0.1}
    (flat,) = fit_warnings({**rec, "accuracy": 0.61})
    assert "(61% right there): the model's scores are nearly flat" in flat and "classified correctly" not in flat
    (easy,) = fit_warnings({**rec, "accuracy": 0.99})
    assert "nearly every image there is classified correctly" in easy
