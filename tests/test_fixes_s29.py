"""Fixes of session 29 outside the sweep, compare and transfer areas."""

from __future__ import annotations

import time

import imgclf
from imgclf.engine.callbacks import Callback
from imgclf.engine.trainer import Trainer

FAST = dict(tensorboard=False, final_eval=False, tta=False)


def test_the_progress_bar_figures_follow_slow_steps(small_sample, tmp_path, monkeypatch):
    # steps of over a second (a CPU fine-tune) left the bar's loss/acc/img_s 10 steps behind its count
    shown: list[int] = []
    real_bar = Trainer._bar

    def bar(self, epoch, start=0):
        b = real_bar(self, epoch, start)
        if b is not None:
            post = b.set_postfix

            def set_postfix(*a, **k):
                shown.append(self.step)
                return post(*a, **k)

            b.set_postfix = set_postfix
        return b

    class Slow(Callback):
        def on_step_end(self, t):
            time.sleep(1.05)

    monkeypatch.setattr(Trainer, "_bar", bar)
    res = imgclf.train(data=str(small_sample), epochs=1, batch_size=72, progress=True, callbacks=[Slow()],
                       project=str(tmp_path), name="slow", **FAST)
    assert len(res.history) == 1
    assert shown == [1, 2, 3, 4, 5]  # 360 images / 72: every step's figures, not steps 1 and 5 alone


def test_l2_replaces_the_default_weight_decay_and_the_run_says_what_regularises(small_sample, tmp_path, capsys):
    # a Keras user's l2 ran on top of sgd's 5e-4 weight decay, and only config.yaml showed it
    res = imgclf.train(data=str(small_sample), model="plaincnn", optimizer="sgd", l2=1e-4, shift=0.1, epochs=1,
                       progress=False, project=str(tmp_path), name="l2", **FAST)
    assert res.config.weight_decay == 0.0 and res.config.l2 == 1e-4
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if "regularisation:" in ln]
    assert "no weight decay, L2 0.0001, label smoothing 0.1" in line
    assert "augmentation: flip, crop +-" in line and "shift 0.1" in line
    # given in so many words, both apply
    res = imgclf.train(data=str(small_sample), model="plaincnn", optimizer="sgd", l2=1e-4, weight_decay=5e-4,
                       epochs=1, progress=False, project=str(tmp_path), name="both", **FAST)
    assert res.config.weight_decay == 5e-4
    assert "weight decay 0.0005, L2 0.0001" in capsys.readouterr().err


def test_compare_counts_an_own_nets_default_as_the_same_value():
    from imgclf.evaluate.compare import config_value, differing_config

    a = {"model": "plaincnn", "model_args": {"channels": [32, 64], "convs_per_block": 2}}
    b = {"model": "plaincnn", "model_args": {"channels": [32, 64, 128]}}
    infos = [{"config": a}, {"config": b}]
    # convs_per_block 2 is PlainCNN's default: listed as '2 vs (default)' it read as a difference
    assert differing_config(infos) == ["model_args.channels"]
    assert config_value(b, "model_args.channels_per_block") == "(default)"  # not a PlainCNN argument
    b["model_args"]["convs_per_block"] = 3
    assert differing_config(infos) == ["model_args.channels", "model_args.convs_per_block"]
    assert config_value({"model": "plaincnn", "model_args": {}}, "model_args.kernel_size") == 3


def test_one_hot_training_labels_beside_index_test_labels():
    # y_train through Keras' to_categorical, y_test left as indices: refused as mixed formats
    import numpy as np
    import pytest

    from imgclf.data.arrays import DataError
    from imgclf.data.npz import build_source

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    idx = np.arange(12) % 3
    src = build_source({"train": (x, np.eye(3)[idx]), "test": (x[:6], idx[:6])}, None, "arrays", "a")
    assert src.task == "single" and src.classes == ["0", "1", "2"]
    assert src.train.labels.tolist() == idx.tolist() and src.test.labels.tolist() == idx[:6].tolist()
    with pytest.raises(DataError, match="label 3 but the one-hot rows have 3 columns"):
        build_source({"train": (x, np.eye(3)[idx]), "test": (x[:6], idx[:6] + 1)}, None, "arrays", "a")
    multi = np.eye(3)[idx]
    multi[0, 1] = 1  # multi-hot: tags, which indices cannot stand beside
    with pytest.raises(DataError, match="some splits have N x K label rows"):
        build_source({"train": (x, multi), "test": (x[:6], idx[:6])}, None, "arrays", "a")


def test_curves_mark_the_epoch_whose_weights_were_kept(tmp_path):
    import numpy as np
    from PIL import Image

    from imgclf.evaluate.plots import plot_curves

    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 1.5 + abs(e - 4) / 5, "train_acc": e / 10,
                "val_acc": 0.6 - abs(e - 4) / 20, "lr": 0.1 / e} for e in range(1, 9)]

    def green(path):  # tab:green, the marker's colour (the curves are blue and orange)
        a = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(a - (44, 160, 44)).sum(-1) < 40).sum())

    plot_curves(history, tmp_path / "last.png")
    plot_curves(history, tmp_path / "kept.png", kept=4)
    assert green(tmp_path / "last.png") == 0 and green(tmp_path / "kept.png") > 300


def test_a_cutout_larger_than_the_size_the_data_gives_is_refused(small_sample, tmp_path):
    import pytest

    from imgclf.errors import UserError

    # no --image-size: the size comes from the data (32 px), known only once it is scanned
    with pytest.raises(UserError, match=r"--cutout 40 must be smaller than the image size \(32 px\)"):
        imgclf.train(data=str(small_sample), cutout=40, epochs=1, progress=False, project=str(tmp_path), name="c",
                     **FAST)
    assert not (tmp_path / "c" / "metrics.csv").exists()


def test_a_plaincnn_too_deep_for_the_size_is_refused_before_decoding(small_sample, tmp_path, monkeypatch):
    import pytest

    import imgclf.api
    from imgclf.errors import UserError

    monkeypatch.setattr(imgclf.api, "build_cache", lambda *a, **k: pytest.fail("images decoded before the check"))
    with pytest.raises(UserError, match=r"makes 6 pooling blocks.*32-px images allow at most 5"):
        imgclf.train(data=str(small_sample), model="plaincnn", model_args={"channels": [16] * 6}, epochs=1,
                     progress=False, project=str(tmp_path), name="deep", **FAST)


def test_a_run_keeps_its_layer_summary(small_sample, tmp_path):
    res = imgclf.train(data=str(small_sample), model="plaincnn", model_args={"channels": [8, 16], "dense": 32},
                       epochs=1, progress=False, project=str(tmp_path), name="s", **FAST)
    text = (res.run_dir / "model.txt").read_text()
    clf = imgclf.load(res.run_dir)
    total = sum(p.numel() for p in clf.model.parameters())
    assert f"{total:,}" in text and "Linear" in text
    table = clf.summary()
    assert f"{total:,}" in table and "8, 32, 32" in table  # the first block's output shape


def test_a_list_model_argument_without_brackets_says_how_to_write_it():
    import pytest

    from imgclf.config import make_config

    with pytest.raises(Exception, match=r"a list is written in brackets, e\.g\. channels=\[32,64\]"):
        make_config(None, data="d", model="plaincnn", model_args="channels=32,64")
