"""Multi-label metrics from sigmoid scores: average precision (per class, macro and micro mAP),
precision/recall/F1 at per-class thresholds, exact-match ratio, and threshold tuning (max F1).

AP follows scikit-learn's ``average_precision_score`` (step-wise sum of precision x recall
increments over distinct score thresholds, ties grouped) so figures compare with other tools;
it is written here in numpy because it runs every epoch on the validation set.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def _ranked(scores: np.ndarray, targets: np.ndarray):
    """Cumulative TP/FP at each distinct score, highest first, and those scores."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of ties
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp, fp, s[last]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class; NaN when it has no positives (undefined, left out of the mean)."""
    y = (np.asarray(targets) > 0.5).astype(np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.sum() == 0:
        return float("nan")
    tp, fp, _ = _ranked(s, y)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.asarray([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores, targets) -> float:
    """Macro mAP over the classes that have positives."""
    ap = per_class_ap(np.asarray(scores, dtype=np.float64), np.asarray(targets))
    ok = ~np.isnan(ap)
    return float(ap[ok].mean()) if ok.any() else float("nan")


def tune_thresholds(scores: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per class, the probability threshold (predict >= t) with the highest F1 on this data.

    The threshold sits halfway between the chosen score and the next lower one, so it does
    not sit on a validation image's exact score. Classes without positives keep ``default``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    out = np.full(scores.shape[1], default)
    for c in range(scores.shape[1]):
        n_pos = y[:, c].sum()
        if n_pos == 0:
            continue
        tp, fp, s = _ranked(scores[:, c], y[:, c].astype(np.float64))
        f1 = 2 * tp / (tp + fp + n_pos)
        k = int(np.argmax(f1))
        lower = s[k + 1] if k + 1 < len(s) else max(s[k] - 1e-3, 0.0)
        out[c] = float((s[k] + lower) / 2)
    return out


def _prf(tp, fp, fn):
    p = np.divide(tp, tp + fp, out=np.zeros_like(tp, dtype=np.float64), where=(tp + fp) > 0)
    r = np.divide(tp, tp + fn, out=np.zeros_like(tp, dtype=np.float64), where=(tp + fn) > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return p, r, f


def multilabel_metrics(scores, targets, classes: list[str], thresholds=None) -> dict:
    """All multi-label figures for sigmoid ``scores`` [N, C] and multi-hot ``targets`` [N, C]."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    n, c = y.shape
    th = np.full(c, 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    pred = scores >= th
    tp = (pred & y).sum(0).astype(np.float64)
    fp = (pred & ~y).sum(0).astype(np.float64)
    fn = (~pred & y).sum(0).astype(np.float64)
    p, r, f = _prf(tp, fp, fn)
    mp, mr, mf = _prf(tp.sum(), fp.sum(), fn.sum())
    ap = per_class_ap(scores, y)
    present = y.sum(0) > 0
    nan = float("nan")
    return {
        "task": "multilabel",
        "n": int(n),
        "map": float(ap[present].mean()) if present.any() else nan,  # macro over classes with positives
        "map_micro": average_precision(scores.ravel(), y.ravel()) if n else nan,
        "precision_micro": float(mp), "recall_micro": float(mr), "f1_micro": float(mf),
        "precision_macro": float(p[present].mean()) if present.any() else nan,
        "recall_macro": float(r[present].mean()) if present.any() else nan,
        "f1_macro": float(f[present].mean()) if present.any() else nan,
        "exact_match": float((pred == y).all(1).mean()) if n else nan,
        "hamming_accuracy": float((pred == y).mean()) if n else nan,
        "classes_with_positives": int(present.sum()),
        "per_class": [
            {"class": classes[i], "ap": None if math.isnan(ap[i]) else float(ap[i]), "threshold": float(th[i]),
             "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(y[:, i].sum())}
            for i in range(c)
        ],
    }


def write_per_class_ap_csv(per_class: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "ap", "threshold", "precision", "recall", "f1", "support"])
        w.writeheader()
        for row in per_class:
            w.writerow({**row, "ap": "" if row["ap"] is None else row["ap"]})


def plot_pr_curves(scores, targets, classes: list[str], path: Path, top: int = 10, title: str = "") -> None:
    """Precision-recall curves of the ``top`` most frequent classes (plus the micro curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    fig, ax = plt.subplots(figsize=(6, 5))
    for i in np.argsort(-y.sum(0), kind="stable")[:top]:
        if y[:, i].sum() == 0:
            continue
        tp, fp, _ = _ranked(scores[:, i], y[:, i].astype(np.float64))
        ax.step(tp / tp[-1], tp / (tp + fp), where="post", lw=1,
                label=f"{classes[i]} (AP {average_precision(scores[:, i], y[:, i]):.2f})")
    if y.any():
        tp, fp, _ = _ranked(scores.ravel(), y.ravel().astype(np.float64))
        ax.step(tp / tp[-1], tp / (tp + fp), where="post", lw=2, color="k", label="micro")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title or "precision-recall")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_multilabel(logits, targets, classes: list[str], thresholds, out_dir: Path, *, split: str,
                        prefix: str = "", extra: dict | None = None) -> dict:
    """Metrics of a multi-label model on one split, written to OUT/{metrics.json, per_class.csv,
    pr_curves.png}; ``thresholds`` are the run's tuned ones (None: 0.5)."""
    import json

    import torch

    scores = torch.sigmoid(torch.as_tensor(logits).float()).numpy()
    m = multilabel_metrics(scores, targets, classes, thresholds)
    m.update({"split": split, "thresholds": "tuned on val (max F1)" if thresholds is not None else "0.5",
              **(extra or {})})
    if thresholds is not None and split == "val":
        # the thresholds were fitted to these very images (a run without a test split): P/R/F1 at
        # them read better than on new images; AP and mAP use no threshold
        m["thresholds_fitted_here"] = True
        from imgclf import log

        log.warn("val precision/recall/F1 use thresholds tuned on this val split, so they are optimistic (mAP is "
                 "not: it uses no threshold); a test split (test/ folder or --test-data) gives unbiased figures",
                 once=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_per_class_ap_csv(m["per_class"], out_dir / f"{prefix}per_class.csv")
    plot_pr_curves(scores, targets, classes, out_dir / f"{prefix}pr_curves.png",
                   title=f"{split}: mAP {m['map']:.3f} (micro {m['map_micro']:.3f})")
    (out_dir / f"{prefix}metrics.json").write_text(json.dumps(m, indent=2))
    return m
