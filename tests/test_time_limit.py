"""--time-limit: the run length is planned from the measured step time so the whole train() call,
closing evaluation included, ends within the budget; on the packaged CIFAR-10 sample."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch

import imgclf
from imgclf.config import TrainConfig, make_config
from imgclf.engine.callbacks import Callback


def test_time_limit_units():
    assert [TrainConfig(data="d", time_limit=v).time_limit for v in (600, "600", "90s", "10m", "1.5h")] == [
        600.0, 600.0, 90.0, 600.0, 5400.0]
    for bad in ("ten", "0", "-5m", "m"):
        with pytest.raises(ValueError, match="positive finite duration"):
            TrainConfig(data="d", time_limit=bad)


def test_cli_bad_time_limit_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "imgclf", "train", "--data", str(tmp_path), "--time-limit", "soon"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and "--time-limit soon:" in lines[0], r.stderr  # the flag as typed


def test_run_fits_the_budget_and_anneals(small_sample, tmp_path, slowness):
    # decoding, the timing probe, the TTA test pass, the temperature and the report take a few
    # seconds of the budget; training gets the rest
    from imgclf.engine import recipe

    budget = 20.0 * slowness
    t0 = time.perf_counter()
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), name="tl", time_limit=budget,
                       progress=False, tensorboard=False)
    wall = time.perf_counter() - t0
    # training, calibration, the TTA test pass, plots and the report all inside the budget
    # (1.5 s of slack for a noisy machine: the plan is re-made every epoch from measured times)
    assert wall <= budget + 1.5 * slowness, wall
    epochs = res.config.epochs
    # what the recipe would have run without a budget (100 epochs on these 360 images)
    unbudgeted = recipe.resolve(make_config(None, data=str(small_sample)), n_train=360, image_size=32,
                                arch="fastnet").epochs
    assert 1 <= epochs < 0.8 * unbudgeted, (epochs, unbudgeted)
    assert len(res.history) == math.ceil(epochs)
    assert make_config(res.run_dir / "config.yaml").epochs == epochs  # the plan is in the repeatable config
    # the schedule was stretched to the planned length, not cut: the last lr is the annealed end
    # (onecycle ends at 0.07x the peak), not the peak of a run stopped midway
    # (the lr of the last step; a run stopped midway would sit near the peak)
    assert res.history[-1]["lr"] <= 0.25 * res.config.lr
    assert res.test["top1"] > 0.25  # it learned (chance 0.1)


def test_explicit_epochs_cap_the_plan(small_sample, tmp_path):
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), epochs=2, time_limit="5m",
                       progress=False, tensorboard=False)
    assert res.config.epochs == 2 and len(res.history) == 2


@pytest.mark.slow
def test_resume_keeps_the_planned_length(small_sample, tmp_path, slowness):
    class Crash(Callback):
        def on_epoch_end(self, t, row):
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    opts = dict(data=str(small_sample), project=str(tmp_path), time_limit=12 * slowness, progress=False,
                tensorboard=False)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(name="cut", callbacks=[Crash()], **opts)
    assert 2 < make_config(tmp_path / "cut" / "config.yaml").epochs < 100
    resumed = imgclf.train(resume=tmp_path / "cut", progress=False)
    # the crash came after the epoch-2 re-plan but before its checkpoint: the run follows the plan
    # saved in last.pt (epoch 1's), and config.yaml is rewritten to say so
    planned = make_config(tmp_path / "cut" / "config.yaml").epochs
    assert resumed.config.epochs == planned
    assert len(resumed.history) == math.ceil(planned)


@pytest.mark.slow
def test_slower_steps_midway_are_replanned_not_cut(small_sample, tmp_path, slowness):
    # from epoch 3 on every step takes 40 ms longer (what unfreezing a backbone does): the plan
    # follows within a window, so the run still ends in budget on its annealed schedule rather
    # than being stopped at the deadline with the lr high
    class Slower(Callback):
        def on_step_end(self, t):
            if t.epoch >= 2:
                time.sleep(0.04)

    budget = 14.0 * slowness
    t0 = time.perf_counter()
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), time_limit=budget, callbacks=[Slower()],
                       progress=False, tensorboard=False)
    assert time.perf_counter() - t0 <= budget + 1.5 * slowness
    assert len(res.history) == math.ceil(res.config.epochs)
    assert res.history[-1]["lr"] <= 0.12 * res.config.lr


def test_budget_spent_by_setup_still_gives_a_model(small_sample, tmp_path, capfd):
    # 2 s is less than decoding plus the first timed steps: the run stops at the deadline check,
    # still writes a model and evaluates it, and config.yaml records the length it ran
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), time_limit=2, progress=False, tensorboard=False)
    err = capfd.readouterr().err
    assert "time limit reached" in err
    assert "--time-limit 2 is 2 seconds, less than reading data and timing the first steps usually take" in err
    assert (res.run_dir / "model.safetensors").exists() and res.test["n"] == 100
    # planning (and so the deadline check) comes after the first 8 timed steps, inside epoch 1
    assert len(res.history) == 1
    assert make_config(res.run_dir / "config.yaml").epochs == res.config.epochs < 1


class SlowInference(Callback):
    """Every forward pass in eval mode (validation, the closing evaluation, calibration, the
    report) 10 ms per image slower, training steps unchanged: inference dear relative to a
    training step, as with a backbone frozen for the whole run, but more so."""

    def on_train_start(self, t):
        model, forward = t.model, t.model.forward

        def slow_in_eval(x):
            if not model.training:
                time.sleep(0.01 * x.shape[0])
            return forward(x)

        model.forward = slow_in_eval


@pytest.mark.slow
def test_closing_evaluation_is_budgeted_from_measured_inference(small_sample, tmp_path, slowness):
    budget = 30.0 * slowness
    t0 = time.perf_counter()
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), name="slow-eval", time_limit=budget,
                       progress=False, tensorboard=False, callbacks=[SlowInference()])
    wall = time.perf_counter() - t0
    # ~1,100 forward passes follow training (100 test images x 6 TTA views, 40 val images for the
    # temperature, too few for a TTA one, 460 for the report's sections): ~11 s here. A reserve
    # guessed from the training step (a third of a step per image, ~1.3 ms) would count ~1.5 s
    # and overrun by ~10 s.
    assert wall <= budget + 1.5 * slowness, wall
    # it trained (~1 epoch of 360 images; less on a slow, busy machine), then evaluated, in the budget
    assert res.config.epochs > 0.3 and res.test is not None


@pytest.mark.slow
def test_validation_time_is_not_taken_for_step_time(small_sample, tmp_path, monkeypatch, slowness):
    # a slow validation (1 s per epoch here; 5k images on the full data) sits between an epoch's
    # last step and the epoch-end re-plan: counted as step time, it inflated the step estimate
    # and shrank the plan at every epoch end
    from imgclf.engine.callbacks import TimeBudget
    from imgclf.engine.trainer import Trainer

    validate = Trainer.validate

    def slow_validate(self):
        time.sleep(1.0)
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", slow_validate)

    class Watch(Callback):
        def __init__(self):
            self.step_ends, self.estimates = [], []

        def on_epoch_start(self, t, epoch):
            self.step_ends.append([])

        def on_step_end(self, t):
            self.step_ends[-1].append(time.perf_counter())

        def on_epoch_end(self, t, row):  # after TimeBudget's re-plan (it runs first)
            budget = next(c for c in t.callbacks if isinstance(c, TimeBudget))
            self.estimates.append(budget.step_s)

    w = Watch()
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), time_limit=14 * slowness, val_split=0.2, callbacks=[w],
                       progress=False, tensorboard=False)
    gaps = [b - a for ends in w.step_ends for a, b in zip(ends, ends[1:])]
    real = float(sorted(gaps)[len(gaps) // 2])
    est = sorted(e for e in w.estimates if e is not None)
    # the bug inflated every epoch's estimate (1 s over ~10 steps: ~2x); the median keeps one
    # noisy window on a busy machine (seen: 1.51x once) from failing the test
    assert est and est[len(est) // 2] < 1.4 * real, (est, real)
    assert len(res.history) == math.ceil(res.config.epochs) >= 3


@pytest.mark.slow
def test_one_step_epochs_are_timed_too(small_sample, tmp_path, slowness):
    # 400 images in batches of 512: one step per epoch, so no timing window ever held a step
    # and the run ignored its budget (the recipe's 100 epochs)
    budget = 10.0 * slowness
    t0 = time.perf_counter()
    res = imgclf.train(data=str(small_sample / "train"), project=str(tmp_path), time_limit=budget, val_split=0,
                       batch_size=512, progress=False, tensorboard=False)
    assert time.perf_counter() - t0 <= budget + 1.5 * slowness
    assert 2 <= res.config.epochs < 100 and len(res.history) == math.ceil(res.config.epochs)


def test_budget_width_picks_the_widest_net_that_still_gets_enough_epochs():
    from imgclf.engine.recipe import budget_width

    cost = {1.0: 1.15, 1.25: 1.58, 1.5: 2.2}  # seconds per step at batch 1024, as on the dev machine
    timed = []

    def step_s(w):
        timed.append(w)
        return cost[w]

    # 600 s on the dev machine: ~13 epochs at width 1, so a 1.25x wider net would get < 11: not
    # even timed
    assert budget_width(step_s, 560, 48, 0.78)[0] == 1.0 and timed == [1.0]
    timed.clear()
    # a machine 1.4x faster (or a 900-s budget here): 19 epochs at width 1, 13.9 at 1.25, 10 at 1.5
    width, epochs = budget_width(step_s, 820, 48, 0.78)
    assert width == 1.25 and timed == [1.0, 1.25, 1.5]
    assert epochs[1.25] == pytest.approx(13.87, abs=0.01) and epochs[1.5] < 11
    timed.clear()
    assert budget_width(step_s, 2000, 48, 0.78)[0] == 1.5  # a GPU's budget


def test_budget_width_goes_narrower_on_a_slow_machine():
    from imgclf.engine.recipe import budget_width

    # step seconds at batch 1024 as timed on a 2-core Xeon without AMX (fp32): width 1 gets ~5
    # epochs in 600 s, and width 0.5 (89.34% at 18.6 epochs) beat width 1 (88.51% at 4.7)
    cost = {0.5: 0.62, 0.75: 1.28, 1.0: 2.25, 1.25: 3.1, 1.5: 4.3}
    timed = []

    def step_s(w):
        timed.append(w)
        return cost[w]

    width, epochs = budget_width(step_s, 520, 48, 0.78)
    assert width == 0.5 and timed == [1.0, 0.75, 0.5]  # narrower ones timed only once width 1 falls short
    assert epochs[1.0] < 11 <= epochs[0.5]
    timed.clear()
    # a machine where 0.75 is enough: 0.5 is not timed
    assert budget_width(step_s, 900, 48, 0.78)[0] == 0.75 and timed == [1.0, 0.75]
    timed.clear()
    # far too slow for any: the narrowest, which gets the most epochs
    assert budget_width(step_s, 60, 48, 0.78)[0] == 0.5
    # widths given without width 1 start from the one nearest to it
    timed.clear()
    assert budget_width(step_s, 520, 48, 0.78, widths=(0.5, 0.75))[0] == 0.5 and timed == [0.75, 0.5]


def test_width_probe_scales_the_passes_to_the_batch_but_not_the_optimizer_step(monkeypatch):
    # The probe times a quarter batch. Muon's Newton-Schulz iterations cost the same at any batch:
    # scaled x4 with the passes, a 2.8-s update on an AVX2 CPU made width 1 look 2x too slow.
    # Sleeps stand in for the work so the figure does not ride on this machine's noise (two real
    # ~2.5-s probes differed by 0.3 s on a busy CI machine).
    from types import SimpleNamespace

    from imgclf import api
    from imgclf.engine import optim, recipe
    from imgclf.engine.trainer import resolve_precision
    from imgclf.models import nets

    class SleepyNet(torch.nn.Module):
        def __init__(self, n, size, width=1.0):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, n)

        def forward(self, x):
            time.sleep(0.1)  # the forward and backward passes of a quarter batch
            return self.head(self.conv(x[:, :, :4, :4]).mean((2, 3)))

    real = optim.build_optimizer

    def slow_optimizer(model, cfg):
        opt = real(model, cfg)
        step = opt.step

        def slow_step(*a, **kw):
            time.sleep(0.5)
            return step(*a, **kw)

        opt.step = slow_step
        return opt

    monkeypatch.setattr(nets, "FastNet", SleepyNet)
    monkeypatch.setattr(optim, "build_optimizer", slow_optimizer)
    cfg = recipe.resolve(TrainConfig(data="x", batch_size=1024), n_train=50_000, image_size=16, arch="fastnet")
    cpu = torch.device("cpu")
    s = SimpleNamespace(cfg=cfg, size=16, device=cpu, src=SimpleNamespace(classes=list("abcdefghij")))
    step_s = api._fastnet_step_seconds(s, 1.0, resolve_precision("fp32", cpu))
    # passes x4 (0.4 s) plus one 0.5-s update; scaling the update with the batch gave 2.4 s
    assert 0.88 < step_s < 1.3, step_s


@pytest.mark.slow
def test_time_limited_fastnet_records_the_width_it_chose_and_pays_for_lr_auto(small_sample, tmp_path, monkeypatch,
                                                                              capfd, slowness):
    # early crops on (the large-data recipe) and a bar every width clears: the widest is chosen
    # from timed steps, and config.yaml and model.json both say so, so a repeat builds the same net.
    # With lr auto, the width probe runs before the lr finder has chosen the lr: it must not need
    # one, and the finder's sweep is paid for inside the same budget.
    import json

    from imgclf.engine import recipe

    monkeypatch.setattr(recipe, "BUDGET_MIN_EPOCHS", 0.5)
    budget = 40.0 * slowness
    t0 = time.perf_counter()
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), time_limit=budget, early_crop=24, lr="auto",
                       progress=False, tensorboard=False)
    took = time.perf_counter() - t0
    assert took <= budget + 1.5 * slowness, f"{took:.1f}s"
    err = capfd.readouterr().err
    assert "fastnet width 1.5" in err and "3 width(s) timed" in err  # each width's steps timed, none assumed
    cfg = make_config(res.run_dir / "config.yaml")
    assert cfg.model_args == {"width": 1.5}
    assert json.loads((res.run_dir / "model.json").read_text())["arch_args"]["width"] == 1.5
    assert isinstance(cfg.lr, float) and (res.run_dir / "lr_find.json").exists()
    assert res.test["top1"] > 0.2


def test_a_checkpoint_within_an_epoch_is_not_timed_as_steps():
    """A mid-epoch checkpoint (checkpoint_minutes) may take seconds: the timing window and the
    epoch's timing skip it, so the plan does not take it for slower steps."""
    from types import SimpleNamespace

    from imgclf.engine.callbacks import TimeBudget

    budget = TimeBudget(time.perf_counter() + 100)
    t = SimpleNamespace(step=5, frozen_end=0, crop_size=lambda: 0, device=torch.device("cpu"))
    budget.on_epoch_start(t, 0)
    budget.on_step_end(t)  # opens a window
    w_t0, e_t0 = budget.w_t0, budget.e_t0
    budget.on_checkpoint(t, 2.5)
    assert (budget.w_t0, budget.e_t0) == (w_t0 + 2.5, e_t0 + 2.5)


