"""report, compare, explain, calibrate and check: what they showed that was not so, or did not show.

Each test names the problem it guards; all use real runs and real CIFAR-10 photos (the session's
tiny_run, a one-epoch multi-label run on small_sample, or small hand-made folders)."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from imgclf.cli import main
from imgclf.errors import UserError
from imgclf.evaluate.compare import compare_runs
from imgclf.evaluate.report import SplitSample, section_confused_pairs, section_gradcam, write_report


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("report.html", "last.pt", "best.safetensors"))
    return dest


def _point_at(run: Path, data: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def _linked_data(sample_dir: Path, dest: Path, rename: dict | None = None, drop: tuple = (), add: tuple = ()) -> Path:
    """The packaged sample as class-folder links: classes renamed, dropped or added (a copy of another)."""
    rename = rename or {}
    for split in ("train", "test"):
        (dest / split).mkdir(parents=True)
        for cdir in sorted((sample_dir / split).iterdir()):
            if cdir.name not in drop:
                (dest / split / rename.get(cdir.name, cdir.name)).symlink_to(cdir, target_is_directory=True)
        for name in add:
            (dest / split / name).symlink_to(sample_dir / split / "cat", target_is_directory=True)
    return dest


@pytest.fixture(scope="module")
def ml_run(small_sample, tmp_path_factory) -> Path:
    """A one-epoch multi-label run on class folders (each image one positive label)."""
    import imgclf

    res = imgclf.train(data=str(small_sample), task="multilabel", epochs=1, project=str(tmp_path_factory.mktemp("ml")),
                       name="ml", progress=False, tensorboard=False)
    return res.run_dir


# -- 1. the run's data folder changed since training ------------------------------------------


def test_report_leaves_out_image_sections_when_a_class_was_renamed(tiny_run, sample_dir, tmp_path):
    # airplane renamed plane: the old report captioned airplane photos with another class's name
    run = _copy_run(tiny_run, tmp_path / "run")
    _point_at(run, _linked_data(sample_dir, tmp_path / "renamed", rename={"airplane": "plane"}))
    doc = write_report(run, device="cpu").read_text()
    notes = [html.unescape(n) for n in re.findall(r'<p class="note">(.*?)</p>', doc)]
    left = [n for n in notes if n.startswith("image-level sections left out")]
    assert len(left) == 1 and "plane" in left[0] and "not trained on" in left[0], notes
    for s in ("top-losses", "gradcam"):
        assert f'<section id="{s}">' not in doc
    assert '<section id="confusion">' in doc  # the run folder's own figures still render


def test_report_remaps_labels_when_a_class_was_removed(tiny_run, sample_dir, tmp_path):
    # without airplane every class index shifts by one: captions must still name each file's folder
    run = _copy_run(tiny_run, tmp_path / "run")
    _point_at(run, _linked_data(sample_dir, tmp_path / "fewer", drop=("airplane",)))
    doc = write_report(run, device="cpu").read_text()
    assert '<section id="top-losses">' in doc
    shown = re.findall(r'<figcaption title="([^"]*)">true <b>([^<]*)</b>', doc)
    assert len(shown) > 30
    wrong = [(t, c) for t, c in shown if Path(html.unescape(t)).parent.name != html.unescape(c)]
    assert not wrong, wrong[:3]


def test_calibrate_without_data_checks_the_runs_classes(tiny_run, sample_dir, tmp_path):
    from imgclf.evaluate.calibrate import calibrate_run

    run = _copy_run(tiny_run, tmp_path / "run")
    _point_at(run, _linked_data(sample_dir, tmp_path / "renamed", rename={"airplane": "plane"}))
    with pytest.raises(UserError, match="plane") as e:  # was: a temperature fitted on wrong labels
        calibrate_run(run, device="cpu", progress=False)
    assert "\n" not in str(e.value)
    _point_at(run, _linked_data(sample_dir, tmp_path / "more", add=("emu",)))
    with pytest.raises(UserError, match="emu"):  # was: IndexError "Target 10 is out of bounds"
        calibrate_run(run, device="cpu", progress=False)


# -- 2, 9. compare: runs of different tasks, unfinished runs ---------------------------------


def test_compare_says_when_runs_mix_tasks(tiny_run, ml_run, tmp_path, capsys):
    single = _copy_run(tiny_run, tmp_path / "single")
    res = compare_runs([single, ml_run], tmp_path / "cmp")
    header, rows = res["header"], res["rows"]
    assert header[:3] == ["run", "task", "status"]
    assert [r[1] for r in rows] == ["single", "multilabel"]
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "not on one scale" in ln]
    assert len(warned) == 1 and "multi-label: ml" in warned[0]
    assert "not on one scale" in (tmp_path / "cmp" / "compare.html").read_text()
    # accuracy and loss get a panel per task; the learning rate means the same in both
    with Image.open(tmp_path / "cmp" / "val_acc.png") as a, Image.open(tmp_path / "cmp" / "lr.png") as b:
        assert a.width == 2 * b.width


def test_compare_marks_an_unfinished_run_and_names_columns_once(tiny_run, tmp_path, capsys):
    done = _copy_run(tiny_run, tmp_path / "done")
    killed = _copy_run(tiny_run, tmp_path / "killed")  # what a kill leaves: config, curves, checkpoint; no model
    for f in ("model.json", "model.safetensors", "metrics.json", "summary.json"):
        (killed / f).unlink()
    cfg = yaml.safe_load((killed / "config.yaml").read_text())
    cfg["epochs"] = 30
    (killed / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = compare_runs([done, killed], tmp_path / "cmp")
    header, rows = res["header"], res["rows"]
    assert len(set(header)) == len(header), header  # was: two columns named "epochs"
    status = header.index("status")
    assert rows[0][status] == "finished"
    assert rows[1][status] == "unfinished: epoch 2 of 30 (no model.json)"
    assert rows[1][header.index("epochs_trained")] == 2 and rows[1][header.index("epochs")] == 30
    with open(tmp_path / "cmp" / "compare.csv") as f:
        table = list(csv.reader(f))
    assert len(set(table[0])) == len(table[0])
    assert "killed (epoch 2 of 30)" in capsys.readouterr().err


# -- 3. the multi-label report ----------------------------------------------------------------


def test_multilabel_report_shows_its_pr_curves(ml_run, tmp_path):
    assert (ml_run / "pr_curves.png").exists()
    doc = write_report(ml_run, device="cpu", out=tmp_path / "r.html").read_text()
    assert '<section id="pr-curves">' in doc and 'alt="precision-recall curves"' in doc
    left = [n for n in re.findall(r'<p class="note">(.*?)</p>', doc) if "left out" in n]
    assert not any("Confusion matrix" in n for n in left), left  # not "nothing to show": not for this task


# -- 4, 5. the report's pairs and losses agree with what they caption -------------------------


def test_confused_pair_counts_and_examples_come_from_the_same_predictions(sample_dir):
    classes = sorted(p.name for p in (sample_dir / "test").iterdir())
    cat, dog = classes.index("cat"), classes.index("dog")
    files = sorted((sample_dir / "test" / "cat").glob("*.jpg"))[:4]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    single = torch.zeros(4, len(classes))
    single[:, dog] = 5.0  # one view: all four cats read as dogs
    tta = torch.zeros(4, len(classes))
    tta[:, cat] = 5.0
    tta[0, cat], tta[0, dog] = 0.0, 5.0  # with TTA (what the metrics count) only the first one
    s = SplitSample("test", images, np.full(4, cat), single, [str(f) for f in files])
    s.tta_logits, s.tta_level, s.of = tta, 2, 4
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    cm[cat, cat], cm[cat, dog] = 3, 1
    body = section_confused_pairs({"confusion": cm.tolist(), "tta_level": 2}, s, classes, 1.0)
    assert "<b>cat</b> predicted as <b>dog</b>: 1 images" in body
    assert body.count("<figure>") == 1 and str(files[0]) in body  # was: 4 single-view examples
    assert "with TTA (level 2)" in body


def test_top_loss_captions_use_one_probability_scale(tiny_run):
    meta = json.loads((tiny_run / "model.json").read_text())
    assert abs(meta["temperature"] - 1) > 0.05  # else both scales agree and this proves nothing
    doc = (tiny_run / "report.html").read_text()
    part = doc.split('<section id="top-losses">')[1].split("</section>")[0]
    caps = re.findall(r"true <b>([^<]*)</b><br><span class=\"\w+\">pred ([^<]*) ([0-9.]+)</span><br>loss ([0-9.]+)", part)
    assert len(caps) == 24
    for true, pred, p, loss in caps:
        p_true = math.exp(-float(loss))  # the loss is -log p(true class) on the captions' scale
        if true == pred:
            assert abs(p_true - float(p)) < 0.012, (true, pred, p, loss)
        else:  # was: "pred truck 1.00, loss 2.51" (p(true) 0.08 beside p(pred) 1.00)
            assert p_true <= 1 - float(p) + 0.012, (true, pred, p, loss)
    assert f"T = {meta['temperature']:.3g}" in part


# -- 6. Grad-CAM with no positive evidence -----------------------------------------------------


def test_explain_says_when_a_class_has_no_positive_evidence(tiny_run, sample_dir, tmp_path, capsys, monkeypatch):
    from imgclf.evaluate import explain as ex

    titles = []
    real = ex.explanation_png
    monkeypatch.setattr(ex, "explanation_png", lambda img, cam, title, *a: titles.append(title) or real(img, cam, title))
    files = [sorted((sample_dir / "test" / c).glob("*.jpg"))[1] for c in sorted(p.name for p in (sample_dir / "test").iterdir())]
    res = ex.explain(tiny_run, files, class_name="bird", out=tmp_path, device="cpu")
    blank = [r["heatmap"].max() == 0 for r in res]
    assert any(blank)  # a max-pooled net gives most non-predicted classes no positive evidence
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "no positive evidence for 'bird'" in ln]
    assert len(warned) == sum(blank)
    assert [("no positive evidence for 'bird'" in t) for t in titles] == blank
    assert [r["no_evidence"] for r in res] == blank


class _NoEvidence(nn.Module):
    """A real CNN whose predicted class (1) is only ever pushed down by its feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight[0] = 1.0
            self.head.weight[1] = -1.0
            self.head.bias[:] = torch.tensor([0.0, 100.0])

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


