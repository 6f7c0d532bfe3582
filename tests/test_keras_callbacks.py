"""A callback written for Keras' model.fit runs unchanged: on_epoch_end(epoch, logs) gets the
epoch counted from 0 and logs with Keras' names (it used to get the trainer as the epoch), the
Keras-only hooks (on_train_begin, on_epoch_begin) are called, and self.model.stop_training ends
training after the epoch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.errors import UserError

FAST = dict(progress=False, tensorboard=False, final_eval=False, batch_size=16)


@pytest.fixture(scope="module")
def arrays(sample_dir) -> tuple[np.ndarray, np.ndarray]:
    """2 classes x 16 CIFAR-10 photos of the packaged sample, 32x32 RGB uint8."""
    xs, ys = [], []
    for i, c in enumerate(("airplane", "cat")):
        for f in sorted((sample_dir / "train" / c).glob("*.jpg"))[:16]:
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(i)
    return np.stack(xs), np.asarray(ys, np.int64)


class KerasHistory:
    """What a Keras user writes: no imgclf base class, Keras' hook names and arguments."""

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple] = []
        self.stop_after = stop_after

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", dict(logs or {})))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, dict(logs)))
        if self.stop_after is not None and epoch + 1 >= self.stop_after:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", dict(logs)))


def test_a_keras_callback_gets_keras_arguments(arrays, tmp_path):
    cb = KerasHistory()
    res = imgclf.train(arrays, callbacks=[cb], epochs=2, project=str(tmp_path), name="k", **FAST)
    kinds = [c[0] for c in cb.calls]
    assert kinds == ["train_begin", "epoch_begin", "epoch_end", "epoch_begin", "epoch_end", "train_end"]
    ends = [c for c in cb.calls if c[0] == "epoch_end"]
    assert [c[1] for c in ends] == [0, 1]  # Keras counts epochs from 0; it used to be the trainer
    assert [c[1] for c in cb.calls if c[0] == "epoch_begin"] == [0, 1]
    logs = ends[-1][2]
    row = res.history[-1]
    assert logs["loss"] == row["train_loss"] and logs["accuracy"] == row["train_acc"]
    assert logs["val_loss"] == row["val_loss"] and logs["val_accuracy"] == row["val_acc"]
    assert logs["learning_rate"] == row["lr"] and logs["epoch"] == 2  # imgclf's own keys are kept
    assert cb.calls[-1][1]["val_accuracy"] == row["val_acc"]  # on_train_end(logs): the last epoch's
    assert hasattr(cb.model, "module")  # the torch model, as Keras' self.model is its model


def test_model_stop_training_ends_the_run_after_that_epoch(arrays, tmp_path):
    cb = KerasHistory(stop_after=2)
    res = imgclf.train(arrays, callbacks=cb, epochs=5, project=str(tmp_path), name="s", **FAST)
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert [c[1] for c in cb.calls if c[0] == "epoch_end"] == [0, 1]


def test_imgclf_convention_is_unchanged_and_a_wrong_keras_signature_is_named(arrays, tmp_path):
    class Ours:
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, trainer, row):
            self.seen.append((type(trainer).__name__, row["epoch"]))

    ours = Ours()
    imgclf.train(arrays, callbacks=ours, epochs=1, project=str(tmp_path), name="o", **FAST)
    assert ours.seen == [("Trainer", 1)] and not hasattr(ours, "model")

    class NoLogs:
        def on_epoch_begin(self):
            pass

    with pytest.raises(UserError, match=r"NoLogs\.on_epoch_begin cannot take \(epoch, logs\)"):
        imgclf.train(arrays, callbacks=NoLogs(), epochs=1, project=str(tmp_path), name="n", **FAST)
