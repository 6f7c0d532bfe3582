"""Calibration: temperature scaling (Guo et al. 2017) fitted on the validation split, and the
expected calibration error (ECE) with its reliability bins.

One float ``T`` divides the logits; it changes confidences, never the predicted class. It is
stored in ``model.json`` (``temperature``, plus a ``calibration`` record of ECE/NLL before and
after) and applied by ``predict``, ``evaluate`` and the server.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgclf import log
from imgclf.errors import UserError

N_BINS = 15
T_MIN, T_MAX = 0.05, 20.0
# One parameter needs few images, but not a dozen: on 12-16 CIFAR-10 val images fitted
# temperatures ranged from 0.3 (raising ECE) to the bound of 20; from about 100 on they settle.
MIN_FIT_IMAGES = 100


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per confidence bin: mean confidence, accuracy and count (equal-width bins over [0, 1])."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    # bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 cannot occur with softmax
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"edges": np.linspace(0, 1, n_bins + 1), "confidence": conf_sum / safe, "accuracy": acc_sum / safe,
            "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Count-weighted mean |accuracy - confidence| over the bins."""
    b = reliability_bins(probs, labels, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    return float((b["count"] * np.abs(b["accuracy"] - b["confidence"])).sum() / n)


def softmax_np(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(logits.float() / temperature, 1).numpy()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of ``softmax(logits / T)``.

    LBFGS on log T (keeps T positive, well scaled); the problem is 1-D and convex in 1/T, so a few
    iterations suffice. A coarse grid guards against a line search that wanders off.
    """
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    if len(labels) == 0:
        raise UserError("cannot fit a temperature on an empty split")

    def nll(t: float) -> float:
        return float(F.cross_entropy(logits / t, labels))

    grid = np.exp(np.linspace(np.log(T_MIN), np.log(T_MAX), 41))
    start = float(grid[int(np.argmin([nll(t) for t in grid]))])
    log_t = torch.tensor([np.log(start)], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(np.clip(log_t.exp().item(), T_MIN, T_MAX))
    if not np.isfinite(t) or nll(t) > nll(start):
        t = start
    return t


def calibration_record(logits: torch.Tensor, labels: torch.Tensor, temperature: float, split: str) -> dict:
    """ECE and NLL before/after dividing by ``temperature`` (the dict stored in model.json)."""
    y = labels.long()
    lab = y.numpy()
    return {
        "temperature": round(float(temperature), 5),
        "ece_before": round(expected_calibration_error(softmax_np(logits), lab), 5),
        "ece_after": round(expected_calibration_error(softmax_np(logits, temperature), lab), 5),
        "nll_before": round(float(F.cross_entropy(logits.float(), y)), 5),
        "nll_after": round(float(F.cross_entropy(logits.float() / temperature, y)), 5),
        "split": split,
        "n": int(len(lab)),
        "accuracy": round(float((logits.argmax(1) == y).float().mean()), 5),
        "bins": N_BINS,
        "tta_level": 0,
    }


def fit_warnings(rec: dict) -> list[str]:
    """What makes a fitted temperature (a ``calibration_record``) untrustworthy, one line each."""
    return [w for _kind, w in _fit_warnings(rec)]


def _fit_warnings(rec: dict) -> list[tuple[str, str]]:
    """fit_warnings with each line's kind (few images, upper bound, lower bound): their text holds
    the fitted value, so a sweep says each kind once (log.warn's key), not once per trial."""
    out = []
    t, n, split = rec["temperature"], rec["n"], rec["split"]
    if n < MIN_FIT_IMAGES:
        worse = (f"; on these images it raised ECE {rec['ece_before']:.4f} -> {rec['ece_after']:.4f}"
                 if rec["ece_after"] > rec["ece_before"] else "")
        out.append(("calibration-few-images",
                    f"temperature {t:.3g} fitted on only {n} images ({split}): too few to pin it down (under "
                    f"{MIN_FIT_IMAGES}){worse}; not applied (scores keep temperature 1); fit it on more held-out "
                    "images with 'imgclf calibrate RUN --data DIR'"))
    if t >= T_MAX * 0.999:
        out.append(("calibration-upper-bound",
                    f"temperature hit its upper bound {T_MAX:g} on {split}: at any scale the model's scores there "
                    "predict no better than a uniform guess, so every confidence is flattened; train longer or check "
                    "the labels"))
    elif t <= T_MIN * 1.001 and rec.get("accuracy", 1.0) >= 0.95:
        out.append(("calibration-lower-bound",
                    f"temperature hit its lower bound {T_MIN:g} on {split}: nearly every image there is classified "
                    "correctly, so the fit only sharpens scores (not a calibration); fit on a larger or harder split"))
    elif t <= T_MIN * 1.001:  # 61% right yet the bound: the scores are near-uniform, not the split too easy
        out.append(("calibration-lower-bound",
                    f"temperature hit its lower bound {T_MIN:g} on {split} ({rec['accuracy']:.0%} right there): the "
                    "model's scores are nearly flat (a short or heavily regularised run), and even the sharpest "
                    "scaling allowed leaves them underconfident; train longer"))
    return out


# The TTA temperature is fitted on at most this many val images (evenly spaced): one parameter
# needs few, and a budgeted run pays views x images for it (CIFAR-10's 5,000 val images x 6
# views would be ~24 s of a 600-s budget on a 2-core CPU; 1,000 cost ~5 s).
TTA_FIT_LIMIT = 1000


def split_logits(model, meta: dict, cs, device, precision: str = "auto", limit: int | None = None,
                 tta_level: int = 0):
    """Logits and labels of a cached split: single views (the way ``predict`` sees images) or
    the averaged test-time views of ``tta_level`` (the way ``evaluate`` does)."""
    from imgclf.data.augment import Normalize
    from imgclf.engine.trainer import resolve_precision
    from imgclf.evaluate.inference import logits_for_array

    rows = cs.rows
    labels = np.asarray(cs.labels)
    if limit is not None and len(rows) > limit:
        pick = np.linspace(0, len(rows) - 1, limit).astype(np.int64)
        rows, labels = rows[pick], labels[pick]
    normalize = Normalize(meta["mean"], meta["std"], device)
    # rows are read from the memory map batch by batch: a copy of a large split would not fit
    logits = logits_for_array(model, cs.images, normalize, resolve_precision(precision, device), device,
                              tta_level=tta_level, tta_flip=meta.get("tta_flip", True), rows=np.asarray(rows))
    return logits.float(), torch.from_numpy(labels.astype(np.int64))


def calibrate_model(run_dir: Path, model, meta: dict, cs, device, precision: str = "auto", split: str = "val") -> dict:
    """Fit T on a cached split, store it in ``run_dir/model.json``; returns the updated meta.

    A run with test-time augmentation gets a second temperature for its averaged views
    (``temperature_tta``, used by evaluate and predict --tta): averaging views shrinks the
    logits, so the single-view T would leave TTA scores under-confident."""
    from imgclf.runs import write_meta

    if meta.get("task", "single") != "single":
        return meta  # temperature scaling of softmax: single-label only
    t0 = time.perf_counter()
    logits, labels = split_logits(model, meta, cs, device, precision)
    t = fit_temperature(logits, labels)
    rec = calibration_record(logits, labels, t, split)
    for kind, w in _fit_warnings(rec):
        log.warn(w, key=kind)
    # a temperature fitted on a dozen images is noise (it can raise ECE on the very images it was
    # fitted on): the record keeps what was fitted, the scores keep temperature 1. So does a fit
    # that lowers the NLL but raises the ECE it is reported by: the model is already about as
    # calibrated as one temperature can make it, and a log line saying "ECE 0.012 -> 0.015,
    # applied" would read as calibration making it worse.
    why = _not_applied(rec)
    rec["applied"] = why is None
    if why:
        rec["not_applied"] = why
        if rec["n"] >= MIN_FIT_IMAGES:
            log.info(f"temperature {t:.3f} not applied: {why} ({split}, n={rec['n']}); scores keep temperature 1")
    meta = {**meta, "temperature": rec["temperature"] if rec["applied"] else 1.0, "calibration": rec}
    meta.pop("temperature_tta", None)
    level = int(meta.get("tta_level") or 0)
    if level and rec["n"] >= MIN_FIT_IMAGES:  # TTA's averaged views shrink the logits: fitted on their own
        tta_logits, tta_labels = split_logits(model, meta, cs, device, precision, limit=TTA_FIT_LIMIT, tta_level=level)
        tta = calibration_record(tta_logits, tta_labels, fit_temperature(tta_logits, tta_labels), split)
        applied_tta = _not_applied(tta) is None
        meta["temperature_tta"] = tta["temperature"] if applied_tta else 1.0
        rec.update({"tta_level": level, "applied_tta": applied_tta,
                    **{f"{k}_tta": v for k, v in tta.items() if k not in ("split", "bins", "tta_level")}})
    write_meta(run_dir, meta)
    tta_note = (f"; with TTA views {rec['temperature_tta']:.3f}{'' if rec['applied_tta'] else ' (not applied)'}, "
                f"ECE {rec['ece_before_tta']:.4f} -> {rec['ece_after_tta']:.4f}") if "temperature_tta" in meta else ""
    log.info(f"calibration on {split} (n={rec['n']}): temperature {t:.3f}{'' if rec['applied'] else ' (not applied)'}, ECE {rec['ece_before']:.4f} -> "
             f"{rec['ece_after']:.4f}, NLL {rec['nll_before']:.4f} -> {rec['nll_after']:.4f}{tta_note} "
             f"({time.perf_counter() - t0:.1f}s)")
    return meta


def _not_applied(rec: dict) -> str | None:
    """Why a fitted temperature (a ``calibration_record``) is kept out of the scores, or None."""
    if rec["n"] < MIN_FIT_IMAGES:
        return "too few images to pin it down"
    if rec["ece_after"] > rec["ece_before"]:
        return (f"it lowers the NLL ({rec['nll_before']:.4f} -> {rec['nll_after']:.4f}) but raises the ECE "
                f"({rec['ece_before']:.4f} -> {rec['ece_after']:.4f}) on the images it was fitted on")
    return None


def check_classes(data, classes: list[str], model_classes: list[str]) -> None:
    """Data to score must hold only classes the model knows; a folder named 'Cat' for the model's
    'cat' (or 'trucks' for 'truck') gets the name it should have."""
    import difflib

    missing = sorted(set(classes) - set(model_classes))
    if not missing:
        return
    by_case = {c.casefold(): c for c in model_classes}
    hints = []
    for m in missing[:10]:
        near = by_case.get(m.casefold()) or next(iter(difflib.get_close_matches(m, model_classes, n=1, cutoff=0.8)), None)
        hints.append(f"{m} (the model has {near})" if near else m)
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise UserError(f"{data} has classes the model was not trained on: {', '.join(hints)}{more}; "
                    f"class names must match the model's exactly (it has {', '.join(model_classes[:10])}"
                    f"{', ...' if len(model_classes) > 10 else ''})")


def source_from_config(cfg, root: Path):
    """The data source exactly as training read it (same splits, seeds and label options)."""
    import inspect

    from imgclf.data.sources import load_source
    from imgclf.runs import check_run_data

    check_run_data(None, cfg)  # moved since training: said as such, not as '--data X: no such file'
    # pass every config value load_source takes, so new data options keep working here
    params = inspect.signature(load_source).parameters
    kw = {k: getattr(cfg, k) for k in params if k not in ("data", "cache_dir") and k in type(cfg).model_fields}
    return load_source(cfg.data, cache_dir=root, **kw)


# How training read its files, which other data given to evaluate/calibrate is read with too: a
# pixel CSV's layout and shape (3072 columns are refused as 'planar or interleaved?', and a
# non-square CSV has no shape, without them) and the label column of a pixel or label CSV or a
# parquet file ('target' rows were refused as having no column 'label'). Neither command takes
# these options: the run's own, given at training, are the ones that read its data.
READ_OPTIONS = ("csv_layout", "csv_shape", "label_column")


def read_options(cfg) -> dict:
    """The options of READ_OPTIONS that ``cfg`` (a run's config, or None) trained with."""
    return {k: getattr(cfg, k) for k in READ_OPTIONS} if cfg is not None else {}


def run_cache_root(run_dir: Path, cache_dir: str | None = None) -> Path:
    """The cache folder for re-reading a run's data: the one given, else the one the run trained
    with (--cache-dir: a CIFAR download or decoded images already there), else the default."""
    from imgclf.config import make_config
    from imgclf.data.cache import cache_root

    if cache_dir is None and (Path(run_dir) / "config.yaml").exists():
        cache_dir = make_config(Path(run_dir) / "config.yaml").cache_dir
    return cache_root(cache_dir)


# Calibrating fits T on a split the model did not learn from: a folder's val/ first (what the
# temperature is meant for), else its test/; only a folder with neither is used whole.
CALIBRATION_SPLITS = ("val", "test")


def _same_data(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two --data values name the same place (a path compared resolved, else the text)."""
    if not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return str(a) == str(b)


def own_held_out(data: str, run_cfg, root: Path):
    """For ``data`` read whole (no val/ or test/ folder of its own): when it is the data the run
    trained on, the run's source rebuilt as training read it, whose ``val`` is the split it held
    out (None: it held none out, so every image is one the model learned). None for other data.
    calibrate and evaluate score that split rather than the images the model learned."""
    if run_cfg is None or not _same_data(data, run_cfg.data):
        return None
    return source_from_config(run_cfg, root)


def calibrate_run(run: str | Path, data: str | None = None, *, device: str = "auto", progress: bool = True,
                  cache_dir: str | None = None) -> dict:
    """Refit the temperature of a finished run on its validation split (or on ``data``: its val/
    split, else its test/ split, else all of it)."""
    from imgclf.config import make_config
    from imgclf.data.cache import build_cache
    from imgclf.data.sources import load_source
    from imgclf.paths import write_problem
    from imgclf.runs import load_model, read_meta, remove_exports, resolve_device

    dev = resolve_device(device)
    run_dir, _ = read_meta(run)
    model, meta = load_model(run_dir, dev)
    if meta.get("task", "single") != "single":
        raise UserError(f"{run_dir}: temperature scaling applies to single-label runs only")
    # the temperature is stored in the run's model.json: a folder that cannot take it (read-only,
    # another user's) is said before the images are decoded and scored, not as a traceback after
    problem = write_problem(run_dir, create=False)
    if problem:
        raise UserError(f"{run_dir}: cannot store a new temperature in the run folder ({problem}); calibrate a "
                        "writable copy of it")
    root = run_cache_root(run_dir, cache_dir)
    cfg = make_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    if data is None:
        if cfg is None:
            raise UserError(f"{run_dir} has no config.yaml: pass --data DIR with held-out labelled images")
        src = source_from_config(cfg, root)
        if src.val is None:
            raise UserError(f"{run_dir} was trained without a validation split: pass --data DIR with held-out "
                            "labelled images to calibrate on")
        split, name = src.val, "val"
        where = cfg.data  # it may have changed since training: a renamed class would mislabel its images
    else:
        src = load_source(data, val_split=0.0, cache_dir=root, **read_options(cfg))
        split, which = next(((getattr(src, k), k) for k in CALIBRATION_SPLITS if getattr(src, k) is not None),
                            (src.train, "all"))
        name = f"{which} split of {data}" if which != "all" else f"all of {data}"
        own = own_held_out(data, cfg, root) if which == "all" else None
        if own is not None:
            if own.val is not None:
                src, split, name = own, own.val, f"the run's validation split of {data}"
            else:
                log.warn(f"{data} is the data {run_dir.name} was trained on and has no val/ or test/ split: the "
                         "temperature is fitted on training images and will come out too low (overconfident)")
        where = data
    check_classes(where, src.classes, meta["classes"])
    remap = np.asarray([meta["classes"].index(c) for c in src.classes], dtype=np.int64)
    split.labels = remap[split.labels]
    cs = build_cache(split, meta["image_size"], meta["resize"], root / "images", progress=progress,
                     desc="decoding")
    if len(cs) < MIN_FIT_IMAGES:  # before the fit: the run keeps the temperature it has
        raise UserError(f"{len(cs)} readable images to calibrate on in {data or run_dir}: too few to fit a "
                        f"temperature (at least {MIN_FIT_IMAGES}); {run_dir.name} keeps temperature "
                        f"{float(meta.get('temperature') or 1.0):.4g}")
    rec = calibrate_model(run_dir, model, meta, cs, dev, "auto", split=name)["calibration"]
    removed = remove_exports(run_dir)
    if removed:
        log.warn(f"removed {', '.join(f.name for f in removed)} from {run_dir}: exported with the old temperature; "
                 f"re-run 'imgclf export {run_dir}'")
    if (run_dir / "report.html").exists():  # made before: its calibration section shows the old temperature
        log.warn(f"{run_dir / 'report.html'} shows the old temperature: run 'imgclf report {run_dir}' to update it")
    return rec
