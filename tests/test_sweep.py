"""Hyperparameter studies end to end on the small CIFAR-10 sample: trials are real run folders,
pruning reports per epoch, crashes are recorded and skipped, a study resumes, and the report
and best.yaml come out usable."""

from __future__ import annotations

import os
import re
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
    if sum(t.state.name == "COMPLETE" for t in trials) >= 4:  # fANOVA's bar chart, else the reason why not
        assert 'alt="parameter importance"' in page and "needs at least" not in page
    else:
        assert "needs at least 4 completed trials" in page

    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    cfg = make_config(spec.study_dir / "best.yaml")
    assert cfg.lr == pytest.approx(best.params["lr"]) and cfg.beta1 == pytest.approx(best.params["beta1"])
    assert cfg.model_args["dense"] == yaml.safe_load(best.params["model_args.dense"])
    assert cfg.model_args["dropout"] == pytest.approx(best.params["model_args.dropout"])
    assert cfg.project == "runs" and cfg.name is None and cfg.epochs == 2  # a plain training config


def test_crashed_trial_is_failed_and_study_goes_on(small_sample, tmp_path):
    # grid: 2 activations x 2 learning rates; 'bogus' makes building the model raise
    path = write_study(tmp_path, small_sample, sampler={"type": "grid"}, pruner="none", n_trials=None,
                       space={"model_args.activation": {"choices": ["bogus", "relu"]}, "lr": {"choices": [1e-3, 2e-3]}})
    spec = sweep.load_spec(path)
    summary = sweep.run_study(spec)
    assert summary["trials"] == 4 and summary["fail"] == 2 and summary["complete"] == 2
    trials = trials_of(spec)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert all("activation" in t.user_attrs["error"] for t in failed)
    assert all((spec.study_dir / "trials" / str(t.number) / "error.txt").exists() for t in failed)
    assert {t.params["model_args.activation"] for t in trials if t.state.name == "COMPLETE"} == {"relu"}
    res = sweep.summarize(spec)
    assert res["best_params"]["model_args.activation"] == "relu"


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
                       base={"data": str(small_sample), "model": "plaincnn", "epochs": 40, "image_size": 32,
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

    spec = sweep.load_spec(path, base={**spec.base, "epochs": 1})
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
    for over, msg in cases:
        path = write_study(tmp_path, small_sample, **over)
        with pytest.raises(UserError, match=re.escape(msg)):
            spec = sweep.load_spec(path)
            sweep.make_sampler(spec, sweep.Space(spec))
            sweep.make_pruner(spec)