def test_report_gradcam_says_when_a_map_is_blank(sample_dir):
    from imgclf.data.augment import Normalize

    torch.manual_seed(0)
    model = _NoEvidence().eval()
    meta = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    files = sorted((sample_dir / "test" / "ship").glob("*.jpg"))[:4]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        logits = model(Normalize(meta["mean"], meta["std"], "cpu")(torch.from_numpy(images)))
    s = SplitSample("test", images, np.zeros(4, dtype=np.int64), logits, [str(f) for f in files])
    body = section_gradcam(model, meta, s, "cpu", ["a", "b"], 1.0)
    assert body.count("no positive evidence") >= 4 and "4 map(s) are blank" in body


# -- 7, 10. check: mirrored copies, wording ---------------------------------------------------


def _check(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    rc = main(["check", *argv, "--out", str(out), "--no-progress"])
    return rc, json.loads((out / "check.json").read_text())


def _two_classes(sample_dir: Path, root: Path, n_train: int = 12, n_test: int = 3) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for c in ("airplane", "ship"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((sample_dir / split / c).glob("*.jpg"))[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def test_check_finds_a_mirrored_copy_leaking_into_test(sample_dir, tmp_path):
    from imgclf.data.phash import hamming, phash_batch

    root = _two_classes(sample_dir, tmp_path / "data")
    src = root / "train" / "ship" / "0002.jpg"
    Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "test" / "ship" / "flipped.jpg", quality=95)
    rc, report = _check(tmp_path, "--data", str(root), "--val-split", "0")
    assert rc == 1
    leaks = [f for f in report["findings"] if f["kind"] == "near_duplicate_across_splits"]
    assert len(leaks) == 1 and leaks[0]["details"].get("mirrored") is True, report["findings"]
    assert "mirrored copies" in leaks[0]["message"] and "flipped.jpg ~ mirror of" in leaks[0]["message"]
    assert {Path(p).name for p in leaks[0]["paths"]} == {"0002.jpg", "flipped.jpg"}
    assert report["stats"]["duplicates"]["mirror_pairs"] == 1
    # a mirror's hash is computed from the image's own DCT (no second pass): it is the flipped image's hash
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted((sample_dir / "test" / "dog").glob("*.jpg"))[:64]])
    assert hamming(phash_batch(x, mirrored=True), phash_batch(np.ascontiguousarray(x[:, :, ::-1]))).max() == 0


