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
    # the default sweep: 100 steps on this small set (its 11 batches cycled), a clear descent (fewer
    # steps leave it within the noise on some seeds)
    rc = main(["lr-find", "--data", str(small_sample), "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "suggested lr:" in printed and f"plot: {out}" in printed
    assert out.stat().st_size > 10_000  # a real PNG
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["method"] == "min/10" and info["steps"] == 100
    # fastnet's recipe lr at batch 32 is 0.047; Muon's filters held still, the suggestion is near it
    assert 0.01 <= info["suggestion"] <= 0.2 and info["muon_filters"].startswith("held still")


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
    assert res.test["top1"] > 0.18  # one epoch at the suggested lr: 0.25 measured (chance 0.1)


# -- the sweep's guards and its training step ---------------------------------------------------


class _Loader:
    """A stand-in BatchLoader: ``n`` fixed batches of 8 random 4-feature rows per epoch."""

    batch_size = 8

    def __init__(self, n: int = 4, classes: int = 3):
        import torch

        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(8, 4, generator=g), torch.randint(0, classes, (8,), generator=g))
                        for _ in range(n)]

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch: int = 0):
        yield from self.batches


def _sweep(loader, steps=8, loss_fn=None, entry="lr-find", **cfg_options):
    import torch

    from imgclf.config import make_config
    from imgclf.engine.lr_find import sweep

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = make_config(None, data="unused", optimizer="sgd", momentum=0.9, weight_decay=0.0, label_smoothing=0.0,
                      backbone_lr_scale=1.0, precision="fp32", **cfg_options)
    res = sweep(model, cfg, loader, lambda x, y, g, parity: (x, y), torch.device("cpu"), loss_fn,
                steps=steps, start=1e-4, end=1e-1, entry=entry)
    return model, res


def test_descent_problem_flags_rising_and_flat_curves():
    from imgclf.engine.lr_find import descent_problem

    lrs = list(np.geomspace(1e-7, 10, 100))
    falling = [2.3 - 1.5 * i / 70 if i < 70 else 0.8 + 0.2 * (i - 70) for i in range(100)]
    assert descent_problem(lrs, smooth(falling)) == ""
    rising = [2.3 + 0.01 * i for i in range(100)]
    assert "lowest at the start" in descent_problem(lrs, smooth(rising))
    flat = [2.3 - 0.0001 * i for i in range(100)]  # a 0.4% fall
    assert "fell only" in descent_problem(lrs, smooth(flat))


