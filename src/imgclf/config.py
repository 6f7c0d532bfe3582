"""Typed training configuration: one flat set of options shared by YAML files, the CLI and sweeps.

Flat on purpose: every option is addressable by one name on the command line (``--rotate 10``),
in a YAML file (``rotate: 10``) and in a sweep's search space, with no dotted paths to learn.
``None`` means "let imgclf choose"; the chosen values are written to the run folder's
``config.yaml`` so a run can be repeated exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from imgclf.errors import UserError

_SIZE_UNITS = {"": 2**30, "k": 2**10, "kib": 2**10, "kb": 1e3, "m": 2**20, "mib": 2**20, "mb": 1e6,
               "g": 2**30, "gib": 2**30, "gb": 1e9, "t": 2**40, "tib": 2**40, "tb": 1e12}


def parse_gib(v: Any) -> float:
    """A memory size in GiB: a plain number is GiB; '200MB', '512MiB', '4G', '1.5GiB' carry their unit
    (KB/MB/GB decimal, KiB/MiB/GiB and K/M/G binary)."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a size")
    if str(v).strip().lower() in ("inf", "-inf", "+inf", "nan", "infinity"):
        raise ValueError("must be a finite size")
    m = re.fullmatch(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(v).lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"{v!r} is not a size: GiB as a number (2.5), or with a unit: 200MB, 512MiB, 4G")
    gib = float(m.group(1)) * _SIZE_UNITS[m.group(2)] / 2**30
    if not 0 <= gib <= 1 << 20:
        raise ValueError(f"{v!r} is out of range (0 to 1 PiB)")
    return gib


def parse_seconds(v: Any) -> float:
    """A duration: '600' / 600 are seconds; '90s', '10m', '1.5h', '30d' carry their unit. The parser
    of --time-limit, shared by every option that takes a duration (sweep --timeout, cache --older-than)."""
    text = str(v).strip()
    if text.endswith("M"):  # months in some tools (ISO 8601, cron, Java): 5M read as minutes would surprise
        raise ValueError("M is ambiguous (minutes or months?): write m for minutes (5m), or days for longer (150d)")
    text = text.lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], None)
    try:
        secs = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        secs = float("nan")
    if secs == 0:  # 0 means 'no limit' in some tools; here having no limit is leaving the option out
        raise ValueError("must be a positive finite duration, not 0: for no limit, leave the option out")
    if not (secs > 0 and math.isfinite(secs)):  # inf: an OverflowError once the run is planned
        raise ValueError("must be a positive finite duration: seconds, or a number ending in s, m, h or d (10m)")
    return secs