def test_check_messages_say_the_threshold_and_the_way_to_search_all(sample_dir, tmp_path):
    root = _two_classes(sample_dir, tmp_path / "data")
    Image.open(root / "train" / "ship" / "0001.jpg").save(root / "test" / "ship" / "again.jpg", quality=60)
    rc, report = _check(tmp_path / "a", "--data", str(root), "--val-split", "0", "--near-threshold", "6")
    near = [f for f in report["findings"]
            if f["kind"] == "near_duplicate_across_splits" and not f["details"].get("mirrored")]
    assert len(near) == 1 and near[0]["details"]["pairs"][0][2] < 6
    assert "pHash distance <= 6" in near[0]["message"]  # was: the distance found, "<= 0"
    rc, report = _check(tmp_path / "b", "--data", str(root), "--val-split", "0", "--max-images", "20")
    sampled = [f["message"] for f in report["findings"] if f["kind"] == "duplicates_sampled"]
    assert len(sampled) == 1 and "without --max-images" in sampled[0] and "imgclf check'" not in sampled[0]


def test_modes_note_claims_alpha_only_for_images_that_have_it(sample_dir, tmp_path):
    root = tmp_path / "data"
    photos = sorted((sample_dir / "train" / "ship").glob("*.jpg"))
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for f in photos[:12]:
            shutil.copy(f, root / c / f"{c}{f.name}")
    Image.open(photos[20]).convert("CMYK").save(root / "a" / "cmyk.jpg")
    grey16 = np.asarray(Image.open(photos[21]).convert("L")).astype(np.uint16) * 256
    Image.fromarray(grey16).save(root / "b" / "deep.png")
    _, report = _check(tmp_path / "x", "--data", str(root), "--val-split", "0")
    modes = [f["message"] for f in report["findings"] if f["kind"] == "modes"]
    assert len(modes) == 1 and "CMYK" in modes[0]
    assert "alpha" not in modes[0] and "composited" not in modes[0]  # was: "(alpha composited on white)"
    Image.open(photos[22]).convert("RGBA").save(root / "a" / "clear.png")
    _, report = _check(tmp_path / "y", "--data", str(root), "--val-split", "0")
    modes = [f["message"] for f in report["findings"] if f["kind"] == "modes"]
    assert "RGBA: transparency composited on white" in modes[0] and "CMYK:" not in modes[0]


