"""imgclf compare: pruned trials, model_args columns, natural order, a table that fits the terminal,
distinct curves for many runs, runs named twice, and earlier comparisons kept.

The runs here are written by hand (config.yaml, metrics.csv, model.json, summary.json: what compare
reads), not trained: each test takes a second or two."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imgclf.errors import UserError
from imgclf.evaluate.compare import compare_runs, curve_figures, format_table


def _run(path: Path, *, epochs: int = 3, done: int | None = None, shift: float = 0.0, **config) -> Path:
    """A finished run folder as compare reads it: ``done`` epochs of ``epochs`` planned."""
    done = epochs if done is None else done
    path.mkdir(parents=True)
    cfg = {"data": "/data/cifar10", "model": "fastnet", "model_args": {}, "epochs": float(epochs), "lr": 0.1,
           "name": path.name, "project": str(path.parent), **config}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds"])
        for e in range(1, done + 1):
            w.writerow([e, 2.0 / e + shift, 2.1 / e + shift, 0.2 * e + shift, 0.1, 1.0])
    (path / "model.json").write_text(json.dumps({"task": "single", "architecture": "fastnet"}))
    (path / "summary.json").write_text(json.dumps({"train_seconds": 3.0, "epochs": done}))
    return path


def _column(res: dict, name: str) -> list:
    j = res["header"].index(name)
    return [r[j] for r in res["rows"]]


# -- 1. a pruned sweep trial is not "finished" -----------------------------------------------


def test_a_pruned_sweep_trial_is_not_shown_as_finished(tmp_path):
    import torch

    from imgclf.tune.sweep import TRIAL_MARKER, PruneOnMetric

    optuna = pytest.importorskip("optuna")
    study_dir = tmp_path / "studies" / "s"
    trials = study_dir / "trials"
    db = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    study_dir.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=db, study_name="s", direction="maximize")
    study.set_user_attr("imgclf_study_id", "sid")

    def objective(trial):
        for epoch in (1, 2):
            trial.report(0.1 * epoch, epoch)
        if trial.number > 0:
            raise optuna.TrialPruned()
        return 0.6

    study.optimize(objective, n_trials=3)
    for n, done in ((0, 3), (1, 1), (2, 2)):
        run = _run(trials / str(n), done=done)
        (run / TRIAL_MARKER).write_text(json.dumps({"study": "s", "study_id": "sid", "trial": n, "storage": db}))
    # trial 1 keeps its last.pt, whose stop reason the sweep's own pruning callback writes
    fake_trial = SimpleNamespace(report=lambda v, step: None, should_prune=lambda: True)
    t = SimpleNamespace(cfg=SimpleNamespace(epochs=3.0), stop=None)
    PruneOnMetric(fake_trial, "val_acc").on_epoch_end(t, {"epoch": 1, "val_acc": 0.2})
    torch.save({"model": {}, "optimizer": {}, "step": 10, "epoch": 1, "stop": t.stop}, trials / "1" / "last.pt")
    torch.save({"model": {}, "optimizer": {}, "step": 30, "epoch": 3, "stop": None}, trials / "0" / "last.pt")
    # trial 2's last.pt was removed (to save space): the study's record says it was pruned
    res = compare_runs([trials], tmp_path / "cmp")
    assert [r[0] for r in res["rows"]] == ["0", "1", "2"]
    assert _column(res, "status") == ["finished", "pruned at epoch 1 of 3", "pruned at epoch 2 of 3"]


# -- 2. model_args: a column per differing key -------------------------------------------------


def test_model_args_differences_get_a_column_each(tmp_path):
    # a timm model: its defaults are not read here (an own net's are: test_fixes_s29)
    a = _run(tmp_path / "p" / "a", model="timm:x", model_args={"width": 32, "depth": 2})
    b = _run(tmp_path / "p" / "b", model="timm:x", model_args={"width": 64, "depth": 2})
    res = compare_runs([a, b], tmp_path / "cmp")
    assert res["differing"] == ["model_args.width"]  # not one JSON cell, and not depth: it is the same
    assert _column(res, "model_args.width") == [32, 64]
    c = _run(tmp_path / "p" / "c", model="timm:x")  # model_args {}: the model's defaults
    res = compare_runs([a, b, c], tmp_path / "cmp2")
    assert res["differing"] == ["model_args.depth", "model_args.width"]  # (config.yaml sorts keys)
    assert _column(res, "model_args.depth") == [2, 2, "(default)"]
    with open(tmp_path / "cmp2" / "compare.csv") as f:
        table = list(csv.reader(f))
    assert "model_args" not in table[0] and table[3][table[0].index("model_args.width")] == "(default)"


# -- 3. natural order --------------------------------------------------------------------------


def test_runs_are_in_natural_order(tmp_path):
    trials = tmp_path / "trials"
    for n in (0, 1, 2, 10, 11):
        _run(trials / str(n), shift=n / 100)
    want = ["0", "1", "2", "10", "11"]
    assert [r[0] for r in compare_runs([trials], tmp_path / "c1")["rows"]] == want
    # the shell's trials/* is in text order: 0, 1, 10, 11, 2
    globbed = sorted(str(p) for p in trials.iterdir())
    assert [r[0] for r in compare_runs(globbed, tmp_path / "c2")["rows"]] == want
    # an order of one's own is kept (a baseline first)
    assert [r[0] for r in compare_runs([trials / "2", trials / "0"], tmp_path / "c3")["rows"]] == ["2", "0"]


# -- 4. a table that fits the terminal ---------------------------------------------------------


def test_the_terminal_table_keeps_to_the_terminals_width(tmp_path, capsys, monkeypatch):
    from imgclf.cli import main

    runs = [_run(tmp_path / "p" / f"cifar10-resnet18-{n}", lr=0.1 * (n + 1), shift=n / 100,
                 data=f"/very/long/path/to/the/data/sets/version-{n}/cifar10-train") for n in range(20)]
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]  # (the last line names the folder)
    assert max(map(len, lines)) <= 80
    assert lines[0].split()[:2] == ["run", "cifar10-resnet18-0"]
    table = " ".join(lines)
    assert all(f"cifar10-resnet18-{n}" in table.split() for n in range(20))
    res = compare_runs(runs[:3], tmp_path / "o2")
    text = format_table(res["header"], res["rows"], res["config_columns"], width=120)
    assert max(map(len, text.splitlines())) <= 120
    assert "version-2/cifar10-train" in text.replace("\n", " ").replace(" ", "")  # wrapped, not cut


# -- 5. 20 runs, 20 distinct lines -------------------------------------------------------------


def test_twenty_runs_get_twenty_distinct_lines(tmp_path):
    from imgclf.evaluate.compare import _run_info
    from imgclf.evaluate.plots import plt

    runs = [_run(tmp_path / "p" / f"r{n}", shift=n / 100) for n in range(20)]
    figs = curve_figures([_run_info(r) for r in runs], [r.name for r in runs])
    try:
        lines = figs["val_acc"].axes[0].get_lines()
        assert len(lines) == 20
        assert len({(str(ln.get_color()), ln.get_linestyle(), ln.get_marker()) for ln in lines}) == 20
        # the same run looks the same in every figure
        other = {ln.get_label(): (str(ln.get_color()), ln.get_linestyle()) for ln in figs["val_loss"].axes[0].get_lines()}
        assert all(other[ln.get_label()] == (str(ln.get_color()), ln.get_linestyle()) for ln in lines)
    finally:
        for f in figs.values():
            plt.close(f)


# -- 6. a run named twice ----------------------------------------------------------------------


def test_a_run_named_twice_is_compared_once(tmp_path, capfd):
    a = _run(tmp_path / "p" / "a")
    b = _run(tmp_path / "p" / "b", lr=0.2)
    (tmp_path / "link").symlink_to(a)
    res = compare_runs([a, f"{a}/", tmp_path / "link", b, a.parent], tmp_path / "cmp")
    assert [r[0] for r in res["rows"]] == ["a", "b"]
    said = [ln for ln in capfd.readouterr().err.splitlines() if "more than once" in ln]
    assert len(said) == 1 and str(tmp_path / "link") in said[0]
    with pytest.raises(UserError, match="at least two"):
        compare_runs([a, tmp_path / "link"], tmp_path / "cmp2")


# -- 7. an earlier comparison is kept ----------------------------------------------------------


def test_an_earlier_comparison_is_not_overwritten(tmp_path, capsys):
    from imgclf.cli import main

    a = _run(tmp_path / "p" / "a")
    b = _run(tmp_path / "p" / "b", lr=0.2)
    first = compare_runs([a, b])
    assert first["out_dir"] == tmp_path / "p" / "compare"
    before = (first["out_dir"] / "compare.csv").read_text()
    c = _run(tmp_path / "p" / "c", lr=0.3)
    second = compare_runs([a, c])  # without --out: a folder of its own
    assert second["out_dir"] == tmp_path / "p" / "compare-2"
    assert (first["out_dir"] / "compare.csv").read_text() == before
    # --out naming an earlier comparison: refused, as train refuses an existing --name
    with pytest.raises(UserError, match="holds an earlier comparison: pass --exist-ok"):
        compare_runs([a, c], first["out_dir"])
    assert (first["out_dir"] / "compare.csv").read_text() == before
    (first["out_dir"] / "val_map.png").write_bytes(b"")  # a figure the new runs do not have
    assert main(["compare", str(a), str(c), "--out", str(first["out_dir"]), "--exist-ok"]) == 0
    assert "lr" in capsys.readouterr().out
    assert (first["out_dir"] / "compare.csv").read_text() != before
    assert not (first["out_dir"] / "val_map.png").exists()
    with pytest.raises(UserError, match="is a run folder"):
        compare_runs([a, c], b)
