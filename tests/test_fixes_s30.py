"""Review 30's fixes, each with the behaviour it restores: --weights RUN records the run's head
dropout in config.yaml; schedule options under --schedule auto are warned; the sweep report counts
interrupted trials apart and draws every trial; grid points that train alike run once; finished
trials drop last.pt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_transfer_fixes_s29 import FAST, _fake_run

import imgclf
from imgclf.config import make_config


def test_a_runs_head_dropout_is_recorded_so_a_repeat_builds_the_same_head(small_sample, tmp_path):
    # was: the model used the run's 0.35, config.yaml recorded the default 0.2, and a repeat from
    # that config.yaml (a named head_dropout now) built its head with 0.2
    w = _fake_run(tmp_path / "prev", "timm:test_resnet", 10, 32, {"head": [16], "head_dropout": 0.35,
                                                                   "small_stem": False})
    res = imgclf.train(data=str(small_sample), model="timm:test_resnet", weights=str(w.parent), image_size=32,
                       epochs=1, val_split=0.0, batch_size=100, project=str(tmp_path), name="ft", **FAST)
    assert json.loads((res.run_dir / "model.json").read_text())["arch_args"]["head_dropout"] == 0.35
    assert make_config(res.run_dir / "config.yaml").head_dropout == 0.35
    again = imgclf.train(config=str(res.run_dir / "config.yaml"), name="again", **FAST)
    assert json.loads((again.run_dir / "model.json").read_text())["arch_args"]["head_dropout"] == 0.35
    # the user's own --head-dropout still wins, and is what config.yaml says
    own = imgclf.train(data=str(small_sample), model="timm:test_resnet", weights=str(w.parent), image_size=32,
                       epochs=1, val_split=0.0, batch_size=100, project=str(tmp_path), name="own",
                       head_dropout=0.1, **FAST)
    assert json.loads((own.run_dir / "model.json").read_text())["arch_args"]["head_dropout"] == 0.1
    assert make_config(own.run_dir / "config.yaml").head_dropout == 0.1


def test_schedule_options_under_auto_warn_once_the_recipe_picks_another(capsys):
    # was: --schedule auto (the default) resolved to onecycle or cosine, and --plateau-patience or
    # --gamma were dropped without a word (a named schedule already warned, in make_config)
    from imgclf.engine import recipe

    def resolved(arch="fastnet", **options):
        cfg = make_config(None, data="d", model=arch, **options)
        return recipe.resolve(cfg, n_train=5000, image_size=32, arch=arch, multilabel=False).schedule

    assert resolved(plateau_patience=4, gamma=0.5) == "onecycle"
    err = capsys.readouterr().err
    assert ("--plateau-patience: not used by --schedule auto, which is onecycle for this run (set --schedule "
            "plateau to use it)") in err
    assert "--gamma: not used by --schedule auto, which is onecycle for this run (set --schedule step" in err
    assert resolved("timm:resnet18", plateau_patience=4, plateau_factor=0.3) == "cosine"
    assert "--plateau-patience, --plateau-factor: not used by --schedule auto, which is cosine" in capsys.readouterr().err
    resolved(schedule="plateau", plateau_patience=4)  # the schedule that uses them, or defaults: nothing said
    resolved(plateau_patience=2, gamma=0.1)
    assert "not used" not in capsys.readouterr().err


def test_sweep_report_counts_interrupted_trials_apart_and_draws_every_trial(small_sample, tmp_path, monkeypatch):
    # was: the header said "1 fail" for a trial Ctrl-C stopped (queued again, nothing failed), and
    # the parallel-coordinates figure left out every trial whose optimizer does not read a
    # searched option (sgd trials in an sgd/adam study lack beta1)
    import optuna
    from test_sweep_fixes_s29 import fake_train, trials_of, write_study

    from imgclf.tune import report, sweep

    fake_train(monkeypatch)
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "beta1": {"low": 0.8, "high": 0.95},
             "momentum": {"low": 0.8, "high": 0.99}, "optimizer": {"choices": ["sgd", "adam"]}}
    spec = sweep.load_spec(write_study(tmp_path, small_sample, space=space, n_trials=6))
    sweep.run_study(spec)
    study = sweep.open_study(spec, heartbeat=False)
    stopped = study.ask()  # as run_worker leaves a trial Ctrl-C stopped
    stopped.set_user_attr("interrupted", True)
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    trials = trials_of(spec)
    assert {t.params.get("optimizer") for t in trials[:6]} == {"sgd", "adam"}

    figures = []
    png = report._png
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or png(fig))
    out = report.write_report(spec.study_dir)
    assert out["fail"] == 0 and out["interrupted"] == 1 and out["complete"] == 6
    assert "7 trials: 6 complete, 1 interrupted." in Path(out["html"]).read_text()
    [fig] = [f for f in figures if f.axes and f.axes[0].get_title().startswith("each line a trial")]
    ax = fig.axes[0]
    axes = len(ax.get_xticks())
    assert len([ln for ln in ax.lines if len(ln.get_xdata()) == axes]) == 6  # one line per scored trial
    assert sum(t.get_text() == "unused" for t in ax.texts) == 2  # beta1's and momentum's axes


def test_a_grid_over_optimizers_trains_each_distinct_setting_once(small_sample, tmp_path, monkeypatch):
    # was: a grid over optimizer x beta1 x momentum trained sgd once per beta1 value (and adam once
    # per momentum value): 8 trainings for 4 distinct settings, the copies differing in nothing read
    import optuna
    from test_sweep_fixes_s29 import fake_train, trials_of, write_study

    from imgclf.tune import report, sweep

    calls = fake_train(monkeypatch)
    space = {"lr": {"choices": [1e-3]}, "optimizer": {"choices": ["sgd", "adam"]}, "beta1": {"choices": [0.85, 0.9]},
             "momentum": {"choices": [0.8, 0.9]}}
    spec = sweep.load_spec(write_study(tmp_path, small_sample, sampler="grid", n_trials=None, space=space))
    summary = sweep.run_study(spec)
    trials = trials_of(spec)
    assert len(trials) == 8  # the grid is walked to its end
    ran = [t for t in trials if not sweep.duplicate(t)]
    assert len(calls) == len(ran) == 4 and all(t.state.name == "COMPLETE" for t in ran)
    assert {tuple(sorted(t.params.items())) for t in ran} == {
        (("lr", 1e-3), ("momentum", m), ("optimizer", "sgd")) for m in (0.8, 0.9)} | {
        (("beta1", b), ("lr", 1e-3), ("optimizer", "adam")) for b in (0.85, 0.9)}
    for t in trials:
        if sweep.duplicate(t):
            twin = trials[t.user_attrs["same_as"]]
            assert t.state == optuna.trial.TrialState.PRUNED and twin.params == t.params and not sweep.duplicate(twin)
            assert not (spec.study_dir / "trials" / str(t.number)).exists()  # no folder for a trial not run
    assert summary["complete"] == 4 and summary["duplicate"] == 4 and summary["pruned"] == 0
    page = Path(report.write_report(spec.study_dir)["html"]).read_text()
    assert "8 trials: 4 complete, 4 duplicate." in page and page.count(">duplicate</td>") == 4


def test_finished_trials_drop_their_checkpoint_but_keep_what_it_told(small_sample, tmp_path, capsys):
    # was: every finished trial kept last.pt (weights plus optimizer state, 2-3x the model), so a
    # 100-trial sweep of a large net kept 100 of them; the stop reason compare reads from it is
    # kept in the study, and --resume on such a trial says how to train it further
    from test_sweep_fixes_s29 import TINY, trials_of, write_study

    from imgclf.errors import UserError
    from imgclf.evaluate.compare import _run_info
    from imgclf.tune import sweep

    base = {"data": str(small_sample), "model": "plaincnn", "epochs": 3, "image_size": 32, "batch_size": 64,
            "model_args": TINY, "early_stopping": 1, "min_delta": 1.0, "optimizer": "sgd"}  # nothing improves
    spec = sweep.load_spec(write_study(tmp_path, small_sample, base=base, n_trials=1,
                                       space={"momentum": {"choices": [0.0]}}))
    sweep.run_study(spec)
    [trial] = trials_of(spec)
    run = spec.study_dir / "trials" / "0"
    assert trial.state.name == "COMPLETE" and (run / "model.safetensors").is_file() and (run / "metrics.csv").is_file()
    assert not (run / "last.pt").exists()
    assert trial.user_attrs["stop"].startswith("early stopping")
    assert _run_info(run)["status"].startswith("stopped at epoch 2 of 3: early stopping")
    with pytest.raises(UserError, match=r"no last.pt \(the sweep removes a finished trial's checkpoint unless its "
                                        r"study sets keep_checkpoints: true\), .* imgclf train --config .*config.yaml "
                                        r"--weights .* --epochs N --name NEW"):
        imgclf.train(resume=str(run))
    kept = sweep.load_spec(write_study(tmp_path, small_sample, name="k", base=base, n_trials=1, keep_checkpoints=True,
                                       space={"momentum": {"choices": [0.0]}}))
    sweep.run_study(kept)
    assert (kept.study_dir / "trials" / "0" / "last.pt").is_file()


def test_report_scores_its_samples_in_the_runs_precision(tiny_run, tmp_path, monkeypatch):
    # was: 'imgclf report' scored the sample images in precision auto whatever the run used: an
    # fp32 run's captions came from bf16 logits (and a new machine timed bf16 first, 5-20 s)
    import shutil

    import yaml

    from imgclf.engine import trainer
    from imgclf.evaluate.report import write_report

    run = tmp_path / "fp32"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "precision": "fp32"}, sort_keys=False))
    asked = []
    resolve = trainer.resolve_precision
    monkeypatch.setattr(trainer, "resolve_precision", lambda name, device: asked.append(name) or resolve(name, device))
    write_report(run, out=tmp_path / "r.html")
    assert asked and set(asked) == {"fp32"}
    asked.clear()
    write_report(run, out=tmp_path / "r2.html", precision="bf16")  # the caller's, where given
    assert asked and set(asked) == {"bf16"}


def test_the_regularisation_line_leaves_out_label_smoothing_a_multilabel_loss_ignores():
    # was: "--label-smoothing 0.1 is ignored" (multi-label losses do not read it), then the start-up
    # line listed "label smoothing 0.1" among what the run adds
    from types import SimpleNamespace

    from imgclf.api import _regularisation_line

    cfg = make_config(None, data="d", label_smoothing=0.1, weight_decay=5e-4)
    assert "label smoothing 0.1" in _regularisation_line(cfg, SimpleNamespace(multilabel=False))
    line = _regularisation_line(cfg, SimpleNamespace(multilabel=True))
    assert "label smoothing" not in line and line.startswith("regularisation: weight decay 0.0005;")


def test_many_classes_with_too_few_images_are_one_finding(small_sample, tmp_path):
    # was: one error per class; on COCO128 that was 78 errors, and the check's other findings were
    # lost among them. Up to GROUP_CLASSES classes are still said one by one.
    import shutil

    from imgclf.cli import main
    from imgclf.data.checks import GROUP_CLASSES

    def check(keep: dict[str, int]) -> list[dict]:
        root = tmp_path / f"d{len(keep)}"
        shutil.copytree(small_sample, root)
        for cls, n in keep.items():
            for f in sorted((root / "train" / cls).glob("*.jpg"))[n:]:
                f.unlink()
        out = tmp_path / f"out{len(keep)}"
        assert main(["check", "--data", str(root), "--out", str(out), "--no-progress"]) == 1
        return [f for f in json.loads((out / "check.json").read_text())["findings"] if f["kind"] == "few_images"]

    many = {"cat": 5, "dog": 3, "frog": 7, "ship": 2, "truck": 9}
    [grouped] = check(many)
    # (the check's train split is what training trains on: the folder less its validation share)
    assert grouped["severity"] == "error" and set(grouped["details"]["classes"]) == set(many)
    assert all(0 < n <= many[c] for c, n in grouped["details"]["classes"].items())
    assert re.match(r"5 of 10 classes have fewer than 10 training images each \('ship' \d, 'dog' \d, 'cat' \d, "
                    r"'frog' \d, 'truck' \d\): each needs at least 10", grouped["message"]), grouped["message"]
    few = dict(list(many.items())[:GROUP_CLASSES])
    assert sorted(f["details"]["class"] for f in check(few)) == sorted(few)