# -- 8. unusable output paths -----------------------------------------------------------------


def test_outputs_under_a_file_are_one_line_errors_before_the_work(tiny_run, small_sample, tmp_path, capsys,
                                                                 monkeypatch):
    from imgclf.evaluate import report

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    twin = tmp_path / "twin"  # a second run for compare (one run named twice is compared once, then refused)
    shutil.copytree(tiny_run, twin, ignore=shutil.ignore_patterns("*.pt"))
    from imgclf.data import cache

    monkeypatch.setattr(report, "load_samples", lambda *a, **k: pytest.fail("images scored before the check"))
    monkeypatch.setattr(cache, "build_cache", lambda *a, **k: pytest.fail("images decoded before the check"))
    cases = [["report", str(tiny_run), "--out", str(afile / "r.html"), "--device", "cpu"],
             ["check", "--data", str(small_sample), "--out", str(afile), "--no-progress"],
             ["check", "--data", str(small_sample), "--out", str(tmp_path / "c"), "--json", str(afile / "x.json"),
              "--no-progress"],
             ["compare", str(tiny_run), str(twin), "--out", str(afile)]]
    for argv in cases:
        assert main(argv) == 2, argv  # was: a FileExistsError traceback
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a folder" in err, (argv, err)


# -- 11. calibration on too few images, or at a bound -----------------------------------------