def parse_mapping(text: str) -> dict[str, Any]:
    """'width=1.5,channels=[32,64]' or a YAML/JSON mapping -> dict. The parser of --model-args,
    shared with YAML files and the Python API so the one written form works in all three."""
    text = text.strip()
    try:
        if text.startswith("{"):
            val = yaml.safe_load(text)
        else:
            val = {}
            depth, cur, parts = 0, "", []
            for ch in text:  # split on commas outside brackets
                depth += ch in "[({"
                depth -= ch in "])}"
                if ch == "," and depth == 0:
                    parts.append(cur)
                    cur = ""
                else:
                    cur += ch
            parts.append(cur)
            prev: list[str] = []  # the last key=value pair, for the hint below
            for part in filter(None, (p.strip() for p in parts)):
                if "=" not in part:  # channels=32,64: a list without its brackets
                    hint = f": a list is written in brackets, e.g. {prev[0]}=[{prev[1]},{part}]" if prev else ""
                    raise ValueError(f"expected key=value, got '{part}'{hint}")
                k, v = part.split("=", 1)
                prev = [k.strip(), v.strip()]
                val[k.strip()] = yaml.safe_load(v)
    except yaml.YAMLError as e:  # 'dense=[64': a one-line error, not a traceback
        raise ValueError(f"{text!r} is not key=value pairs ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(val, dict):
        raise ValueError("expected key=value pairs")
    return val


class TrainConfig(BaseModel):
    # allow_inf_nan=False: no float option means anything at inf or nan, and inf passes ge/gt
    # bounds ('--weight-decay inf' would make nan weights, '--ram-budget inf' an OverflowError mid-run)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    # --- data -------------------------------------------------------------------------------
    data: str = Field(..., description="class-folder tree (or a .zip/.tar[.gz|.bz2|.xz] of one), CIFAR pickle dir, "
                                  "'cifar10'/'cifar100', hf:OWNER/NAME, .parquet, .npz, COCO JSON, YOLO folder, "
                                  "label CSV (path,labels) or pixel CSV")
    val_data: str | None = Field(None, description="separate validation data (default: a val/ folder, else --val-split)")
    test_data: str | None = Field(None, description="separate test data (default: a test/ folder, or a CIFAR test batch)")
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out when there is no val split")
    split_seed: int = Field(0, description="seed of the train/val split (kept fixed across runs so they compare)")
    csv_layout: Literal["auto", "planar", "interleaved", "gray"] = Field(
        "auto", description="pixel order of a CSV: planar R..G..B.. (CIFAR) or interleaved RGBRGB.."
    )
    csv_shape: str | None = Field(
        None, description="image shape of a pixel CSV whose images are not square: HxW, e.g. 48x64 (or 48x64x3, 48x64x1) "
        "(default: square)"
    )
    label_column: str = Field("label", description="label column of a pixel CSV or of a label CSV")
    image_size: int | None = Field(None, ge=8, le=2048, description="square input size (default: from the data)")
    resize: Literal["stretch", "crop", "letterbox"] = Field("stretch", description="how images reach image_size")
    cache_dir: str | None = Field(None, description="decoded-image cache (default $IMGCLF_CACHE or ~/.cache/imgclf)")
    workers: int = Field(0, ge=0, description="processes decoding images into the cache (0: one per core)")
    ram_budget: float | str | None = Field(
        None, description="decoded images to keep in RAM/on the device: GiB (2.5), or with a unit (200MB, 512MiB, "
        "4G) (default: half of free RAM)"
    )
    task: Literal["auto", "single", "multilabel"] = Field(
        "auto", description="single-label (softmax) or multi-label (sigmoid); auto: from the data"
    )
    label_mode: Literal["multilabel", "largest"] = Field(
        "multilabel", description="COCO/YOLO labels: every object's class, or the largest object's (single-label)"
    )
    classes: str | None = Field(None, description="keep only these classes, e.g. person,dog,cat (default: all)")
    images: str | None = Field(None, description="image folder of a COCO JSON or of a label CSV that names images by id "
                               "(default: found beside it)")
    keep_empty: bool = Field(True, description="keep COCO/YOLO images without objects as all-negative")

    # --- model ------------------------------------------------------------------------------
    model: str = Field("auto", description="fastnet, plaincnn, or timm:<name> (default: auto, which is fastnet)")
    model_args: dict[str, Any] = Field(default_factory=dict, description="extra model arguments as key=value, lists in "
                                       "brackets: fastnet width=1.5; plaincnn channels=[32,64,128],dense=[256],dropout=0.25 "
                                       "(an unknown key lists the model's keys and defaults)")
    pretrained: bool = Field(False, description="start from pretrained weights (timm models)")
    weights: str | None = Field(None, description="weights to start from: a safetensors or state-dict file, or an http(s) URL (downloaded once; URL#sha256=HEX is checked) (default: none: random, or --pretrained's)")
    head: list[int] | None = Field(None, description="hidden sizes of a new classifier head on a timm backbone, e.g. 512,256 (default: none, one linear layer)")
    head_dropout: float = Field(0.2, ge=0, lt=1, description="dropout before each layer of that head")
    freeze_epochs: float | None = Field(None, ge=0, description="epochs (or a fraction of one) training only the head "
                                        "before the backbone (default: 1 for a pretrained timm model trained 3 epochs or "
                                        "more, at most 200 steps under --time-limit; else 0)")
    backbone_lr_scale: float | None = Field(None, ge=0, description="backbone lr as a fraction of lr (default: 0.1 pretrained, else 1)")
    freeze_stages: int = Field(0, ge=0, description="stem and first N backbone stages frozen for the whole run "
                               "(cheaper fine-tuning steps)")
    freeze_bn: bool | None = Field(None, description="keep the pretrained backbone's BatchNorm statistics once it is "
                                   "unfrozen, as Keras' fine-tuning guide does (default: on for a pretrained backbone "
                                   "trained on under 5000 images, off otherwise and for nets from scratch)")
    probe: bool | None = Field(None, description="fit the new head on the frozen backbone's features of the training "
                               "images (up to 10000, read once) before fine-tuning: linear probe, then fine-tune "
                               "(default: off; --probe helps where the pretrained features already fit the images, "
                               "and then --freeze-epochs defaults to 0)")

    # --- optimisation -----------------------------------------------------------------------
    epochs: float | None = Field(None, gt=0, description="training epochs, fractions allowed (default: 10 for fastnet and "
                                  "pretrained models, 30 for others, more on small data so a run has 400 steps, or with early crops; at most 100)")
    time_limit: float | str | None = Field(
        None, description="wall-clock budget for the whole run, e.g. 600, 90s, 10m, 1.5h: the run length is planned "
        "from the measured step time so training and the final evaluation end within it (--epochs, if given, caps it) "
        "(default: none, --epochs sets the length)"
    )
    # The GLOBAL batch: with N processes each takes batch_size // N, so the recipe's lr (set for
    # batch_size) needs no rescaling and a run matches a 1-process run (docs/distributed.md).
    batch_size: int | None = Field(None, ge=1, description="images per step, global: split across processes (default: 1024 for "
                                        "fastnet, 128 for others, 64 past 96 px; smaller on small data or large images)")
    optimizer: Literal["auto", "sgd", "adam", "adamw", "muon"] = Field(
        "auto", description="auto: muon for fastnet, adamw for others; muon: Muon on conv filters, Nesterov SGD (lr, "
        "momentum) on the rest"
    )
    lr: float | Literal["auto"] | None = Field(
        None, description="peak learning rate; 'auto': run the lr finder first and use its suggestion (default: by "
        "optimizer and batch: fastnet 1.5 x batch/1024, sgd 0.1 x batch/256, adam/adamw 0.001 x sqrt(batch/128))"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (default: 0.9; 0.85 for fastnet)")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD")
    muon_lr: float | None = Field(None, gt=0, description="Muon's step size for conv filters (default: 0.24 for fastnet and plaincnn, 0.02 for others)")
    muon_momentum: float | None = Field(None, ge=0, lt=1, description="Muon's momentum (default: 0.6 for fastnet and plaincnn, 0.95 for others)")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float | None = Field(None, ge=0, description="weight decay, decoupled for AdamW (default: fastnet 0.00133, sgd 5e-4, "
                                          "adamw 0.05, adam 0; 0 when --l2 is given)")
    l2: float = Field(0.0, ge=0, description="L2 penalty added to the loss, Keras-style kernel_regularizer")
    label_smoothing: float | None = Field(None, ge=0, lt=1, description="label smoothing of the cross-entropy targets "
                                          "(default: 0.2 for fastnet, 0.1 for others, 0 multi-label)")
    schedule: Literal["auto", "onecycle", "cosine", "linear", "step", "plateau", "constant"] = Field(
        "auto", description="learning-rate schedule; auto: onecycle (triangular) for fastnet, cosine for others")
    warmup_epochs: float | None = Field(None, ge=0, description="linear warm-up length (default: onecycle 23% of the run, "
                                          "cosine/linear 10% of it up to 2 epochs, others 0)")
    lr_start_factor: float | None = Field(None, gt=0, le=1, description="lr at step 0 as a fraction of the peak (default: onecycle 0.2, others 0.1)")
    lr_end_factor: float | None = Field(None, ge=0, le=1, description="lr at the end as a fraction of the peak (default: onecycle 0.07, others 0)")
    step_epochs: float = Field(30, gt=0, description="'step' schedule: epochs between drops")
    gamma: float = Field(0.1, gt=0, le=1, description="'step' schedule: factor per drop")
    plateau_patience: int = Field(2, ge=0, description="'plateau': drop the lr on this many epochs in a row without improvement (Keras's count)")
    plateau_factor: float = Field(0.2, gt=0, lt=1, description="'plateau': factor per drop")
    plateau_min_lr: float | None = Field(None, ge=0, description="'plateau': the lowest lr it drops to, absolute as Keras's min_lr; param groups with their own lr keep their ratio to --lr (default: 1e-4 x the peak --lr)")
    plateau_cooldown: int = Field(0, ge=0, description="'plateau': validated epochs after a drop that are not counted as without improvement (torch's count)")
    plateau_min_delta: float = Field(0.0, ge=0, description="'plateau': an epoch improves when --monitor beats the best by more than this (Keras's min_delta; an exact tie is no improvement)")
    early_stopping: int = Field(0, ge=0, description="stop after this many epochs without improvement, counted after the lr warm-up and early crops (0: off)")
    min_delta: float = Field(0.0, ge=0, description="for the best weights and early stopping, an epoch improves when --monitor beats the best by more than this, or (an accuracy or mAP) equals it with a lower val_loss")
    keep: Literal["best", "last"] = Field("best", description="the weights the run ends with (model.safetensors): best, of the best epoch by --monitor, or last, of the last epoch (Keras's restore_best_weights=False); best.safetensors is written either way")
    monitor: Literal["val_acc", "val_loss", "val_map", "val_bal_acc"] = Field("val_acc", description="metric for early stopping, plateau, best (default: val_acc; multi-label: val_map; val_bal_acc, the mean recall over classes, for imbalanced data)")
    clip_grad: float | None = Field(None, gt=0, description="clip the gradient norm to this value (default: off)")
    ema: float | None = Field(None, ge=0, lt=1, description="EMA decay of weights, e.g. 0.999 (default: off)")
    lookahead: bool | None = Field(None, description="lookahead weight averaging (default: on for fastnet, off for others)")

    # --- augmentation (batched, on the training device) --------------------------------------
    flip: bool = Field(True, description="random horizontal flip")
    translate: int | None = Field(None, ge=0, description="random crop after reflect padding, in pixels (default: size/16 for fastnet, "
                                    "size/8 for others, at least 1)")
    rotate: float = Field(0.0, ge=0, le=180, description="random rotation, max degrees")
    zoom: float = Field(0.0, ge=0, lt=1, description="random zoom, max fraction (0.1: 0.9x-1.1x)")
    shift: float = Field(0.0, ge=0, lt=1, description="random shift, max fraction of the size")
    cutout: int = Field(0, ge=0, description="side of a random square erased, in pixels")
    early_crop: int | None = Field(
        None, ge=0, description="train the first early_crop_fraction of the run on random crops of this side "
        "(same scale, ~(crop/size)^2 of the compute: more epochs in a budget); 0: off (default: 3/4 of the size, at "
        "least 16 px, for fastnet at 24 px or more on data large enough that the recipe's 10 epochs make 400 steps; "
        "else off)")
    early_crop_fraction: float | None = Field(
        None, gt=0, lt=1, description="fraction of the planned steps trained on early crops (default: 0.5)")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0: off)")

    # --- imbalanced and multi-label data ------------------------------------------------------
    loss: Literal["auto", "ce", "bce", "asl"] = Field("auto", description="ce (single-label), bce or asl (multi-label)")
    class_weights: str | None = Field(
        None, description="none, balanced (n/(C*count)), one weight per class '1,5,...' (class order), or "
        "'cat=5,dog=2'; each image's loss is scaled by its class's weight (multi-label: the class's positives) "
        "(default: none)"
    )
    sampler: Literal["none", "balanced"] = Field("none", description="balanced: draw images with probability 1/class count")

    # --- runtime ----------------------------------------------------------------------------
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps")
    devices: int = Field(1, ge=1, description="processes to spawn for data-parallel training (under torchrun: ignored)")
    sync_bn: bool = Field(False, description="synchronise BatchNorm statistics across processes (CUDA only)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on recent GPUs and on CPUs where it is faster than fp32 (AMX; AVX512-BF16 is timed once per machine)")
    channels_last: bool = Field(True, description="channels-last memory layout for the model and batches")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile (auto: off; it paid on no model measured, see engine.trainer.use_compile)")
    seed: int = Field(0, description="seed of weight initialisation, batch order and augmentation")
    tta: bool = Field(True, description="test-time augmentation (flips, shifts) for the final evaluation")
    eval_every: int = Field(1, ge=1, description="validate every N epochs (and always at the end)")
    checkpoint_minutes: float = Field(
        10.0, ge=0, description="also save RUN/last.pt within an epoch every N minutes, so a killed run resumes "
        "from there and loses at most N minutes of a long epoch (0: at epoch ends only)")

    # --- output -----------------------------------------------------------------------------
    project: str = Field("runs", description="folder holding run folders")
    name: str | None = Field(None, description="run folder name (default: <data>-<model>-N)")
    exist_ok: bool = Field(False, description="reuse a run folder of the same name")
    tensorboard: bool = Field(True, description="write TensorBoard logs to RUN/tensorboard")
    progress: bool = Field(True, description="progress bars while decoding and training, and a line per epoch (metrics.csv has them either way)")

    # option -> its value before the recipe (or a time budget, or --lr auto) chose it for this run;
    # config.yaml keeps it under 'derived:' (make_config, mark_derived). Not an option of its own.
    _derived: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("image_size", mode="before")
    @classmethod
    def _size_pair(cls, v):
        # Keras' target_size=(224, 224), torchvision's Resize((224, 224)): one square size
        if isinstance(v, list | tuple):
            if len(v) == 2 and v[0] == v[1]:
                return v[0]
            raise ValueError(f"{tuple(v)}: images are resized to one square size; give one number (e.g. {max(v)})"
                             if len(v) == 2 else "give one number")
        return v

    @field_validator("zoom", "shift", "rotate", mode="before")
    @classmethod
    def _symmetric_range(cls, v, info):
        # Keras' zoom_range=[0.8, 1.2] and rotation ranges [-15, 15] (torchvision's degrees=(-15, 15),
        # translate=(0.1, 0.1)): one number here, the range's half-width; an asymmetric one is refused
        if not isinstance(v, list | tuple):
            return v
        name = info.field_name
        means = {"zoom": "z, a random scale between 1-z and 1+z (0.2: 0.8x-1.2x)",
                 "shift": "f, a random shift of up to f of the size either way, on both axes (0.1: up to 10%)",
                 "rotate": "d, a random rotation between -d and +d degrees (15: -15 to 15)"}[name]
        nums = [float(x) for x in v if isinstance(x, int | float) and not isinstance(x, bool)]
        one = None
        if len(v) == 2 and len(nums) == 2:
            a, b = sorted(nums)
            if math.isclose(a, -b, abs_tol=1e-9):  # [-15, 15], [-0.1, 0.1]
                one = b
            elif name == "zoom" and math.isclose(a + b, 2.0, abs_tol=1e-9):  # scales [0.8, 1.2]
                one = b - 1
            elif name == "shift" and a == b:  # torchvision's (horizontal, vertical) maximum fractions
                one = b
        if one is None:
            example = {"zoom": "[0.8, 1.2]", "shift": "[-0.1, 0.1]", "rotate": "[-15, 15]"}[name]
            raise ValueError(f"takes one number {means}; only a range symmetric about "
                             f"{'1x' if name == 'zoom' else '0'}, such as {example}, is read as one")
        one = float(f"{one:.12g}")  # 1.2 - 1 is 0.19999999999999996
        from imgclf import log

        what = {"zoom": f"{1 - one:g}x-{1 + one:g}x", "shift": f"up to {one:g} of the size",
                "rotate": f"-{one:g} to {one:g} degrees"}[name]
        log.info(f"{name} {list(v)} is read as {name} {one:g} ({what})")
        return one

    @field_validator("*", mode="before")
    @classmethod
    def _choice_any_case(cls, v, info):
        # optimizer="Adam", schedule: Cosine: a choice's spelling, not a different choice
        field = cls.model_fields.get(info.field_name)
        if isinstance(v, str) and field is not None and typing.get_origin(field.annotation) is Literal:
            low = v.strip().lower()
            if low in typing.get_args(field.annotation):
                return low
        if isinstance(v, bool) and field is not None and field.annotation in (int, float, int | None,
                                                                              float | None):
            raise ValueError(f"{v} is a yes/no, not a number")  # epochs=True trained 1 epoch
        return v

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number_or_auto(cls, v):
        if v is None or v == "auto":
            return v
        try:
            lr = float(v)
        except (TypeError, ValueError):
            lr = float("nan")
        if not (lr > 0 and math.isfinite(lr)):  # inf trains to nan weights
            raise ValueError("must be a positive finite number or 'auto'")
        return lr

    @field_validator("time_limit", mode="before")
    @classmethod
    def _seconds(cls, v):
        # '600' / 600 are seconds; '90s', '10m', '1.5h' carry their unit. Stored as seconds.
        return None if v is None else parse_seconds(v)

    @field_validator("ram_budget", mode="before")
    @classmethod
    def _gib(cls, v):
        # '200MB' was 'invalid float value', where other options take units (90s, 30d). Stored as GiB.
        return None if v is None else parse_gib(v)

    @field_validator("classes", mode="before")
    @classmethod
    def _class_list(cls, v):
        # a YAML list (classes: [person, dog]) means what --classes person,dog does
        if isinstance(v, list | tuple):
            return ",".join(str(c).strip() for c in v)
        return v

    @field_validator("label_column", mode="before")
    @classmethod
    def _column_position(cls, v):
        # label_column=0 from the API (or 'label_column: 0' in YAML): a position, as the CLI's '0'
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_list_or_map(cls, v):
        # YAML / Python: class_weights: [1, 2, 5, 1] or {frog: 5} mean '1,2,5,1' and 'frog=5'
        if isinstance(v, dict):
            return ",".join(f"{k}={w}" for k, w in v.items())
        if isinstance(v, list | tuple):
            return ",".join(str(w) for w in v)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return str(v)
        return v

    @field_validator("model_args", mode="before")
    @classmethod
    def _mapping_text(cls, v):
        # model_args: dropout=0.3,dense=[64] in a YAML file (or the API) reads as --model-args does
        return parse_mapping(v) if isinstance(v, str) else v

    @field_validator("head", mode="before")
    @classmethod
    def _head_sizes(cls, v):
        # '512,256' from the command line; '' or 'linear' means a single linear layer. Every
        # size is checked here: '512,,256' is a typo, not 512,256, and 0 or -5 would build a
        # zero-width layer (constant predictions) or crash mid-setup with a traceback.
        from imgclf.models.head import parse_hidden

        if v is None:
            return v
        try:
            return parse_hidden(v)
        except UserError as e:
            raise ValueError(str(e)) from None


