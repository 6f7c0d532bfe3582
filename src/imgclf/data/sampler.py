"""Balanced sampling and the imbalance check.

The sampler draws each epoch's indices with replacement, with probability proportional to
1 / (images of the sample's class), so every class is seen about equally often. Like the
loader's shuffle, epoch k's draw depends only on (seed, k): resume stays exact.
"""

from __future__ import annotations

import numpy as np
import torch

IMBALANCE_RATIO = 10.0


def sample_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weight 1/count of its class. Multi-hot: the rarest of its positive classes
    (the image is worth as much as its rarest label); images without labels count as one group."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        return 1.0 / counts[labels]
    pos = labels > 0.5
    counts = pos.sum(0).astype(np.float64)
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    w = (pos * inv).max(1)
    empty = ~pos.any(1)
    if empty.any():
        w[empty] = 1.0 / empty.sum()
    return w


class BalancedSampler:
    """``order(epoch)`` -> ``num_samples`` indices drawn with probability ∝ 1/class count."""

    def __init__(self, labels: np.ndarray, num_classes: int, seed: int = 0, num_samples: int | None = None):
        w = sample_weights(labels, num_classes)
        self.probs = torch.as_tensor(w / w.sum(), dtype=torch.float64)
        self.seed = seed
        self.num_samples = num_samples or len(w)

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_019 + epoch)
        return torch.multinomial(self.probs, self.num_samples, replacement=True, generator=g)


def imbalance_warning(counts: np.ndarray, classes: list[str]) -> str | None:
    """One line with the class counts when the largest class outnumbers the smallest > 10x."""
    counts = np.asarray(counts)
    present = counts[counts > 0]
    if len(present) < 2 or present.max() / present.min() <= IMBALANCE_RATIO:
        return None
    order = np.argsort(-counts, kind="stable")
    shown = [f"{classes[i]} {int(counts[i])}" for i in order]
    if len(shown) > 12:
        shown = shown[:6] + ["..."] + shown[-6:]
    absent = int((counts == 0).sum())
    return (f"imbalanced training data (largest/smallest class {present.max() / present.min():.0f}x): "
            + ", ".join(shown) + (f"; {absent} class(es) without images" if absent else "")
            + "; consider --class-weights balanced or --sampler balanced")
