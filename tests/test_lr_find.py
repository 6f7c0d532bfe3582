"""The learning-rate finder: suggestion rule, CLI, and ``train --lr auto``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from imgclf.engine.lr_find import smooth, suggest


def test_suggestion_is_a_tenth_of_the_smoothed_minimum():
    lrs = list(np.geomspace(1e-6, 10, 120))
    # a range-test shaped curve: flat, falling, minimum near lr=0.1, then blowing up
    losses = [2.3 - 1.5 / (1 + np.exp(-3 * (np.log10(lr) + 3))) + 30 * max(0.0, np.log10(lr) + 1) ** 2 for lr in lrs]
    noisy = [v + 0.02 * np.sin(7 * i) for i, v in enumerate(losses)]
    sm = smooth(noisy, beta=0.5)
    suggestion, steepest, min_lr = suggest(lrs, sm)
    assert 0.03 < min_lr < 0.3
    assert suggestion == pytest.approx(min_lr / 10)
    assert steepest is not None and 1e-4 < steepest < 1e-2  # the middle of the falling part


def test_smoothing_is_debiased():
    assert smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])


def test_lr_find_command_prints_a_suggestion_and_writes_the_plot(small_sample, tmp_path, capsys):
    from imgclf.cli import main

    out = tmp_path / "sweep.png"
    rc = main(["lr-find", "--data", str(small_sample), "--steps", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "suggested lr:" in printed and str(out) in printed
    assert out.stat().st_size > 10_000  # a real PNG
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["method"] == "min/10" and info["steps"] <= 20
    assert 1e-7 <= info["suggestion"] <= 1.0


def test_train_lr_auto_uses_and_records_the_suggestion(small_sample, tmp_path):
    import imgclf
    from imgclf.engine.callbacks import Callback

    peaks = []

    class PeakLR(Callback):
        def on_epoch_end(self, t, row):
            peaks.append(t.optimizer.param_groups[-1]["base_lr"])

    res = imgclf.train(data=str(small_sample), lr="auto", epochs=1, project=str(tmp_path), name="auto",
                       progress=False, tensorboard=False, tta=False, callbacks=[PeakLR()])
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    found = json.loads((res.run_dir / "lr_find.json").read_text())
    assert isinstance(cfg["lr"], float) and cfg["lr"] == pytest.approx(found["suggestion"], rel=1e-2)
    assert peaks[0] == pytest.approx(cfg["lr"])
    assert (res.run_dir / "lr_find.png").exists()
    assert res.test["top1"] > 0.1
