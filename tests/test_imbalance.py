"""Class weights, the balanced sampler and the imbalance warning, on an imbalanced CIFAR-10 sample."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from imgclf.config import make_config
from imgclf.data.sampler import BalancedSampler, imbalance_warning, sample_weights
from imgclf.data.sources import load_source
from imgclf.engine.losses import (
    MultiLabelLoss,
    balanced_weights,
    build_loss,
    imbalance_setup,
    label_counts,
    parse_class_weights,
)
from imgclf.errors import UserError

RARE = "deer"


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory, sample_dir) -> Path:
    """The packaged sample's train split (300 per class) with 'deer' cut to 2% of the images."""
    out = tmp_path_factory.mktemp("imbalanced")
    for cdir in sorted((sample_dir / "train").iterdir()):
        files = sorted(cdir.glob("*.jpg"))
        keep = files[:55] if cdir.name == RARE else files  # 55 / (9*300 + 55) = 2.0%
        (out / "train" / cdir.name).mkdir(parents=True)
        for f in keep:
            os.symlink(f, out / "train" / cdir.name / f.name)
    os.symlink(sample_dir / "test", out / "test")
    return out


@pytest.fixture(scope="module")
def source(imbalanced):
    return load_source(str(imbalanced), val_split=0.0, cache_dir=Path("/nonexistent"))


def test_balanced_weights_match_scikit_learn(source):
    y = source.train.labels
    counts = label_counts(y, len(source.classes))
    rare = source.classes.index(RARE)
    assert counts[rare] / counts.sum() == pytest.approx(0.02, abs=0.001)
    w = balanced_weights(counts)
    np.testing.assert_allclose(w, compute_class_weight("balanced", classes=np.arange(10), y=y))
    assert w[rare] == pytest.approx(len(y) / (10 * 55))


def test_weighted_loss_counts_the_rare_class_more(source):
    cfg = make_config(data="x", class_weights="balanced")
    loss_fn, weight, sampler = imbalance_setup(cfg, source.classes, source.train.labels, False, torch.device("cpu"))
    assert loss_fn is None and sampler is None  # single-label: the trainer's CE takes the weights
    y = torch.from_numpy(source.train.labels)
    logits = torch.zeros(len(y), 10)  # uniform predictions: every image's CE is log(10)
    rare = source.classes.index(RARE)
    per_image = F.cross_entropy(logits, y, weight=weight, reduction="none")
    w = weight[y]
    assert per_image[y == rare][0] / per_image[y != rare][0] == pytest.approx(float(weight[rare] / weight[0]))
    assert float(weight[rare] / weight[0]) == pytest.approx(300 / 55)
    # as a mean, the rare class carries 1/10 of the loss (its share of classes), not 2%
    share = float((per_image * (y == rare)).sum() / per_image.sum())
    assert share == pytest.approx(0.1, abs=1e-5)
    assert F.cross_entropy(logits, y, weight=weight).item() == pytest.approx(float(per_image.sum() / w.sum()))


def test_explicit_class_weights(source):
    cls = source.classes
    assert parse_class_weights("none", cls) is None
    assert parse_class_weights(",".join(["2"] * 10), cls) == [2.0] * 10
    named = parse_class_weights(f"{RARE}=5", cls)
    assert named[cls.index(RARE)] == 5.0 and sum(named) == 14.0
    for bad in ("1,2", "zebra=3", "a,b"):
        with pytest.raises(UserError):
            parse_class_weights(bad, cls)


def test_balanced_sampler_frequencies_and_determinism(source):
    y = source.train.labels
    s = BalancedSampler(y, 10, seed=3)
    draws = torch.cat([s.order(e) for e in range(20)]).numpy()
    freq = np.bincount(y[draws], minlength=10) / len(draws)
    np.testing.assert_allclose(freq, 0.1, atol=0.01)  # every class ~10%, the rare one included
    assert len(s.order(0)) == len(y)
    assert torch.equal(s.order(5), BalancedSampler(y, 10, seed=3).order(5))  # (seed, epoch) decide: exact resume
    assert not torch.equal(s.order(5), s.order(6))
    assert not torch.equal(s.order(5), BalancedSampler(y, 10, seed=4).order(5))