def option_help() -> dict[str, str]:
    return {name: (f.description or "") for name, f in TrainConfig.model_fields.items()}


# What other tools and notebooks call imgclf's training options (Keras, PyTorch scripts,
# Ultralytics' imgsz/lr0/batch, timm's train.py): spelling distance finds 'epoch' for 'epochs'
# but not 'lr' for 'learning_rate'.
OTHER_NAMES = {
    "learning_rate": "lr", "lr0": "lr", "base_lr": "lr", "init_lr": "lr",
    "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs", "nb_epoch": "epochs",
    "batch": "batch_size", "bs": "batch_size", "batchsize": "batch_size", "train_batch_size": "batch_size",
    "imgsz": "image_size", "img_size": "image_size", "input_size": "image_size", "resolution": "image_size",
    "target_size": "image_size", "size": "image_size",
    "arch": "model", "architecture": "model", "backbone": "model", "net": "model", "network": "model",
    "dataset": "data", "data_dir": "data", "train_dir": "data", "data_path": "data", "dataset_dir": "data",
    "val_dir": "val_data", "valid_data": "val_data", "validation_data": "val_data", "test_dir": "test_data",
    "validation_split": "val_split", "valid_split": "val_split", "val_ratio": "val_split", "valid_ratio": "val_split",
    "validation_ratio": "val_split", "val_fraction": "val_split", "val_size": "val_split", "holdout": "val_split",
    "exp_name": "name", "experiment_name": "name", "run_name": "name",
    "optimiser": "optimizer", "optim": "optimizer", "opt": "optimizer",
    "wd": "weight_decay",
    "scheduler": "schedule", "lr_scheduler": "schedule", "lr_schedule": "schedule", "sched": "schedule",
    "warmup": "warmup_epochs", "patience": "early_stopping", "smoothing": "label_smoothing",
    "num_workers": "workers", "amp": "precision", "mixed_precision": "precision",
    "pretrained_weights": "weights",
    # Keras' fit(): validation_data is above; verbose shows the bar
    "val": "val_data", "valid": "val_data", "validation": "val_data", "test": "test_data", "verbose": "progress",
    # Keras' ImageDataGenerator, optimizer and callback arguments
    "epsilon": "eps", "factor": "plateau_factor", "reduce_lr_factor": "plateau_factor", "cooldown": "plateau_cooldown",
    "width_shift": "shift", "height_shift": "shift", "width_shift_range": "shift", "height_shift_range": "shift",
    "horizontal_flip": "flip", "zoom_range": "zoom", "rotation_range": "rotate", "kernel_regularizer": "l2",
}

