"""The learning-rate finder (Leslie Smith's range test, as popularised by fastai).

Train for a few hundred steps while the lr grows exponentially from ``start`` to ``end``,
record the loss, smooth it, and suggest a peak lr. The model's weights are restored afterwards:
the sweep only looks.

The suggestion is the lr at the minimum of the smoothed loss divided by 10. The minimum is the
most stable feature of the curve, even over a few dozen noisy steps; the steepest-descent point
depends on a numerical derivative of that noise and jumps around between runs. One tenth of the
minimum backs off from the edge of divergence to where the loss still falls fast, and is what
a schedule's peak lr should be. The steepest point is reported and drawn too, for comparison.

What moves during the sweep is what ``--lr`` controls, and only that: with Muon (fastnet's
optimizer) the conv filters take steps of their own fixed size (``muon_lr``), whatever ``--lr``
is, so they are held still; otherwise the loss would fall at any swept lr, and the finder would
"find" the start of any range. A curve whose fall is within the step-to-step noise of the loss
suggests nothing (``no_descent``), and a minimum in the last tenth of the range is said (the
loss may fall further past ``end``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgclf import log
from imgclf.engine.optim import build_optimizer, l2_penalty
from imgclf.engine.trainer import resolve_precision, training_loss
from imgclf.errors import UserError

MIN_STEPS = 5  # fewer usable points than this make no curve
MIN_DROP = 0.01  # a smoothed loss falling less than 1% from its start has no descent to read, noise or not
# A fall that the same losses shuffled match in this share of shuffles or more is noise (see
# fall_p_value); NOISE_SHUFFLES shuffles measure it.
NOISE_P, NOISE_SHUFFLES = 0.01, 499
DEFAULT_MIN_STEPS, DEFAULT_MAX_STEPS = 100, 200  # default_steps: fewer points leave the minimum to noise
END_FRACTION = 0.1  # a minimum in the last tenth of the sweep: the loss may fall further past its end


class NoDescentError(UserError):
    """The lr finder's smoothed loss never fell (its minimum lies at the start of the sweep, or it
    dropped less than MIN_DROP), so its suggestion would be ~lr_start, at which nothing trains.
    ``train --lr auto`` catches it and falls back to the recipe's lr; ``reason`` says what was
    seen (no advice), ``result`` is the sweep (already plotted)."""

    def __init__(self, message: str, result, reason: str):
        super().__init__(message)
        self.result, self.reason = result, reason


# what the user of each entry point can change when the sweep gives nothing to read
_ADVICE = {
    "lr-find": {"few": "lower --lr-start, or check the data",
                "flat": "sweep another range with --lr-start/--lr-end (a higher --lr-end if the loss never "
                        "moved, a lower --lr-start if it rose from the first step)",
                "end": "the loss may fall further at larger lrs: widen --lr-end"},
    "train": {"few": "give --lr a number instead of auto, or check the data",
              "flat": "run 'imgclf lr-find' with another --lr-start/--lr-end, or give --lr a number",
              "end": "the suggestion may be too low: run 'imgclf lr-find' with a higher --lr-end, or give --lr a number"},
}


@dataclass
class LRFind:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None  # None when the curve has no descent (no_descent says why)
    steepest: float | None
    min_lr: float
    method: str = "min/10"
    stopped: str = ""
    extras: dict = field(default_factory=dict)
    no_descent: str = ""  # why the curve has no descent to suggest from ('' when it has): see descent_problem()
    at_end: bool = False  # the minimum lies in the last tenth of the range: the loss may fall further past it

    def as_dict(self) -> dict:
        out = {"suggestion": None if self.no_descent else self.suggestion, "method": self.method,
               "min_loss_lr": self.min_lr, "steepest_lr": self.steepest, "steps": len(self.lrs),
               "stopped": self.stopped}
        if self.no_descent:
            out["no_descent"] = self.no_descent
        if self.at_end and not self.no_descent:
            out["minimum_at_end"] = True
        return out


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Debiased exponential moving average (what fastai plots)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def _smooth_rows(x: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """smooth() of each row of ``x`` at once."""
    out, avg = np.empty_like(x), np.zeros(len(x))
    for i in range(x.shape[1]):
        avg = beta * avg + (1 - beta) * x[:, i]
        out[:, i] = avg / (1 - beta ** (i + 1))
    return out


def fall_p_value(losses: list[float], skip: int, n: int = NOISE_SHUFFLES) -> float:
    """How often the same losses in a random order fall as far from ``smoothed[skip]`` to the
    smoothed minimum as they do in the order they came (a permutation test: no model of the
    noise, and the choice of the lowest point is made in every shuffle too). Small: a real
    descent; large: the lowest point of a curve that only wobbles."""
    x = np.asarray(losses, dtype=float)
    if len(x) <= skip + 1:
        return 1.0
    sm = _smooth_rows(x[None])[0]
    seen = sm[skip] - sm[skip:].min()
    rng = np.random.default_rng(0)  # the same curve always gets the same answer
    shuffled = _smooth_rows(rng.permuted(np.tile(x, (n, 1)), axis=1))
    falls = shuffled[:, skip] - shuffled[:, skip:].min(axis=1)
    return float((1 + np.sum(falls >= seen - 1e-12)) / (1 + n))


def descent_problem(lrs: list[float], smoothed: list[float], losses: list[float] | None = None) -> str:
    """Why the curve shows no descent to read a suggestion from ('' if it does): its minimum lies in
    the first ~10% of the points looked at, the smoothed loss fell less than MIN_DROP from its
    start to its minimum, or (given the raw ``losses``) its fall is within their noise: the
    losses up to the minimum, shuffled, fall as far more often than NOISE_P (fall_p_value), so
    the minimum is the lowest wobble of a flat curve and its place is chance."""
    skip = min(len(lrs) // 10, 5)
    i_min = skip + int(np.argmin(smoothed[skip:]))
    first = smoothed[skip]
    if i_min - skip < max(1, math.ceil(0.1 * (len(lrs) - skip))):
        return f"the smoothed loss was lowest at the start of the sweep (lr {lrs[i_min]:.2g}) and never fell"
    drop = (first - smoothed[i_min]) / max(abs(first), 1e-12)
    if drop < MIN_DROP:
        return (f"the smoothed loss fell only {100 * drop:.1f}% (from {first:.4g} to {smoothed[i_min]:.4g} "
                f"at lr {lrs[i_min]:.2g})")
    if losses is not None:
        p = fall_p_value(losses[: i_min + 1], skip)
        if p >= NOISE_P:
            return (f"the smoothed loss fell {100 * drop:.1f}% (from {first:.4g} to {smoothed[i_min]:.4g} at lr "
                    f"{lrs[i_min]:.2g}), no more than the same losses shuffled do ({100 * p:.0f}% of shuffles): "
                    f"no clear descent, only noise")
    return ""


def minimum_at_end(lrs: list[float], smoothed: list[float], start: float, end: float) -> bool:
    """Whether the smoothed minimum lies in the last END_FRACTION of the swept range (in log lr)."""
    skip = min(len(lrs) // 10, 5)
    i_min = skip + int(np.argmin(smoothed[skip:]))
    return math.log(lrs[i_min] / start) >= (1 - END_FRACTION) * math.log(end / start)


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float | None, float]:
    """(suggestion = lr at the smoothed minimum / 10, steepest-descent lr, lr at the minimum)."""
    # ignore the first few points: the EMA has not settled yet
    skip = min(len(lrs) // 10, 5)
    i_min = skip + int(np.argmin(smoothed[skip:]))
    min_lr = lrs[i_min]
    steepest = None
    if i_min - skip >= 3:
        grad = np.gradient(np.asarray(smoothed[skip : i_min + 1]), np.log(np.asarray(lrs[skip : i_min + 1])))
        steepest = float(lrs[skip + int(np.argmin(grad))])
    return max(min_lr / 10, lrs[0]), steepest, min_lr


def sweep(model, cfg, loader, augment, device, loss_fn=None, *, steps: int = 200, start: float = 1e-7,
          end: float = 10.0, diverge: float = 4.0, progress: bool = False, entry: str = "lr-find") -> LRFind:
    """Exponential lr sweep over ``steps`` optimizer steps (fewer if the loss diverges), cycling
    through the data as often as that takes.

    ``cfg`` is the resolved training config: its optimizer, momentum/betas, weight decay and
    the model's own parameter groups (e.g. a 0.1x backbone) are used, so the suggestion is the
    peak lr of exactly that training set-up. Each step is the trainer's: the l2 penalty, the
    fp16 GradScaler (a step it skips for overflowing gradients gives no point on the curve)
    and gradient clipping. Muon's conv filters are held still: their step size is ``muon_lr``,
    not the swept lr. Weights, BatchNorm statistics, ``requires_grad`` flags and train/eval
    mode are restored, and no ``.grad`` is left behind.

    A curve without descent is returned with ``no_descent`` set and no suggestion (the caller
    plots it, then raises: :func:`check_descent`). ``entry`` ('lr-find' or 'train') words the
    advice of errors and warnings.
    """
    if steps < MIN_STEPS:
        raise UserError(f"lr finder: {steps} steps are too few for a curve: sweep at least {MIN_STEPS}")
    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    opt = build_optimizer(model, cfg.model_copy(update={"lr": 1.0}))  # base_lr = each group's lr scale
    # Muon's filter groups step by their own muon_lr whatever the swept lr: out of the sweep, or
    # the loss falls at any lr and the curve measures Muon. Without clipping (whose norm counts
    # their gradients, as in training) their gradients are not even computed.
    held = [p for g in opt.param_groups if g.get("muon") for p in g["params"]]
    opt.param_groups[:] = [g for g in opt.param_groups if not g.get("muon")]
    if not opt.param_groups:
        raise UserError("lr finder: every trained parameter takes Muon's own steps (muon_lr), so --lr moves nothing "
                        "to sweep: use another --optimizer")
    if getattr(model, "backbone_frozen", False):
        log.info(_head_only_note(model, cfg, entry))
    precision = resolve_precision(cfg.precision, device)
    smoothing = cfg.label_smoothing or 0.0
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, label_smoothing=smoothing))
    g = torch.Generator().manual_seed(cfg.seed)
    lrs, losses, best, stopped = [], [], math.inf, ""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        from imgclf.log import bar_interval

        bar = tqdm(total=steps, desc="lr sweep", unit="step", leave=False, dynamic_ncols=True,
                   mininterval=bar_interval())
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    epoch, usable = 0, []  # usable: the finite losses of the steps the optimizer took
    try:
        if not cfg.clip_grad:
            for p in held:
                p.requires_grad_(False)
        while len(lrs) < steps and not stopped:
            batches = 0
            for x, y in loader.epoch(10_000 + epoch):  # its own shuffle: not the training run's epoch 0
                batches += 1
                i = len(lrs)
                if i >= steps:
                    break
                if batches > 1 and 2 * len(y) < loader.batch_size:
                    continue  # an epoch's small remainder batch: a point several times noisier than the rest
                lr = start * (end / start) ** (i / max(1, steps - 1))
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr
                xb, target = augment(x, y, g, None)
                with precision.autocast(device):
                    logits = model(xb)
                loss = loss_fn(logits.float(), target)
                if cfg.l2 > 0:  # as the trainer's step does (trainer.train_epoch)
                    loss = loss + cfg.l2 * l2_penalty(model)
                model.zero_grad(set_to_none=True)  # the held filters' too: no stale gradient in the clip norm
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                value = float(loss.detach())
                skipped = scaler.is_enabled() and scaler.get_scale() < scale  # inf/nan gradients: no step
                lrs.append(lr)
                losses.append(value if not skipped else math.nan)
                if bar is not None:
                    bar.update(1)
                if not math.isfinite(value):
                    stopped = f"stopped at lr {lr:.3g}: loss diverged"
                    break
                if skipped:
                    continue
                usable.append(value)
                sm = smooth(usable)[-1]
                best = min(best, sm)
                if bar is not None:
                    bar.set_postfix(lr=f"{lr:.2g}", loss=f"{sm:.3f}", refresh=False)
                if i > steps // 10 and sm > diverge * best:
                    stopped = f"stopped at lr {lr:.3g}: loss diverged"
                    break
            if not batches:
                raise UserError(f"lr finder: the training data gave no batch of {loader.batch_size}: "
                                "lower --batch-size or add training images")
            epoch += 1
    finally:
        if bar is not None:
            bar.close()
        model.load_state_dict(saved)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    lrs, losses = [lrs[i] for i in finite], [losses[i] for i in finite]
    if len(lrs) < MIN_STEPS:
        raise UserError(f"lr finder: fewer than {MIN_STEPS} usable steps (the loss diverged or was not finite "
                        f"from the start): {_ADVICE[entry]['few']}")
    sm = smooth(losses)
    suggestion, steepest, min_lr = suggest(lrs, sm)
    problem = descent_problem(lrs, sm, losses)
    at_end = not problem and not stopped and minimum_at_end(lrs, sm, start, end)
    if at_end:
        log.warn(f"lr finder: the smoothed loss was lowest at lr {min_lr:.2g}, in the last {100 * END_FRACTION:.0f}% "
                 f"of the sweep (which ends at {end:.2g}): {_ADVICE[entry]['end']}")
    return LRFind(lrs, losses, sm, None if problem else suggestion, steepest, min_lr, stopped=stopped,
                  no_descent=problem, at_end=at_end)


def _head_only_note(model, cfg, entry: str) -> str:
    """What a sweep with the backbone frozen measures, and what ``train --lr auto`` does with it:
    the head's lr of the head-only phase, which the run then trains with throughout (the backbone
    at backbone_lr_scale of it once unfrozen)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    freeze = cfg.freeze_epochs or 0
    phase = f" as in the first {freeze:g} epoch(s) of training (--freeze-epochs {freeze:g})" if freeze else ""
    scale = getattr(model, "backbone_lr_scale", 1.0)
    backbone = "the backbone at the same lr" if scale == 1 else f"the backbone at {scale:g}x it"
    if entry == "train":
        return (f"lr finder: sweeping the head only ({trained:,} of {total:,} parameters), with the backbone frozen"
                f"{phase}: its suggestion becomes the lr, the head's throughout and, once unfrozen, {backbone}")
    return (f"lr finder: the sweep trains the head only ({trained:,} of {total:,} parameters), with the backbone "
            f"frozen{phase}: its suggestion is the head's lr; 'train --lr auto' sweeps the same way and trains with it, "
            f"the head at that lr throughout and, once unfrozen, {backbone}")


