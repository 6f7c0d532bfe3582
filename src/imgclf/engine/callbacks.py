"""Everything optional in training is a callback: it sees the trainer at a few hook points.

Hooks: on_train_start(t), on_epoch_start(t, epoch), on_step_end(t), on_epoch_end(t, row),
on_train_end(t). ``row`` is the epoch's metrics dict (what goes into metrics.csv). A callback
stops training by setting ``t.stop = "<reason>"``. Callbacks with state implement
state_dict()/load_state_dict() and are saved in every checkpoint, so resume is exact.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from imgclf.engine.recipe import crop_step_cost
from imgclf.errors import UserError


class Callback:
    """A hook into training, ``imgclf.train(data=..., callbacks=[MyCallback()])``: subclass it and
    define the hooks you need (any object with some of these methods is accepted too, and only the
    hooks it defines are called). ``t`` is the running Trainer (``t.epoch``, ``t.step``,
    ``t.total_steps``, ``t.history``, ``t.model``); set ``t.stop = "reason"`` to end training.

    - ``on_train_start(t)``: before the first epoch
    - ``on_epoch_start(t, epoch)``: ``epoch`` counts from 0
    - ``on_step_end(t)``: after each optimizer step
    - ``on_epoch_end(t, row)``: ``row`` is the epoch's metrics, as in metrics.csv
      (``{"epoch": 1, "train_loss": ..., "val_loss": ..., "val_acc": ..., ...}``)
    - ``on_checkpoint(t, seconds)``: a checkpoint written within an epoch took ``seconds``
    - ``on_train_end(t)``: after the last epoch
    - ``state_dict()`` / ``load_state_dict(state)``: saved in checkpoints, so --resume is exact

    A callback written for Keras' model.fit runs as it is: ``on_epoch_end(self, epoch, logs)``
    (and on_train_begin, on_epoch_begin, on_train_end) get the epoch from 0 and ``logs`` with
    Keras' names too (loss, accuracy, val_loss, val_accuracy, learning_rate), and
    ``self.model.stop_training = True`` ends training after the epoch.
    """

    def on_train_start(self, t) -> None: ...
    def on_epoch_start(self, t, epoch: int) -> None: ...
    def on_step_end(self, t) -> None: ...
    def on_checkpoint(self, t, seconds: float) -> None: ...  # a checkpoint within an epoch took seconds
    def on_epoch_end(self, t, row: dict) -> None: ...
    def on_train_end(self, t) -> None: ...
    def state_dict(self) -> dict:
        return {}
    def load_state_dict(self, state: dict) -> None: ...


# each hook with the arguments the trainer passes after self (as Callback documents them)
HOOKS = {"on_train_start": ("trainer",), "on_epoch_start": ("trainer", "epoch"), "on_step_end": ("trainer",),
         "on_checkpoint": ("trainer", "seconds"), "on_epoch_end": ("trainer", "row"), "on_train_end": ("trainer",)}


# Keras' hook names and their arguments: a callback written for model.fit (on_epoch_end(self, epoch,
# logs=None), self.model.stop_training = True) runs unchanged
KERAS_HOOKS = {"on_train_begin": ("logs",), "on_epoch_begin": ("epoch", "logs"),
               "on_epoch_end": ("epoch", "logs"), "on_train_end": ("logs",)}
# Keras' names for the metrics of an epoch, beside imgclf's own (which are kept)
_KERAS_LOGS = {"train_loss": "loss", "train_acc": "accuracy", "val_acc": "val_accuracy", "lr": "learning_rate"}


def _keras_style(obj, name: str) -> bool:
    """Whether obj's hook ``name`` follows Keras' convention: its first argument is named as Keras
    names it (epoch, logs) rather than being the trainer."""
    import inspect

    hook = getattr(obj, name, None)
    if name not in KERAS_HOOKS or not callable(hook):
        return False
    if name not in HOOKS:  # on_train_begin, on_epoch_begin: Keras' names, so Keras' arguments
        return True
    try:
        params = list(inspect.signature(hook).parameters)
    except ValueError:
        return False
    return bool(params) and params[0] == KERAS_HOOKS[name][0]


def keras_logs(row: dict | None) -> dict:
    """An epoch's metrics row with Keras' names added (loss, accuracy, val_accuracy, learning_rate)."""
    logs = dict(row or {})
    for ours, theirs in _KERAS_LOGS.items():
        if ours in logs:
            logs.setdefault(theirs, logs[ours])
    return logs


class _KerasModel:
    """What a Keras-style callback finds as ``self.model``: ``stop_training = True`` ends training
    after the epoch, as in model.fit; ``module`` is the torch model being trained."""

    def __init__(self):
        self.stop_training = False
        self.module = None


class _Hooks(Callback):
    """Any object with some of the hooks (a Keras-style one with on_epoch_end only) as a Callback:
    the hooks it defines are called, the others do nothing (the trainer calls every hook of every
    callback, and an object without on_train_start failed mid-run). Hooks written to Keras'
    convention (on_epoch_end(epoch, logs), on_train_begin(logs), ...) get Keras' arguments: the
    epoch counted from 0 and the metrics with Keras' names; they used to get the trainer as the
    epoch."""

    def __init__(self, obj):
        self.obj = obj
        self._logs: dict = {}
        if any(_keras_style(obj, h) for h in KERAS_HOOKS) and getattr(obj, "model", None) is None:
            try:
                obj.model = _KerasModel()
            except AttributeError:  # __slots__ or a read-only property: stop_training is not offered
                pass

    def _call(self, name: str, *args) -> None:
        hook = getattr(self.obj, name, None)
        if callable(hook):
            hook(*args)

    def _keras(self, t, name: str, *args) -> bool:
        """Call obj's Keras-convention hook ``name`` if it has one; False if it has none."""
        if not _keras_style(self.obj, name):
            return False
        getattr(self.obj, name)(*args)
        model = getattr(self.obj, "model", None)
        if isinstance(model, _KerasModel):
            model.module = t.model
            if model.stop_training and not t.stop:
                t.stop = f"{type(self.obj).__name__} set model.stop_training"
        return True

    def on_train_start(self, t):
        if isinstance(getattr(self.obj, "model", None), _KerasModel):
            self.obj.model.module = t.model
        if not self._keras(t, "on_train_begin", {}):
            self._call("on_train_start", t)

    def on_epoch_start(self, t, epoch):
        if not self._keras(t, "on_epoch_begin", epoch, dict(self._logs)):
            self._call("on_epoch_start", t, epoch)

    def on_step_end(self, t):
        self._call("on_step_end", t)

    def on_checkpoint(self, t, seconds):
        self._call("on_checkpoint", t, seconds)

    def on_epoch_end(self, t, row):
        self._logs = keras_logs(row)
        if not self._keras(t, "on_epoch_end", row["epoch"] - 1, dict(self._logs)):
            self._call("on_epoch_end", t, row)

    def on_train_end(self, t):
        if not self._keras(t, "on_train_end", dict(self._logs)):
            self._call("on_train_end", t)

    def state_dict(self):
        f = getattr(self.obj, "state_dict", None)
        return f() if callable(f) else {}

    def load_state_dict(self, state):
        f = getattr(self.obj, "load_state_dict", None)
        if callable(f):
            f(state)


