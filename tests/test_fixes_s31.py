"""Session 31: file names with control characters in predict's and explain's rows."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from imgclf.cli import main


def _photo(sample_dir: Path, cls: str = "ship", i: int = 0) -> Path:
    return sorted((sample_dir / "test" / cls).glob("*.jpg"))[i]


def test_predict_keeps_one_row_per_input_whatever_its_name(tiny_run, sample_dir, tmp_path, capsys):
    # Linux allows a newline or tab in a file name: it split predict's row into two lines and
    # shifted its tab-separated columns
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["two\nlines.jpg", "tab\there.jpg", "plain.jpg"]
    for i, name in enumerate(names):
        shutil.copy(_photo(sample_dir, i=i), photos / name)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run), str(photos), "--device", "cpu", "--top-k", "1",
                 "--output", str(out)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(str(photos))]
    assert len(rows) == 3 and all(ln.count("\t") == 1 for ln in rows)
    assert {ln.split("\t")[0] for ln in rows} == {f"{photos}/two\\nlines.jpg", f"{photos}/tab\\there.jpg",
                                                  f"{photos}/plain.jpg"}
    with open(out, newline="", encoding="utf-8") as f:  # the file keeps the real names
        assert sorted(r["input"] for r in csv.DictReader(f)) == sorted(str(photos / n) for n in names)


def test_explain_rows_name_control_characters(tiny_run, sample_dir, tmp_path, capsys):
    src = tmp_path / "a\nb.jpg"
    shutil.copy(_photo(sample_dir), src)
    assert main(["explain", str(tiny_run), str(src), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = [ln for ln in out if "gradcam" in ln]
    assert len(row) == 1 and "a\\nb.jpg" in row[0] and (tmp_path / "x" / "a\nb_gradcam.png").is_file()


def test_a_folder_that_takes_no_files_is_named_not_said_missing():
    # /proc exists but answers ENOENT for anything new: 'cannot write there (No such file or
    # directory)' sent the user looking for a missing folder
    from imgclf.paths import write_problem

    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    # root gets /proc's ENOENT, another user EACCES first: either way not 'No such file'
    assert write_problem(Path("/proc/self"), create=True) in ("/proc/self does not take new files", "Permission denied")
    assert write_problem(Path("/proc/imgclf-none/sub"), create=True) in ("/proc does not take new files",
                                                                         "Permission denied")


def test_progress_bars_written_to_a_log_are_redrawn_rarely(small_sample, tmp_path, capfd, monkeypatch):
    # `imgclf train ... > log 2>&1` (nohup, SLURM, CI): the log keeps every redraw of the bar; at
    # tqdm's 0.1 s a 10-minute run wrote thousands of them between the epoch lines
    import io
    import sys
    import time

    import imgclf
    from imgclf.engine.callbacks import Callback
    from imgclf.log import LOGGED_BAR_INTERVAL, bar_interval

    class Slow(Callback):  # every step slower than tqdm's default redraw interval
        def on_step_end(self, t):
            time.sleep(0.15)

    imgclf.train(data=str(small_sample), epochs=1, batch_size=50, image_size=16, project=str(tmp_path),
                 progress=True, tensorboard=False, callbacks=[Slow()])
    out, err = capfd.readouterr()  # capfd's stderr is a file, as a log is
    assert err.count("epoch 1/1:") <= 2  # the first draw (and at most one more), not one per step
    assert "epoch   1  loss" in out  # the epoch's own line is written as ever
    assert bar_interval() == LOGGED_BAR_INTERVAL

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert bar_interval() == 0.1


def test_imbalanced_test_scores_come_with_the_majority_baseline(small_sample, tmp_path, capfd):
    # a top-1 of 0.68 on crops where 'person' is 62% of the test set read as learning: training's
    # closing line and evaluate now say what always answering the largest class scores
    import os

    import imgclf
    from imgclf.evaluate.metrics import majority_baseline

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for cdir in sorted((small_sample / "train").iterdir()):
        os.symlink(cdir, data / "train" / cdir.name, target_is_directory=True)
    for cdir in sorted((small_sample / "test").iterdir()):
        keep = sorted(cdir.glob("*.jpg"))[: 10 if cdir.name == "cat" else 2]
        (data / "test" / cdir.name).mkdir(parents=True)
        for f in keep:
            os.symlink(f, data / "test" / cdir.name / f.name)
    res = imgclf.train(data=str(data), epochs=1, image_size=16, project=str(tmp_path), progress=False,
                       tensorboard=False, tta=False)
    share = 10 / 28
    assert majority_baseline(res.test) == ("cat", pytest.approx(share), pytest.approx(0.1))
    closing = next(ln for ln in capfd.readouterr().err.splitlines() if "test top-1" in ln)
    assert f"balanced acc {res.test['balanced_accuracy']:.4f} (always answering 'cat': {share:.4f}, 0.1000)" in closing

    assert main(["evaluate", str(res.run_dir), "--device", "cpu"]) == 0
    assert f"always answering 'cat' scores top-1 {share:.4f}, balanced acc 0.1000" in capfd.readouterr().out
    # balanced classes: nothing added
    assert majority_baseline({"per_class": [{"class": "a", "support": 10}, {"class": "b", "support": 6}]}) is None


def test_train_prints_the_next_data_check_findings_not_only_the_worst(sample_dir, tmp_path, capfd):
    # train said '1 error, 2 warnings; <the error>': the imbalance warning, the one that says
    # top-1 will mislead, was only in check.json
    import os

    import imgclf

    data = tmp_path / "data"
    for cdir in sorted((sample_dir / "train").iterdir()):
        n = {"cat": 300, "dog": 5}.get(cdir.name, 25)
        (data / "train" / cdir.name).mkdir(parents=True)
        for f in sorted(cdir.glob("*.jpg"))[:n]:
            os.symlink(f, data / "train" / cdir.name / f.name)
    imgclf.train(data=str(data), epochs=1, image_size=16, project=str(tmp_path), progress=False,
                 tensorboard=False, tta=False)
    said = [ln for ln in capfd.readouterr().err.splitlines() if "data check:" in ln]
    assert "class 'dog' has only" in said[0] and "1 error" in said[0]
    imbalance = [ln for ln in said if "classes are imbalanced" in ln]
    assert len(imbalance) == 1 and "'cat' has 270" in imbalance[0]
    assert "among the classes not named above" in imbalance[0]  # dog's 4 are not the smallest it means
    assert "details in" in said[-1]


def test_a_run_ending_within_an_epoch_says_the_fraction_it_trained(small_sample, tmp_path):
    # a --time-limit run planned 19.3 epochs, its log said 'trained 19.3 epochs', and summary.json
    # and the report said 20: the partial last epoch was counted whole
    import json

    import imgclf

    res = imgclf.train(data=str(small_sample), epochs=1.5, batch_size=36, image_size=16, project=str(tmp_path),
                       progress=False, tensorboard=False, tta=False)
    assert len(res.history) == 2  # two epoch rows: the second a half
    assert json.loads((res.run_dir / "summary.json").read_text())["epochs"] == 1.5
    assert json.loads((res.run_dir / "model.json").read_text())["epochs_trained"] == 1.5