def test_calibrate_warns_on_a_small_split(tiny_run, sample_dir, tmp_path, capsys):
    from imgclf.evaluate.calibrate import calibrate_run

    run = _copy_run(tiny_run, tmp_path / "run")
    root = tmp_path / "data"
    for cdir in sorted((sample_dir / "test").iterdir()):
        (root / "val" / cdir.name).mkdir(parents=True)
        shutil.copy(sorted(cdir.glob("*.jpg"))[7], root / "val" / cdir.name / "one.jpg")
    for split in ("train", "test"):
        (root / split).symlink_to(sample_dir / split, target_is_directory=True)
    before = json.loads((run / "model.json").read_text())
    # a temperature from 10 images is noise: refused before the fit, the run keeps its own
    with pytest.raises(UserError, match=r"10 readable images .* too few to fit a temperature .* keeps temperature"):
        calibrate_run(run, str(root), device="cpu", progress=False)
    assert json.loads((run / "model.json").read_text()) == before


def test_training_on_a_small_val_split_records_the_fit_but_keeps_temperature_1(tmp_path, capsys):
    from types import SimpleNamespace

    from imgclf import log
    from imgclf.evaluate.calibrate import calibrate_model

    y = np.arange(12) % 4  # 12 images: under MIN_FIT_IMAGES
    images = np.repeat((y * 60).astype(np.uint8), 8 * 8 * 3).reshape(12, 8, 8, 3)
    cs = SimpleNamespace(rows=np.arange(12), labels=y, images=images)
    meta = {"task": "single", "mean": [0.0] * 3, "std": [1.0] * 3, "tta_level": 2, "tta_flip": True}
    out = calibrate_model(tmp_path, _Brightness(), meta, cs, torch.device("cpu"))
    rec = out["calibration"]
    assert rec["n"] == 12 and rec["applied"] is False and rec["temperature"] != 1.0  # what was fitted, kept
    assert out["temperature"] == 1.0 and "temperature_tta" not in out  # what predict uses
    assert json.loads((tmp_path / "model.json").read_text())["temperature"] == 1.0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "fitted on only 12 images" in ln]
    assert len(warned) == 1 and "not applied" in warned[0] and "imgclf calibrate" in warned[0]
    log.reset()  # its lower-bound warning, printed once per process, is the next test's to see


class _Brightness(nn.Module):
    """Scores 4 classes by an image's brightness with a huge margin: class k for pixels of 60 * k."""

    def forward(self, x):
        v = x.mean(dim=(1, 2, 3))[:, None]
        return -1000.0 * (v - torch.arange(4, dtype=torch.float32) * 60 / 255) ** 2


class _Skewed(nn.Module):
    """3 classes: an image of pixels 60 * k scores k at 0.8, k + 1 at 0.19 and k + 2 at 0.01."""

    def forward(self, x):
        k = (x.mean(dim=(1, 2, 3)) * 255 / 60).round().long()
        probs = torch.tensor([0.8, 0.19, 0.01])
        return torch.stack([probs.roll(int(i)) for i in k]).log()


