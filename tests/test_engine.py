"""Schedules and callbacks in isolation (no training needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import imgclf
from imgclf.engine.callbacks import EarlyStopping, ReduceOnPlateau
from imgclf.engine.schedule import lr_factor


class _T:
    stop = None
    lr_scale = 1.0
    settling = False


def test_onecycle_is_the_airbench_triangle():
    f = [lr_factor("onecycle", s, 100, warmup=23, start=0.2, end=0.07) for s in range(101)]
    assert f[0] == pytest.approx(0.2) and f[23] == pytest.approx(1.0) and f[100] == pytest.approx(0.07)
    assert max(f) == pytest.approx(1.0) and np.argmax(f) == 23


def test_cosine_with_warmup_and_step():
    f = [lr_factor("cosine", s, 110, warmup=10, start=0.1, end=0.0) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[10] == pytest.approx(1.0) and f[110] == pytest.approx(0.0, abs=1e-9)
    assert f[60] == pytest.approx(0.5)
    g = [lr_factor("step", s, 100, steps_per_epoch=10, step_epochs=3, gamma=0.1) for s in (0, 29, 30, 60)]
    assert g == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert lr_factor("constant", 50, 100) == 1.0


def test_early_stopping_waits_for_patience():
    t, es = _T(), EarlyStopping("val_acc", patience=2)
    for acc in (0.5, 0.6, 0.59, 0.6):
        es.on_epoch_end(t, {"val_acc": acc})
    assert t.stop is not None and "val_acc" in t.stop
    t2, es2 = _T(), EarlyStopping("val_loss", patience=2)
    for loss in (1.0, 0.9, 0.95, 0.8, 0.85):
        es2.on_epoch_end(t2, {"val_loss": loss})
    assert t2.stop is None


def test_warm_up_and_early_crop_epochs_are_not_counted_as_plateaus():
    """The untimed default run on the full CIFAR-10 copy (43 steps per epoch, warm-up 127 steps,
    crops until step 276 of 551) and its recorded validation scores: patience 2 must not stop it
    at epoch 4, nor a plateau schedule cut its lr, while its steps are warm-up or crops."""
    from imgclf.engine.trainer import Trainer

    t = _T()
    t.warmup_steps, t.crop_end = 127, 276
    es, rp = EarlyStopping("val_acc", patience=2), ReduceOnPlateau("val_acc", patience=1, factor=0.5)
    for epoch, acc in enumerate((0.598, 0.642, 0.587, 0.479, 0.642, 0.688, 0.756, 0.783, 0.834), start=1):
        t.step = 43 * epoch
        t.settling = Trainer.settling.fget(t)
        assert t.settling == (epoch <= 6)
        es.on_epoch_end(t, {"val_acc": acc})
        rp.on_epoch_end(t, {"val_acc": acc})
    assert t.stop is None and t.lr_scale == 1.0
    for acc in (0.83, 0.82):  # two epochs without improvement past the settling phase
        t.step += 43
        es.on_epoch_end(t, {"val_acc": acc})
    assert t.stop is not None


def test_plateau_reduces_lr_after_patience():
    t, rp = _T(), ReduceOnPlateau("val_loss", patience=2, factor=0.5)
    rp.on_epoch_end(t, {"val_loss": 1.0})
    rp.on_epoch_end(t, {"val_loss": 1.1})
    assert t.lr_scale == 1.0  # one bad epoch of the two it waits for
    rp.on_epoch_end(t, {"val_loss": 1.2})
    assert t.lr_scale == 0.5  # the 2nd bad epoch in a row drops it (as Keras and EarlyStopping count)
    rp.on_epoch_end(t, {"val_loss": 0.5})
    assert t.lr_scale == 0.5 and not math.isnan(rp.best)


def test_plateau_schedule_and_early_stopping_in_a_real_run(small_sample, tmp_path):
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), model="plaincnn",
                       model_args={"channels": [8, 16], "dense": [32]}, schedule="plateau", plateau_patience=0,
                       plateau_factor=0.5, early_stopping=2, monitor="val_loss", epochs=12, lr=0.05,
                       optimizer="sgd", batch_size=32, progress=False, tensorboard=False)
    # replay both rules from the recorded val_loss: patience 0 halves the lr after every epoch
    # that did not improve on the best; two such epochs in a row end the run there
    lrs = [r["lr"] for r in res.history]
    best, lr, bad = math.inf, lrs[0], 0
    for i, row in enumerate(res.history):
        assert lrs[i] == pytest.approx(lr), f"epoch {i + 1}"
        if row["val_loss"] < best:
            best, bad = row["val_loss"], 0
        else:
            lr, bad = lr * 0.5, bad + 1
        if bad == 2:
            assert i == len(res.history) - 1, f"did not stop after epoch {i + 1}"
            break
    else:
        assert len(res.history) == 12
    assert min(lrs) < lrs[0]  # the rule fired at least once (so the replay checked a reduction)


def test_fastnet_gradients_stay_bounded_on_flat_colour_images():
    """Flat patches leave 18 of the whitening stem's 24 channels constant (its bias alone), and
    the Dirac-initialised convs copy them into every group: BatchNorm then sees zero-variance
    channels, whose backward multiplies the gradient by 1/sqrt(eps) per layer. At eps 1e-12 a
    bf16 step gave the (SGD-trained) stem bias a gradient of ~1e28; the next step overflowed."""
    import torch
    import torch.nn.functional as F

    from imgclf.models.nets import FastNet

    torch.manual_seed(0)
    net = FastNet(3, 32)
    x = ((torch.rand(48, 3, 1, 1) - 0.5) / 0.29).expand(48, 3, 32, 32).contiguous()  # normalised flat colours
    net.init_from_data(x)
    x = x[:16, :, :24, :24].contiguous()  # one batch of early crops, as the first steps train
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    F.cross_entropy(out.float(), torch.arange(16) % 3).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert net.whiten.bias.grad.abs().max() < 1e3


def test_a_batch_larger_than_the_data_is_the_data_and_scales_the_lr_as_such(capfd):
    """--batch-size 4096 on 270 images: every step is the 270 images, so the lr is the one of
    --batch-size 270 (it was scaled for 4096, 15x as large), and the log says so."""
    from imgclf.config import TrainConfig
    from imgclf.engine import recipe

    for arch, opt in (("fastnet", "sgd"), ("plaincnn", "adamw")):
        big = recipe.resolve(TrainConfig(data="x", batch_size=4096, optimizer=opt), n_train=270, image_size=32,
                             arch=arch)
        exact = recipe.resolve(TrainConfig(data="x", batch_size=270, optimizer=opt), n_train=270, image_size=32,
                               arch=arch)
        assert big.batch_size == 270 and big.lr == exact.lr
    assert "--batch-size 4096 is more than the 270 training images: batches of 270" in capfd.readouterr().err
    # two processes share each batch equally: 269 images make batches of 268
    assert recipe.resolve(TrainConfig(data="x", batch_size=512), n_train=269, image_size=32, arch="fastnet",
                          world=2).batch_size == 268


def test_options_the_run_does_not_use_are_said_to_be_ignored(capfd):
    from imgclf.config import TrainConfig
    from imgclf.engine import recipe

    def said(**kw) -> str:
        recipe.resolve(TrainConfig(data="x", **kw), n_train=5000, image_size=32, arch="fastnet")
        return capfd.readouterr().err

    assert "--muon-lr: not used by --optimizer adamw" in said(optimizer="adamw", muon_lr=0.1)
    assert "--beta1, --eps: not used by --optimizer sgd" in said(optimizer="sgd", beta1=0.8, eps=1e-6)
    assert "--warmup-epochs 5 is not shorter than the run (1 epochs)" in said(epochs=1, warmup_epochs=5)
    assert "--early-crop 48 is not smaller than the 32px input" in said(early_crop=48)
    # a run's own config.yaml sets every key, at its default where the user did not: nothing to say
    resolved = recipe.resolve(TrainConfig(data="x", optimizer="sgd"), n_train=5000, image_size=32, arch="fastnet")
    capfd.readouterr()
    assert said(**resolved.model_dump(exclude={"data", "image_size", "model"})) == ""


def test_model_arguments_of_the_wrong_type_are_named():
    """--model-args width=abc was "type str doesn't define __round__ method"."""
    from imgclf.errors import UserError
    from imgclf.models.registry import build_model

    with pytest.raises(UserError, match=r"FastNet: model argument width='abc' is not a number \(its default: 1.0\)"):
        build_model("fastnet", 10, 32, {"width": "abc"})
    with pytest.raises(UserError, match="batchnorm='yes' is not true or false"):
        build_model("plaincnn", 10, 32, {"batchnorm": "yes"})
    assert build_model("fastnet", 10, 32, {"width": 2}) is not None  # an int for a float is fine
