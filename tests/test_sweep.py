"""Hyperparameter studies end to end on the small CIFAR-10 sample: trials are real run folders,
pruning reports per epoch, crashes are recorded and skipped, a study resumes, and the report
and best.yaml come out usable."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imgclf.cli import main
from imgclf.config import make_config
from imgclf.errors import UserError
from imgclf.tune import sweep

# A tiny plain CNN: each trial takes about a second on the 400-image sample.
TINY = {"channels": [8, 16], "dense": [32]}


def write_study(tmp_path: Path, data: Path, **over) -> Path:
    study = {
        "name": "s",
        "directory": str(tmp_path / "studies"),
        "base": {"data": str(data), "model": "plaincnn", "optimizer": "adam", "epochs": 2, "image_size": 32,
                 "batch_size": 32, "model_args": dict(TINY)},
        "space": {
            "lr": {"low": "1e-4", "high": 3e-3, "log": True},  # a string: PyYAML's reading of 1e-4
            "beta1": {"low": 0.8, "high": 0.95},
            "model_args.dropout": {"low": 0.0, "high": 0.5},
            "model_args.dense": {"choices": [[32], [16]]},
            "schedule": "constant",
        },
        "sampler": {"type": "random"},
        "pruner": {"type": "median", "n_startup_trials": 1},
        "n_trials": 4,
        "seed": 0,
        "heartbeat": 1,
    }
    study.update(over)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def trials_of(spec):
    return sorted(sweep.open_study(spec, heartbeat=False).get_trials(), key=lambda t: t.number)


def test_study_report_and_best_config(small_sample, tmp_path, capsys):
    path = write_study(tmp_path, small_sample)
    assert main(["sweep", str(path)]) == 0
    spec = sweep.load_spec(path)
    trials = trials_of(spec)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert any(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        run = spec.study_dir / "trials" / str(t.number)
        cfg = make_config(run / "config.yaml")
        assert cfg.lr == pytest.approx(t.params["lr"]) and cfg.schedule == "constant"
        assert cfg.model_args["dropout"] == pytest.approx(t.params["model_args.dropout"])
        assert cfg.model_args["channels"] == [8, 16]  # base model_args kept beside the searched keys
        assert (run / "metrics.csv").exists() and not (run / "metrics.json").exists()  # no test eval in trials
        assert 1 in t.intermediate_values  # val_acc reported per epoch for the pruner

    assert main(["sweep-report", str(spec.study_dir)]) == 0
    page = (spec.study_dir / "report.html").read_text()
    text = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', "", page)
    assert "http" not in text and not re.search(r"(src|href)=", text)  # self-contained: inline images only
    assert page.count("data:image/png;base64,") >= 4 + 2  # one plot per parameter + parallel + curves
    for t in trials:
        assert f"<td>{t.number}</td>" in page
    # 4 searched parameters: fANOVA needs 2 * 4 + 2 completed trials (test_report_from_trial_configs draws it)
    assert "needs at least 10 completed trials" in page and 'alt="parameter importance"' not in page

    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    cfg = make_config(spec.study_dir / "best.yaml")
    assert cfg.lr == pytest.approx(best.params["lr"]) and cfg.beta1 == pytest.approx(best.params["beta1"])
    assert cfg.model_args["dense"] == yaml.safe_load(best.params["model_args.dense"])
    assert cfg.model_args["dropout"] == pytest.approx(best.params["model_args.dropout"])
    assert cfg.project == "runs" and cfg.name is None and cfg.epochs == 2  # a plain training config
    # what the recipe resolved for the 2-epoch trials (config.yaml) is left for a run of another length
    run_cfg = make_config(spec.study_dir / "trials" / str(best.number) / "config.yaml")
    assert run_cfg.warmup_epochs is not None and cfg.warmup_epochs is None


def test_crashed_trial_is_failed_and_study_goes_on(small_sample, tmp_path):
    # grid: 2 nets x 2 learning rates; a net for 1-channel images builds (load_spec builds each
    # choice's net) but fails in training's first forward pass on RGB images
    path = write_study(tmp_path, small_sample, sampler={"type": "grid"}, pruner="none", n_trials=None,
                       space={"model_args.in_channels": {"choices": [1, 3]}, "lr": {"choices": [1e-3, 2e-3]}})
    spec = sweep.load_spec(path)
    summary = sweep.run_study(spec)
    assert summary["trials"] == 4 and summary["fail"] == 2 and summary["complete"] == 2
    trials = trials_of(spec)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert all("channels" in t.user_attrs["error"] for t in failed)
    assert all((spec.study_dir / "trials" / str(t.number) / "error.txt").exists() for t in failed)
    assert {t.params["model_args.in_channels"] for t in trials if t.state.name == "COMPLETE"} == {3}
    res = sweep.summarize(spec)
    assert res["best_params"]["model_args.in_channels"] == 3


def test_resume_runs_only_the_missing_trials(small_sample, tmp_path):
    path = write_study(tmp_path, small_sample, pruner="none", space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
                       base={"data": str(small_sample), "model": "plaincnn", "epochs": 1, "image_size": 32,
                             "model_args": TINY})
    sweep.run_study(sweep.load_spec(path, n_trials=2))
    spec = sweep.load_spec(path, n_trials=4)
    sweep.run_study(spec)
    trials = trials_of(spec)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["lr"] for t in trials}) == 4  # the restarted sampler drew new points
    sweep.run_study(spec)  # budget used: nothing runs
    assert len(trials_of(spec)) == 4


@pytest.mark.slow
def test_killed_study_resumes_and_reruns_the_killed_trial(small_sample, tmp_path):
    path = write_study(tmp_path, small_sample, pruner="none", n_trials=2,
                       base={"data": str(small_sample), "model": "plaincnn", "epochs": 12, "image_size": 32,
                             "model_args": TINY})
    spec = sweep.load_spec(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "sweep", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = spec.study_dir / "trials" / "0" / "metrics.csv"
    t0 = time.time()
    while not first.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trials_of(spec)[0].state.name == "RUNNING"
    killed_params = trials_of(spec)[0].params

    # resumed with the same settings: a changed base (fewer epochs, say) is refused, as it must be
    sweep.run_study(spec)
    trials = trials_of(spec)
    assert trials[0].state.name == "FAIL" and "error" not in trials[0].user_attrs  # stale: failed by heartbeat
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == killed_params and retried[0].state.name == "COMPLETE"
    assert sum(map(sweep.counted, trials)) == 2 and len(trials) == 3


def test_study_file_errors_are_one_line(small_sample, tmp_path):
    cases = [
        ({"space": {"lr": {"low": 0, "high": 1e-2, "log": True}}}, "log range needs low > 0"),
        ({"space": {"betta1": {"low": 0.8, "high": 0.9}}}, "did you mean 'beta1'"),
        ({"space": {"beta1": {"low": 0.5, "high": 1.0}}}, "beta1"),
        ({"space": {"model_args.dropuot": {"low": 0.0, "high": 0.5}}}, "dropuot not known to plaincnn"),
        ({"space": {"lr": {"low": 1e-4, "high": 1e-2}}, "sampler": "grid"}, "needs 'choices' or a 'step'"),
        ({"pruner": "hyperband"}, "unknown pruner"),
        ({"base": {"model": "plaincnn", "name": "x", "data": "d"}}, "set by the sweep"),
    ]
    base = {"data": str(small_sample), "model": "plaincnn", "model_args": dict(TINY)}
    cases += [
        ({"metric": "val_accuracy"}, "metric 'val_accuracy' is not a score a trial writes; use one of val_acc, val_loss"),
        ({"base": {**base, "monitor": "val_loss"}}, "monitor val_loss differs from the study's metric val_acc"),
        ({"metric": "val_loss", "space": {"monitor": "val_acc"}}, "monitor val_acc differs from the study's metric val_loss"),
        ({"base": {**base, "devices": 2}}, "sweep --workers N"),
        ({"space": {"mixup": {"low": 0.0, "high": 1.0, "step": 0}}, "sampler": "grid"}, "'step' must be above 0 (got 0)"),
        ({"space": {"lr": {"low": 1e-4, "high": 1e-2, "step": -1e-3}}}, "'step' must be above 0"),
        ({"space": {"batch_size": {"low": 16, "high": 64, "step": 0.5}}}, "whole-number 'step' (got 0.5)"),
        ({"space": {"batch_size": {"low": 16.5, "high": 64}}}, "whole-number ends"),
        ({"space": {"beta1": {"min": 0.8, "max": 0.9}}}, "space 'beta1': 'max' without 'low'/'high'"),
        ({"space": {"model_args.dropout": {"value": 0.3, "log": True}}}, "'log' without 'low'/'high'"),
        ({"space": {"model_args.kernel_size": {"low": 3, "high": 5}}}, "add 'type: int'"),
        ({"n_trials": None}, "give n_trials or timeout"),
        # a quoted boolean is a non-empty string, which used to mean log (and refuse low: 0)
        ({"space": {"lr": {"low": 0, "high": 1e-2, "log": "false"}}}, "space 'lr': 'log' must be true or false, got 'false'"),
        ({"space": {"lr": {"low": 1e-4, "high": 1e-2, "log": "true"}}}, "'log' must be true or false, got 'true'"),
        ({"space": {"lr": {"low": 1e-4, "high": 1e-2, "log": 1}}}, "'log' must be true or false, got 1"),
    ]
    for over, msg in cases:
        path = write_study(tmp_path, small_sample, **over)
        with pytest.raises(UserError, match=re.escape(msg)) as info:
            spec = sweep.load_spec(path)
            sweep.make_sampler(spec, sweep.Space(spec))
            sweep.make_pruner(spec)
        assert "\n" not in str(info.value)
    # valid neighbours of those cases
    for over in ({"n_trials": None, "timeout": 60}, {"n_trials": None, "sampler": "grid", "space": {"lr": {"choices": [1e-3]}}},
                 {"base": {**base, "monitor": "val_acc"}}, {"metric": "train_loss", "base": {**base, "monitor": "val_loss"}},
                 {"space": {"model_args.kernel_size": {"low": 3, "high": 5, "type": "int"}}},
                 {"space": {"model_args": {"dropout": 0.1}}}):
        sweep.load_spec(write_study(tmp_path, small_sample, **over))


def test_range_kind_follows_the_option():
    kinds = {
        ("mixup", (0, 1), None): "float",  # int ends, float option: not just 0 and 1
        ("rotate", (0, 30), None): "float",
        ("batch_size", (16, 64), None): "int",
        ("epochs", (1, 3), None): "float",
        ("lr", (1, 2), None): "float",  # float | 'auto' | None
        ("model_args.dropout", (0, 1), None): "float",
        ("model_args.depth", (2, 6), "int"): "int",
        ("mixup", (0, 4), "int"): "int",  # an explicit type wins
        ("batch_size", (16, 64), "float"): "float",
    }
    for (name, (lo, hi), typ), kind in kinds.items():
        spec = {"low": lo, "high": hi, **({"type": typ} if typ else {})}
        assert sweep.parse_param(name, spec).kind == kind, name


def test_trials_follow_the_study_metric(small_sample, tmp_path):
    spec = sweep.load_spec(write_study(tmp_path, small_sample, metric="val_loss"))
    assert sweep.Space(spec).options({})["monitor"] == "val_loss"
    spec = sweep.load_spec(write_study(tmp_path, small_sample, metric="train_acc"))
    assert "monitor" not in sweep.Space(spec).options({})  # not a monitor: the run keeps its own


# ---------------------------------------------------------------------------------------------
# study bookkeeping, with a fake train() that writes a run folder in milliseconds


def fake_train(monkeypatch, fail_on: set[int] | None = None, interrupt: bool = False) -> list[dict]:
    """Replace imgclf.api.train: writes config.yaml and metrics.csv, reports one epoch whose
    val_acc peaks at lr = 1e-3; returns the options of every call."""
    import math
    from types import SimpleNamespace

    import imgclf.api
    from imgclf.config import TrainConfig, dump_yaml

    calls: list[dict] = []

    def train(callbacks=(), final_eval=True, project=None, name=None, exist_ok=False, **opts):
        calls.append(dict(opts, name=name))
        if interrupt:
            raise KeyboardInterrupt
        if fail_on and int(name) in fail_on:
            raise RuntimeError("boom")
        run = Path(project) / name
        run.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(**opts, project=project, name=name, exist_ok=exist_ok)
        cfg.warmup_epochs = 0.23 * (cfg.epochs or 10)  # as the recipe: config.yaml holds what it resolved
        dump_yaml(cfg, run / "config.yaml")
        acc = 0.9 - 0.1 * abs(math.log10(float(cfg.lr)) + 3)
        row = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1 - acc, "val_acc": acc}
        if cfg.task == "multilabel":  # as the trainer: mAP on multi-label data only
            row["val_map"] = acc
        (run / "metrics.csv").write_text(",".join(row) + "\n" + ",".join(map(str, row.values())) + "\n")
        t = SimpleNamespace(cfg=SimpleNamespace(epochs=1), stop=None)
        for cb in callbacks:
            cb.on_epoch_end(t, row)
        return SimpleNamespace(history=[row])

    monkeypatch.setattr(imgclf.api, "train", train)
    return calls


def lr_study(tmp_path, data, **over) -> Path:
    return write_study(tmp_path, data, pruner="none", space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, **over)


def test_resume_refuses_another_metric_or_direction(small_sample, tmp_path, capsys):
    from imgclf import log

    path = lr_study(tmp_path, small_sample)
    spec = sweep.load_spec(path)
    spec.study_dir.mkdir(parents=True)
    study = sweep.open_study(spec, heartbeat=False)
    assert study.user_attrs["imgclf_metric"] == "val_acc" and study.user_attrs["imgclf_direction"] == "maximize"
    with pytest.raises(UserError, match="started to maximize val_acc, and this file asks to minimize val_loss"):
        sweep.open_study(sweep.load_spec(path, metric="val_loss"), heartbeat=False)
    minimize = sweep.load_spec(path)
    minimize.direction = "minimize"  # load_spec refuses it (test_sweep_fixes_s29): the storage's own check
    with pytest.raises(UserError, match="started to maximize val_acc, and this file asks to minimize val_acc"):
        sweep.open_study(minimize, heartbeat=False)
    with pytest.raises(UserError, match="started to maximize val_acc, and this file asks to maximize val_map"):
        sweep.open_study(sweep.load_spec(path, metric="val_map"), heartbeat=False)
    log.reset()
    capsys.readouterr()
    sweep.open_study(spec, heartbeat=False, warn=True)
    assert "changed" not in capsys.readouterr().err
    study.enqueue_trial({"lr": 1e-3})  # a study without trials may still change
    changed = sweep.load_spec(path, base={**spec.base, "epochs": 3})
    with pytest.raises(UserError, match="base or space changed since the study began"):  # trials must compare
        sweep.open_study(changed, heartbeat=False, warn=True)


def test_new_study_keeps_off_an_old_studys_trial_folders(small_sample, tmp_path, monkeypatch):
    calls = fake_train(monkeypatch)
    spec = sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=2))
    trials = spec.study_dir / "trials"
    (trials / "0").mkdir(parents=True)
    (trials / "0" / "error.txt").write_text("from before")  # a folder without a study: taken, stale error dropped
    sweep.run_study(spec)
    assert len(calls) == 2 and not (trials / "0" / "error.txt").exists()
    sid = sweep.study_id(sweep.open_study(spec, heartbeat=False))
    assert {sweep.read_marker(trials / n)["study_id"] for n in ("0", "1")} == {sid}
    before = (trials / "0" / "config.yaml").read_text()

    (spec.study_dir / "study.db").unlink()  # a new study of the same name would restart at trial 0
    with pytest.raises(UserError, match="holds trial 0 of another study 's'"):
        sweep.run_study(spec)
    assert len(calls) == 2 and (trials / "0" / "config.yaml").read_text() == before


def test_changed_space_is_refused_before_any_trial(small_sample, tmp_path, monkeypatch, capsys):
    calls = fake_train(monkeypatch)
    path = write_study(tmp_path, small_sample, pruner="none", n_trials=1, space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    assert main(["sweep", str(path)]) == 0
    # a log float range turned into choices: Optuna refuses the parameter in every trial, which used
    # to fail each of them (using up n_trials) and exit 0
    path = write_study(tmp_path, small_sample, pruner="none", n_trials=3, space={"lr": {"choices": [1e-3, 1e-2]}})
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgclf: error:")]
    assert "space 'lr': choices [0.001, 0.01], but study 's' drew it from a float range (log)" in err
    assert "give the study a new name, or delete" in err
    assert len(calls) == 1 and len(trials_of(sweep.load_spec(path))) == 1
    # other changes Optuna refuses: the log scale, another choice list; a new range Optuna takes, but
    # the study refuses it too (test_sweep_fixes_s29: its trials would not compare)
    for space, msg in (({"lr": {"low": 1e-4, "high": 1e-2}}, "a float range, but study 's' drew it from a float range (log)"),
                       ({"lr": {"low": 1e-5, "high": 1e-1, "log": True}}, "space.lr changed")):
        spec = sweep.load_spec(write_study(tmp_path, small_sample, pruner="none", n_trials=2, space=space))
        with pytest.raises(UserError, match=re.escape(msg)):
            sweep.run_study(spec)
    spec = sweep.load_spec(write_study(tmp_path, small_sample, pruner="none", n_trials=1, name="b",
                                       space={"lr": 1e-3, "beta1": {"choices": [0.9]}}))
    assert sweep.run_study(spec)["complete"] == 1
    spec = sweep.load_spec(write_study(tmp_path, small_sample, pruner="none", n_trials=3, name="b",
                                       space={"lr": 1e-3, "beta1": {"choices": [0.8]}}))
    with pytest.raises(UserError, match=re.escape("space 'beta1': choices [0.8], but study 'b' drew it from choices [0.9]")):
        sweep.run_study(spec)


def test_changed_space_seen_in_a_trial_fails_it_with_its_reason(small_sample, tmp_path, monkeypatch):
    # a worker that skips the check (another machine changed the study meanwhile) still says why
    fake_train(monkeypatch)
    path = write_study(tmp_path, small_sample, pruner="none", n_trials=1, space={"lr": {"choices": [1e-3, 2e-3]}})
    sweep.run_study(sweep.load_spec(path))
    spec = sweep.load_spec(write_study(tmp_path, small_sample, pruner="none", n_trials=2,
                                       space={"lr": {"choices": [1e-3, 5e-3]}}))
    assert "5 trials in a row failed, the last with: the search space changed" in sweep.run_worker(spec)
    t = trials_of(spec)[1]
    assert t.state.name == "FAIL" and "search space changed since study 's' began" in t.user_attrs["error"]
    assert "CategoricalDistribution" in (spec.study_dir / "trials" / "1" / "error.txt").read_text()


def test_failed_trials_always_leave_error_txt(small_sample, tmp_path, monkeypatch):
    fake_train(monkeypatch, fail_on={0})
    # trial 0 raises; the others train but never report the metric (single-label rows have no val_map;
    # run_study refuses that metric up front, a worker alone does not look at the data)
    spec = sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=2, metric="val_map"))
    spec.study_dir.mkdir(parents=True)
    assert "5 trials in a row failed, the last with: metric 'val_map' was never reported" in sweep.run_worker(spec)
    trials = trials_of(spec)
    assert [t.state.name for t in trials] == ["FAIL"] * 5
    assert "boom" in trials[0].user_attrs["error"] and "never reported" in trials[1].user_attrs["error"]
    for t in trials:
        assert (spec.study_dir / "trials" / str(t.number) / "error.txt").exists()


def test_metric_the_data_cannot_produce_is_refused_before_any_trial(small_sample, tmp_path, monkeypatch, capsys):
    calls = fake_train(monkeypatch)
    # every trial used to fail with "--monitor val_map is for multi-label data", and the sweep exited 0
    path = lr_study(tmp_path, small_sample, n_trials=2, metric="val_map")
    assert main(["sweep", str(path)]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgclf: error:")]
    assert "metric val_map is for multi-label data" in err and calls == []
    base = {"data": str(small_sample), "model": "plaincnn", "epochs": 1, "image_size": 32, "model_args": TINY}
    # no validation images: no val_ metric is ever written
    with pytest.raises(UserError, match="metric val_loss needs validation images"):
        sweep.run_study(sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=2, metric="val_loss",
                                                 base={**base, "val_split": 0}, name="v")))
    assert calls == []
    # the neighbours that work: multi-label data (task: multilabel), a train_ metric without validation
    sweep.run_study(sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=1, metric="val_map",
                                             base={**base, "task": "multilabel"})))
    sweep.run_study(sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=1, metric="train_loss",
                                             base={**base, "val_split": 0}, name="t")))
    assert len(calls) == 2


def test_failed_trials_do_not_use_up_n_trials(small_sample, tmp_path, monkeypatch, capsys):
    calls = fake_train(monkeypatch, fail_on={1})
    path = lr_study(tmp_path, small_sample, n_trials=3)
    assert main(["sweep", str(path)]) == 0
    spec = sweep.load_spec(path)
    assert [t.state.name for t in trials_of(spec)] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert len(calls) == 4
    assert main(["sweep", str(path)]) == 0 and len(calls) == 4  # the budget is met: nothing more runs


def test_sweep_whose_trials_all_fail_exits_non_zero(small_sample, tmp_path, monkeypatch, capsys):
    calls = fake_train(monkeypatch, fail_on=set(range(10_000)))
    # a grid ends when every point was tried; both failed: no result, so not a success
    path = write_study(tmp_path, small_sample, sampler="grid", pruner="none", n_trials=None,
                       space={"lr": {"choices": [1e-3, 2e-3]}})
    assert main(["sweep", str(path)]) == 1
    err = capsys.readouterr().err
    assert "imgclf: error: no trial finished: the 2 trials this sweep ran failed, the last with: RuntimeError: boom" in err
    assert len(calls) == 2
    # failing trials do not run for ever: 5 in a row end the study, whatever n_trials says; the
    # sweep ran and every trial failed, so it exits 1 as above (a UserError made it 2)
    assert main(["sweep", str(lr_study(tmp_path, small_sample, n_trials=20, name="r"))]) == 1
    err = capsys.readouterr().err
    assert "no trial finished: the 5 trials this sweep ran failed" in err and len(calls) == 2 + 5
    assert "(5 failures in a row stop a sweep)" in err and "RuntimeError: boom" in err
    # a timeout with only failures is refused too
    monkeypatch.setattr(sweep, "_MAX_CONSECUTIVE_FAILURES", 100)
    assert main(["sweep", str(lr_study(tmp_path, small_sample, n_trials=None, timeout=0.5, name="t"))]) == 1
    assert "no trial finished" in capsys.readouterr().err
    monkeypatch.setattr(sweep, "_MAX_CONSECUTIVE_FAILURES", 5)
    # trials that finished, then 5 failures in a row: the sweep stopped on failures, 1 as well
    fail_after = fake_train(monkeypatch, fail_on=set(range(1, 100)))
    assert main(["sweep", str(lr_study(tmp_path, small_sample, n_trials=20, name="f"))]) == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imgclf: error:")]
    assert "5 trials in a row failed, the last with: RuntimeError: boom" in line and len(fail_after) == 6


def test_ctrl_c_requeues_a_retried_trial(small_sample, tmp_path, monkeypatch):
    fake_train(monkeypatch, interrupt=True)
    spec = sweep.load_spec(lr_study(tmp_path, small_sample))
    spec.study_dir.mkdir(parents=True)
    sweep.open_study(spec, heartbeat=False).enqueue_trial({"lr": 1.5e-3})  # as a retry is queued
    with pytest.raises(KeyboardInterrupt):
        sweep.run_worker(spec)
    trials = trials_of(spec)
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[1].params == {"lr": 1.5e-3} and trials[1].system_attrs["failed_trial"] == 0
    assert sweep.counted(trials[1]) and not sweep.counted(trials[0])


def test_report_from_trial_configs(small_sample, tmp_path, monkeypatch):
    fake_train(monkeypatch)
    from imgclf.tune.report import write_report

    path = lr_study(tmp_path, small_sample, n_trials=3)
    spec = sweep.load_spec(path)
    sweep.run_study(spec)
    write_report(spec.study_dir)
    page = (spec.study_dir / "report.html").read_text()
    assert "needs at least 4 completed trials for 1 parameter (this study has 3)" in page
    assert 'alt="parameter importance"' not in page
    sweep.run_study(sweep.load_spec(path, n_trials=4))

    # the study file changed after the trials: best.yaml is what the best trial trained with
    saved = yaml.safe_load((spec.study_dir / "study.yaml").read_text())
    saved["base"]["batch_size"] = 64
    (spec.study_dir / "study.yaml").write_text(yaml.safe_dump(saved))
    res = write_report(spec.study_dir)
    page = (spec.study_dir / "report.html").read_text()
    assert 'alt="parameter importance"' in page and "from 4 completed trials" in page
    best = yaml.safe_load((spec.study_dir / "best.yaml").read_text())
    assert best["batch_size"] == 32 and best["monitor"] == "val_acc"
    assert not {"project", "name", "exist_ok", "progress", "tensorboard"} & set(best)
    assert best["lr"] == pytest.approx(trials_of(spec)[res["best_trial"]].params["lr"])
    assert make_config(spec.study_dir / "best.yaml").project == "runs"
    assert not list(spec.study_dir.glob("*.tmp"))

    # a best config that would not train is refused before anything is written
    from types import SimpleNamespace

    from imgclf.tune.report import write_best_config

    good = (spec.study_dir / "best.yaml").read_text()
    bad = SimpleNamespace(number=0, value=0.5, params={}, user_attrs={"options": {**best, "batch_size": 0}})
    with pytest.raises(UserError, match="best.yaml: option 'batch_size'"):
        write_best_config(spec, sweep.Space(spec), bad, spec.study_dir / "best.yaml")
    assert (spec.study_dir / "best.yaml").read_text() == good


def test_best_yaml_leaves_what_the_recipe_resolved_to_the_next_run(small_sample, tmp_path, monkeypatch):
    # short trials, then one long run from best.yaml: the trials' 1-epoch warm-up (config.yaml) must
    # not reach it, nor any value the recipe derives; local paths are absolute, as in config.yaml
    fake_train(monkeypatch)
    from imgclf.tune.report import write_report

    monkeypatch.chdir(small_sample.parent)
    base = {"data": small_sample.name, "model": "plaincnn", "epochs": 1, "model_args": TINY}
    spec = sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=2, base=base))
    sweep.run_study(spec)
    res = write_report(spec.study_dir)
    run_cfg = make_config(spec.study_dir / "trials" / str(res["best_trial"]) / "config.yaml")
    assert run_cfg.warmup_epochs == pytest.approx(0.23)
    text = (spec.study_dir / "best.yaml").read_text()
    assert text.startswith(f"# best trial {res['best_trial']} of study 's': val_acc")
    best = yaml.safe_load(text)
    assert best == {**base, "data": str(small_sample), "lr": pytest.approx(trials_of(spec)[res["best_trial"]].params["lr"]),
                    "monitor": "val_acc"}
    monkeypatch.chdir(tmp_path)
    cfg = make_config(spec.study_dir / "best.yaml", epochs=20)
    assert cfg.epochs == 20 and cfg.warmup_epochs is None and cfg.batch_size is None and cfg.data == str(small_sample)


def test_study_key_typos_suggest_the_study_key(small_sample, tmp_path):
    # a misspelt top-level key is a study key, not a train option: 'imgclf train --help' does not list them
    path = write_study(tmp_path, small_sample)
    text = path.read_text().replace("n_trials:", "n_trails:")
    path.write_text(text)
    with pytest.raises(UserError, match=r"unknown study key 'n_trails'; did you mean 'n_trials'\?$") as info:
        sweep.load_spec(path)
    assert "\n" not in str(info.value)
    # a train option at the top level belongs under base: or space:
    with pytest.raises(UserError, match=r"unknown study key 'lr'; train options go under 'base:'"):
        sweep.load_spec(write_study(tmp_path, small_sample, lr=0.01))
    # nothing close: the study keys are listed
    with pytest.raises(UserError, match=r"unknown study key 'zzz'; the study keys are name, directory, .*n_trials"):
        sweep.load_spec(write_study(tmp_path, small_sample, zzz=1))


def test_bad_command_line_values_name_their_flag(small_sample, tmp_path, capsys):
    path = write_study(tmp_path, small_sample)
    for argv, flag in ((["--n-trials", "0"], "--n-trials: option 'n_trials'"), (["--timeout", "-1"], "--timeout: option 'timeout'")):
        assert main(["sweep", str(path), *argv]) == 2
        err = capsys.readouterr().err
        assert f"imgclf: error: {flag}" in err and str(path) not in err  # it used to blame the file
    # the file's own bad value still names the file, even beside a good flag
    path = write_study(tmp_path, small_sample, n_trials=0)
    with pytest.raises(UserError, match=re.escape(f"{path}: option 'n_trials'")):
        sweep.load_spec(path, timeout=60)


def test_summary_shows_list_choices_as_values(small_sample, tmp_path, monkeypatch, capsys):
    fake_train(monkeypatch)
    path = write_study(tmp_path, small_sample, pruner="none", n_trials=2,
                       space={"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model_args.dense": {"choices": [[32], [16]]}})
    assert main(["sweep", str(path)]) == 0
    import json

    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["best_params"]["model_args.dense"] in ([32], [16])  # it printed the JSON text "[32]"
    from imgclf.tune.report import write_report

    write_report(sweep.load_spec(path).study_dir)
    best = yaml.safe_load((sweep.load_spec(path).study_dir / "best.yaml").read_text())
    assert best["model_args"]["dense"] == summary["best_params"]["model_args.dense"]


def test_report_of_a_study_without_finished_trials_warns_nothing(small_sample, tmp_path, monkeypatch):
    import warnings

    fake_train(monkeypatch, fail_on=set(range(100)))
    spec = sweep.load_spec(write_study(tmp_path, small_sample, pruner="none", sampler="grid", n_trials=None,
                                       space={"lr": {"choices": [1e-3, 2e-3]}}))
    sweep.run_study(spec)
    from imgclf.tune.report import write_report

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        res = write_report(spec.study_dir)
    assert res["fail"] == 2 and "best_yaml" not in res


def test_study_mistakes_are_refused_before_a_study_db_or_a_trial(small_sample, tmp_path, monkeypatch, capsys):
    calls = fake_train(monkeypatch)
    base = {"data": str(small_sample), "model": "plaincnn", "model_args": dict(TINY)}
    cases = [
        # typos of the sampler and pruner used to fail after studies/<name>/study.db was made
        ({"sampler": {"type": "tpe", "n_startup_trial": 8}}, "sampler tpe: "),
        ({"pruner": "medain"}, "unknown pruner 'medain'"),
        # a range inside model_args was taken as a fixed value (a dict reaching the net in every trial)
        ({"space": {"model_args": {"dropout": {"low": 0.0, "high": 0.5}}}},
         "write one key per searched argument, model_args.dropout: {low: ..., high: ...}"),
        ({"base": {**base, "model_args": {**TINY, "dropout": {"low": 0.0, "high": 0.5}}}},
         "base: model_args.dropout is a range"),
        # a number range for a list argument: every trial failed building the net
        ({"space": {"model_args.channels": {"low": 8, "high": 16}}}, "plaincnn takes a list for channels"),
        # (dense: 16 is a list of one since s29: a zero-width layer is the choice no trial could build)
        ({"space": {"model_args.dense": {"choices": [[32], 0]}}}, "study space value {'model_args.dense': 0}"),
        # a fixed value under space is the space's, and a list is not a range
        ({"space": {"lr": [1e-4, 1e-2]}}, "study space (a fixed value): option 'lr'"),
    ]
    for over, msg in cases:
        path = write_study(tmp_path, small_sample, **over)
        assert main(["sweep", str(path)]) == 2
        [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imgclf: error:")]
        assert msg in line and "study base" not in line, line
        assert not (tmp_path / "studies").exists()
    assert "a range {low: ..., high: ...} or {choices: [...]}" in line
    assert calls == []


def test_data_that_is_not_there_is_refused_before_a_study_db_or_a_trial(small_sample, tmp_path, monkeypatch, capsys):
    # it used to make the study, run 5 trials that each failed on it and write their folders, then exit 1
    calls = fake_train(monkeypatch)
    base = {"data": str(small_sample), "model": "plaincnn", "model_args": dict(TINY)}
    nope = str(tmp_path / "nope")
    cases = [
        ({"base": {**base, "data": nope}}, [], f"study base: data {nope}: no such file or folder (give a folder"),
        ({}, ["--data", nope], f"error: --data {nope}: no such file or folder"),
        ({"base": {**base, "val_data": nope}}, [], f"study base: val_data {nope}: no such file or folder"),
        ({"space": {"data": {"choices": [str(small_sample), nope]}}}, [], f"study space value {{'data': '{nope}'}}: data"),
        ({"space": {"test_data": nope}}, [], f"study space (a fixed value): test_data {nope}: no such"),
        ({"base": {**base, "data": "/dev/null"}}, [], "study base: data /dev/null: not a file or folder"),
    ]
    for over, argv, msg in cases:
        path = write_study(tmp_path, small_sample, **over)
        assert main(["sweep", str(path), *argv]) == 2
        [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imgclf: error:")]
        assert msg in line, line
        assert not (tmp_path / "studies").exists()
    assert calls == []
    # what the loader takes besides a path passes (load_spec reads and downloads nothing)
    for data in ("cifar10", "CIFAR-100", "hf:owner/name", str(small_sample / "train")):
        sweep.load_spec(write_study(tmp_path, small_sample, base={**base, "data": data}))


def test_numbers_pyyaml_reads_as_strings_are_numbers_in_the_space(small_sample, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: s\ndirectory: {tmp_path / 'studies'}\nn_trials: 1\n"
                    f"base: {{data: {small_sample}, model: plaincnn, model_args: {{channels: [8, 16], dense: [32]}}}}\n"
                    "space:\n  model_args.dropout: {choices: [1e-1, 2e-1]}\n  model_args.dense_dropout: 5e-1\n"
                    "  model_args.activation: {choices: [relu, gelu]}\n")
    space = sweep.Space(sweep.load_spec(path))
    assert space.params["model_args.dropout"].choices == [0.1, 0.2]
    assert space.params["model_args.activation"].choices == ["relu", "gelu"]
    assert space.options({"model_args.dropout": 0.1})["model_args"]["dense_dropout"] == 0.5


def test_sigterm_stops_a_sweep_as_ctrl_c_does(small_sample, tmp_path, monkeypatch, capsys):
    import imgclf.api

    def train(callbacks=(), final_eval=True, project=None, name=None, exist_ok=False, **opts):
        run = Path(project) / name
        (run / "last.pt").write_bytes(b"")  # a checkpoint: the trainer would say "imgclf train --resume"
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except BaseException as e:
            imgclf.api._stopped_early(run, e, new=True)  # what train says on its way out
            raise
        raise AssertionError("SIGTERM did not stop the trial")

    def guard(signum, frame):  # not the sweep's handler: fail the trial, not the test process
        raise RuntimeError("SIGTERM reached the default handler")

    monkeypatch.setattr(imgclf.api, "train", train)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        path = lr_study(tmp_path, small_sample, n_trials=2)
        assert main(["sweep", str(path)]) == 130
        assert signal.getsignal(signal.SIGTERM) is guard  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "run the same 'imgclf sweep' command again" in err and "continue with 'imgclf train --resume" not in err
    assert [t.state.name for t in trials_of(sweep.load_spec(path))] == ["FAIL", "WAITING"]  # queued again


def test_a_worker_ends_with_its_parent(tmp_path):
    # a worker of --workers N went on running trials when its parent was killed, beside the
    # workers of the sweep started again
    flag = tmp_path / "worker.txt"
    worker = ("import sys, time\nfrom imgclf.tune import sweep\nsweep._follow_parent()\n"
              "open(sys.argv[1], 'w').write('ready')\n"
              "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    open(sys.argv[1], 'w').write('stopped')\n")
    parent = ("import os, subprocess, sys, time\nenv = dict(os.environ, IMGCLF_SWEEP_PARENT=str(os.getpid()))\n"
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], env=env)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent, worker, str(flag)])
    try:
        t0 = time.time()
        while not (flag.exists() and flag.read_text() == "ready") and proc.poll() is None and time.time() - t0 < 60:
            time.sleep(0.1)
        assert flag.exists() and flag.read_text() == "ready"
    finally:
        proc.kill()  # -9: nothing of the parent runs
        proc.wait()
    while flag.read_text() != "stopped" and time.time() - t0 < 90:
        time.sleep(0.1)
    assert flag.read_text() == "stopped"


def test_report_axes_and_paths(small_sample, tmp_path, monkeypatch, capsys):
    import shutil

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from imgclf.tune.report import _log_axis, write_report

    # a log range under a decade has no power of ten in view: its axis was blank
    for lo, hi in ((1e-3, 3e-3), (2e-4, 8e-3), (1e-5, 1e-1)):
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.scatter([lo, hi], [0, 1])
        _log_axis(ax, lo, hi)
        ax.set_xlim(lo / 1.05, hi * 1.05)
        fig.canvas.draw()
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo / 1.05 <= t.get_position()[0] <= hi * 1.05]
        assert len(shown) >= 2 if hi / lo < 100 else len(shown) >= 3, (lo, hi, shown)

    fake_train(monkeypatch)
    spec = sweep.load_spec(lr_study(tmp_path, small_sample, n_trials=2))
    sweep.run_study(spec)
    monkeypatch.chdir(spec.study_dir)  # 'sweep-report .' looked for ./s/study.db
    assert main(["sweep-report", "."]) == 0
    assert (spec.study_dir / "report.html").exists() and (spec.study_dir / "best.yaml").exists()
    assert not (spec.study_dir / spec.name).exists()
    assert main(["sweep-report", ".", "--out", "new/dir/r.html"]) == 0  # its folder is made
    assert (spec.study_dir / "new" / "dir" / "r.html").exists()
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()
    assert main(["sweep-report", ".", "--out", str(tmp_path / "a-file" / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot make the folder" in err and "Traceback" not in err
    # a study folder renamed since the sweep reads its own study.db
    shutil.copytree(spec.study_dir, tmp_path / "renamed")
    assert write_report(tmp_path / "renamed")["trials"] == 2


def test_study_files_relative_data_is_read_beside_it(small_sample, tmp_path, monkeypatch):
    # base: {data: photos} in studies/cats.yaml, run from elsewhere: the study's neighbour, as
    # train --config reads it; a path in neither place is refused naming both before any trial
    shutil.copytree(small_sample, tmp_path / "photos")
    path = write_study(tmp_path, Path("photos"))
    monkeypatch.chdir(tmp_path.parent)
    assert Path(sweep.load_spec(path).base["data"]).resolve() == (tmp_path / "photos").resolve()
    path = write_study(tmp_path, Path("nowhere"))
    with pytest.raises(UserError, match=r"study base: data nowhere: no such file or folder"):
        sweep.load_spec(path)


def test_a_study_resumed_from_another_folder_is_not_said_to_have_changed(small_sample, tmp_path, monkeypatch, capfd):
    # data: photos read from the working directory, then (resumed from elsewhere) from beside the
    # study file: the same folder, yet the digest of the text differed: 'base or space changed'
    shutil.copytree(small_sample, tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, Path("photos"), directory=str(tmp_path / "studies"), name="moved")  # its own
    sweep.load_spec(path).study_dir.mkdir(parents=True)  # name: a warning is said once per process
    sweep.open_study(sweep.load_spec(path), heartbeat=False, warn=True).enqueue_trial({})  # a study with trials
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    capfd.readouterr()
    sweep.open_study(sweep.load_spec(path), heartbeat=False, warn=True)
    assert "changed since the study began" not in capfd.readouterr().err
    (tmp_path / "a" / "photos").mkdir()  # now 'photos' here is other data: refused
    other = sweep.load_spec(path)
    err = capfd.readouterr().err
    with pytest.raises(UserError, match="changed since the study began"):
        sweep.open_study(other, heartbeat=False, warn=True)
    assert "is read from the working directory" in err and "not the one beside study.yaml" in err


def test_trials_tied_at_the_best_value_are_said_to_be_tied(small_sample, tmp_path, capfd):
    # five trials at chance (0.3333 on 18 val images): 'best_trial 0' read as a winner
    import optuna

    from imgclf.tune.report import write_report

    path = write_study(tmp_path, small_sample, space={"schedule": "constant"}, name="tied")
    spec = sweep.load_spec(path)
    sweep.write_spec(spec)
    study = sweep.open_study(spec, heartbeat=False)
    for v in (1 / 3, 1 / 3, 0.25):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=v))
    out = sweep.summarize(spec)
    assert out["best_trial"] == 0 and out["tied"] == 2
    assert "study 'tied': 2 trials tie at the best val_acc 0.3333" in capfd.readouterr().err
    res = write_report(spec.study_dir)
    assert res["tied"] == 2 and "2 trials tie at this value" in Path(res["html"]).read_text()
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    assert "tied" not in sweep.summarize(spec)
