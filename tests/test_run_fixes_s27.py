"""Run-folder fixes: a default-named run killed before its first checkpoint, and the like."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import imgclf

FAST = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def _orphan(project, name: str):
    """What kill -9 during the decode or the first epoch leaves: a config.yaml and no checkpoint
    (test_core's kill test makes one for real)."""
    folder = project / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("data: photos\n")
    return folder


def test_default_named_run_killed_before_its_first_checkpoint_is_started_over(small_sample, tmp_path, capfd):
    # kill -9 during the decode or the first epoch of 'imgclf train --data photos/' left
    # photos-fastnet-1 with a config and nothing else; the same command made photos-fastnet-2 and
    # the empty -1 stayed in every runs/ listing and compare
    from imgclf.api import _default_name

    opts = dict(data=str(small_sample), project=str(tmp_path), **FAST)
    base = f"{small_sample.name}-fastnet-"
    orphan = _orphan(tmp_path, base + "1")
    res = imgclf.train(**opts)
    assert res.run_dir == orphan and (orphan / "model.json").is_file()
    assert "stopped before its first checkpoint: starting over in it" in capfd.readouterr().err
    # a finished run is never taken, nor an orphan another process trains in (not saved yet)
    assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "2"
    held = _orphan(tmp_path, base + "2")
    assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "2"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from imgclf.runs import hold_run; "
                               f"hold_run({str(held)!r}); print('held', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "3"
    finally:
        holder.kill()
        holder.wait()
    assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "2"  # its lock went with it


def test_a_yaml_configs_relative_data_path_is_read_beside_the_file(small_sample, tmp_path, monkeypatch):
    # projects/cats/run.yaml says data: photos (its neighbour); run from the home folder, train
    # said "--data photos: no such file or folder", blaming a flag the user never typed
    import shutil

    from imgclf.config import make_config
    from imgclf.errors import UserError

    proj = tmp_path / "projects" / "cats"
    shutil.copytree(small_sample, proj / "photos")
    (proj / "run.yaml").write_text("data: photos\nepochs: 1\n")
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = make_config(proj / "run.yaml")
    assert Path(cfg.data).resolve() == (proj / "photos").resolve()
    # the working directory's own folder of that name wins, as on the command line
    (elsewhere / "photos").mkdir()
    assert make_config(proj / "run.yaml").data == "photos"
    # a command-line --data is the user's, read from the working directory and left alone
    assert make_config(proj / "run.yaml", data="other").data == "other"
    (proj / "run.yaml").write_text("data: nowhere\n")
    with pytest.raises(UserError, match=r"run.yaml data: nowhere: no such file or folder, in the working directory "
                                        r".*home\) or beside run.yaml \(.*cats\)"):
        make_config(proj / "run.yaml")
    (proj / "run.yaml").write_text("data: cifar10\n")  # names, not paths, stay as they are
    assert make_config(proj / "run.yaml").data == "cifar10"


def test_an_empty_yaml_value_is_the_options_default(tmp_path, capfd):
    # 'rotate:' left empty, or 'model: null', was "option 'model': Input should be a valid string
    # (got None)"; options whose None means something (epochs: derived) keep their None
    from imgclf.config import make_config

    path = tmp_path / "run.yaml"
    path.write_text(f"data: {tmp_path}\nmodel: null\nrotate:\nmodel_args:\nepochs: null\nlr: 0.01\n")
    cfg = make_config(path)
    assert (cfg.model, cfg.rotate, cfg.model_args, cfg.epochs, cfg.lr) == ("auto", 0.0, {}, None, 0.01)
    err = capfd.readouterr().err
    assert "empty values read as the default (model: 'auto', rotate: 0.0, model_args: {})" in err


def test_a_runs_config_given_with_changes_chooses_the_recipes_values_again(tiny_run, small_sample, tmp_path,
                                                                           capfd):
    # train --config RUN/config.yaml --epochs N kept the old run's warm-up (23% of ITS epochs) and
    # its lr for its batch size: values the recipe had chosen, written down as if the user had
    import yaml

    from imgclf.config import make_config

    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    chosen = saved["derived"]
    assert {"epochs", "batch_size", "lr", "warmup_epochs", "optimizer", "model"} <= set(chosen) - {"epochs"} | {
        "epochs"} and chosen["optimizer"] == "auto" and chosen["warmup_epochs"] is None
    assert "epochs" not in chosen  # the fixture gave epochs=2 itself
    # with only where-to-write changes, the run repeats exactly, choices and record kept
    same = make_config(tiny_run / "config.yaml", name="again", project=str(tmp_path), progress=False)
    assert same.warmup_epochs == saved["warmup_epochs"] and same.lr == saved["lr"] and same._derived == chosen
    # --epochs changed: the recipe chooses again, and says so
    capfd.readouterr()
    res = imgclf.train(config=str(tiny_run / "config.yaml"), data=str(small_sample), epochs=1, name="longer",
                       project=str(tmp_path), progress=False, tensorboard=False)
    assert "--epochs changed, so what the recipe chose for that run is chosen again (batch_size, lr, " \
        "warmup_epochs, image_size and " in capfd.readouterr().err
    new = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert new["warmup_epochs"] == pytest.approx(0.23 * 1) and saved["warmup_epochs"] == pytest.approx(0.23 * 2)
    assert new["batch_size"] != saved["batch_size"]  # 360 images, not the sample's 4500: a smaller batch
    assert new["derived"]["warmup_epochs"] is None and new["derived"]["batch_size"] is None
    # a value the user typed is never re-chosen
    kept = make_config(tiny_run / "config.yaml", epochs=5, lr=0.5)
    assert kept.lr == 0.5 and kept.warmup_epochs is None and kept.epochs == 5


def test_tilde_in_a_yaml_project_or_study_directory_is_the_home_folder(tmp_path, monkeypatch):
    # project: ~/runs in a YAML file (no shell expands it) made a folder named '~' in the working
    # directory, which 'rm -rf ~' then tidies up
    from imgclf.api import _absolute_paths
    from imgclf.config import make_config
    from imgclf.tune.sweep import StudySpec

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "run.yaml").write_text(f"data: {tmp_path}\nproject: ~/runs\n")
    assert _absolute_paths(make_config(tmp_path / "run.yaml")).project == str(tmp_path / "home" / "runs")
    assert StudySpec(name="s", directory="~/studies").study_dir == tmp_path / "home" / "studies" / "s"