def test_lr_find_command_says_when_the_curve_never_fell(small_sample, tmp_path, capsys):
    # lrs far too small to move the loss: the old rule silently suggested ~lr_start
    from imgclf.cli import main

    out = tmp_path / "flat.png"
    rc = main(["lr-find", "--data", str(small_sample), "--steps", "8", "--lr-start", "1e-9", "--lr-end", "1e-8",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no descent" in err and "--lr-end" in err and err.count("\n") == 1
    info = json.loads(out.with_suffix(".json").read_text())
    # no number where there is nothing to read: train --lr auto falls back to the recipe's lr
    assert out.exists() and "no_descent" in info and info["suggestion"] is None


def test_lr_for_training_raises_no_descent_for_the_train_path_to_catch(tmp_path):
    import torch

    from imgclf.config import make_config
    from imgclf.engine.lr_find import NoDescentError, lr_for_training
    from imgclf.errors import UserError

    cfg = make_config(None, data="unused", optimizer="sgd", momentum=0.9, weight_decay=0.0, label_smoothing=0.0,
                      backbone_lr_scale=1.0, precision="fp32", progress=False, freeze_epochs=0)

    def rising(logits, target):  # a loss that only grows with the step count
        rising.n += 1
        return logits.sum() * 0 + rising.n
    rising.n = 0
    with pytest.raises(NoDescentError) as e:
        lr_for_training(torch.nn.Linear(4, 3), cfg, _Loader(), lambda x, y, g, p: (x, y), torch.device("cpu"),
                        rising, None, False, tmp_path)
    assert isinstance(e.value, UserError) and e.value.reason and e.value.result.lrs
    assert "--lr a number" in str(e.value) and "--lr-start/--lr-end" in str(e.value)  # lr-find's options, named as such
    assert (tmp_path / "lr_find.png").exists()  # written before the error: it shows the curve


def test_sweep_stops_when_an_epoch_gives_no_batch():
    from imgclf.errors import UserError

    with pytest.raises(UserError, match="no batch"):
        _sweep(_Loader(n=0))


def test_lr_find_with_a_batch_larger_than_the_train_split(small_sample):
    # drop_last=True made the loader empty and the sweep loop forever; training's rule caps the batch at
    # the training images (360 after the 10% held out), as train does
    from imgclf.engine.lr_find import NoDescentError
    from imgclf.models.commands import find_lr

    try:
        res = find_lr(data=str(small_sample), batch_size=1024, steps=6, out=None, progress=False)
    except NoDescentError as e:
        res = e.result
    assert len(res.lrs) == 6 and res.extras["batch_size"] == 360


def test_lr_find_sweeps_the_set_up_train_uses(small_sample):
    # multi-label data with mixup: multi-hot targets, mixed as multi-hot, under the multi-label loss
    # (it was cross-entropy on float targets, and BatchAugment one-hot encoded them: a traceback)
    from imgclf.engine.lr_find import NoDescentError
    from imgclf.errors import UserError
    from imgclf.models.commands import find_lr

    try:
        res = find_lr(data=str(small_sample), task="multilabel", mixup=0.2, steps=6, out=None, progress=False)
    except NoDescentError as e:
        res = e.result
    assert len(res.lrs) == 6 and all(np.isfinite(res.losses))
    # --loss goes through train's imbalance_setup: its checks apply here too
    with pytest.raises(UserError, match="--loss bce is for multi-label data"):
        find_lr(data=str(small_sample), loss="bce", steps=6, out=None, progress=False)


def test_steps_below_five_are_refused_up_front(small_sample, capsys):
    from imgclf.cli import main

    assert main(["lr-find", "--data", str(small_sample), "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--steps 3" in err and "at least 5" in err and "not finite" not in err


def test_too_few_usable_steps_are_worded_for_each_entry_point():
    from imgclf.errors import UserError

    def nan_loss(logits, target):
        return logits.sum() * float("nan")

    with pytest.raises(UserError, match="lower --lr-start"):
        _sweep(_Loader(), loss_fn=nan_loss)
    with pytest.raises(UserError) as e:
        _sweep(_Loader(), loss_fn=nan_loss, entry="train")
    assert "--lr a number instead of auto" in str(e.value) and "--lr-start" not in str(e.value)


def test_sweep_step_has_the_trainers_l2_and_clipping(monkeypatch):
    import torch
    import torch.nn.functional as F

    from imgclf.engine.optim import l2_penalty

    loader = _Loader()
    torch.manual_seed(0)
    fresh = torch.nn.Linear(4, 3)
    x, y = loader.batches[0]
    with torch.no_grad():
        expected = float(F.cross_entropy(fresh(x), y) + 0.5 * l2_penalty(fresh))
    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: calls.append(m) or clip(p, m, *a, **k))
    model, res = _sweep(loader, l2=0.5, clip_grad=0.25)
    assert res.losses[0] == pytest.approx(expected, rel=1e-5)  # the first step's loss includes the penalty
    assert calls == [0.25] * 8


def test_sweep_drops_the_steps_the_fp16_scaler_skips():
    # step 3's gradients overflow (a finite loss): GradScaler skips that step, as in training,
    # and the curve leaves it out; without the scaler the inf/nan gradients reach the weights
    import torch

    from imgclf.config import make_config
    from imgclf.engine.lr_find import sweep

    step = {"n": 0}

    def loss_fn(logits, target):
        step["n"] += 1
        if step["n"] == 3:
            logits.register_hook(lambda g: g * float("inf"))
        return torch.nn.functional.cross_entropy(logits, target)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = make_config(None, data="unused", optimizer="sgd", momentum=0.9, weight_decay=0.0, label_smoothing=0.0,
                      backbone_lr_scale=1.0, precision="fp16")
    res = sweep(model, cfg, _Loader(), lambda x, y, g, p: (x, y), torch.device("cpu"), loss_fn, steps=8,
                start=1e-4, end=1e-1)
    assert len(res.lrs) == 7 and all(np.isfinite(res.losses)) and not res.stopped


def test_train_lr_auto_falls_back_to_the_recipe_lr_when_the_curve_never_fell(small_sample, tmp_path, monkeypatch,
                                                                              capfd):
    import yaml

    import imgclf
    from imgclf.engine import lr_find

    monkeypatch.setattr(lr_find, "descent_problem", lambda lrs, sm, losses=None: "the loss only rose")
    monkeypatch.setattr(lr_find, "DEFAULT_MIN_STEPS", 20)  # the curve is judged "never fell" whatever its length
    res = imgclf.train(data=str(small_sample), lr="auto", epochs=1, project=str(tmp_path), name="flat",
                       progress=False, tensorboard=False, tta=False)
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert cfg["lr"] == pytest.approx(1.5 * cfg["batch_size"] / 1024)  # fastnet's recipe lr, not ~lr_start
    assert "training with the recipe's lr" in capfd.readouterr().err
    assert (res.run_dir / "lr_find.png").exists() and len(res.history) == 1


# -- what the sweep moves, what it leaves behind, and when its curve says something ---------------


class _ImageLoader:
    """4 fixed batches of 16 random 3x8x8 images whose class (0-2) follows their mean colour."""

    batch_size = 16

    def __init__(self):
        import torch

        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(4):
            x = torch.randn(16, 3, 8, 8, generator=g)
            self.batches.append((x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()))

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch: int = 0):
        yield from self.batches


def test_sweep_holds_muons_filters_still_and_leaves_the_model_as_it_was():
    # Muon's filters step by muon_lr whatever the swept lr: they used to learn during a sweep over
    # lrs at which nothing else can (1e-9..1e-8), and the finder "found" 1e-9 (the old code: a
    # suggestion of 1e-9, the smoothed loss 1.08 -> 0.83)
    import torch

    from imgclf.config import make_config
    from imgclf.engine.lr_find import sweep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    model[4].bias.requires_grad_(False)  # a frozen parameter stays frozen
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = make_config(None, data="unused", optimizer="muon", muon_lr=0.24, muon_momentum=0.6, momentum=0.9,
                      weight_decay=0.0, label_smoothing=0.0, backbone_lr_scale=1.0, precision="fp32")
    res = sweep(model, cfg, _ImageLoader(), lambda x, y, g, p: (x, y), torch.device("cpu"), steps=30,
                start=1e-9, end=1e-8)
    assert res.no_descent and res.suggestion is None and res.as_dict()["suggestion"] is None
    assert max(res.smoothed) - min(res.smoothed) < 0.02  # nothing learnt: the loss stayed where it began
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fall_within_the_noise_is_no_descent():
    from imgclf.engine.lr_find import descent_problem, fall_p_value

    rng = np.random.default_rng(0)
    lrs = list(np.geomspace(1e-7, 10, 100))
    noisy = [2.3 + 0.2 * v for v in rng.standard_normal(100)]  # flat: its lowest wobble is ~4% below its start
    sm = smooth(noisy)
    assert (sm[5] - min(sm[5:])) / sm[5] > 0.03
    assert "no clear descent" in descent_problem(lrs, sm, noisy)
    falling = [v - 0.006 * max(0, i - 40) for i, v in enumerate(noisy)]  # the same noise on a real descent
    assert descent_problem(lrs, smooth(falling), falling) == "" and fall_p_value(falling, 5) < 0.01


def test_a_minimum_at_the_end_of_the_range_is_said(capsys):
    from imgclf import log

    def falling(logits, target):  # a loss that falls to the last step
        falling.n += 1
        return logits.sum() * 0 + 3.0 - 0.05 * falling.n
    falling.n = 0
    log.reset()
    _, res = _sweep(_Loader(), steps=30, loss_fn=falling)
    assert res.at_end and res.as_dict()["minimum_at_end"] is True and res.suggestion is not None
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert "last 10% of the sweep" in line and "widen --lr-end" in line


def test_default_sweep_length():
    from imgclf.engine.lr_find import default_steps

    # ~2 epochs, but never fewer than 100 points (small data is cycled) nor more than 200
    assert [default_steps(range(n)) for n in (5, 60, 1000)] == [100, 120, 200]


def test_lr_find_out_is_checked_before_the_sweep(small_sample, tmp_path, capsys, monkeypatch):
    import torch

    from imgclf.cli import main
    from imgclf.engine import lr_find
    from imgclf.engine.lr_find import NoDescentError
    from imgclf.models.commands import find_lr

    (tmp_path / "a-file").write_text("")
    # both used to fail with a traceback after the whole sweep
    for out, msg in (("lr.json", "the plot is an image: name a .png, .svg, .pdf file"),
                     (str(tmp_path / "a-file" / "lr.png"), "cannot write in the folder")):
        assert main(["lr-find", "--data", str(small_sample), "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    # no suffix: a PNG, and the path said is the one written; the sweep runs at train's memory format
    layouts = []
    real = lr_find.sweep

    def spy(model, *a, **k):
        w = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 3)
        layouts.append(w.is_contiguous(memory_format=torch.channels_last))
        return real(model, *a, **k)

    monkeypatch.setattr(lr_find, "sweep", spy)
    try:
        res = find_lr(data=str(small_sample), steps=6, out=tmp_path / "foo", progress=False)
    except NoDescentError as e:
        res = e.result
    assert res.extras["plot"] == str(tmp_path / "foo.png") and (tmp_path / "foo.png").stat().st_size > 10_000
    assert (tmp_path / "foo.json").exists() and not (tmp_path / "foo").exists() and layouts == [True]


def test_lr_find_refuses_training_options_that_do_not_reach_the_sweep(small_sample, capsys):
    from imgclf.cli import main

    rc = main(["lr-find", "--data", str(small_sample), "--devices", "2", "--time-limit", "60", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "--[no-]tensorboard, --devices, --time-limit do not apply to the lr sweep" in err
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    text = capsys.readouterr().out
    assert "--devices" not in text and "--schedule" not in text and "--momentum" in text
    assert "default: lr_find.png in the current folder" in " ".join(text.split())