def test_loader_uses_the_sampler(source):
    from imgclf.data.cache import CachedSplit
    from imgclf.data.loader import BatchLoader

    y = source.train.labels
    cs = CachedSplit(np.zeros((len(y), 4, 4, 3), np.uint8), np.arange(len(y)), y, [])
    s = BalancedSampler(y, 10, seed=0)
    loader = BatchLoader(cs, 64, torch.device("cpu"), shuffle=True, sampler=s, ram_budget=1 << 30)
    labels = torch.cat([b for _, b in loader.epoch(2)]).numpy()
    np.testing.assert_array_equal(labels, y[s.order(2).numpy()])


def test_multilabel_sampler_weights_use_the_rarest_label():
    y = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    w = sample_weights(y, 2)
    assert w.tolist() == pytest.approx([0.25, 0.25, 0.25, 1.0, 1.0])


def test_imbalance_warning_names_the_counts(source, small_sample):
    y = source.train.labels
    rare = source.classes.index(RARE)
    counts = label_counts(y, 10)
    assert imbalance_warning(counts, source.classes) is None  # 2% of 10 classes is 5.5x: below the 10x bar
    fewer = np.concatenate([y[y != rare], y[y == rare][:25]])  # 300 vs 25: 12x
    msg = imbalance_warning(label_counts(fewer, 10), source.classes)
    assert msg is not None and f"{RARE} 25" in msg and "airplane 300" in msg and "12x" in msg
    balanced = load_source(str(small_sample), val_split=0.0, cache_dir=Path("/nonexistent"))
    assert imbalance_warning(label_counts(balanced.train.labels, 10), balanced.classes) is None


def test_multilabel_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g) * 3
    y = (torch.rand(16, 5, generator=g) < 0.3).float()
    ref = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert MultiLabelLoss("bce")(logits, y).item() == pytest.approx(ref.sum(1).mean().item(), rel=1e-5)
    # ASL without focusing and margin is BCE; with them, easy negatives count less
    assert MultiLabelLoss("asl", gamma_neg=0, clip=0)(logits, y).item() == pytest.approx(
        ref.sum(1).mean().item(), rel=1e-4)
    assert MultiLabelLoss("asl")(logits, y) < MultiLabelLoss("bce")(logits, y)
    # 'balanced' = n / (2 * count) on each class's positives and negatives
    labels = y.numpy()
    fn, _ = build_loss("bce", multilabel=True, class_weights="balanced", train_labels=labels, num_classes=5)
    pos = labels.sum(0)
    wp, wn = 16 / (2 * pos), 16 / (2 * (16 - pos))
    manual = -(y * F.logsigmoid(logits) * torch.tensor(wp) + (1 - y) * F.logsigmoid(-logits) * torch.tensor(wn))
    assert fn(logits, y).item() == pytest.approx(manual.sum(1).mean().item(), rel=1e-5)
    with pytest.raises(UserError):
        build_loss("ce", multilabel=True, class_weights=None, train_labels=labels, num_classes=5)


@pytest.mark.slow
def test_short_weighted_run(imbalanced, tmp_path):
    """The whole path: config -> weighted CE + balanced sampler in the trainer -> per-class recall."""
    import imgclf
    from imgclf.data.sampler import BalancedSampler
    from imgclf.engine.callbacks import Callback

    class Seen(Callback):  # what the trainer was given, and the classes of the first epoch's draw
        def on_train_start(self, t):
            self.weights, self.sampler = t.class_weights, t.train_loader.sampler
            labels = np.asarray(t.train_loader.data.labels)
            self.drawn = labels[t.train_loader.sampler.order(0)]

    seen = Seen()
    res = imgclf.train(data=str(imbalanced), epochs=1, project=str(tmp_path), name="w", progress=False,
                       tensorboard=False, tta=False, class_weights=f"{RARE}=2", sampler="balanced",
                       callbacks=[seen])
    classes = json.loads((res.run_dir / "model.json").read_text())["classes"]
    rare = classes.index(RARE)
    assert isinstance(seen.sampler, BalancedSampler)
    w = seen.weights.cpu().numpy()
    assert w[rare] == pytest.approx(2.0) and np.allclose(np.delete(w, rare), 1.0)
    # deer is 2% of the images but ~10% of a balanced epoch's draws
    assert 0.07 < np.mean(seen.drawn == rare) < 0.13
    assert res.test["n"] == 1000
    assert next(r for r in res.test["per_class"] if r["class"] == RARE)["support"] == 100
    cfg = (res.run_dir / "config.yaml").read_text()
    assert f"class_weights: {RARE}=2" in cfg and "sampler: balanced" in cfg