def check_descent(res: LRFind, entry: str = "lr-find", plot_path: Path | None = None) -> None:
    """Raise NoDescentError if the sweep's curve never fell (after the caller has plotted it)."""
    if res.no_descent:
        where = f" (plot: {plot_path})" if plot_path is not None else ""
        raise NoDescentError(f"lr finder: the loss curve has no descent to suggest an lr from: {res.no_descent}"
                             f"{where}; {_ADVICE[entry]['flat']}", res, res.no_descent)


def plot(res: LRFind, path: Path, title: str = "learning-rate finder") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(res.lrs, res.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(res.lrs, res.smoothed, color="C0", lw=2, label="smoothed loss")
    ax.axvline(res.min_lr, color="C3", ls=":", lw=1, label=f"minimum {res.min_lr:.2g}")
    if res.steepest is not None:
        ax.axvline(res.steepest, color="C2", ls="--", lw=1, label=f"steepest {res.steepest:.2g}")
    if res.no_descent or res.suggestion is None:
        title += "\nno suggestion: the loss has no clear descent"
    else:
        ax.axvline(res.suggestion, color="C1", lw=2, label=f"suggested {res.suggestion:.2g} (minimum / 10)")
    ax.set_xscale("log")
    # from the smoothed minimum to the start of the curve, at least 5% of the loss: a fall of a
    # few percent (what moves when Muon's filters are held still) is seen, a diverged tail is cut
    lo, hi = min(res.smoothed), max(res.smoothed[: max(1, len(res.smoothed) // 10)])
    pad = max(hi - lo, 0.05 * abs(lo), 1e-6)
    ax.set_ylim(lo - 0.3 * pad, hi + 0.6 * pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def default_steps(loader) -> int:
    """~2 epochs, at least DEFAULT_MIN_STEPS (small data is cycled through several times: fewer
    points over 8 decades leave the place of the minimum to noise) and at most DEFAULT_MAX_STEPS."""
    return int(max(DEFAULT_MIN_STEPS, min(DEFAULT_MAX_STEPS, 2 * len(loader))))


def lr_for_training(model, cfg, loader, augment, device, loss_fn, class_weights, multilabel: bool,
                    run_dir: Path | None, world: int = 1) -> float:
    """``train --lr auto``: sweep with the run's own set-up, save lr_find.png, return the suggestion.

    Raises NoDescentError (after writing the plot) when the curve never fell: the caller falls
    back to the recipe's lr."""
    if world > 1:
        raise UserError("--lr auto runs the lr finder in one process: run 'imgclf lr-find' first and pass --lr VALUE")
    fn = training_loss(cfg, loss_fn, class_weights, multilabel)
    frozen = getattr(model, "freeze_backbone", None)
    if callable(frozen) and (cfg.freeze_epochs or 0) > 0:
        model.freeze_backbone(True)  # the peak lr of the first (head-only) phase
    try:
        res = sweep(model, cfg, loader, augment, device, fn, steps=default_steps(loader), progress=cfg.progress,
                    entry="train")
    finally:
        if callable(frozen):
            model.freeze_backbone(False)
    png = run_dir / "lr_find.png" if run_dir is not None else None
    if run_dir is not None:
        plot(res, png, title=f"lr finder: {cfg.model}")
        import json

        (run_dir / "lr_find.json").write_text(json.dumps(res.as_dict(), indent=2))
    check_descent(res, "train", png)
    log.info(f"lr finder: suggested lr {res.suggestion:.3g} (minimum of the smoothed loss at {res.min_lr:.3g} / 10"
             + (f"; steepest descent at {res.steepest:.3g}" if res.steepest else "") + ")"
             + (f"; plot {png}" if png is not None else ""))
    return float(f"{res.suggestion:.3g}")
