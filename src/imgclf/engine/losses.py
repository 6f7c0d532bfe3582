"""Losses for multi-label and imbalanced data, and class weights computed from label counts.

Multi-label losses are summed over classes and averaged over the batch: the per-logit gradient
then has the size it has under softmax cross-entropy, so the learning-rate recipes tuned for
single-label runs carry over (a mean over classes would shrink every gradient by C).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.errors import UserError


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class: class indices [N] or positives of multi-hot [N, C]."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return (labels > 0.5).sum(0).astype(np.int64)
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def _named_entries(pieces: list[str], classes: list[str]) -> list[str]:
    """'a,b=5,cat=2' split at its commas, with the pieces of a class name that holds a comma
    ('a,b') put back together: only where the joined name is one of the classes."""
    out, i = [], 0
    while i < len(pieces):
        j = i
        while "=" not in pieces[j] and j + 1 < len(pieces):
            j += 1
        joined = ",".join(pieces[i:j + 1])
        if j > i and joined.rsplit("=", 1)[0].strip() not in classes:
            j = i  # not a class name: the piece stands alone (and is reported as it is)
            joined = pieces[i]
        out.append(joined)
        i = j + 1
    return out


def parse_class_weights(spec: str | None, classes: list[str]) -> str | list[float] | None:
    """'none' / 'balanced' / '1,5,1,...' (one per class, in the run's class order) / 'cat=5,dog=2'
    (others 1)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    text = spec.strip()
    if text.lower() == "balanced":
        return "balanced"
    order = ", ".join(f"'{c}'" if "," in c else c for c in classes[:12]) + (f", ... ({len(classes)} classes)" if len(classes) > 12 else "")
    parts = [p.strip() for p in _named_entries(text.split(","), classes)] if "=" in text else \
        [p.strip() for p in text.split(",")]
    if not any(parts) or not all(parts):
        raise UserError(f"--class-weights {spec!r}: an empty entry; give 'balanced', one number per class "
                        f"({order}), or class=weight pairs")
    try:
        if all("=" in p for p in parts):
            w = [1.0] * len(classes)
            seen: set[str] = set()
            for p in parts:
                name, val = (x.strip() for x in p.rsplit("=", 1))
                if name not in classes:
                    import difflib

                    close = difflib.get_close_matches(name, classes, n=1) or \
                        [c for c in classes if c.lower() == name.lower()]
                    hint = f"; did you mean '{close[0]}'?" if close else f"; the classes are {order}"
                    raise UserError(f"--class-weights: unknown class '{name}'{hint}")
                if name in seen:
                    raise UserError(f"--class-weights: class '{name}' is given twice")
                seen.add(name)
                w[classes.index(name)] = float(val)
        else:
            w = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--class-weights {spec!r}: expected 'balanced', one number per class, or class=weight pairs") from None
    if len(w) != len(classes):
        raise UserError(f"--class-weights: got {len(w)} weights for {len(classes)} classes; one per class, in this "
                        f"order: {order} (or name them: 'cat=5,dog=2')")
    if not all(np.isfinite(w)) or any(x < 0 for x in w):
        raise UserError(f"--class-weights {spec!r}: weights must be finite numbers >= 0")
    if not any(x > 0 for x in w):
        raise UserError(f"--class-weights {spec!r}: every weight is 0, so nothing would be trained")
    return w


def check_options(cfg, classes: list[str], multilabel: bool) -> str | list[float] | None:
    """The imbalance and loss options against the data, before anything is decoded (train and
    lr-find): the loss fits the task, sampler and weights do not both balance, the class weights
    parse. Returns the parsed weights."""
    if cfg.sampler == "balanced" and (cfg.class_weights or "").strip().lower() == "balanced":
        raise UserError("--sampler balanced and --class-weights balanced each correct the imbalance; together "
                        "they over-correct (weights ~1/count^2): pick one")
    if multilabel and cfg.loss == "ce":
        raise UserError("--loss ce is for single-label data; multi-label runs use --loss bce or --loss asl")
    if not multilabel and cfg.loss in ("bce", "asl"):
        raise UserError(f"--loss {cfg.loss} is for multi-label data; add --task multilabel or use --loss ce")
    return parse_class_weights(cfg.class_weights, classes)


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's 'balanced' rule n / (C * count); a class without images gets weight 1."""
    counts = np.asarray(counts, dtype=np.float64)
    n, c = counts.sum(), len(counts)
    return np.where(counts > 0, n / (c * np.maximum(counts, 1)), 1.0)


def balanced_pos_neg_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label 'balanced': each class is its own binary problem, so apply n / (2 * count)
    to its positives and negatives (the same rule with C = 2)."""
    y = np.asarray(labels) > 0.5
    n = len(y)
    pos = y.sum(0).astype(np.float64)
    neg = n - pos
    wp = np.where(pos > 0, n / (2 * np.maximum(pos, 1)), 1.0)
    wn = np.where(neg > 0, n / (2 * np.maximum(neg, 1)), 1.0)
    return wp, wn


class MultiLabelLoss:
    """Sigmoid BCE or the asymmetric loss (ASL) of Ridnik et al. 2021, with optional weights.

    ASL: L+ = (1-p)^g+ log p,  L- = p_m^g- log(1 - p_m), p_m = max(p - clip, 0). The
    negative focusing (g- = 4) and the probability margin (clip = 0.05) discount the many easy
    negatives of multi-label images; defaults are the paper's.
    ``class_weight`` [C] scales every term of a class; ``pos_weight``/``neg_weight`` [C] scale
    positive / negative terms. Targets may be soft (mixup).
    """

    def __init__(self, kind: str = "bce", *, class_weight=None, pos_weight=None, neg_weight=None,
                 gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8):
        if kind not in ("bce", "asl"):
            raise ValueError(kind)
        self.kind, self.gamma_pos, self.gamma_neg, self.clip, self.eps = kind, gamma_pos, gamma_neg, clip, eps
        as_t = lambda w: None if w is None else torch.as_tensor(np.asarray(w), dtype=torch.float32)  # noqa: E731
        self.class_weight, self.pos_weight, self.neg_weight = as_t(class_weight), as_t(pos_weight), as_t(neg_weight)

    def _w(self, w: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
        return 1.0 if w is None else w.to(like.device)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = target.float()
        if self.kind == "bce":
            # log-sigmoid forms: exact and stable for large |logits|
            lp, ln = F.logsigmoid(logits), F.logsigmoid(-logits)
            pos, neg = y * lp, (1 - y) * ln
        else:
            p = torch.sigmoid(logits)
            pm = (p - self.clip).clamp(min=0) if self.clip > 0 else p
            pos = y * torch.log(p.clamp(min=self.eps)) * (1 - p).pow(self.gamma_pos)
            neg = (1 - y) * torch.log((1 - pm).clamp(min=self.eps)) * pm.pow(self.gamma_neg)
        loss = -(pos * self._w(self.pos_weight, logits) + neg * self._w(self.neg_weight, logits))
        loss = loss * self._w(self.class_weight, logits)
        return loss.sum(1).mean()


def build_loss(kind: str, *, multilabel: bool, class_weights, train_labels: np.ndarray, num_classes: int,
               label_smoothing: float = 0.0):
    """The loss function for the trainer (None: the trainer's default) and the single-label
    weight tensor (the trainer applies it in its cross-entropy)."""
    if kind == "auto":
        kind = "bce" if multilabel else "ce"
    if not multilabel:
        if class_weights is None:
            return None, None
        w = balanced_weights(label_counts(train_labels, num_classes)) if class_weights == "balanced" else class_weights
        return None, torch.as_tensor(np.asarray(w), dtype=torch.float32)
    if class_weights == "balanced":
        wp, wn = balanced_pos_neg_weights(train_labels)
        return MultiLabelLoss(kind, pos_weight=wp, neg_weight=wn), None
    # a named weight scales the class's positive terms (PyTorch's pos_weight), as 'balanced' does:
    # scaling both terms of a class rescales its gradient but never moves what it learns to
    # predict (a bias-only fit kept P(ship) at 0.037 with ship=5 and with ship=50)
    return MultiLabelLoss(kind, pos_weight=class_weights), None


def imbalance_setup(cfg, classes: list[str], train_labels: np.ndarray, multilabel: bool, device: torch.device,
                    warn: bool = True):
    """From the config: (loss_fn or None, single-label class-weight tensor or None, sampler or
    None). ``warn``: say, with the class counts, when the training data is strongly imbalanced
    and nothing corrects for it (train's data check already says so: it passes False)."""
    from imgclf import log
    from imgclf.data.sampler import BalancedSampler, imbalance_warning

    counts = label_counts(train_labels, len(classes))
    note = imbalance_warning(counts, classes) if warn else None
    if note and (cfg.class_weights or "none").lower() == "none" and cfg.sampler == "none":
        log.warn(note)
    weights = check_options(cfg, classes, multilabel)
    loss_fn, class_weight = build_loss(cfg.loss, multilabel=multilabel, class_weights=weights,
                                       train_labels=train_labels, num_classes=len(classes))
    if weights is not None:
        shown = (loss_fn.pos_weight if multilabel else class_weight).tolist()
        what = "positive-label weights" if multilabel else "class weights"
        log.info(f"{what}: " + ", ".join(f"{c} {w:.3g}" for c, w in list(zip(classes, shown))[:20])
                 + (f", ... ({len(classes)} classes)" if len(classes) > 20 else ""))
    if class_weight is not None:
        class_weight = class_weight.to(device)
    sampler = BalancedSampler(train_labels, len(classes), seed=cfg.seed) if cfg.sampler == "balanced" else None
    return loss_fn, class_weight, sampler
