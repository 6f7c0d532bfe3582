"""Linear probe, then fine-tune (LP-FT): a new head is fitted on the frozen backbone's features
before any step of fine-tuning.

A random head on a pretrained backbone sends large, meaningless gradients into the features
during its first steps (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"). The usual remedy, a head-only phase trained like the rest
(fastai's ``fine_tune``, Keras' two-step guide, imgclf's default), pays a full backbone pass per
image per step and, on small data, ends long before the head has converged.

Off by default (``--probe`` turns it on), because it helps only where the frozen features already
fit the task. EfficientNet-Lite0, 224 px, ``--time-limit 3m``, one run each, the default head-only
epoch against the probe:

    232 COCO object crops, 8 classes (71 test images)     0.718 -> 0.775 top-1, balanced 0.351 -> 0.466
      the same, --seed 1                                   0.746 -> 0.775 top-1, balanced 0.403 -> 0.460
    270 CIFAR-10 photos (32 px, upscaled; 1000 test)       0.770 -> 0.723
    258 CIFAR-10 photos, one class 150 of them (1000 test)  0.584 -> 0.531 (this probe with an L2
                                                                 chosen by 3-fold cross-validation,
                                                                 since removed: it memorised too)

On the upscaled 32-px photos the probe scored 0.50-0.63 on val and fitted the training images
exactly (train top-1 1.0): the fine-tune then started with almost no loss to learn from, and its
backbone, which these images need to adapt, moved less.

Here the backbone reads each training image once (up to ``MAX_IMAGES``; flipped copies too when
the run flips and the set is small), and the head trains on those cached features for a few
hundred steps (a few seconds in all on 2 CPU cores, reading included). Written by hand because it is a few lines around the
run's own head, loss and precision, which a generic probe (scikit-learn's) would not share.
"""

from __future__ import annotations

import copy
import math
import time

import torch

MAX_IMAGES = 10_000  # features read for the probe: 26 s of Lite0 at 128 px on 2 CPU cores (measured)
VAL_IMAGES = 2_000  # held-out images the probe is scored on, for the start-up line
STEPS = 500  # head steps on the cached features
BATCH = 256
LR = 1e-3  # AdamW, cosine to zero: Lite0's features of a few hundred images fitted to train top-1 1.0


@torch.no_grad()
def _features(model, loader, normalize, precision, device, limit: int, flip: bool, epoch: int):
    """Backbone features (float32, on the model's device), labels and the number of images read
    (up to ``limit``, each with its flip when ``flip``) of ``loader``, in the order of its epoch
    ``epoch`` (seeded, so a repeat reads the same images)."""
    feats, labels, seen = [], [], 0
    for x, y in loader.epoch(epoch):
        x, y = x[: limit - seen], y[: limit - seen]
        views = [normalize(x)]
        if flip:
            views.append(views[0].flip(3))
        for v in views:
            with precision.autocast(device):
                feats.append(model.backbone(v).float())
            labels.append(y)
        seen += len(x)
        if seen >= limit:
            break
    # kept where the head trains: a batch copied to a GPU per head step would cost more than the step
    return torch.cat(feats), torch.cat(labels), seen


def _accuracy(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    if multilabel:
        return float(((logits > 0) == (y > 0.5)).all(1).float().mean())
    return float((logits.argmax(1) == y).float().mean())


def _fit(head, x, y, loss_fn, weight_decay: float, steps: int, seed: int) -> None:
    """``head`` trained on (x, y) with AdamW (the run's weight decay on its weight matrices) and a
    cosine lr from ``LR`` to zero."""
    head.train()
    params = list(head.parameters())
    opt = torch.optim.AdamW([dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
                             dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)], lr=LR)
    g = torch.Generator().manual_seed(seed)  # on the CPU: the permutations index x on any device
    n, bs = len(x), min(BATCH, len(x))
    perm, at = torch.randperm(n, generator=g), 0
    with torch.enable_grad():
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / steps))
            if at + bs > n:
                perm, at = torch.randperm(n, generator=g), 0
            idx = perm[at : at + bs]
            at += bs
            loss = loss_fn(head(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()


def fit_head(model, train_loader, val_loader, normalize, precision, device, loss_fn, *, seed: int = 0,
             flip: bool = True, multilabel: bool = False, weight_decay: float = 0.0) -> dict:
    """Fit ``model.head`` (a HeadedNet's) on the frozen backbone's features of the training
    images; the backbone is left as it was. Returns what the start-up line reports."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # the backbone's pretrained BatchNorm statistics and no dropout: its features as loaded
    n_train = train_loader.num_samples
    # flipped views double a small set (the run flips too); a large one has views enough
    flip = flip and 2 * n_train <= MAX_IMAGES
    order_epoch = 1_000_003  # an epoch number of its own: the shuffle seeded by it, never a training epoch's
    every = copy.copy(train_loader)  # the same images (shared, not copied), none dropped for an even batch
    every.drop_last = False
    x, y, read = _features(model, every, normalize, precision, device, MAX_IMAGES, flip, order_epoch)
    head = model.head
    _fit(head, x, y, loss_fn, weight_decay, STEPS, seed)
    with torch.no_grad():
        train_acc = _accuracy(head(x).float(), y, multilabel)
        val_acc = None
        if val_loader is not None:
            vx, vy, _ = _features(model, val_loader, normalize, precision, device, VAL_IMAGES, False, 0)
            val_acc = _accuracy(head(vx).float(), vy, multilabel)
    model.train(was_training)
    return {"images": read, "flip": flip, "train_acc": train_acc, "val_acc": val_acc,
            "seconds": time.perf_counter() - t0}