# Other tools' settings that are no single option here: what to say instead of the nearest
# spelling ('--out' is nearest to '--cutout', '--test-split' to '--val-split'). {key} is written
# as the flag on the command line and as the key in a YAML file.
OTHER_SETTINGS = {
    **dict.fromkeys(("out", "output", "out_dir", "output_dir", "save_dir", "save_path", "log_dir", "logdir",
                     "run_dir", "checkpoint_dir", "work_dir", "exp_dir"),
                    "did you mean {project}/{name}? a run's folder is PROJECT/NAME"),
    **dict.fromkeys(("test_split", "test_ratio", "test_size", "test_fraction"),
                    "the test split is not cut from the training data: it comes from a test/ folder in the "
                    "data, or {test_data}"),
    # Keras' applications: include_top=False, then a new classifier on top
    **dict.fromkeys(("include_top", "top", "no_top", "notop"),
                    "a pretrained model's own classifier is always replaced by a new head for your classes "
                    "({pretrained} or {weights} FILE; {head} sets its hidden sizes, e.g. 512,256)"),
    # Keras' ReduceLROnPlateau(min_lr=...): a tuple is alternatives, the first whose options all exist is said
    "min_lr": ("did you mean {plateau_min_lr}?",
               "no option sets an lr floor: {schedule} plateau stops lowering the lr at 1e-4 x the peak {lr}; "
               "other schedules end at {lr_end_factor} x the peak"),
    # Keras' EarlyStopping(restore_best_weights=True)
    "restore_best_weights": ("a run ends on its best epoch's weights (by {monitor}) unless {keep} last says "
                             "otherwise (Keras' restore_best_weights=False)",
                             "nothing to set: imgclf always keeps the best epoch's weights (by {monitor}) in "
                             "best.safetensors and the final model is taken from them"),
    # Keras' fit(x, y): the arrays and their labels are one option
    **dict.fromkeys(("x", "y", "x_train", "y_train"), "images and labels go together: {data}=(x_train, y_train)"),
    # the command line's --resume is no option of a run: 'resume: true' in a file was told 'resize?'
    "resume": "a run is continued with 'imgclf train --resume RUN' (its folder), not by an option in a config",
    # Keras' SGD(decay=...): a learning-rate decay per step, not weight decay
    "decay": "Keras' decay lowers the learning rate, it is not weight decay: the lr follows {schedule} (e.g. "
             "linear, step); weight decay is {weight_decay}",
    **dict.fromkeys(("shear", "shear_range", "channel_shift", "channel_shift_range", "vertical_flip",
                     "brightness_range"),
                    "no such augmentation here; the augmentations are {flip} (horizontal), {translate}, {rotate}, {zoom}, "
                    "{shift}, {cutout}, {mixup} and {cutmix}"),
    # a random crop here is --translate: reflect padding, then a crop back to the size
    **dict.fromkeys(("crop", "random_crop", "random_crop_padding", "crop_padding"),
                    "the random crop is {translate} N (pad N px by reflection, then crop back to the size); "
                    "{resize} crop centre-crops images to the size"),
}


