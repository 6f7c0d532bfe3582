"""Default recipes: every option the user left unset (None / 'auto') gets a value chosen for the
model family, the image size and the amount of data. The result is written to config.yaml.

Why these numbers:
- fastnet follows airbench94 (tuned for CIFAR-10 at batch 1024), expressed for a mean loss:
  lr 1.5 per 1024 images (linear scaling), coupled decay 0.00133, Nesterov momentum 0.85,
  label smoothing 0.2, a triangular schedule (0.2 -> 1 at 23% -> 0.07), lookahead, alternating
  flips and 2-px translations; its conv filters take airbench94_muon's Muon steps (lr 0.24,
  momentum 0.6: 91.1% vs 90.7% in the same 600 s on CIFAR-10, benchmarks/cifar10_cpu.py). On
  large data the first half of its steps train on random 3/4-side crops (early_crop), which
  cost ~0.57x a full step: 10.9 / 11.7 epochs instead of 8.2 / 8.8 in one 600 s budget, 91.0% /
  91.0% vs 90.4% / 90.5% (seeds 0 / 1, each pair back to back).
  Small data sets get smaller batches and more epochs so a run still takes a few hundred
  optimizer steps.
- plain CNNs and timm models from scratch use AdamW + cosine with warm-up, the robust choice
  across architectures; pretrained models train the new head at that lr and the backbone at
  0.1x (backbone_lr_scale), after one head-only epoch (freeze_epochs; with --time-limit,
  HEAD_ONLY_STEPS steps at most).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from imgclf.config import TrainConfig

FASTNET_EPOCHS_50K = 10.0  # full CIFAR-10 (see benchmarks/cifar10_cpu.py for the measured budget)
MIN_STEPS = 400  # a run shorter than this many optimizer steps underfits whatever the data size
FREEZE_BN_BELOW = 5000  # training images under which a pretrained backbone keeps its BatchNorm statistics
HEAD_ONLY_STEPS = 200  # a time-limited fine-tune trains the new head alone this long (at most an epoch)


def auto_image_size(paths: list[str] | None, native: int | None, sample: int = 2000) -> int:
    """Median short side of a sample of the images, clamped to [32, 224], multiple of 16. The
    sample is as large as the data check's (checks.size_sample), so the size chosen follows the
    median the check reports: with 256 headers a set of mixed photos got 176 px while the check
    said a median of 160 (reading a header costs well under a millisecond)."""
    if native is not None:
        return native
    from PIL import Image

    rng = np.random.default_rng(0)
    pick = rng.choice(len(paths), size=min(sample, len(paths)), replace=False)
    sides = []
    for i in pick:
        try:
            with Image.open(paths[i]) as im:  # header only: no pixels decoded
                sides.append(min(im.size))
        except Exception:  # unreadable files are reported by the cache builder
            continue
    if not sides:
        return 32
    med = float(np.median(sides))
    if med <= 40:
        return max(8, int(round(med)))
    return int(min(224, max(32, 16 * round(med / 16))))


def _pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1))))


def crop_step_cost(crop: int, size: int) -> float:
    """A training step on ``crop``-px early crops over one on whole ``size``-px images, before
    either is timed: its pixel share. Measured: FastNet 24 of 32 px at batch 1024, in the
    benchmark's own timing windows, 0.565x (the pixel share is 0.5625); EfficientNet-Lite0 with 3
    frozen stages, 96 of 128 px, batch 64: 0.6x; small batches more (FastNet at batch 32: 0.83x,
    fixed per-step costs dominate). The recipe sizes crop epochs with it; TimeBudget uses it only
    until both kinds of step are timed. (Forward passes timed at the two sizes were tried instead:
    they miss the fixed costs too, and guessed no better.)"""
    return min(1.0, (crop / max(1, size)) ** 2) if crop else 1.0


# --time-limit on large data: the FastNet widths a budget may get, and the epochs (as planned:
# early-crop epochs count as epochs) a net must get to be worth its slower steps. Width 1 is timed
# first; the widest net that still gets BUDGET_MIN_EPOCHS is taken, and where width 1 does not, the
# narrower ones are timed (the narrowest is taken if none does). Measured with
# benchmarks/cifar10_cpu.py, seed 0, runs of one hour each:
# - a fast 2-core CPU, 900 s: width 1.0 91.30% at 16.9 epochs, 1.25 91.72% at 12.3, 1.5 91.07% at
#   7.7; 600 s: 1.0 90.95% at 11.9, 1.25 90.89% at 7.9. A machine 1.4x faster (this issue's
#   reference CPU) affords the 900-s case in 600 s.
# - a 2-core Xeon with AMX masked (fp32, ~3x slower), 600 s: width 1.0 88.51% at 4.7 epochs, 0.75
#   89.27% at 8.6, 0.5 89.34% at 18.6 (1659 img/s against 455: small convolutions use the cores
#   better than their FLOPs say).
BUDGET_WIDTHS = (0.5, 0.75, 1.0, 1.25, 1.5)
BUDGET_MIN_EPOCHS = 11.0


def budget_width(step_s, avail_s: float, steps_per_epoch: int, crop_factor: float,
                 widths: tuple[float, ...] = BUDGET_WIDTHS, min_epochs: float | None = None):
    """The widest FastNet whose training steps (``step_s(width)``: seconds timed on this machine;
    how much a wider net costs depends on the machine) still leave ``min_epochs`` in ``avail_s``,
    or the narrowest if none does; returns (width, {width: epochs}). Width 1 (or the width in
    ``widths`` nearest to it) is timed first, then wider ones while they could qualify (a wider
    net's steps cost at least width/last as much), or narrower ones until one qualifies."""
    min_epochs = BUDGET_MIN_EPOCHS if min_epochs is None else min_epochs
    widths = tuple(sorted(widths))
    first = min(range(len(widths)), key=lambda i: abs(widths[i] - 1.0))
    epochs: dict[float, float] = {}

    def timed(w: float) -> float:
        epochs[w] = avail_s / (steps_per_epoch * step_s(w) * crop_factor)
        return epochs[w]

    if timed(widths[first]) < min_epochs:  # a slow machine: narrower nets get more epochs
        for w in reversed(widths[:first]):
            if timed(w) >= min_epochs:
                return w, epochs
        return widths[0], epochs
    chosen = widths[first]
    for i in range(first + 1, len(widths)):
        w, last = widths[i], widths[i - 1]
        if epochs[last] * last / w < min_epochs or timed(w) < min_epochs:
            break
        chosen = w
    return chosen, epochs


def resolve(cfg: TrainConfig, *, n_train: int, image_size: int, arch: str, multilabel: bool = False,
            world: int = 1) -> TrainConfig:
    """Fill every unset option; explicit user values are kept as they are. ``world``: the processes
    of a distributed run, which share each (global) batch equally."""
    c = cfg.model_copy()
    c.image_size = image_size
    c.model = arch
    fast = arch == "fastnet"
    pretrained = c.pretrained or bool(c.weights)
    if c.batch_size is None:
        base = 1024 if fast else (64 if image_size > 96 else 128)
        # activations grow with pixels x batch: past 128 px (FastNet) or 224 px (others) the
        # batch shrinks to keep the pixels per step. Measured one bf16 step of a plain CNN: 2.0 GB
        # at 256 px, batch 32; 6.0 GB at 512 px, batch 32 (batch 64 would be ~11 GB); FastNet at
        # 256 px, batch 256: 1.5 GB.
        edge = 128 if fast else 224
        if image_size > edge:
            base = max(8, _pow2_floor(base * (edge / image_size) ** 2))
        # at least ~8 steps per epoch on small data
        c.batch_size = int(max(min(16, base), min(base, _pow2_floor(n_train / 8))))
        if c.batch_size % world:  # --devices 3: the nearest multiple of 3 (32 -> 33), an equal share each
            c.batch_size = max(world, world * round(c.batch_size / world))
    elif c.batch_size > n_train >= world:
        # every step is the whole set: the lr below scales with the batch, and 4096 on 270 images
        # gave 15x the lr of --batch-size 270 for the same computation
        from imgclf import log

        capped = n_train // world * world
        log.warn(f"--batch-size {c.batch_size} is more than the {n_train} training images: batches of {capped}")
        c.batch_size = capped
    steps_per_epoch = max(1, math.ceil(n_train / c.batch_size))
    if c.early_crop is None:
        # progressive crops (cf. fast.ai's progressive resizing, but at constant scale, so the
        # full-size phase needs no re-adaptation to a new object size): the first half of a
        # fastnet run sees random 3/4-side crops, whose steps cost ~0.57x (crop_step_cost).
        # CIFAR-10 in a 600 s budget (benchmarks/cifar10_cpu.py): 10.9 epochs, 90.99% vs 8.2
        # epochs, 90.43% without (seed 1: 91.02% vs 90.54%).
        # Downscaling instead of cropping (true progressive resizing) gave the same accuracy.
        # Only where the epochs are few (large data): on the 2,700-image packaged sample, where
        # the recipe already runs ~37 epochs, crops were no gain (75.4-76.3% vs 76.5-76.6%, two
        # seeds, 1,000 test images).
        base_epochs = FASTNET_EPOCHS_50K if fast else (10.0 if pretrained else 30.0)
        few = math.ceil(MIN_STEPS / steps_per_epoch) <= base_epochs
        c.early_crop = max(16, round(image_size * 0.75)) if fast and image_size >= 24 and few else 0
    if c.early_crop_fraction is None:
        c.early_crop_fraction = 0.5
    if c.early_crop and c.early_crop >= image_size:
        c.early_crop = 0  # nothing to crop
    if c.epochs is None:
        base_epochs = FASTNET_EPOCHS_50K if fast else (10.0 if pretrained else 30.0)
        epochs = max(base_epochs, math.ceil(MIN_STEPS / steps_per_epoch))
        if c.early_crop:
            # the same compute as whole-image epochs
            f, r = c.early_crop_fraction, crop_step_cost(c.early_crop, image_size)
            epochs = round(epochs / (f * r + 1 - f), 1)
        c.epochs = float(min(100, epochs))
    if c.optimizer == "auto":
        c.optimizer = "muon" if fast else "adamw"
    if c.optimizer == "muon":
        # airbench94_muon's values for BatchNorm'd convs whose filters Muon renormalises (FastNet,
        # PlainCNN); Keller Jordan's general defaults otherwise
        own = arch in ("fastnet", "plaincnn")
        c.muon_lr = c.muon_lr if c.muon_lr is not None else (0.24 if own else 0.02)
        c.muon_momentum = c.muon_momentum if c.muon_momentum is not None else (0.6 if own else 0.95)
    if fast and c.optimizer in ("sgd", "muon"):
        defaults = dict(lr=1.5 * c.batch_size / 1024, weight_decay=0.00133, label_smoothing=0.2)
        if "momentum" not in cfg.model_fields_set:
            c.momentum = 0.85
    elif c.optimizer in ("sgd", "muon"):
        defaults = dict(lr=0.1 * c.batch_size / 256, weight_decay=5e-4, label_smoothing=0.1)
    else:  # adam / adamw
        # pretrained: this is the new head's lr; the backbone gets backbone_lr_scale (0.1) of it
        lr = 1e-3 * math.sqrt(c.batch_size / 128)
        defaults = dict(lr=lr, weight_decay=0.05 if c.optimizer == "adamw" else 0.0, label_smoothing=0.1)
    if multilabel:
        defaults["label_smoothing"] = 0.0  # the multi-label losses have none: config.yaml says so
    if c.l2 > 0:
        # --l2 is Keras' kernel_regularizer, chosen in place of weight decay: the two stacked (an
        # sgd run with l2 1e-4 also decayed at 5e-4) regularised far more than either alone
        defaults["weight_decay"] = 0.0
    for k, v in defaults.items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    if c.backbone_lr_scale is None:
        # discriminative lr: pretrained features need small steps, the new head large ones
        c.backbone_lr_scale = 0.1 if pretrained else 1.0
    if c.probe is None:
        # linear probe, then fine-tune (models/probe.py): better where the frozen features fit
        # the task, worse where the backbone must adapt (upscaled 32-px photos), so only on request
        c.probe = False
    if c.probe and not (pretrained and arch.startswith("timm:")):
        from imgclf.errors import UserError

        raise UserError("--probe fits a new head on pretrained features: it needs a timm model with --pretrained "
                        f"or --weights FILE, not {'random weights' if arch.startswith('timm:') else arch}")
    if c.freeze_epochs is None and c.probe:
        c.freeze_epochs = 0  # the probe has fitted the head: no head-only phase is needed
    if c.freeze_epochs is None:
        # fastai's fine_tune: one head-only epoch first, so the random head's large early
        # gradients never reach (and wreck) the pretrained features
        c.freeze_epochs = 1 if pretrained and arch.startswith("timm:") and c.epochs >= 3 else 0
        if c.freeze_epochs and c.time_limit:
            # a budgeted run's length is unknown here and often short: a new head settles in a
            # few hundred steps, and on large data a whole head-only epoch is then up to 40% of
            # the run. Lite0 on CIFAR-10, 128 px, 900 s: 0.25 epochs head-only, 92.3% (3.0
            # fine-tuning epochs) vs a whole one, 92.0% (2.2).
            c.freeze_epochs = round(min(1.0, HEAD_ONLY_STEPS / steps_per_epoch), 2)
    if c.freeze_bn is None:
        # on small data the running statistics a fine-tune re-estimates from its own few, augmented
        # batches replace ImageNet's: Lite0 on ~100 photos lost val accuracy at every unfreeze
        # (0.58 -> 0.33 top-1), and putting the pretrained statistics back gave 0.69 test top-1
        # against 0.43. On large data the new statistics are well estimated and match the task
        # (the CIFAR-10 transfer benchmark trains them).
        c.freeze_bn = bool(pretrained and n_train < FREEZE_BN_BELOW)
    if c.schedule == "auto":
        c.schedule = "onecycle" if fast else "cosine"
    if c.schedule == "onecycle":
        c.warmup_epochs = c.epochs * 0.23 if c.warmup_epochs is None else c.warmup_epochs
        c.lr_start_factor = 0.2 if c.lr_start_factor is None else c.lr_start_factor
        c.lr_end_factor = 0.07 if c.lr_end_factor is None else c.lr_end_factor
    else:
        if c.warmup_epochs is None:
            c.warmup_epochs = min(2.0, c.epochs * 0.1) if c.schedule in ("cosine", "linear") else 0.0
        c.lr_start_factor = 0.1 if c.lr_start_factor is None else c.lr_start_factor
        c.lr_end_factor = 0.0 if c.lr_end_factor is None else c.lr_end_factor
    if c.translate is None:
        c.translate = max(1, round(image_size / 16)) if fast else max(1, round(image_size / 8))
    if c.lookahead is None:
        c.lookahead = fast
    _say_ignored(cfg.model_fields_set, cfg, c)
    return c


def _say_ignored(given: set[str], cfg: TrainConfig, c: TrainConfig) -> None:
    """Options the user set that this run does not use: silently dropped, a tuning session
    learned nothing from them (--optimizer adam --muon-lr 0.1, a warm-up longer than the run)."""
    from imgclf import log

    uses = {"sgd": {"momentum", "nesterov"}, "muon": {"momentum", "nesterov", "muon_lr", "muon_momentum"},
            "adam": {"beta1", "beta2", "eps"}, "adamw": {"beta1", "beta2", "eps"}}
    # set, and not to its default: a run's own config.yaml (--resume, a repeat) holds every key
    unused = sorted(k for k in ("momentum", "nesterov", "muon_lr", "muon_momentum", "beta1", "beta2", "eps")
                    if k in given and getattr(cfg, k) != TrainConfig.model_fields[k].default
                    and k not in uses.get(c.optimizer, set()))
    if unused:
        log.warn(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: not used by --optimizer {c.optimizer}")
    if cfg.schedule == "auto":  # config._check_combinations warns where a schedule was named; 'auto' is known here
        for schedule, keys in (("plateau", [k for k in TrainConfig.model_fields if k.startswith("plateau_")]),
                               ("step", ["step_epochs", "gamma"])):
            unused = [k for k in keys if k in given
                      and getattr(cfg, k) != TrainConfig.model_fields[k].get_default(call_default_factory=True)]
            if unused and c.schedule != schedule:
                log.warn(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: not used by --schedule auto, "
                         f"which is {c.schedule} for this run (set --schedule {schedule} to use "
                         f"{'it' if len(unused) == 1 else 'them'})")
    if "warmup_epochs" in given and c.epochs and c.warmup_epochs >= c.epochs:
        log.warn(f"--warmup-epochs {c.warmup_epochs:g} is not shorter than the run ({c.epochs:g} epochs): the lr "
                 "never reaches its peak")
    if cfg.early_crop and cfg.early_crop >= c.image_size:
        log.warn(f"--early-crop {cfg.early_crop} is not smaller than the {c.image_size}px input: no early crops")


def flip_mode(cfg: TrainConfig) -> str:
    return "alternate" if cfg.model == "fastnet" else "random"


def tta_level(cfg: TrainConfig) -> int:
    if not cfg.tta:
        return 0
    # 1-px shifts only make sense on small images; on large ones a flip is the useful view, and
    # a model trained without flips gets none (tta_views)
    if (cfg.image_size or 224) <= 64:
        return 2
    return 1 if cfg.flip else 0


def default_run_name(project: Path, data_name: str, arch: str) -> str:
    base = f"{data_name}-{arch.replace('timm:', '').replace('/', '-')}"
    i = 1
    while (project / f"{base}-{i}").exists():
        i += 1
    return f"{base}-{i}"
