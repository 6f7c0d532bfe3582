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
    check_options,
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
    with pytest.raises(UserError, match="--loss ce is for single-label"):
        check_options(make_config(data="x", loss="ce"), list("abcde"), multilabel=True)
    with pytest.raises(UserError, match="--loss asl is for multi-label"):
        check_options(make_config(data="x", loss="asl"), list("abcde"), multilabel=False)


def _fit_logits(loss, target: torch.Tensor, n_classes: int, steps: int = 300) -> torch.Tensor:
    """The constant logits (a bias-only model) that minimise ``loss`` over ``target``."""
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([b], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss(b.expand(len(target), n_classes), target).backward()
        opt.step()
    return b.detach()


def test_smoothing_with_class_weights_keeps_each_image_on_its_own_class():
    """Every image is class 0; class 1 is rare (weight 8.5). PyTorch's weight= with
    label_smoothing= weights the smoothing term by every class's weight, and its optimum put
    class 1 first (the largest class's recall fell to 0 in a real run); each image's loss must be
    weighted by its own class instead, so class 0 stays on top."""
    from imgclf.engine.trainer import soft_cross_entropy

    w = torch.tensor([0.4, 8.5, 1.0, 1.0])  # balanced weights: class 1 ~20x rarer than class 0
    y = torch.zeros(64, dtype=torch.long)
    old = _fit_logits(lambda z, t: F.cross_entropy(z, t, weight=w, label_smoothing=0.2), y, 4)
    assert old.argmax() == 1  # the defect this guards against
    new = _fit_logits(lambda z, t: soft_cross_entropy(z, t, 0.2, w), y, 4)
    assert new.argmax() == 0
    p = new.softmax(0)
    assert p[0] == pytest.approx(0.85, abs=0.02)  # smoothing 0.2 over 4 classes: 0.8 + 0.05
    # without smoothing it is PyTorch's weighted mean, exactly
    z, t = torch.randn(32, 4), torch.randint(0, 4, (32,))
    assert soft_cross_entropy(z, t, 0.0, w).item() == pytest.approx(F.cross_entropy(z, t, weight=w).item(), rel=1e-5)


def test_class_weights_do_not_rescale_mixed_targets():
    """Equal weights are no weights, for class indices and for mixup's class probabilities alike
    (PyTorch's weight= left probability targets unnormalised: weights of 3 tripled the loss)."""
    from imgclf.engine.trainer import soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 4, generator=g)
    soft = torch.softmax(torch.randn(32, 4, generator=g) * 3, 1)
    hard = torch.randint(0, 4, (32,), generator=g)
    three = torch.full((4,), 3.0)
    for t in (hard, soft):
        assert soft_cross_entropy(z, t, 0.1, three).item() == pytest.approx(soft_cross_entropy(z, t, 0.1).item(),
                                                                             rel=1e-5)


def test_named_multilabel_weights_move_what_the_class_predicts():
    """A multi-label weight scales the class's positives (as 'balanced' does): a rare label's
    learned prior rises with it. Scaling both of its terms, as before, left it where it was."""
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, 3, generator=g) < torch.tensor([0.5, 0.5, 0.04])).float()
    labels = y.numpy()
    probs = {}
    for spec in (None, [1.0, 1.0, 5.0]):
        fn, _ = build_loss("bce", multilabel=True, class_weights=spec, train_labels=labels, num_classes=3)
        probs[str(spec)] = torch.sigmoid(_fit_logits(fn, y, 3, steps=400))[2].item()
    rate = labels[:, 2].mean()
    assert probs["None"] == pytest.approx(rate, abs=0.01)
    assert probs["[1.0, 1.0, 5.0]"] == pytest.approx(5 * rate / (5 * rate + 1 - rate), abs=0.02)


@pytest.mark.parametrize("spec,message", [
    ("cat=5,cat=1", "given twice"),
    (",", "empty entry"),
    ("1,,1,1", "empty entry"),
    ("nan,1,1,1", "finite"),
    ("1,inf,1,1", "finite"),
    ("0,0,0,0", "every weight is 0"),
    ("Cat=5", "did you mean 'cat'"),
    ("cta=5", "did you mean 'cat'"),
    ("1,5,1", "in this order: cat, dog, frog, ship"),
])
def test_bad_class_weights_are_one_line_that_helps(spec, message):
    with pytest.raises(UserError, match=message):
        parse_class_weights(spec, ["cat", "dog", "frog", "ship"])