def other_setting(key: str, known: Iterable[str], *, flag: bool) -> str | None:
    """What to say for another tool's ``key`` that no one option here replaces (OTHER_SETTINGS),
    naming options as flags or as YAML keys; None where the command lacks those options."""
    said = OTHER_SETTINGS.get(key.lstrip("-").replace("-", "_").lower())
    for text in (said,) if isinstance(said, str) else said or ():
        names = re.findall(r"{(\w+)}", text)
        if set(names) <= set(known):
            return text.format(**{n: "--" + n.replace("_", "-") if flag else f"'{n}'" for n in names})
    return None


def suggest_key(key: str, known: Iterable[str] | None = None,
                fallback: str = "; run 'imgclf train --help' for the options") -> str:
    """'; did you mean ...?' for the closest of ``known`` (default: the train options), or what
    another tool's name for it is here (learning_rate: lr)."""
    known = list(TrainConfig.model_fields.keys() if known is None else known)
    setting = other_setting(key, known, flag=False)
    if setting:
        return f"; {setting}"
    other = OTHER_NAMES.get(key.replace("-", "_").lower())
    if other in known:
        return f"; did you mean '{other}'?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else fallback


# The training options typed on the command line, key -> "--flag VALUE" as typed: set by imgclf.cli
# while a command runs, so a bad value names what the user wrote ("--val-split 1.5: must be less
# than 1"), not a YAML key and a "config" they never wrote. The Python API leaves it empty.
_COMMAND_LINE: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("imgclf_command_line",
                                                                                         default=None)


