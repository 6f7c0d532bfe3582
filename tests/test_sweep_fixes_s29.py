"""Sweep fixes: advice for a stopped trial's folder, direction against the metric, a clean Ctrl-C,
one epochs column, optimizer-specific parameters drawn only for their optimizer, warnings said
once per study, the sampler's seed, typos in sampler/pruner arguments, study.yaml kept on resume,
and imgclf.sweep()."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import imgclf
from imgclf.cli import main
from imgclf.errors import UserError
from imgclf.tune import sweep

TINY = {"channels": [8, 16], "dense": [32]}
REPO = Path(__file__).resolve().parents[1]


def write_study(tmp_path: Path, data: Path, **over) -> Path:
    study = {
        "name": "s",
        "directory": str(tmp_path / "studies"),
        "base": {"data": str(data), "model": "plaincnn", "optimizer": "adam", "epochs": 1, "image_size": 32,
                 "batch_size": 32, "model_args": dict(TINY)},
        "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        "sampler": {"type": "random"},
        "pruner": "none",
        "n_trials": 2,
        "seed": 0,
        "heartbeat": 1,
    }
    study.update(over)
    path = tmp_path / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def trials_of(spec):
    return sorted(sweep.open_study(spec, heartbeat=False).get_trials(), key=lambda t: t.number)


def fake_train(monkeypatch, epochs_run: int | None = None) -> list[dict]:
    """imgclf.api.train in milliseconds: a run folder with config.yaml and metrics.csv, val_acc
    peaking at lr 1e-3; ``epochs_run``: the epochs every run stops after (as a pruned one)."""
    import imgclf.api
    from imgclf.config import TrainConfig, dump_yaml

    calls: list[dict] = []

    def train(callbacks=(), final_eval=True, project=None, name=None, exist_ok=False, **opts):
        calls.append(dict(opts, name=name))
        run = Path(project) / name
        run.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(**opts, project=project, name=name, exist_ok=exist_ok)
        dump_yaml(cfg, run / "config.yaml")
        acc = 0.9 - 0.1 * abs(math.log10(float(cfg.lr)) + 3)
        rows = [{"epoch": e, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1 - acc, "val_acc": acc}
                for e in range(1, int(epochs_run or cfg.epochs or 1) + 1)]
        (run / "metrics.csv").write_text(",".join(rows[0]) + "\n"
                                         + "".join(",".join(map(str, r.values())) + "\n" for r in rows))
        t = SimpleNamespace(cfg=SimpleNamespace(epochs=cfg.epochs), stop=None)
        for r in rows:
            for cb in callbacks:
                cb.on_epoch_end(t, r)
        return SimpleNamespace(history=rows)

    monkeypatch.setattr(imgclf.api, "train", train)
    return calls


# a. -------------------------------------------------------------------------------------------


def test_a_stopped_trials_folder_points_to_the_sweep_not_train_resume(tmp_path, capsys):
    run = tmp_path / "studies" / "s" / "trials" / "3"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data: photos\n")
    (run / "last.pt").write_bytes(b"not read")
    resume = f"imgclf sweep {tmp_path / 's.yaml'}"
    (run / sweep.TRIAL_MARKER).write_text(json.dumps({"study": "s", "study_id": "x", "trial": 3, "resume": resume}))
    for argv in (["report", str(run)], ["train", "--resume", str(run)]):
        capsys.readouterr()
        assert main(argv) == 2
        [err] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imgclf: error:")]
        assert "is trial 3 of study 's' and did not finish" in err and f"resume the study with '{resume}'" in err
        assert "(not 'imgclf train --resume')" in err and "continue" not in err
    with pytest.raises(UserError, match="is trial 3 of study 's' and did not finish"):  # and from Python
        imgclf.train(resume=str(run))


# b. -------------------------------------------------------------------------------------------


def test_b_direction_against_the_metric_is_refused(small_sample, tmp_path):
    for metric, direction, needs in (("val_loss", "maximize", "minimize"), ("val_acc", "minimize", "maximize"),
                                     ("train_loss", "maximize", "minimize")):
        path = write_study(tmp_path, small_sample, metric=metric, direction=direction)
        with pytest.raises(UserError, match=f"direction {direction} with metric {metric}: .* needs direction {needs}"):
            sweep.load_spec(path)
    assert sweep.load_spec(write_study(tmp_path, small_sample, metric="val_loss", direction="minimize"))


# c. -------------------------------------------------------------------------------------------


def test_c_ctrl_c_stops_the_study_cleanly(small_sample, tmp_path, monkeypatch, capsys):
    # real training: trial 0 is stopped in its 2nd epoch, after its 1st epoch's last.pt was saved
    on_epoch_end = sweep.PruneOnMetric.on_epoch_end
    seen: list[bool] = []

    def stop_in_epoch_2(self, t, row):
        on_epoch_end(self, t, row)
        if row["epoch"] == 2:
            seen.append((t.run_dir / "last.pt").is_file())
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep.PruneOnMetric, "on_epoch_end", stop_in_epoch_2)
    base = {"data": str(small_sample), "model": "plaincnn", "epochs": 2, "image_size": 32, "batch_size": 64,
            "model_args": TINY}
    path = write_study(tmp_path, small_sample, base=base, n_trials=2)
    assert main(["sweep", str(path)]) == 130
    err = capsys.readouterr().err
    spec = sweep.load_spec(path)
    trials = trials_of(spec)
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]  # Optuna's FAIL, queued again
    assert trials[1].params == trials[0].params and sweep.interrupted(trials[0])
    summary = sweep.summarize(spec)
    assert summary["fail"] == 0 and summary["interrupted"] == 1  # not counted as a failed trial
    folder = spec.study_dir / "trials"
    assert seen == [True] and list(folder.iterdir()) == []  # neither its last.pt nor an empty folder stays
    [line] = [ln for ln in err.splitlines() if "resume" in ln]  # one line says how to go on
    assert f"study s stopped (1 trial queued again): to resume it, run the same 'imgclf sweep' command again " \
           f"(imgclf sweep {path})" in line
    assert "train --resume" not in err

    monkeypatch.setattr(sweep.PruneOnMetric, "on_epoch_end", on_epoch_end)
    fake_train(monkeypatch)
    assert main(["sweep", str(path)]) == 0  # the queued trial runs, then one more
    trials = trials_of(spec)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"] and not sweep.interrupted(trials[1])
    assert trials[1].params == trials[0].params
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]


# d. -------------------------------------------------------------------------------------------


def test_d_report_has_one_epochs_column(small_sample, tmp_path, monkeypatch):
    from imgclf.tune.report import write_report

    fake_train(monkeypatch, epochs_run=1)  # stops after 1 epoch: "1 of 2" where 2 were drawn
    path = write_study(tmp_path, small_sample, sampler="grid", n_trials=None,
                       space={"lr": {"choices": [1e-3]}, "epochs": {"choices": [1, 2]}})
    spec = sweep.load_spec(path)
    sweep.run_study(spec)
    page = Path(write_report(spec.study_dir)["html"]).read_text()
    assert page.count("<th>epochs</th>") == 1
    assert "<td>1 of 2</td>" in page and "<td>1</td><td>" in page


# e. -------------------------------------------------------------------------------------------


def test_e_optimizer_options_are_drawn_only_for_their_optimizer(small_sample, tmp_path, monkeypatch):
    calls = fake_train(monkeypatch)
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "beta1": {"low": 0.8, "high": 0.95},
             "beta2": {"choices": [0.99, 0.999]}, "momentum": {"low": 0.8, "high": 0.99},
             "optimizer": {"choices": ["sgd", "adam"]}}
    spec = sweep.load_spec(write_study(tmp_path, small_sample, space=space, n_trials=8))
    sweep.run_study(spec)
    trials = trials_of(spec)
    assert {t.params["optimizer"] for t in trials} == {"sgd", "adam"}
    for t, opts in zip(trials, calls, strict=True):
        if t.params["optimizer"] == "sgd":
            assert set(t.params) == {"lr", "momentum", "optimizer"} and "beta1" not in opts
        else:
            assert set(t.params) == {"lr", "beta1", "beta2", "optimizer"} and "momentum" not in opts
    # a searched option no trial's optimizer reads is a mistake, said before any trial
    with pytest.raises(UserError, match=r"space 'beta1': optimizer sgd does not use it \(only adam, adamw do\)"):
        sweep.load_spec(write_study(tmp_path, small_sample, base={"data": str(small_sample), "optimizer": "sgd"},
                                    space={"beta1": {"low": 0.8, "high": 0.95}}))
    # the example studies keep working (adam fixed in base, its betas searched)
    for example in sorted((REPO / "examples").glob("*.yaml")):
        ex = sweep.load_spec(example)
        assert set(sweep.Space(ex).params) >= {"beta1", "beta2"}


# f. -------------------------------------------------------------------------------------------


def test_f_a_calibration_warning_is_said_once_per_study(small_sample, tmp_path, capfd):
    # 40 validation images: every trial's temperature is fitted on too few (each with its own value)
    base = {"data": str(small_sample), "model": "plaincnn", "epochs": 1, "image_size": 32, "batch_size": 64,
            "model_args": TINY}
    spec = sweep.load_spec(write_study(tmp_path, small_sample, base=base, n_trials=2))
    capfd.readouterr()
    sweep.run_study(spec)
    err = capfd.readouterr().err
    assert err.count("trial 1 done") == 1
    assert len(re.findall(r"warning: temperature \S+ fitted on only 40 images", err)) == 1


# g. h. ----------------------------------------------------------------------------------------


def test_g_a_seed_in_the_sampler_is_the_studys_seed(small_sample, tmp_path):
    import optuna

    def first_lr(sampler) -> float:
        spec = sweep.load_spec(write_study(tmp_path, small_sample, sampler=sampler, seed=None))
        study = optuna.create_study(sampler=sweep.make_sampler(spec, sweep.Space(spec)))
        return study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}).params["lr"]

    for kind in ("tpe", "random"):
        a, b = first_lr({"type": kind, "seed": 1}), first_lr({"type": kind, "seed": 2})
        assert a == first_lr({"type": kind, "seed": 1}) and a != b
    sweep.load_spec(write_study(tmp_path, small_sample, sampler={"type": "grid", "seed": 1}, n_trials=None,
                                space={"lr": {"choices": [1e-3, 1e-2]}}))


def test_h_typos_in_sampler_and_pruner_arguments_are_one_line(small_sample, tmp_path):
    cases = (({"pruner": {"type": "median", "n_startup_trails": 1}},
              "pruner median: unknown argument 'n_startup_trails'; did you mean 'n_startup_trials'? it takes "
              "n_startup_trials, n_warmup_steps, interval_steps"),
             ({"pruner": {"type": "halving", "reduction_factr": 3}},
              "pruner halving: unknown argument 'reduction_factr'; did you mean 'reduction_factor'?"),
             ({"sampler": {"type": "tpe", "n_startup_trial": 3}},
              "sampler tpe: unknown argument 'n_startup_trial'; did you mean 'n_startup_trials'?"),
             ({"sampler": {"type": "grid", "search_space": {}}}, "sampler grid: 'search_space' is set by the sweep"))
    for over, msg in cases:
        with pytest.raises(UserError) as e:
            sweep.load_spec(write_study(tmp_path, small_sample, **over))
        assert msg in str(e.value) and "\n" not in str(e.value) and "__init__" not in str(e.value)


# i. -------------------------------------------------------------------------------------------


def test_i_resume_keeps_study_yaml_and_refuses_another_base_or_space(small_sample, tmp_path, monkeypatch, capsys):
    calls = fake_train(monkeypatch)
    path = write_study(tmp_path, small_sample, n_trials=1)
    assert main(["sweep", str(path)]) == 0
    spec = sweep.load_spec(path)
    recorded = (spec.study_dir / "study.yaml").read_text()
    assert yaml.safe_load(recorded)["n_trials"] == 1
    # more trials of the same study: run, and study.yaml still says what the study began as
    assert main(["sweep", str(path), "--n-trials", "2"]) == 0 and len(calls) == 2
    assert (spec.study_dir / "study.yaml").read_text() == recorded
    # another base or space: refused in one line before any trial, naming what changed
    for over, what in (({"base": {**spec.base, "epochs": 3}}, "base.epochs changed (1 -> 3)"),
                       ({"space": {"lr": {"low": 1e-5, "high": 1e-2, "log": True}}}, "space.lr changed")):
        capsys.readouterr()
        assert main(["sweep", str(write_study(tmp_path, small_sample, n_trials=3, **over))]) == 2
        [err] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imgclf: error:")]
        assert f"study 's': {what}" in err and "start a new study (another name" in err
        assert len(calls) == 2 and (spec.study_dir / "study.yaml").read_text() == recorded
    # where a trial runs (the device, data-loading processes) may change
    assert main(["sweep", str(write_study(tmp_path, small_sample, n_trials=3,
                                          base={**spec.base, "workers": 0}))]) == 0
    assert len(calls) == 3


# k. -------------------------------------------------------------------------------------------


def test_k_sweep_from_python(small_sample, tmp_path, monkeypatch):
    import imgclf

    fake_train(monkeypatch)
    assert "sweep" in dir(imgclf) and "SweepResult" in dir(imgclf)
    study = yaml.safe_load(write_study(tmp_path, small_sample, n_trials=5).read_text())
    res = imgclf.sweep(study, n_trials=3)
    assert isinstance(res, imgclf.SweepResult) and res.study_dir == Path(study["directory"]) / "s"
    assert len(res.study.trials) == 3 and res.best_trial == res.study.best_trial.number
    assert res.best_value == pytest.approx(res.study.best_value) and set(res.best_params) == {"lr"}
    assert (res.best_run / "config.yaml").is_file()
    # a file, the command line's flags as keywords: the study resumes to 4 trials
    res = imgclf.sweep(write_study(tmp_path, small_sample, n_trials=5), n_trials=4, timeout="10m")
    assert len(res.study.trials) == 4
    with pytest.raises(UserError, match="timeout 'soon'"):
        imgclf.sweep(study, timeout="soon")