def test_a_temperature_that_raises_the_ece_is_recorded_not_applied(tmp_path, capsys):
    from types import SimpleNamespace

    from imgclf.evaluate.calibrate import calibrate_model
    from imgclf.evaluate.report import _calibration_table

    # right 80% of the time at 0.8 confidence (ECE 0), and when wrong the truth is the 0.01 class:
    # a flatter T lowers the NLL those cost but pulls confidence under the 80% accuracy
    k = np.arange(600) % 3
    y = np.where(np.arange(600) % 5 == 0, (k + 2) % 3, k)
    cs = SimpleNamespace(rows=np.arange(600), labels=y, images=np.repeat((k * 60).astype(np.uint8), 48).reshape(600, 4, 4, 3))
    meta = {"task": "single", "mean": [0.0] * 3, "std": [1.0] * 3, "tta_level": 1, "tta_flip": True}
    out = calibrate_model(tmp_path, _Skewed(), meta, cs, torch.device("cpu"))
    rec = out["calibration"]
    assert rec["temperature"] > 1.2 and rec["nll_after"] < rec["nll_before"]  # what the fit found
    assert rec["ece_after"] > rec["ece_before"] + 0.05
    # was: applied, and the log read "ECE 0.0000 -> 0.1..." for a calibration
    assert rec["applied"] is False and out["temperature"] == 1.0
    assert rec["applied_tta"] is False and out["temperature_tta"] == 1.0  # flipped views score alike
    assert json.loads((tmp_path / "model.json").read_text())["temperature"] == 1.0
    err = capsys.readouterr().err
    assert re.search(r"temperature \d\.\d+ not applied: it lowers the NLL \(\d\.\d+ -> \d\.\d+\) but raises the ECE "
                     r"\(0\.0+ -> 0\.\d+\) on the images it was fitted on \(val, n=600\)", err)
    assert "not applied (it lowers the NLL" in html.unescape(_calibration_table(rec))


@pytest.mark.parametrize("labels_shift, bound", [(0, "lower bound"), (1, "upper bound")])
def test_calibrate_warns_when_the_temperature_hits_a_bound(tmp_path, capsys, labels_shift, bound):
    from types import SimpleNamespace

    from imgclf.evaluate.calibrate import T_MAX, T_MIN, calibrate_model

    y = np.arange(200) % 4
    images = np.repeat((y * 60).astype(np.uint8), 8 * 8 * 3).reshape(200, 8, 8, 3)
    cs = SimpleNamespace(rows=np.arange(200), labels=(y + labels_shift) % 4, images=images)
    meta = {"task": "single", "mean": [0.0] * 3, "std": [1.0] * 3, "tta_level": 0}
    # always right: sharper is always better; always wrong: flatter is always better
    t = calibrate_model(tmp_path, _Brightness(), meta, cs, torch.device("cpu"))["temperature"]
    assert t == pytest.approx(T_MIN if labels_shift == 0 else T_MAX, rel=1e-3)
    err = capsys.readouterr().err.splitlines()
    assert len([ln for ln in err if bound in ln]) == 1
    assert not any("fitted on only" in ln for ln in err)  # 200 images: enough, the bound is the problem


def test_the_report_after_training_reuses_the_closing_evaluation(tiny_run):
    # tiny_run's report was written by training, from the closing evaluation's TTA logits (scoring
    # the views again pushed --time-limit runs past their budget): the pairs it counts from those
    # logits are the confusion matrix of metrics.json, so the logits line up with the images
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["tta_level"] > 0
    cm = np.asarray(metrics["confusion"])
    classes = json.loads((tiny_run / "model.json").read_text())["classes"]
    doc = (tiny_run / "report.html").read_text()
    part = doc.split('<section id="confused-pairs">')[1].split("</section>")[0]
    assert f"all {int(cm.sum())} test images" in part  # the whole split, not a sample of it
    found = re.findall(r"<b>([^<]*)</b> predicted as <b>([^<]*)</b>: (\d+) images", part)
    assert found
    for a, b, n in found:
        assert int(n) == cm[classes.index(html.unescape(a)), classes.index(html.unescape(b))]


def test_training_hands_its_test_logits_to_the_report(small_sample, tmp_path, monkeypatch):
    import imgclf
    from imgclf.evaluate import report

    seen = []
    real = report.sample_split

    def spy(*a, **k):
        seen.append((k.get("tta_level", 0), k.get("tta_all") is not None))
        return real(*a, **k)

    monkeypatch.setattr(report, "sample_split", spy)
    imgclf.train(data=str(small_sample), epochs=1, project=str(tmp_path), progress=False, tensorboard=False)
    assert [s for s in seen if s[0]] == [(seen[-1][0], True)]  # the evaluated split's views: not rescored