@contextlib.contextmanager
def command_line_options(typed: Mapping[str, str]) -> Iterator[None]:
    """Within this block, errors in the values of ``typed`` (key -> "--flag VALUE") name the flag."""
    token = _COMMAND_LINE.set(dict(typed))
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def _error_text(e: dict) -> str:
    # a validator's own ValueError reaches us as "Value error, must be ...": pydantic's words, not ours
    return re.sub(r"^(Value error|Assertion failed), ", "", e["msg"])


def format_validation_error(err: ValidationError, origin: str | Callable[[str], str], *, noun: str = "option",
                            suggest: Callable[[str], str] = suggest_key, flags: Mapping[str, str] | None = None) -> str:
    """One line per problem, naming the key: what users need to fix a config. ``origin`` names
    where the values came from (or maps a key to that). Other files with their own keys (sweep
    files) pass their ``noun`` and ``suggest``. A key in ``flags`` (key -> "--flag VALUE") was typed
    on the command line: its problem names the flag, "--val-split 1.5: must be less than 1"."""
    lines = []
    where = origin if callable(origin) else (lambda key: origin)
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden" and suggest is suggest_key and isinstance(e.get("input"), dict):
            # 'train:' holding 'epochs: 3' (sections, as other tools' configs have): 'did you mean
            # pretrained?' misleads; the options are one flat set
            inner = [str(k).replace("-", "_") for k in e["input"]]
            valid = [k for k in inner if k in TrainConfig.model_fields]
            if valid:
                then = f"; move {', '.join(valid)} to the top level"
            elif inner:
                then = f"; '{inner[0]}' is no option either" if len(inner) == 1 else \
                    f"; none of {', '.join(inner)} is an option"
            else:
                then = ""  # an empty section: its name is no misspelt option ('pretrained' for 'train')
            lines.append(f"{where(key)}: unknown {noun} '{key}' (a section): options are flat, top-level keys{then}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{where(key)}: unknown {noun} '{key}'{suggest(key)}")
        elif e["type"] == "missing":
            lines.append(f"{where(key)}: option '{key}' is required")
        elif e.get("input") is None and e["type"] == "string_type" and not (flags and key.split(".")[0] in flags):
            # 'data:' left empty in a YAML file: "Input should be a valid string (got None)"
            lines.append(f"{where(key)}: option '{key}' is empty: give it a value")
        elif flags and key.split(".")[0] in flags:
            lines.append(f"{flags[key.split('.')[0]]}: {re.sub(r'^Input should be ', 'must be ', _error_text(e))}")
        else:
            lines.append(f"{where(key)}: option '{key}': {_error_text(e)} (got {e.get('input')!r})")
    return lines[0] if len(lines) == 1 else "; ".join(lines)


