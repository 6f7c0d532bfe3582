"""``imgclf lr-find``: the learning-rate finder on the same set-up ``imgclf train`` would use."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Training options that do not reach the sweep: the run's output and length, its lr schedule and
# what happens after or around each step (evaluation, weight averaging, compilation, early
# crops, several processes), and Muon's own step, which the sweep holds still. Given to lr-find
# (or find_lr) they are refused in one line, and --help does not list them; a --config file (the
# one 'imgclf train' reads) may hold them, unused.
NOT_SWEPT = ("lr", "project", "name", "exist_ok", "tensorboard", "devices", "sync_bn", "time_limit", "test_data",
             "schedule", "warmup_epochs", "lr_start_factor", "lr_end_factor", "step_epochs", "gamma",
             "plateau_patience", "plateau_factor", "plateau_min_lr", "plateau_cooldown", "plateau_min_delta",
             "early_stopping", "min_delta", "keep", "monitor", "ema", "lookahead", "compile",
             "tta", "eval_every", "checkpoint_minutes", "early_crop", "early_crop_fraction", "muon_lr", "muon_momentum")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def add_lr_find(sub) -> None:
    from imgclf.cli import add_config_options

    p = sub.add_parser("lr-find", help="sweep the learning rate, plot loss against lr and suggest a value")
    p.add_argument("--config", help="YAML file of training options (the one 'imgclf train' reads: options that do "
                                    "not apply to the sweep are unused); command-line options override it")
    p.add_argument("--steps", type=int, default=None,
                   help="sweep length in optimizer steps (default: 2 epochs of the data, at least 100, at most 200)")
    p.add_argument("--lr-start", type=float, default=1e-7, help="first learning rate of the sweep")
    p.add_argument("--lr-end", type=float, default=10.0, help="last learning rate of the sweep")
    p.add_argument("--out", default="lr_find.png",
                   help="plot of loss against learning rate: .png, .svg or .pdf (no suffix: .png), with a .json of "
                        "the result beside it (default: lr_find.png in the current folder)")
    add_config_options(p, skip=("lr",))  # lr: the sweep's own range
    for action in p._actions:  # read only to refuse them in one line (find_lr): not listed in --help
        if action.dest in NOT_SWEPT:
            action.help = argparse.SUPPRESS
    p.set_defaults(func=cmd_lr_find)


def plot_path(out: str | Path) -> Path:
    """The file ``--out`` names, checked before the sweep: an image suffix (none: .png; a folder:
    lr_find.png in it) in a folder that can be written (made if missing)."""
    from imgclf.errors import UserError
    from imgclf.paths import write_problem

    path = Path(out).expanduser()
    if path.is_dir():
        path = path / "lr_find.png"
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--out {out}: the plot is an image: name a {', '.join(PLOT_SUFFIXES)} file "
                        f"(the .json of the result is written beside it)")
    problem = write_problem(path.parent, create=True)
    if problem:
        raise UserError(f"--out {out}: cannot write in the folder {path.parent}: {problem}")
    for f in (path, path.with_suffix(".json")):
        if f.is_dir() or (f.exists() and not os.access(f, os.W_OK)):
            raise UserError(f"--out {out}: cannot write {f}: {'a folder' if f.is_dir() else 'permission denied'}")
    return path


def find_lr(config=None, *, steps: int | None = None, lr_start: float = 1e-7, lr_end: float = 10.0,
            out: str | Path | None = "lr_find.png", **options):
    """Python API of ``imgclf lr-find``: returns the LRFind result (``.suggestion`` is the lr)."""
    import numpy as np
    import torch

    from imgclf import log
    from imgclf.api import _arrays_as_files, _cache_splits, _drop_last, channel_stats
    from imgclf.config import make_config
    from imgclf.data.augment import AugmentSpec, BatchAugment, Normalize
    from imgclf.data.cache import cache_root
    from imgclf.data.loader import BatchLoader
    from imgclf.data.sources import load_source
    from imgclf.engine import lr_find, recipe
    from imgclf.engine.cpu_alloc import prepare_cpu_training
    from imgclf.engine.losses import check_options, imbalance_setup
    from imgclf.engine.trainer import seed_everything, training_loss
    from imgclf.errors import UserError
    from imgclf.models import head as transfer
    from imgclf.models import pretrained
    from imgclf.models.registry import arch_args_for_record, build_model, default_normalization, resolve_name
    from imgclf.runs import resolve_device

    if lr_start <= 0 or lr_end <= lr_start:
        raise UserError(f"--lr-start {lr_start} and --lr-end {lr_end}: need 0 < start < end")
    if steps is not None and steps < lr_find.MIN_STEPS:
        raise UserError(f"--steps {steps}: the sweep needs at least {lr_find.MIN_STEPS} steps")
    from imgclf.config import TrainConfig

    unused = [("--[no-]" if TrainConfig.model_fields[k].annotation is bool else "--") + k.replace("_", "-")
              for k in NOT_SWEPT if k in options and k != "lr"]
    if unused or "lr" in options:
        what = ", ".join(unused + (["--lr (the sweep's range is --lr-start/--lr-end)"] if "lr" in options else []))
        raise UserError(f"lr-find: {what} do{'es' if len(unused) + ('lr' in options) == 1 else ''} not apply to the lr "
                        "sweep (one process, no run folder, its own lr schedule, Muon's filters held still): drop "
                        f"{'it' if len(unused) + ('lr' in options) == 1 else 'them'}")
    out = plot_path(out) if out else None  # before the data is read and the sweep run
    # data=(x_train, y_train) as train takes it: else pydantic's 'should be a valid string' printed
    # the whole array, and a notebook could lr-find only data already on disk
    options = _arrays_as_files(options)
    cfg = make_config(config, **options)
    if "data" not in cfg.model_fields_set and not config:
        raise UserError("lr-find needs --data")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    root = cache_root(cfg.cache_dir)
    arch = resolve_name(cfg.model)  # the model and its weights first, as in train: one line, not after decoding
    source = pretrained.plan(arch, cfg.weights, cfg.pretrained)
    pretrained.check_available(arch, cfg)
    # the data, recipe, loss, sampler and augmentation as api.train sets them up (_prepare_data, _build_trainer)
    src = load_source(cfg.data, val_data=cfg.val_data, test_data=cfg.test_data, val_split=cfg.val_split,
                      split_seed=cfg.split_seed, csv_layout=cfg.csv_layout, csv_shape=cfg.csv_shape,
                      label_column=cfg.label_column, cache_dir=root, task=cfg.task, label_mode=cfg.label_mode, classes=cfg.classes,
                      images=cfg.images, keep_empty=cfg.keep_empty)
    for p in src.problems:
        log.warn(p)
    multilabel = src.task == "multilabel"
    check_options(cfg, src.classes, multilabel)  # as train does, before decoding
    native = src.train.images.shape[1] if src.train.images is not None else None
    size = cfg.image_size or (source.input_size if source else 0) or recipe.auto_image_size(src.train.paths, native)
    cached = {"train": _cache_splits(src, size, cfg.resize, root, cfg.workers, cfg.progress)["train"]}
    cfg = recipe.resolve(cfg, n_train=len(cached["train"]), image_size=size, arch=arch, multilabel=multilabel)
    mean, std = (source.mean, source.std) if source and source.mean else default_normalization(arch)
    if mean is None:
        mean, std = channel_stats(cached["train"])
    arch_args = arch_args_for_record(arch, size, {**transfer.transfer_arch_args(arch, cfg, source), **cfg.model_args})
    model = build_model(arch, len(src.classes), size, arch_args)
    transfer.setup_transfer(model, arch, cfg, source, classes=list(src.classes))
    loss_fn, class_weights, sampler = imbalance_setup(cfg, src.classes, np.asarray(cached["train"].labels),
                                                      multilabel, device)
    n_train = len(cached["train"])
    loader = BatchLoader(cached["train"], cfg.batch_size, device, shuffle=True,
                         drop_last=_drop_last(n_train, cfg.batch_size), seed=cfg.seed, sampler=sampler,
                         ram_budget=int(cfg.ram_budget * 2**30) if cfg.ram_budget is not None else None)
    normalize = Normalize(mean, std, device)
    init = getattr(model, "init_from_data", None)
    if callable(init) and source is None:  # loaded weights keep their own whitening stem, as in train
        cs = cached["train"]
        rows = np.sort(cs.rows[: min(2000, len(cs.rows))])
        init(normalize(torch.from_numpy(np.ascontiguousarray(cs.images[rows])).to(device)).cpu())
    model.to(device)
    torch.set_float32_matmul_precision("high")  # train's set-up (api.train, _build_trainer)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    prepare_cpu_training(model, device)
    spec = AugmentSpec(flip=cfg.flip, translate=cfg.translate or 0, rotate=cfg.rotate, zoom=cfg.zoom, shift=cfg.shift,
                       cutout=cfg.cutout, mixup=cfg.mixup, cutmix=cfg.cutmix)
    augment = BatchAugment(spec, normalize, len(src.classes), multilabel=multilabel)
    if (cfg.freeze_epochs or 0) > 0 and hasattr(model, "freeze_backbone"):
        model.freeze_backbone(True)  # the lr of the first, head-only phase
    n = steps or lr_find.default_steps(loader)
    loss = training_loss(cfg, loss_fn, class_weights, multilabel)
    res = lr_find.sweep(model, cfg, loader, augment, device, loss, steps=n, start=lr_start, end=lr_end,
                        progress=cfg.progress, entry="lr-find")
    res.extras = {"model": arch, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "image_size": size,
                  "frozen_backbone": bool(getattr(model, "backbone_frozen", False))}
    if cfg.optimizer == "muon":
        res.extras["muon_filters"] = "held still (their step is muon_lr, not lr)"
    if out is not None:
        lr_find.plot(res, out, title=f"lr finder: {arch}, {cfg.optimizer}, batch {cfg.batch_size}, {size}px")
        out.with_suffix(".json").write_text(json.dumps({**res.as_dict(), **res.extras}, indent=2))
        res.extras["plot"] = str(out)
    lr_find.check_descent(res, "lr-find", out)
    log.info(res.stopped or f"swept {len(res.lrs)} steps")
    return res


def cmd_lr_find(args: argparse.Namespace) -> int:
    from imgclf.config import TrainConfig

    opts = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}
    res = find_lr(args.config, steps=args.steps, lr_start=args.lr_start, lr_end=args.lr_end, out=args.out, **opts)
    steep = f", steepest descent at {res.steepest:.3g}" if res.steepest else ""
    print(f"suggested lr: {res.suggestion:.3g}  (minimum of the smoothed loss at {res.min_lr:.3g} / 10{steep}; "
          f"{res.extras['optimizer']}, batch {res.extras['batch_size']})")
    if res.extras.get("plot"):
        print(f"plot: {res.extras['plot']}")
    print(f"use it: imgclf train ... --lr {res.suggestion:.3g}   (or --lr auto)")
    return 0


COMMANDS = [add_lr_find]
