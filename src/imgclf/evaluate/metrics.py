"""Single-label classification metrics from logits: top-k, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    c = len(classes)
    labels_np = labels.numpy().astype(np.int64)
    pred = logits.argmax(1).numpy()
    # top-5 only where it can miss: over 5 classes or fewer it is 1.0 whatever the model does
    # (timm's min(5, classes) prints a perfect top-2 for every 2-class model)
    k = 5
    cm = confusion_matrix(pred, labels_np, c)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=(precision + recall) > 0)
    present = support > 0
    # macro F1 as scikit-learn computes it: over the classes in the labels or the predictions, so
    # predicting a class that has no test images costs (its F1 is 0) instead of going unseen
    seen = present | (predicted > 0)
    n = max(len(labels_np), 1)
    return {
        "n": int(len(labels_np)),
        "top1": float((pred == labels_np).mean()) if len(labels_np) else float("nan"),
        **({"top5": float((logits.topk(k, dim=1).indices.numpy() == labels_np[:, None]).any(1).mean())
            if len(labels_np) else float("nan")} if c > k else {}),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[seen].mean()) if present.any() else float("nan"),
        "nll": float(F.cross_entropy(logits.float(), labels.long()).item()) if len(labels_np) else float("nan"),
        "per_class": [
            {"class": classes[i], "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i in range(c)
        ],
        "confusion": cm.tolist(),
        "error_rate_n": int(n - np.trace(cm)),
    }


def majority_baseline(m: dict) -> tuple[str, float, float] | None:
    """(class, top-1, balanced accuracy) of always answering the most frequent class of single-label
    metrics ``m``, where its classes are imbalanced (the largest with twice the images of the
    smallest); None where they are not. A top-1 of 0.68 reads as learning until one sees that
    answering 'person' every time scores 0.62."""
    support = [r["support"] for r in m.get("per_class", []) if r["support"] > 0]
    if len(support) < 2 or max(support) < 2 * min(support):
        return None
    top = max(m["per_class"], key=lambda r: r["support"])
    return top["class"], top["support"] / sum(support), 1.0 / len(support)


def write_confusion_csv(cm: np.ndarray, classes: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, np.asarray(cm)):
            w.writerow([name, *row.tolist()])


def write_per_class_csv(per_class: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(per_class)
