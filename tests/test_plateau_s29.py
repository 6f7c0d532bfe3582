"""Keras' plateau and early-stopping settings (min_lr, cooldown, min_delta), one rule of
improvement for early stopping and the best weights, and keeping the last epoch's weights."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

import imgclf
from imgclf.config import TrainConfig
from imgclf.engine.callbacks import EarlyStopping, ReduceOnPlateau
from imgclf.engine.trainer import Trainer


def _t(lr: float = 0.1):
    return SimpleNamespace(stop=None, lr_scale=1.0, settling=False, cfg=SimpleNamespace(lr=lr))


def _scales(rp: ReduceOnPlateau, values, monitor: str = "val_loss", lr: float = 0.1) -> list[float]:
    t, out = _t(lr), []
    for v in values:
        rp.on_epoch_end(t, {monitor: v})
        out.append(t.lr_scale)
    return out


# -- 1. ReduceLROnPlateau's min_lr, cooldown and min_delta ----------------------------------------

def test_plateau_min_lr_is_an_absolute_floor_and_the_default_floor_is_unchanged():
    # peak lr 0.1, floor 0.01: 1 -> 0.2 -> 0.1 (0.04 would be under the floor) and no lower
    rp = ReduceOnPlateau("val_loss", patience=1, factor=0.2, min_lr=0.01)
    assert _scales(rp, [1.0, 1.1, 1.1, 1.1, 1.1]) == pytest.approx([1.0, 0.2, 0.1, 0.1, 0.1])
    # an lr already at or under the floor is not raised to it
    assert _scales(ReduceOnPlateau("val_loss", 1, 0.5, min_lr=0.5), [1.0, 1.1, 1.1], lr=0.1) == [1.0, 1.0, 1.0]
    # no min_lr: 1e-4 x the peak lr, as before the option (0.1 ** 5 stops at 1e-4)
    assert _scales(ReduceOnPlateau("val_loss", 1, 0.1), [1.0] + [1.1] * 6)[-2:] == pytest.approx([1e-4, 1e-4])


def test_plateau_cooldown_skips_the_epochs_after_a_drop():
    # patience 1, cooldown 2: a drop, two epochs not counted, then the next bad epoch drops it again
    rp = ReduceOnPlateau("val_loss", patience=1, factor=0.5, cooldown=2)
    assert _scales(rp, [1.0, 1.1, 1.2, 1.2, 1.2, 1.2]) == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    # an improvement within the cooldown still becomes the best
    rp = ReduceOnPlateau("val_loss", patience=1, factor=0.5, cooldown=2)
    _scales(rp, [1.0, 1.1, 0.7])
    assert rp.best == 0.7
    # the cooldown left is part of the state a checkpoint keeps; one written before it had none
    rp2 = ReduceOnPlateau("val_loss", patience=1, factor=0.5, cooldown=2)
    rp2.load_state_dict(ReduceOnPlateau("val_loss", 1, 0.5, cooldown=2).state_dict() | {"cooling": 1})
    assert rp2.cooling == 1
    rp2.load_state_dict({"best": 1.0, "bad": 0})
    assert rp2.cooling == 0


def test_plateau_and_early_stopping_min_delta():
    # improvements of 0.005 are not improvements by more than 0.01
    rp = ReduceOnPlateau("val_loss", patience=2, factor=0.5, min_delta=0.01)
    assert _scales(rp, [1.0, 0.995, 0.99, 0.985]) == [1.0, 1.0, 0.5, 0.5]
    t, es = _t(), EarlyStopping("val_acc", patience=2, min_delta=0.01)
    for acc in (0.5, 0.505, 0.51):
        es.on_epoch_end(t, {"val_acc": acc})
    assert t.stop == "early stopping: val_acc did not improve by more than 0.01 for 2 epochs"
    # without it, each small step is an improvement (today's rule)
    t, es = _t(), EarlyStopping("val_acc", patience=2)
    for acc in (0.5, 0.505, 0.51, 0.515):
        es.on_epoch_end(t, {"val_acc": acc})
    assert t.stop is None


def test_the_new_options_default_to_the_old_behaviour_and_are_flags():
    from imgclf.cli import build_parser

    cfg = TrainConfig(data="x")
    assert (cfg.plateau_min_lr, cfg.plateau_cooldown, cfg.plateau_min_delta, cfg.min_delta, cfg.keep) == \
        (None, 0, 0.0, 0.0, "best")
    args = build_parser().parse_args(["train", "--data", "x", "--plateau-min-lr", "1e-5", "--plateau-cooldown", "2",
                                      "--plateau-min-delta", "1e-4", "--min-delta", "0.01", "--keep", "last"])
    assert (args.plateau_min_lr, args.plateau_cooldown, args.plateau_min_delta, args.min_delta, args.keep) == \
        (1e-5, 2, 1e-4, 0.01, "last")


def test_the_trainer_passes_the_options_to_its_callbacks():
    cfg = TrainConfig(data="x", schedule="plateau", early_stopping=3, plateau_min_lr=1e-5, plateau_cooldown=2,
                      plateau_min_delta=1e-3, min_delta=0.01)
    fake = SimpleNamespace(cfg=cfg, val_loader=object(), run_dir=None, is_main=True, callbacks=[])
    Trainer._add_standard_callbacks(fake)
    rp = next(c for c in fake.callbacks if isinstance(c, ReduceOnPlateau))
    es = next(c for c in fake.callbacks if isinstance(c, EarlyStopping))
    assert (rp.min_lr, rp.cooldown, rp.min_delta, es.min_delta) == (1e-5, 2, 1e-3, 0.01)


# -- 2. one rule of improvement for early stopping and the best weights ---------------------------

def _track(monitor: str, min_delta: float = 0.0):
    """Trainer._track_best on a fake trainer (no run folder): the best epoch after each row."""
    fake = SimpleNamespace(cfg=SimpleNamespace(monitor=monitor, min_delta=min_delta), best=None, best_epoch=None,
                           run_dir=None, is_main=True, history=[])
    fake._ties_with_lower_loss = lambda m, row: Trainer._ties_with_lower_loss(fake, m, row)

    def step(row):
        fake.history.append(row)
        Trainer._track_best(fake, row)
        return fake.best_epoch

    return step


def test_early_stopping_counts_a_tie_with_a_lower_val_loss_as_the_best_weights_do():
    # the reviewer's run: epoch 10 ties epoch 8's val_acc with a lower val_loss and becomes the
    # best weights; early stopping counted it as a 3rd bad epoch and stopped at epoch 11
    rows = [(1, 0.5, 1.5), (2, 0.6, 1.2), (3, 0.7, 0.9), (4, 0.75, 0.8), (5, 0.78, 0.7), (6, 0.8, 0.65),
            (7, 0.82, 0.6), (8, 0.85, 0.52), (9, 0.84, 0.5), (10, 0.85, 0.45), (11, 0.83, 0.47)]
    t, es, best = _t(), EarlyStopping("val_acc", patience=3), _track("val_acc")
    for epoch, acc, loss in rows:
        row = {"epoch": epoch, "val_acc": acc, "val_loss": loss}
        es.on_epoch_end(t, row)
        kept = best(row)
    assert kept == 10 and t.stop is None and es.bad == 1
    # its state keeps the best epoch's loss, so a resumed run breaks the next tie the same way
    es2 = EarlyStopping("val_acc", patience=3)
    es2.load_state_dict(es.state_dict())
    t2 = _t()
    es2.on_epoch_end(t2, {"epoch": 12, "val_acc": 0.85, "val_loss": 0.46})
    assert es2.bad == 2  # a tie with a higher loss is no improvement
    es2.on_epoch_end(t2, {"epoch": 13, "val_acc": 0.85, "val_loss": 0.44})
    assert es2.bad == 0


@pytest.mark.parametrize("monitor,min_delta", [("val_acc", 0.0), ("val_acc", 0.1), ("val_loss", 0.0),
                                               ("val_loss", 0.05), ("val_map", 0.0)])
def test_every_epoch_the_best_weights_move_to_is_one_early_stopping_counted_as_an_improvement(monitor, min_delta):
    rng = random.Random(f"{monitor}{min_delta}")
    for _ in range(30):
        t, es, best = _t(), EarlyStopping(monitor, patience=1000, min_delta=min_delta), _track(monitor, min_delta)
        kept = None
        for epoch in range(1, 25):
            # coarse values: ties are common, as on a small val split
            row = {"epoch": epoch, monitor: rng.randint(0, 12) / 20, "val_loss": rng.randint(0, 12) / 20}
            es.on_epoch_end(t, row)
            now = best(row)
            assert (now != kept) == (es.bad == 0), f"epoch {epoch}: best weights at {now}, early stopping bad={es.bad}"
            kept = now


# -- 3. keep the last epoch's weights ---------------------------------------------------------------

class _FirstEpochIsBest(imgclf.Callback):
    """Make epoch 1 the best by val_acc whatever it scores, so the best and the last differ."""

    def on_epoch_end(self, t, row):
        if row["epoch"] == 1 and "val_acc" in row:
            row["val_acc"] = 1.0


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_last_ends_on_the_last_epochs_weights(small_sample, tmp_path, keep):
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), model="plaincnn", keep=keep,
                       model_args={"channels": [8, 16], "dense": [32]}, epochs=2, lr=0.05, optimizer="sgd",
                       batch_size=64, progress=False, tensorboard=False, callbacks=[_FirstEpochIsBest()])
    run = res.run_dir
    model, best = _weights(run / "model.safetensors"), _weights(run / "best.safetensors")
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]
    meta = json.loads((run / "model.json").read_text())
    assert not _same(best, {k: v for k, v in last.items() if k in best})  # the two epochs differ
    if keep == "best":
        assert _same(model, best) and meta["weights_from"] == "best (val_acc at epoch 1)"
    else:
        assert _same(model, {k: v for k, v in last.items() if k in model}) and meta["weights_from"] == "final"
