"""Early crops: the first part of a fastnet run trains on random same-scale crops (cheaper steps),
the rest on whole images; the boundary follows a --time-limit plan and survives a resume."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import imgclf
from imgclf.config import make_config
from imgclf.data.augment import AugmentSpec, BatchAugment, Normalize
from imgclf.engine.callbacks import Callback
from imgclf.errors import UserError


def test_crop_is_a_same_scale_window():
    x = torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    aug = BatchAugment(AugmentSpec(flip=False), Normalize((0, 0, 0), (1 / 255,) * 3, "cpu"), 10)
    g = torch.Generator().manual_seed(0)
    out, _ = aug(x, torch.zeros(4, dtype=torch.long), g, crop=24)
    assert out.shape == (4, 3, 24, 24)
    for i in range(4):  # each output is some 24x24 window of its own input, pixel for pixel
        img = out[i].permute(1, 2, 0).round().to(torch.uint8)
        hits = [(oy, ox) for oy in range(9) for ox in range(9) if torch.equal(x[i, oy:oy + 24, ox:ox + 24], img)]
        assert len(hits) == 1
    full, _ = aug(x, torch.zeros(4, dtype=torch.long), g, crop=0)
    assert full.shape == (4, 3, 32, 32)


def test_recipe_defaults():
    def resolved(**kw):
        from imgclf.engine import recipe

        return recipe.resolve(make_config(None, data="d", **kw), n_train=50_000, image_size=kw.pop("size", 32),
                              arch=kw.get("model", "fastnet"))

    assert resolved().early_crop == 24 and resolved().early_crop_fraction == 0.5
    # small data runs many epochs anyway: no crops there
    from imgclf.engine import recipe

    small = recipe.resolve(make_config(None, data="d"), n_train=2700, image_size=32, arch="fastnet")
    assert small.early_crop == 0 and small.epochs == 37
    assert resolved(model="plaincnn").early_crop == 0  # a flatten layer needs the full size
    assert resolved(early_crop=0).early_crop == 0  # the user's word stands
    # without a time limit the cheaper crop epochs buy more of them: the same compute as 10 whole
    assert resolved().epochs == 12.8 and resolved(early_crop=0).epochs == 10


class Shapes(Callback):
    """Records the input side of every training step."""

    def __init__(self):
        self.sides: list[int] = []

    def on_train_start(self, t):
        self.handle = t.model.register_forward_pre_hook(
            lambda m, a: self.sides.append(a[0].shape[-1]) if m.training else None)

    def on_train_end(self, t):
        self.handle.remove()


@pytest.mark.slow
def test_time_limited_plan_counts_the_cheap_steps(small_sample, tmp_path):
    """The plan solves for a length whose first half is crop steps; then it must end in budget."""
    rec = Shapes()
    budget = 18.0
    t0 = time.perf_counter()
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), time_limit=budget, batch_size=32,
                       early_crop=24, progress=False, tensorboard=False, callbacks=[rec])
    assert time.perf_counter() - t0 <= budget + 1.5
    n_crop = sum(s == 24 for s in rec.sides)
    # the boundary is half the plan at the time the run passes it; later re-plans move the end only
    assert 0.3 * len(rec.sides) <= n_crop <= 0.6 * len(rec.sides), (n_crop, len(rec.sides))
    assert rec.sides == [24] * n_crop + [32] * (len(rec.sides) - n_crop)
    cfg = make_config(res.run_dir / "config.yaml")  # the phase as run is in the repeatable config
    assert abs(cfg.early_crop_fraction * len(rec.sides) - n_crop) <= 1


@pytest.mark.slow
def test_crops_come_first_and_a_resume_keeps_the_boundary(small_sample, tmp_path):
    class Crash(Callback):
        def on_epoch_end(self, t, row):
            if row["epoch"] == 2:  # before epoch 2's checkpoint: resumes at step 6 of the 12 crop steps
                raise KeyboardInterrupt

    kw = dict(data=str(small_sample), epochs=4, batch_size=64, val_split=0.0, early_crop=24, progress=False,
              tensorboard=False)
    first = Shapes()
    # (set explicitly: the recipe turns crops on only for large data, where epochs are few)
    whole = imgclf.train(project=str(tmp_path / "a"), name="r", callbacks=[first], **kw)
    steps = len(first.sides)  # the first half of the steps are crops, the rest whole images
    assert whole.config.early_crop == 24
    assert first.sides == [24] * round(steps / 2) + [32] * (steps - round(steps / 2))
    assert whole.test["top1"] > 0.2  # evaluated on whole images (chance 0.1)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(project=str(tmp_path / "b"), name="r", callbacks=[Crash()], **kw)
    rec = Shapes()
    resumed = imgclf.train(resume=str(tmp_path / "b" / "r"), callbacks=[rec], progress=False)
    assert rec.sides == [24] * 6 + [32] * 12  # the boundary came back with the checkpoint
    a = np.array([r["train_loss"] for r in whole.history])
    b = np.array([r["train_loss"] for r in resumed.history])
    assert np.allclose(a, b, rtol=1e-5), (a, b)


def test_fixed_size_net_gets_one_line(small_sample, tmp_path):
    with pytest.raises(UserError, match="early-crop 24: plaincnn only takes 32-px inputs"):
        imgclf.train(data=str(small_sample), project=str(tmp_path), model="plaincnn", early_crop=24, epochs=1,
                     progress=False, tensorboard=False)
