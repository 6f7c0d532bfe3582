"""Everything optional in training is a callback: it sees the trainer at a few hook points.

Hooks: on_train_start(t), on_epoch_start(t, epoch), on_step_end(t), on_epoch_end(t, row),
on_train_end(t). ``row`` is the epoch's metrics dict (what goes into metrics.csv). A callback
stops training by setting ``t.stop = "<reason>"``. Callbacks with state implement
state_dict()/load_state_dict() and are saved in every checkpoint, so resume is exact.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch


class Callback:
    def on_train_start(self, t) -> None: ...
    def on_epoch_start(self, t, epoch: int) -> None: ...
    def on_step_end(self, t) -> None: ...
    def on_epoch_end(self, t, row: dict) -> None: ...
    def on_train_end(self, t) -> None: ...
    def state_dict(self) -> dict:
        return {}
    def load_state_dict(self, state: dict) -> None: ...


def _better(monitor: str, value: float, best: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


class EarlyStopping(Callback):
    def __init__(self, monitor: str, patience: int):
        self.monitor, self.patience, self.best, self.bad = monitor, patience, None, 0

    def on_epoch_end(self, t, row):
        if self.monitor not in row:
            return
        if _better(self.monitor, row[self.monitor], self.best):
            self.best, self.bad = row[self.monitor], 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                t.stop = f"early stopping: {self.monitor} did not improve for {self.patience} epochs"

    def state_dict(self):
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, s):
        self.best, self.bad = s["best"], s["bad"]


class ReduceOnPlateau(Callback):
    """Multiply the lr by ``factor`` after ``patience`` epochs without improvement."""

    def __init__(self, monitor: str, patience: int, factor: float, min_factor: float = 1e-4):
        self.monitor, self.patience, self.factor, self.min_factor = monitor, patience, factor, min_factor
        self.best, self.bad = None, 0

    def on_epoch_end(self, t, row):
        if self.monitor not in row:
            return
        if _better(self.monitor, row[self.monitor], self.best):
            self.best, self.bad = row[self.monitor], 0
            return
        self.bad += 1
        if self.bad > self.patience:
            t.lr_scale = max(self.min_factor, t.lr_scale * self.factor)
            self.bad = 0

    def state_dict(self):
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, s):
        self.best, self.bad = s["best"], s["bad"]


class Lookahead(Callback):
    """airbench's lookahead: every 5 steps pull the weights towards a slow copy whose pull
    weakens as training ends; the run ends on the slow copy."""

    def __init__(self, every: int = 5):
        self.every, self.slow = every, None

    def _params(self, t):
        return [v for v in t.model.state_dict().values() if v.dtype.is_floating_point]

    def on_train_start(self, t):
        if self.slow is None:
            self.slow = [v.detach().clone() for v in self._params(t)]

    def on_step_end(self, t):
        if t.step >= t.total_steps:
            self._sync(t, 1.0)  # the run ends on the slow weights (validated like any epoch)
        elif t.step % self.every == 0:
            self._sync(t, 0.95**5 * (t.step / t.total_steps) ** 3)

    def _sync(self, t, decay: float):
        with torch.no_grad():
            for s, p in zip(self.slow, self._params(t)):
                s.lerp_(p, 1 - decay)
                p.copy_(s)

    def state_dict(self):
        return {"slow": self.slow}

    def load_state_dict(self, s):
        self.slow = s["slow"]


class CSVLogger(Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_epoch_end(self, t, row):
        rows = t.history
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(self.path)


class TensorBoard(Callback):
    def __init__(self, logdir: Path):
        self.logdir, self.writer = logdir, None

    def on_train_start(self, t):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but never fail a run over logging
            return
        self.writer = SummaryWriter(str(self.logdir), purge_step=t.epoch if t.epoch else None)

    def on_epoch_end(self, t, row):
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and not math.isnan(v):
                group = k.split("_", 1)
                tag = f"{group[1]}/{group[0]}" if len(group) == 2 and group[0] in ("train", "val") else k
                self.writer.add_scalar(tag, v, row["epoch"])
        self.writer.flush()

    def on_train_end(self, t):
        if self.writer is not None:
            self.writer.close()