_HOOKS_TEXT = ("give an object with on_epoch_end(self, trainer, row), or any of imgclf.Callback's hooks: "
               "on_train_start(trainer), on_epoch_start(trainer, epoch), on_step_end(trainer), on_train_end(trainer)")


def as_callbacks(callbacks, *, wrap: bool = True) -> list:
    """``callbacks=`` as a list, checked before any work: one object or a list of them; an object
    that does not subclass Callback is accepted if it defines some of the hooks (``wrap``: in a
    _Hooks, so only those are called), and each hook it defines must take the hook's arguments
    (a wrong signature failed only when the trainer first called it, mid-run). A function, a
    class or an object with no hook is refused in one line."""
    import inspect

    if callbacks is None:
        return []
    items = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    out = []
    for c in items:
        if isinstance(c, type):  # callbacks=[MyCallback]: its hooks would get the trainer as self
            raise UserError(f"callbacks: {c.__name__} is a class: pass an instance, {c.__name__}()")
        defined = [h for h in {**HOOKS, **KERAS_HOOKS} if callable(getattr(c, h, None))]
        if not defined:
            what = (f"the function {getattr(c, '__name__', type(c).__name__)}" if callable(c)
                    else f"a {type(c).__name__}")
            raise UserError(f"callbacks: {what} is not a callback: {_HOOKS_TEXT}")
        for h in defined:
            try:
                args = KERAS_HOOKS[h] if h not in HOOKS or _keras_style(c, h) else HOOKS[h]
                inspect.signature(getattr(c, h)).bind(*args)
            except TypeError:
                raise UserError(f"callbacks: {type(c).__name__}.{h} cannot take ({', '.join(args)}), "
                                f"the arguments the trainer passes: define it as {h}(self, "
                                f"{', '.join(args)})") from None
            except ValueError:  # no signature to read (a builtin): called as it is
                pass
        out.append(_Hooks(c) if wrap and not isinstance(c, Callback) else c)
    return out