def test_a_run_name_too_long_for_a_folder_is_one_line(small_sample, tmp_path):
    from imgclf.errors import UserError

    with pytest.raises(UserError, match=r"--name x{40}\.\.\.: 300 bytes long; a folder name holds at most 255"):
        imgclf.train(data=str(small_sample), project=str(tmp_path), name="x" * 300, **FAST)


def test_the_console_says_which_epochs_weights_were_kept(small_sample, tmp_path, capfd):
    # val_acc 0.375 then 0.219 on the epoch lines, then 'val top-1 0.3750': only summary.json said
    # the first epoch's weights were kept
    class Scores(imgclf.Callback):
        def on_epoch_end(self, t, row):
            row["val_acc"] = 0.9 if row["epoch"] == 1 else 0.2

    res = imgclf.train(data=str(small_sample), project=str(tmp_path), callbacks=[Scores()], **{**FAST, "epochs": 2})
    assert "kept the weights of epoch 1 (val_acc 0.9000), not the last epoch's (0.2000)" in capfd.readouterr().err
    assert json.loads((res.run_dir / "summary.json").read_text())["weights"] == "best (val_acc at epoch 1)"


def test_a_model_predicting_one_class_for_everything_is_said_to_have_collapsed(capfd):
    # imbalanced photos: val top-1 0.625 = 20 of 32 images, every one predicted 'golden retriever'
    from imgclf.api import _one_class_note

    m = {"confusion": [[20, 0, 0], [8, 0, 0], [3, 1, 0]], "top1": 0.625, "balanced_accuracy": 0.3333}
    _one_class_note(m, ["golden retriever", "cat", "bird"], "val")
    assert m["predicts_one_class"] == "golden retriever"
    assert ("val: 97% of the predictions are 'golden retriever', which is 62% of the images: the model has "
            "collapsed onto one class") in capfd.readouterr().err
    fine = {"confusion": [[15, 5, 0], [4, 4, 0], [1, 1, 2]], "top1": 0.66, "balanced_accuracy": 0.54}
    _one_class_note(fine, ["golden retriever", "cat", "bird"], "val")
    assert "predicts_one_class" not in fine and "collapsed" not in capfd.readouterr().err


def test_check_takes_the_data_as_its_argument(small_sample, tmp_path, capsys):
    from imgclf.cli import main

    assert main(["check", str(small_sample), "--out", str(tmp_path / "c")]) in (0, 1)
    assert (tmp_path / "c" / "check.json").is_file()
    assert main(["check", str(small_sample), "--data", str(tmp_path)]) == 2
    assert "check takes the data once" in capsys.readouterr().err