def test_a_lone_slow_window_is_set_aside_and_a_second_one_taken():
    """A single timing window far off the estimate (a stall: another process) no longer replaces
    it, which re-planned a fine-tune 2.5 -> 1.9 -> 2.6 epochs and jolted its lr schedule; two in a
    row the same way are a new speed, taken at once."""
    from imgclf.engine.callbacks import TimeBudget

    budget = TimeBudget(time.perf_counter() + 100)
    budget.w_kind = "step"

    def window(seconds_per_step: float) -> float:
        budget.w_t0, budget.w_steps = 0.0, 10
        budget._close_window(10 * seconds_per_step)
        return budget.step_s

    assert window(1.0) == 1.0  # the first window sets the estimate
    assert window(1.1) == pytest.approx(1.03)  # near it: smoothed
    assert window(2.0) == pytest.approx(1.03)  # a stall: set aside
    assert window(1.0) == pytest.approx(1.021)  # and forgotten once the speed is back
    assert window(0.5) == pytest.approx(1.021)  # faster once: set aside too
    assert window(2.0) == pytest.approx(1.021)  # off the other way: not the same change
    assert window(2.2) == pytest.approx(2.1)  # slower twice in a row: the new speed
    assert window(2.1) == pytest.approx(2.1)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_a_replan_past_the_warmup_never_sends_the_lr_back_up(schedule):
    """A longer plan past the warm-up used to stretch the schedule: the lr jumped back up from
    where annealing had taken it (plans of 11.5, 46.9 and 17.9 epochs on a busy machine: the lr
    fell, rose, fell). Now the schedule carries on from where it is, to zero at the new end."""
    from types import SimpleNamespace

    from imgclf.engine.trainer import Trainer

    t = object.__new__(Trainer)
    t.cfg = SimpleNamespace(schedule=schedule, lr_start_factor=0.0, lr_end_factor=0.0, step_epochs=30, gamma=0.1,
                            early_crop=0, epochs=10.0, warmup_epochs=1.0)
    t.steps_per_epoch, t.lr_scale, t.crop_frac, t.crop_end = 10, 1.0, 0.0, 0
    t.total_steps, t.warmup_steps, t.step, t.lr_anchor = 100, 10, 0, None
    t.optimizer = SimpleNamespace(param_groups=[{"base_lr": 1.0, "lr": 0.0}])
    lrs = []
    for step in range(400):
        t.step = step
        if step == 40:
            t.set_total_steps(300)  # much longer
        elif step == 120:
            t.set_total_steps(150)  # then shorter
        elif step == 130:
            t.set_total_steps(260)  # then longer again
        if step >= t.total_steps:
            break
        lrs.append(t._set_lr())
    after = lrs[10:]  # past the warm-up: only ever down
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert len(lrs) == 260 and lrs[-1] < 0.01  # annealed to the end of the last plan
    jumps = [abs(b - a) for a, b in zip(lrs[10:], lrs[11:])]
    assert max(jumps) < 0.05  # no step in the lr at a re-plan
    assert t.lr_anchor is not None and t.lr_anchor[0] == 130  # the last re-plan's (last.pt keeps it)