def _better(monitor: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta``: lower for a loss, higher for
    the others (None or nan never does; anything beats no best)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best - min_delta if monitor.endswith("loss") else value > best + min_delta


def improves(monitor: str, row: dict, best: dict | None, min_delta: float = 0.0) -> bool:
    """Whether an epoch's metrics ``row`` improve on ``best``, the metrics of the best epoch so
    far (None: there is none yet). The one rule of the best weights (best.safetensors, the
    epoch the run keeps) and of EarlyStopping, so the epoch kept is one early stopping counted
    as an improvement: ``monitor`` beats the best by more than ``min_delta``, or, for an
    accuracy or mAP, equals it exactly with a lower val_loss. On a small val split accuracy
    moves in steps of 1/n and ties are common; the later epoch, trained longer at a lower lr, is
    the better model by the finer measure. (Early stopping counted such a tie as a bad epoch
    while the best weights moved to it: "did not improve for 3 epochs", then "kept the weights
    of epoch 10" of 11.)"""
    value = row.get(monitor)
    ref = None if best is None else best.get(monitor)
    if _better(monitor, value, ref, min_delta):
        return True
    if monitor.endswith("loss") or ref is None or value != ref:
        return False
    loss, ref_loss = row.get("val_loss"), best.get("val_loss")
    return loss is not None and ref_loss is not None and loss < ref_loss


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without improvement, counted from the first epoch that ends
    past the warm-up and the early crops (t.settling; cf. Keras's start_from_epoch): a patience of
    2 stopped the default CIFAR-10 recipe at epoch 4 of 13, on crops at peak lr. An improvement
    is what moves the best weights (``improves``: by more than ``min_delta``, or a tie of the
    accuracy with a lower val_loss)."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best, self.best_loss, self.bad = None, None, 0

    def on_epoch_end(self, t, row):
        if self.monitor not in row or t.settling:
            return
        best = None if self.best is None else {self.monitor: self.best, "val_loss": self.best_loss}
        if improves(self.monitor, row, best, self.min_delta):
            self.best, self.best_loss, self.bad = row[self.monitor], row.get("val_loss"), 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                by = f" by more than {self.min_delta:g}" if self.min_delta else ""
                t.stop = f"early stopping: {self.monitor} did not improve{by} for {self.patience} epochs"

    def state_dict(self):
        return {"best": self.best, "bad": self.bad, "best_loss": self.best_loss}

    def load_state_dict(self, s):
        # a checkpoint written before ties counted has no best_loss: a tie then counts as bad once more
        self.best, self.bad, self.best_loss = s["best"], s["bad"], s.get("best_loss")


class ReduceOnPlateau(Callback):
    """Multiply the lr by ``factor`` once ``patience`` epochs in a row have not improved (counted
    as EarlyStopping counts them: not during the warm-up or the early crops). Keras's rule, and
    EarlyStopping's: patience 2 drops the lr on the 2nd bad epoch (torch's ReduceLROnPlateau
    waits for the 3rd); a patience of 0 is treated as 1.

    Keras's other settings: ``min_delta``, what an improvement must beat the best by (an exact
    tie is no improvement here: the plateau keeps its own, Keras's, rule); ``cooldown``, the
    number of validated epochs after a drop that are not counted as bad (an improvement still
    resets the count): torch's reading of "epochs to wait before resuming normal operation"
    (Keras's code counts the last of them: its cooldown 1 waits for none); ``min_lr``, the
    lowest lr, absolute as in Keras, for the peak lr (``t.cfg.lr``; param groups with another
    lr, a backbone's or Muon's, keep their ratio to it); None: ``min_factor`` x the peak.
    An lr already at or below the floor is left as it is."""

    def __init__(self, monitor: str, patience: int, factor: float, min_factor: float = 1e-4, *,
                 min_lr: float | None = None, cooldown: int = 0, min_delta: float = 0.0):
        self.monitor, self.patience, self.factor, self.min_factor = monitor, patience, factor, min_factor
        self.min_lr, self.cooldown, self.min_delta = min_lr, cooldown, min_delta
        self.best, self.bad, self.cooling = None, 0, 0

    def _floor(self, t) -> float:
        """The lowest lr scale: min_lr over the peak lr, or min_factor."""
        if self.min_lr is None:
            return self.min_factor
        return self.min_lr / t.cfg.lr

    def on_epoch_end(self, t, row):
        if self.monitor not in row or t.settling:
            return
        cooling = self.cooling > 0
        if cooling:
            self.cooling -= 1
        if _better(self.monitor, row[self.monitor], self.best, self.min_delta):
            self.best, self.bad = row[self.monitor], 0
            return
        if cooling:
            return
        self.bad += 1
        if self.bad >= max(1, self.patience):
            floor = self._floor(t)
            if t.lr_scale > floor:
                t.lr_scale = max(floor, t.lr_scale * self.factor)
            self.bad, self.cooling = 0, self.cooldown

    def state_dict(self):
        return {"best": self.best, "bad": self.bad, "cooling": self.cooling}

    def load_state_dict(self, s):
        self.best, self.bad, self.cooling = s["best"], s["bad"], s.get("cooling", 0)


class Lookahead(Callback):
    """airbench's lookahead: every 5 steps pull the weights towards a slow copy whose pull
    weakens as training ends; the run ends on the slow copy (a run of under 5 steps on its own
    weights)."""

    def __init__(self, every: int = 5):
        self.every, self.slow = every, None

    def _params(self, t):
        return [v for v in t.model.state_dict().values() if v.dtype.is_floating_point]

    def on_train_start(self, t):
        if self.slow is None:
            self.slow = [v.detach().clone() for v in self._params(t)]

    def on_step_end(self, t):
        if t.step % self.every == 0:
            self._sync(t, 0.95**5 * (min(t.step, t.total_steps) / t.total_steps) ** 3)
        if t.step >= t.total_steps:
            # the run ends on the slow weights (validated like any epoch); a run shorter than one
            # pull never moved them off the initial weights, so it keeps what it trained instead
            self._sync(t, 1.0 if t.step >= self.every else 0.0)

    def _sync(self, t, decay: float):
        with torch.no_grad():
            for s, p in zip(self.slow, self._params(t)):
                s.lerp_(p, 1 - decay)
                p.copy_(s)

    def state_dict(self):
        return {"slow": self.slow}

    def load_state_dict(self, s):
        self.slow = s["slow"]


class TimeBudget(Callback):
    """--time-limit: plan the run length so training, validation and the closing evaluation end
    by ``deadline`` (a time.perf_counter() value), whatever the machine.

    Step times are measured in windows (an epoch's first step is not timed: it carries shuffling
    and, at the start, one-off kernel set-up; nor are the first ``window`` steps of a new phase,
    see below): the first of ``window`` steps, later ones of at
    least ``window_s`` seconds, so fast steps are not timed a noisy batch at a time. Two windows in a
    row more than 25% off the smoothed estimate (the same way) replace it, so a lasting change
    of speed is picked up within two windows and a lone stall is not (phase changes, such as
    unfreezing a backbone, are timed apart from the start). The gap between epochs (validation, checkpoint) is
    measured too. The length is planned after the first window and re-planned when the estimate
    moves it by more than 2% (window ends) or 1% (epoch ends); the lr schedule follows it (during
    the warm-up, which keeps its fraction, by stretching; after it, from where it is to the new end:
    Trainer.set_total_steps). Early-crop steps (cfg.early_crop) are timed apart from
    whole-image ones, and the plan solves for a length whose first early_crop_fraction is crop
    steps. Head-only steps of a fine-tune (before t.frozen_end) are timed apart too, and until a
    step with the backbone unfrozen has been timed it is guessed at UNFROZEN_STEP_COST of one:
    planned from head-only steps alone, a Lite0 fine-tune first planned 3.8x its real length and
    its lr schedule was stretched to match. ``max_steps`` (an explicit --epochs) caps the plan. If the
    deadline comes anyway, the run ends there. It runs first among the callbacks, so lookahead
    sees the final step; ``deadline=None`` makes it inert (a resumed run keeps its plan).

    Distributed: window lengths are step counts and every plan is the mean over the ranks, taken
    at steps all ranks share, so all ranks always agree on the length (a rank stopping early
    would hang the others in their next all-reduce).
    """

    runs_first = True
    # a training step with the backbone unfrozen over a head-only one, until one is timed: the
    # backward pass through the backbone costs about twice its forward pass, and the optimizer
    # now updates every backbone parameter. Measured: 3.8x on EfficientNet-Lite0 at 128 px, batch
    # 64, 3 stages frozen throughout (benchmarks/transfer_cpu.py); 6.5x on ResNet-18 at 32 px,
    # batch 32, where the optimizer's share is large.
    UNFROZEN_STEP_COST = 4.0

    def __init__(self, deadline: float | None, *, eval_images: int = 0, val_images: int = 0,
                 fixed_reserve: float = 0.0, max_steps: int | None = None, window: int = 8, window_s: float = 2.0,
                 input_shape: tuple[int, ...] | None = None, on_plan=None):
        self.deadline, self.eval_images, self.val_images = deadline, eval_images, val_images
        self.fixed_reserve, self.max_steps, self.on_plan = fixed_reserve, max_steps, on_plan
        self.window, self.window_s, self.window_steps = window, window_s, window
        self.input_shape = input_shape  # (C, H, W) of a model input: the forward pass is timed on it
        self.active = deadline is not None
        self.planned = False
        self.step_s: float | None = None  # smoothed seconds per training step on full images
        self.crop_s: float | None = None  # the same during the early-crop phase (cfg.early_crop)
        self.frozen_s: float | None = None  # the same with the backbone frozen (t.frozen_end)
        self.infer_s: float | None = None  # seconds per image of an evaluation forward pass
        self.gap_s: float | None = None  # seconds between two epochs' steps (validation, checkpoint)
        self.off_s: dict[str, float] = {}  # per kind: the last window far off its estimate, set aside
        self.t_last: float | None = None  # end of the last step
        self.w_t0: float | None = None  # start of the current timing window
        self.w_steps = 0
        self.w_kind = "step"  # the current window's kind of step: "step" (full), "crop" or "frozen"
        self.lead_in = 0  # steps left untimed at the start of a new phase
        self.e_t0: float | None = None  # the current epoch's start and steps so far
        self.e_steps = 0

    def _full_s(self, t) -> float:
        if self.step_s is not None:
            return self.step_s
        if self.crop_s is not None:  # only crops timed yet
            return self.crop_s / crop_step_cost(t.cfg.early_crop or 0, t.cfg.image_size or 1)
        return self.frozen_s * self.UNFROZEN_STEP_COST  # only head-only steps timed yet

    def _frozen_s(self, t) -> float:
        return self.frozen_s if self.frozen_s is not None else self._full_s(t) / self.UNFROZEN_STEP_COST

    @staticmethod
    def _kind(t) -> str:
        """The next step's kind (a head-only step on early crops is timed as head-only)."""
        return "frozen" if t.step < t.frozen_end else ("crop" if t.crop_size() > 0 else "step")

    def _crop_s(self, t) -> float:
        if self.crop_s is not None:
            return self.crop_s
        return self.step_s * crop_step_cost(t.cfg.early_crop or 0, t.cfg.image_size or 1)

    def _measure_inference(self, t) -> None:
        """Time the evaluation's forward pass once: an evaluation-sized batch through the model in
        eval mode without gradients, twice (the first pass sets up kernels; the second is timed).
        Guessing it from the training step is unreliable: with a frozen backbone or frozen
        stages a step is mostly forward, and the closing evaluation and report were
        under-budgeted by half on a fine-tune with 3 frozen stages."""
        if self.input_shape is None:
            return
        from imgclf.evaluate.inference import auto_batch_size

        model = t.model
        was_training = model.training
        # at the evaluation's own batch size (auto_batch_size): per image, a CPU forward costs up
        # to several times more at the wrong one
        c, h, w = self.input_shape
        x = torch.zeros(auto_batch_size((h, w, c), device=t.device), c, h, w, device=t.device)
        if t.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model.eval()
        try:
            with torch.no_grad(), t.precision.autocast(t.device):
                for _ in range(2):
                    if t.device.type == "cuda":
                        torch.cuda.synchronize(t.device)
                    t0 = time.perf_counter()
                    model(x)
                    if t.device.type == "cuda":
                        torch.cuda.synchronize(t.device)
            self.infer_s = (time.perf_counter() - t0) / x.shape[0]
        finally:
            model.train(was_training)
        if self.t_last is not None:  # the measurement is part of neither a timing window nor the epoch gap
            self.w_t0, self.t_last = None, time.perf_counter()

    def _per_image(self, t) -> float:
        # before (or without) a measurement: a forward pass costs about a third of a training step
        return self.infer_s if self.infer_s is not None else self._full_s(t) / max(1, t.train_loader.batch_size) / 3

    def _eval_reserve(self, t) -> float:
        # the closing evaluation and report; 10% for loading batches and computing metrics
        return 1.1 * self.eval_images * self._per_image(t)

    def _close_window(self, now: float) -> bool:
        if self.w_t0 is None or self.w_steps == 0:
            return False
        w = (now - self.w_t0) / self.w_steps
        attr = f"{self.w_kind}_s"
        cur = getattr(self, attr)
        if cur is None:
            setattr(self, attr, w)
        elif abs(w - cur) > 0.25 * cur:
            # Off by more than 25%: a lone window like that is a stall (another process, a page
            # cache flush) and is set aside; a second one off the same way is a new speed, taken
            # at once. Taken from one window, a Lite0 fine-tune on a busy machine re-planned
            # 2.5 -> 1.9 -> 2.6 epochs, and the lr schedule stretched and shrank with it. (Phase
            # changes, unfreezing or the end of early crops, are timed apart: see _kind.)
            prev = self.off_s.get(self.w_kind)
            if prev is not None and (prev > cur) == (w > cur):
                setattr(self, attr, 0.5 * (prev + w))
                self.off_s.pop(self.w_kind)
            else:
                self.off_s[self.w_kind] = w
        else:
            setattr(self, attr, 0.7 * cur + 0.3 * w)
            self.off_s.pop(self.w_kind, None)
        self.w_t0, self.w_steps = now, 0
        return True

    def _plan(self, t, now: float, tolerance: float) -> None:
        if self.infer_s is None and self.input_shape is not None:
            self._measure_inference(t)
            now = time.perf_counter()  # the measurement's own time is spent too
        gap = self.gap_s
        if gap is None:  # not measured yet: a validation pass
            gap = self.val_images * self._per_image(t)
        per_gap = gap / (t.steps_per_epoch * max(1, t.cfg.eval_every))
        s_full = self._full_s(t) + per_gap
        reserve = self.fixed_reserve + self._eval_reserve(t)
        avail = self.deadline - reserve - now
        step = t.step
        if step < t.frozen_end:  # the rest of the head-only phase first; the plan is what follows it
            avail -= (t.frozen_end - step) * (self._frozen_s(t) + per_gap)
            step = t.frozen_end
        n = step + max(1, int(avail / s_full))
        if step < t.crop_end:
            # the first crop_frac of the n steps are crop steps: solve
            # (f*n - step) * s_crop + (1 - f) * n * s_full = avail for n
            f, s_crop = t.crop_frac, self._crop_s(t) + per_gap
            n_crop = int((avail + step * s_crop) / (f * s_crop + (1 - f) * s_full))
            if f * n_crop > step:  # else the phase ends now and the rest is full steps (n above)
                n = max(step + 1, n_crop)
        late = float(now + 3.0 + self._eval_reserve(t) >= self.deadline)
        kind = self._kind(t)
        step_s = self._frozen_s(t) if kind == "frozen" else (self._crop_s(t) if kind == "crop" else self._full_s(t))
        if t.reduce is not None:
            n, step_s, late = (t.reduce(torch.tensor([n, step_s, late], dtype=torch.float64, device=t.device))
                               / t.reduce_world).tolist()
            n = round(n)
        if self.max_steps is not None:
            n = min(n, self.max_steps)
        self.window_steps = max(self.window, math.ceil(self.window_s / max(step_s, 1e-6)))
        if late > 0:
            self._stop(t)
        elif not self.planned or abs(n - t.total_steps) > tolerance * t.total_steps:
            before = t.total_steps if self.planned else None
            self.planned = True
            t.set_total_steps(n)
            if self.on_plan is not None:
                self.on_plan(t, before)

    def _stop(self, t) -> None:
        if t.step < t.total_steps:
            t.set_total_steps(t.step)
            t.stop = "time limit reached: the run ended before its planned length"
            if self.on_plan is not None:
                self.on_plan(t, None, stopped=True)  # config.yaml records the length actually run

    def on_epoch_start(self, t, epoch):
        if self.active and self.t_last is not None:
            gap = time.perf_counter() - self.t_last
            self.gap_s = gap if self.gap_s is None else 0.5 * (self.gap_s + gap)
        self.w_t0, self.w_steps = None, 0  # a window never spans an epoch boundary
        self.e_t0, self.e_steps = time.perf_counter(), 0

    def on_checkpoint(self, t, seconds):
        # writing a checkpoint within an epoch is not step time: the window and epoch timings skip it
        if self.w_t0 is not None:
            self.w_t0 += seconds
        if self.e_t0 is not None:
            self.e_t0 += seconds

    def on_step_end(self, t):
        if not self.active:
            return
        kind = self._kind(t)
        switch = self.w_t0 is not None and kind != self.w_kind  # early crops or the head-only phase end here
        if t.device.type == "cuda" and ((self.w_t0 is None and not self.lead_in) or switch
                                        or self.w_steps + 1 >= self.window_steps):
            # CUDA steps are queued, not run, when the host returns: time the device's work, at
            # window edges only (one sync per >= 2 s, nothing inside the window)
            torch.cuda.synchronize(t.device)
        now = self.t_last = time.perf_counter()
        self.e_steps += 1
        if self.w_t0 is None:
            if self.lead_in > 0:
                self.lead_in -= 1
                self._check_deadline(t, now)
                return
            self.w_t0, self.w_steps, self.w_kind = now, 0, kind
            return
        self.w_steps += 1
        if switch and t.step < t.total_steps:
            # the next step is of another kind (a phase ends): the window ends with its own
            self._close_window(now)
            self._plan(t, now, 0.02)
            # and the new phase's first steps are not timed: they set up kernels for new shapes
            # or backward passes, the optimizer's state and a larger heap. Lite0's steps after
            # unfreezing at 128 px: 0.55, 0.59, 0.37, 0.46, 0.41 s ... 0.29 s from the 18th on;
            # timed from the first, a window planned 1.9 epochs and the next 3.2 (the run had 3.0)
            self.w_t0, self.lead_in = None, self.window
        elif self.w_steps >= self.window_steps and t.step < t.total_steps:
            self._close_window(now)
            self._plan(t, now, 0.02)
        else:
            self._check_deadline(t, now)

    def _check_deadline(self, t, now: float) -> None:
        if t.reduce is None and self.planned and now + 3.0 + self._eval_reserve(t) >= self.deadline:
            self._stop(t)  # one process: checked every step; distributed: at window ends, in _plan

    def on_epoch_end(self, t, row):
        if not self.active or t.step >= t.total_steps:
            return
        now = time.perf_counter()
        # The window ends at the epoch's last step, not now: validation ran in between, and it is
        # already counted (gap_s). Ended now, a window of the epoch's last 2 steps took the 5k-image
        # validation as step time, and the plan shrank at every epoch end.
        closed = self._close_window(self.t_last)
        if not closed and self.e_steps and all(v is None for v in (self.step_s, self.crop_s, self.frozen_s)):
            # epochs too short to hold a window (one step each): time whole epochs instead
            setattr(self, f"{self._kind(t)}_s", (self.t_last - self.e_t0) / self.e_steps)
        if closed or any(v is not None for v in (self.step_s, self.crop_s, self.frozen_s)):
            self._plan(t, now, 0.01)


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
        # scalars are logged at 1-based epochs: a run resumed after epoch k hides what a killed
        # run logged past k (steps >= k + 1) and keeps epoch k's own points
        self.writer = SummaryWriter(str(self.logdir), purge_step=t.epoch + 1 if t.epoch else None)

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