class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping: PyYAML lets the last win without
    a word, so 'lr: 0.1' then 'lr: 0.01' further down trains at 0.01. In the file's top mapping,
    keys are compared as load_yaml reads them: 'batch-size' is 'batch_size'."""

    top: yaml.Node | None = None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *defaults' then 'lr: 0.01': overriding a merged key is its purpose
                key = self.construct_object(key_node, deep=True)
                if node is self.top:
                    key = str(key).replace("-", "_")
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor's own error says so
                if first is not key_node:
                    a, b = first.start_mark.line + 1, key_node.start_mark.line + 1
                    lines = f"line {a}" if a == b else f"lines {a} and {b}"
                    same = (f"'{first.value}' (line {a}) and '{key_node.value}' (line {b}) are the same option"
                            if first.value != key_node.value else f"'{key_node.value}' is given twice ({lines})")
                    raise _DuplicateKey(f"{same}; keep one")
        return super().construct_mapping(node, deep)


_YAML_WORDS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null")


def _names_read_as_words(p: Path, node: yaml.Node | None) -> None:
    """'classes: [yes, no]' is [True, False] to YAML 1.1 (as are on/off; ~ and null are None): refused,
    naming the spellings to quote, rather than failing later on class names 'True' and 'False'
    that no folder has. Class names are the items of 'classes' and the keys of 'class_weights'."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _names_read_as_words(p, item)
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value in node.value:
        key = str(key_node.value).replace("-", "_")
        names = (value.value if key == "classes" and isinstance(value, yaml.SequenceNode) else
                 [k for k, _ in value.value] if key == "class_weights" and isinstance(value, yaml.MappingNode) else [])
        bad = [n for n in names if isinstance(n, yaml.ScalarNode) and n.tag in _YAML_WORDS and n.value]
        if key == "classes" and isinstance(value, yaml.ScalarNode) and value.tag == _YAML_WORDS[0]:
            bad = [value]  # 'classes: yes'; 'classes: null' is the default, all classes
        if bad:
            spelt = ", ".join(n.value for n in bad)
            read = ", ".join({True: "true", False: "false", None: "null"}[yaml.safe_load(n.value)] for n in bad)
            one = len(bad) == 1
            raise UserError(f"{p} line {bad[0].start_mark.line + 1}: {key}: YAML reads {spelt} as {read}, not as "
                            f"{'a class name' if one else 'class names'}; quote {'it' if one else 'them'}: "
                            + ", ".join(f"'{n.value}'" for n in bad))
        _names_read_as_words(p, value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a folder: give a YAML file")
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    loader = None
    try:
        loader = _Loader(p.read_text())  # yaml.safe_load, with the top node kept for the checks
        loader.top = loader.get_single_node()
        raw = (loader.construct_document(loader.top) if loader.top is not None else None) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        # a ReaderError (a control character) has a reason, not a problem: its str() is two lines
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or e
        raise UserError(f"{p}:{where} is not valid YAML ({problem})") from None
    except _DuplicateKey as e:
        raise UserError(f"{p}: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()
    _names_read_as_words(p, loader.top)
    if not isinstance(raw, dict):
        raise UserError(f"{p} must hold a mapping of option: value, not a {type(raw).__name__}")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


# options naming input files; a relative one in a YAML file may be written from the file's folder
_INPUT_PATHS = ("data", "val_data", "test_data", "images", "weights")


def paths_beside(file: Path, values: dict[str, Any], given: list[str]) -> str | None:
    """A YAML file's relative input paths, read from the working directory as the command line's
    are; one that is not there but is beside the file (``data: photos`` in projects/cats/run.yaml,
    run from elsewhere) is taken from there. Neither: the one-line error naming both places and
    blaming the file, not --data (returned: the caller reports its validation errors first)."""
    from imgclf.data.sources import DATA_NAMES

    for key in _INPUT_PATHS:
        v = values.get(key)
        if key in given or not isinstance(v, str) or not v.strip() or "://" in v or v.lower() in DATA_NAMES or \
                v.startswith("hf:") or Path(v).expanduser().is_absolute() or \
                (key == "weights" and v.strip().lower() == "imagenet"):  # Keras' weights: imagenet, as --pretrained
            continue
        beside = file.parent / v
        if Path(v).exists():
            if beside.exists() and not os.path.samefile(v, beside):  # two folders of that name: say which
                from imgclf import log

                log.warn(f"{file} {key}: {v} is read from the working directory ({os.path.abspath(v)}), not the "
                         f"one beside {file.name} ({os.path.abspath(beside)}); write the path you mean")
            continue
        if beside.exists():
            values[key] = str(beside)
            continue
        return (f"{file} {key}: {v}: no such file or folder, in the working directory ({os.getcwd()}) "
                f"or beside {file.name} ({os.path.abspath(file.parent)})")
    return None


def _nulls_as_defaults(file: Path, values: dict[str, Any]) -> None:
    """``rotate:`` or ``model: null`` in a YAML file, for an option that has no 'none': its default
    (one line says so), as a missing key would be, not 'Input should be a valid string'."""
    import typing

    fields = TrainConfig.model_fields
    empty = [k for k, v in values.items() if v is None and k in fields and fields[k].is_required() is False
             and type(None) not in typing.get_args(fields[k].annotation)]
    for k in empty:
        del values[k]
    if empty:
        from imgclf import log

        shown = ", ".join(f"{k}: {fields[k].get_default(call_default_factory=True)!r}" for k in empty)
        log.info(f"{file}: {'an empty value reads' if len(empty) == 1 else 'empty values read'} as the default "
                 f"({shown})")


class _Unset:
    """A command-line 'none' for an option a --config file sets: back to its default (the
    recipe's choice, no limit, no file), as if the file did not set it."""

    def __repr__(self) -> str:
        return "none"

    def __reduce__(self) -> str:
        return "UNSET"  # the one instance, also in the processes --devices N spawns (an 'is' test)


UNSET = _Unset()


# Command-line values that change nothing the recipe derives: a run's config.yaml given with only
# these is repeated exactly, choices and all (the options --resume takes, and where output goes)
_NEUTRAL = frozenset({"progress", "device", "devices", "cache_dir", "workers", "ram_budget", "name", "project",
                      "exist_ok", "tensorboard", "seed", "checkpoint_minutes", "eval_every"})


def mark_derived(before: TrainConfig, after: TrainConfig, keys: Iterable[str] | None = None) -> TrainConfig:
    """Record in ``after`` which options were chosen for this run rather than given (``keys``, or
    every option the user did not set that differs), with the value each had before, so a repeat
    of the run with other settings chooses them again (make_config)."""
    keys = [k for k in TrainConfig.model_fields if k not in before.model_fields_set] if keys is None else keys
    was = before.model_dump(mode="json")
    now = after.model_dump(mode="json")
    chosen = {k: was[k] for k in keys if now[k] != was[k] and k not in before._derived}
    after._derived = {**before._derived, **chosen}  # a new dict: model_copy shares the old one
    return after


def note_chosen(cfg: TrainConfig, key: str, was: Any) -> None:
    """``key`` was just chosen for this run (a time budget's epochs or width, --lr auto's value) in
    place of ``was``: recorded as mark_derived records the recipe's choices."""
    if key not in cfg._derived:
        cfg._derived = {**cfg._derived, key: was}


_SHOWN_FIRST = ("epochs", "batch_size", "lr", "warmup_epochs", "image_size", "model")


def _rederive(file: Path, values: dict[str, Any], derived: Any, given: dict[str, Any]) -> dict[str, Any]:
    """A run's config.yaml (its 'derived:' record) given with command-line changes: the options the
    recipe chose for that run go back to what they were before it chose, so --epochs 30 gets the
    warm-up and lr of a 30-epoch run, not the old run's; unchanged, the run repeats exactly."""
    if not isinstance(derived, dict) or not derived:
        return {}
    changed = sorted(k for k in given if k not in _NEUTRAL and values.get(k) != given[k])
    if not changed:
        return derived
    back = [k for k in derived if k in TrainConfig.model_fields and k not in given]
    fields = TrainConfig.model_fields
    for k in back:
        if derived[k] == fields[k].get_default(call_default_factory=True):
            values.pop(k, None)  # unset, as it was: this run's record marks it chosen again
        else:
            values[k] = derived[k]  # a value the user gave that the run replaced: lr: auto
    if back:
        from imgclf import log

        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        first = sorted(back, key=lambda k: (k not in _SHOWN_FIRST, _SHOWN_FIRST.index(k) if k in _SHOWN_FIRST else 0))
        shown = ", ".join(first[:4]) + (f" and {len(first) - 4} more" if len(first) > 4 else "")
        log.info(f"{file}: {flags} changed, so what the recipe chose for that run is chosen again ({shown})")
    return {}


class ReplacedArgs(dict):
    """--model-args after '--model-args none': these arguments alone, not merged over the file's."""


def _model_args_over_file(values: dict[str, Any], derived: Any, given: dict[str, Any]) -> None:
    """--model-args with a --config file that sets model_args: the arguments given replace the
    file's of the same name and the others stay, as a sweep's model_args.X does over its base.
    'run.yaml' with the Keras CNN's channels, dense and batchnorm, and '--model-args dropout=0.3',
    trained plaincnn's default net with dropout 0.3, without a word. The base is what the run
    had before its recipe chose any (a time budget's width, under derived:), so it is chosen
    again; '--model-args none' takes the file's back. Another --model than the file's gets only
    the arguments given: the file's plaincnn channels are no arguments of fastnet."""
    mine, file_args = given.get("model_args"), values.get("model_args")
    if isinstance(mine, ReplacedArgs) or ("model" in given and given["model"] != values.get("model")):
        return
    if isinstance(derived, dict) and isinstance(derived.get("model_args"), dict):
        file_args = derived["model_args"]
    try:  # model_args: dropout=0.3,dense=[64] in the file, model_args="width=1.5" from the API
        file_args, mine = (parse_mapping(v) if isinstance(v, str) else v for v in (file_args, mine))
    except ValueError:
        return  # said as the option's own error when the config is validated
    if isinstance(mine, dict) and isinstance(file_args, dict):
        given["model_args"] = {**file_args, **mine}


def make_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Build a config from an optional YAML file plus overrides (overrides win)."""
    values: dict[str, Any] = load_yaml(file) if file else {}
    derived = values.pop("derived", None)
    record = isinstance(derived, dict)  # a run's own config.yaml: its values were checked when it ran
    missing = None
    if file:
        missing = paths_beside(Path(file), values, given=[k for k, v in overrides.items() if v is not None])
        _nulls_as_defaults(Path(file), values)
    # pathlib paths from the Python API (data=Path("photos")) as the strings a YAML file holds
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items() if v is not None}
    _model_args_over_file(values, derived, given)
    derived = _rederive(Path(file), values, derived, given) if file else {}
    for k in [k for k, v in given.items() if v is UNSET]:
        del given[k]
        values.pop(k, None)
    values.update(given)
    try:
        cfg = TrainConfig(**values)
    except ValidationError as e:
        # a bad command-line value is not the file's fault: each problem names where it came from
        def origin(key: str) -> str:
            return str(file) if file and key.split(".")[0] not in given else "config"

        typed = {k: v for k, v in (_COMMAND_LINE.get() or {}).items() if k in given}
        raise UserError(format_validation_error(e, origin, flags=typed)) from None
    if missing:
        raise UserError(missing)
    # what the user set now: the command line's options and a file of their own, not what a run's
    # config.yaml recorded (read again by --resume, evaluate and report, it would warn on each read)
    _check_combinations(cfg, set(given) | (set() if record else set(values)))
    cfg._derived = dict(derived)
    return cfg


# the models with a classifier of their own (models.registry.OWN_MODELS; 'auto' is fastnet),
# named here so that reading a config does not import torch
_OWN_MODELS = ("auto", "", "fastnet", "plaincnn")


def _check_combinations(cfg: TrainConfig, fresh: set[str]) -> None:
    """Options set together that cannot both be used: a refusal where the house refuses its like
    (--head on an own net, --translate not smaller than the image), else one warning line as
    recipe._say_ignored gives for --optimizer adam --muon-lr 0.1. Only ``fresh`` options are
    looked at, and only when set to something other than their default."""
    from imgclf import log

    fields = TrainConfig.model_fields

    def set_here(key: str) -> bool:
        return key in fresh and getattr(cfg, key) != fields[key].get_default(call_default_factory=True)

    if set_here("head_dropout"):  # as transfer_arch_args refuses --head, and setup_transfer --freeze-epochs
        model = cfg.model.strip().lower()
        if model in _OWN_MODELS:
            arch = model if model in ("fastnet", "plaincnn") else "fastnet"
            own = " or its own dropout, --model-args dense_dropout=X" if arch == "plaincnn" else ""
            raise UserError(f"--head-dropout {cfg.head_dropout:g} is the dropout of a new head on a timm model; "
                            f"{arch} has its own classifier (use --model timm:NAME{own})")
        if cfg.head is None and not cfg.pretrained and not cfg.weights:
            raise UserError(f"--head-dropout {cfg.head_dropout:g} needs a new head on the timm backbone: add "
                            "--head, --pretrained or --weights FILE (else timm's own classifier is trained)")
    # 'auto' is for the recipe to resolve (engine.recipe): only a schedule given can be known not to use them
    for schedule, keys in (("plateau", [k for k in fields if k.startswith("plateau_")]),
                           ("step", ["step_epochs", "gamma"])):
        unused = [k for k in keys if set_here(k)]
        if unused and cfg.schedule not in ("auto", schedule):
            log.warn(f"{', '.join('--' + k.replace('_', '-') for k in unused)}: not used by --schedule "
                     f"{cfg.schedule} (only by --schedule {schedule})")
    # as api checks --translate once the size is known: a square as large as the image erases all of it
    if cfg.cutout and cfg.image_size and cfg.cutout >= cfg.image_size and {"cutout", "image_size"} & fresh:
        raise UserError(f"--cutout {cfg.cutout} must be smaller than the image size ({cfg.image_size} px): a square "
                        "that large erases most or all of each image")


def _without_float_noise(v: Any) -> Any:
    """Floats as written, not as arithmetic left them: warmup_epochs 0.30000000000000004 (0.23 x
    epochs) is 0.3. A float is rounded to 12 significant digits only where that moves it by float
    noise (1e-14 of it); others (an lr of 0.001 x sqrt(batch/128)) keep every digit, so a run
    repeated or resumed from config.yaml trains with exactly the values it had."""
    if isinstance(v, dict):
        return {k: _without_float_noise(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_without_float_noise(x) for x in v]
    if isinstance(v, float) and math.isfinite(v):
        r = float(f"{v:.12g}")
        return r if abs(r - v) <= 1e-14 * abs(v) else v
    return v


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    # rewritten mid-run at every re-plan: a kill while writing must not leave a half file that
    # --resume would read
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = cfg.model_dump(mode="json")
    if cfg._derived:
        data["derived"] = cfg._derived
    tmp.write_text(yaml.safe_dump(_without_float_noise(data), sort_keys=False))
    os.replace(tmp, path)