def test_class_weights_from_yaml_lists_and_maps(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(f"data: {tmp_path}\nclass_weights: {{frog: 5, cat: 2}}\n")
    assert make_config(f).class_weights == "frog=5,cat=2"
    assert parse_class_weights(make_config(data="x", class_weights=[1, 2, 5, 1]).class_weights,
                               ["cat", "dog", "frog", "ship"]) == [1.0, 2.0, 5.0, 1.0]


def test_class_names_holding_a_comma_can_be_weighted(tmp_path):
    # folder names like 'pepper, bell' (Fruits-360) are class names too
    classes = ["apple", "pepper, bell", "pepper"]
    assert parse_class_weights("pepper, bell=4,pepper=2", classes) == [1.0, 4.0, 2.0]
    f = tmp_path / "run.yaml"
    f.write_text(f"data: {tmp_path}\nclass_weights: {{'pepper, bell': 3}}\n")
    assert parse_class_weights(make_config(f).class_weights, classes) == [1.0, 3.0, 1.0]
    # a piece that joins into no class name stays an unknown name, and the order quotes the comma
    with pytest.raises(UserError, match=r"unknown class 'bell'; the classes are apple, 'pepper, bell', pepper"):
        parse_class_weights("bell=4", classes)


def test_bad_class_weights_fail_before_decoding(imbalanced, tmp_path):
    import imgclf

    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="unknown class 'dear'; did you mean 'deer'"):
        imgclf.train(data=str(imbalanced), class_weights="dear=5", project=str(tmp_path / "runs"),
                     cache_dir=str(cache), progress=False)
    assert not any(p.is_file() for p in cache.rglob("*"))  # nothing decoded


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


def test_balanced_accuracy_is_a_monitor_and_matches_evaluate(tmp_path, sample_dir):
    """--monitor val_bal_acc: each epoch's mean recall over the val classes, the kept weights are
    its best epoch's, and evaluate on the same val images gives the same balanced accuracy."""
    import imgclf

    data = tmp_path / "d"
    for split, counts in (("train", {"airplane": 60, "cat": 10, "ship": 10}),
                          ("val", {"airplane": 30, "cat": 6, "ship": 6})):
        src = "train" if split == "train" else "test"
        for c, n in counts.items():
            (data / split / c).mkdir(parents=True)
            for f in sorted((sample_dir / src / c).glob("*.jpg"))[:n]:
                os.symlink(f, data / split / c / f.name)
    res = imgclf.train(data=str(data), epochs=3, monitor="val_bal_acc", batch_size=16, project=str(tmp_path),
                       name="bal", progress=False, tensorboard=False, final_eval=False, tta=False)
    bal = [r["val_bal_acc"] for r in res.history]
    assert all(0.0 <= b <= 1.0 for b in bal) and "val_bal_acc" in (res.run_dir / "metrics.csv").read_text()
    best = int(np.argmax(bal))
    ev = imgclf.evaluate(res.run_dir, str(data / "val"), tta=False, progress=False)
    assert ev["n"] == 42
    assert ev["balanced_accuracy"] == pytest.approx(bal[best], abs=1e-6)
    assert ev["top1"] == pytest.approx(res.history[best]["val_acc"], abs=1e-6)


def test_val_bal_acc_is_refused_where_it_means_nothing(tmp_path, sample_dir):
    from PIL import Image

    import imgclf

    files = sorted((sample_dir / "train" / "cat").glob("*.jpg"))[:8]
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    tags = [["cat"], ["cat", "pet"]] * 4  # several labels per image: multi-label, scored by mAP
    with pytest.raises(UserError, match="--monitor val_bal_acc is for single-label data"):
        imgclf.train((x, tags), monitor="val_bal_acc", epochs=1, project=str(tmp_path), progress=False)
