"""The training loop: one readable loop; everything optional is a callback.

Determinism and exact resume: the shuffle order, augmentation draws and dropout masks of epoch
k depend only on (seed, k), and every epoch ends in an atomic checkpoint of the model, the
optimizer and every callback. Within a long epoch a checkpoint is also written every
``checkpoint_minutes``, holding the epoch's position and its random generators' states as well.
A run killed at any point and resumed ends where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from imgclf.config import TrainConfig
from imgclf.data.augment import BatchAugment, Normalize
from imgclf.data.loader import BatchLoader
from imgclf.engine import callbacks as cb
from imgclf.engine.optim import build_optimizer, l2_penalty, native_bf16
from imgclf.engine.schedule import lr_factor
from imgclf.errors import UserError


@dataclass
class Precision:
    dtype: torch.dtype | None  # None: full fp32

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "fp32":
        return Precision(None)
    if name == "bf16":
        return Precision(torch.bfloat16)
    if name == "fp16":
        return Precision(torch.float16)
    if device.type == "cuda":
        return Precision(torch.bfloat16 if native_bf16(device) else torch.float16)
    # on a CPU without native bf16 instructions autocast is emulated and slower than fp32
    return Precision(torch.bfloat16 if device.type == "cpu" and native_bf16(device) else None)


def use_compile(setting: str) -> bool:
    """Whether the trainer wraps the model in torch.compile. ``auto`` never does: measured on an
    H100 (torch 2.11, bf16 autocast, channels_last), a compiled training step was no faster in
    steady state and each new input shape cost a compile of 15-45 s. FastNet at batch 1024:
    9.2 ms eager vs 9.9 ms compiled; ResNet-18 at 32 px 10.5 vs 11.6; EfficientNet-Lite0 at 224 px
    24.2 vs 28.6; ResNet-50 at 224 px 34.8 vs 32.5, the one gain (7%), which repays its 41-s first
    compile only after ~10 minutes. A 10-epoch CIFAR-10 run took 18 s eager and 111 s compiled
    (the early-crop and evaluation shapes each recompile), and under --time-limit those stalls
    left the schedule unannealed (76.9% where the eager run reached 92.2%). ``on`` compiles anyway."""
    return setting == "on"


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path, tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # else a power cut can leave the renamed file empty
        os.replace(tmp, path)


def _disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, as an OSError, or as the text of an error that wraps it (safetensors'
    SafetensorError, torch's file writer), or as the error another was raised in handling of:
    torch.save into a file that fills up raises the OSError, then, closing its zip writer,
    RuntimeError('unexpected pos ...'), which named no disk and came out as a traceback."""
    import errno

    if not isinstance(e, Exception):  # Ctrl-C while writing stays Ctrl-C
        return False
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # a cycle of __context__ links is possible
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        msg = str(e)
        if "No space left on device" in msg or "Disk quota exceeded" in msg:
            return True
        # 'raise ... from None' says the earlier error is not the cause: not followed then
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


@contextlib.contextmanager
def _writing(path: Path, tmp: Path):
    """Write ``tmp`` then rename it to ``path``: on any failure the temp file goes, and a full disk
    is one line, not a traceback (the previous file, renamed into place whole, is untouched)."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _disk_full(e):
            # 'last.pt keeps the last good epoch' only where there is one: the first save has none
            kept = "; last.pt keeps the last good epoch" if (path.parent / "last.pt").exists() else ""
            raise UserError(f"no space left on device writing {path}: free some space{kept}") from None
        raise


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float, weight=None,
                       reduce=None, world: int = 1) -> torch.Tensor:
    """Cross-entropy with label smoothing; ``target`` holds class indices or (mixup/cutmix) class
    probabilities. With class weights, each image's smoothed loss is scaled by its own class's
    weight (a mixed image: its classes' weights in the mixture's shares) and the batch is
    normalised by the sum of those weights.

    Written out because PyTorch's ``weight=`` does otherwise in two places: with
    ``label_smoothing`` it weights the smoothing term by every class's weight, so a rare class
    of weight 8.5 took most of the smoothing mass of every image (4 classes, 200/100/30/10
    images, smoothing 0.2: the largest class's recall fell to 0, against 0.5 without smoothing);
    with probability targets it does not normalise, so weights of 3 everywhere tripled the
    gradient (an lr change) under mixup but not without it.

    Distributed (``reduce`` sums over the ``world`` ranks), the normaliser is the weight sum of
    the global batch, not of this rank's share: each rank's shard holds other classes, so its own
    sum would weight its images differently from a 1-process run. Times ``world``, because DDP
    averages the ranks' gradients."""
    if weight is None:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    logp = F.log_softmax(logits, 1)
    if target.ndim == 1:
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        w = weight[target]
    else:
        nll = -(target * logp).sum(1)
        w = target @ weight
    if smoothing:
        nll = (1 - smoothing) * nll - smoothing * logp.mean(1)
    total = w.sum().detach()
    if reduce is not None and world > 1:
        total = reduce(total) / world
    return (nll * w).sum() / total.clamp_min(1e-12)


def training_loss(cfg, loss_fn, class_weights, multilabel: bool, reduce=None, world: int = 1):
    """The loss a run trains with (the Trainer's, and the lr finder's sweep of it): ``loss_fn``
    from losses.imbalance_setup when the config asks for one, else cross-entropy with the run's
    label smoothing and class weights (BCE on multi-label data). ``reduce``/``world``: a
    distributed run's sum over ranks (soft_cross_entropy's class-weight normaliser)."""
    if loss_fn is not None:
        return loss_fn
    if multilabel:
        def bce(logits, target):
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return bce
    smoothing = cfg.label_smoothing or 0.0

    def ce(logits, target):
        return soft_cross_entropy(logits, target, smoothing, class_weights, reduce, world)
    return ce


class Trainer:
    """Fits ``model`` with the resolved ``cfg``. ``run_dir`` None: nothing is written."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train: BatchLoader,
        val: BatchLoader | None,
        augment: BatchAugment,
        normalize: Normalize,
        device: torch.device,
        *,
        run_dir: Path | None = None,
        callbacks: list[cb.Callback] | None = None,
        multilabel: bool = False,
        class_weights: torch.Tensor | None = None,
        loss_fn=None,
        flip_mode: str = "random",
        is_main: bool = True,
        ddp_model: nn.Module | None = None,
        reduce=None,
    ):
        self.model, self.cfg, self.train_loader, self.val_loader = model, cfg, train, val
        self.augment, self.normalize, self.device = augment, normalize, device
        self.run_dir, self.multilabel, self.is_main = run_dir, multilabel, is_main
        self.flip_mode = flip_mode
        self.class_weights = class_weights
        self.precision = resolve_precision(cfg.precision, device)
        self.forward_model = ddp_model or model
        self.reduce = reduce  # sums a tensor across ranks (distributed), identity otherwise
        self.reduce_world = getattr(train, "world", 1)
        # which images the run trains and validates on (sources.membership), kept in checkpoints
        # so --resume can say when the data changed underneath it; what it found: resumed_data
        self.data_id: dict | None = None
        self.resumed_data: dict | None = None
        if use_compile(cfg.compile):
            t0 = time.perf_counter()
            self.forward_model = torch.compile(self.forward_model)
            self.compile_seconds = time.perf_counter() - t0
        self.loss_fn = training_loss(cfg, loss_fn, class_weights, multilabel, reduce, self.reduce_world)
        self.optimizer = build_optimizer(model, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.dtype == torch.float16)
        self.steps_per_epoch = len(train)
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.warmup_steps = round((cfg.warmup_epochs or 0) * self.steps_per_epoch)
        # early crops (cfg.early_crop): steps before crop_end train on crops. The boundary is a
        # fraction of the plan and moves with it until the run passes it; then it stays put.
        self.crop_frac = float(cfg.early_crop_fraction or 0.0) if cfg.early_crop else 0.0
        self.crop_end = round(self.crop_frac * self.total_steps)
        # steps before frozen_end train a new head on a frozen backbone (set by models.head's
        # FreezeBackbone); TimeBudget times them apart, as it does early crops
        self.frozen_end = 0
        self.step, self.epoch, self.lr_scale = 0, 0, 1.0
        # (step, schedule progress) where the last re-plan past the warm-up left the schedule
        # (set_total_steps); None: the progress is the plain fraction of the plan
        self.lr_anchor: tuple[int, float] | None = None
        # where a checkpoint written within an epoch left it (_save_within_epoch); None at epoch ends
        self.in_epoch: dict | None = None
        self.history: list[dict] = []
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stop: str | None = None
        # one object or a list; objects that do not subclass Callback have their own hooks called only
        self.callbacks = cb.as_callbacks(callbacks)
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if cfg.ema:
            self.ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_with_warmup(cfg.ema),
                                                           use_buffers=True)
        self._add_standard_callbacks()

    # -- set-up ---------------------------------------------------------------------------------
    def _add_standard_callbacks(self):
        c = self.cfg
        std: list[cb.Callback] = []
        if c.lookahead:
            std.append(cb.Lookahead())
        if c.schedule == "plateau":
            std.append(cb.ReduceOnPlateau(c.monitor, c.plateau_patience, c.plateau_factor, min_lr=c.plateau_min_lr,
                                          cooldown=c.plateau_cooldown, min_delta=c.plateau_min_delta))
        if c.early_stopping > 0 and self.val_loader is not None:
            std.append(cb.EarlyStopping(c.monitor, c.early_stopping, c.min_delta))
        if self.run_dir is not None and self.is_main:
            std.append(cb.CSVLogger(self.run_dir / "metrics.csv"))
            if c.tensorboard:
                std.append(cb.TensorBoard(self.run_dir / "tensorboard"))
        first = [c for c in self.callbacks if getattr(c, "runs_first", False)]
        self.callbacks = first + std + [c for c in self.callbacks if c not in first]

    def _progress(self, step: int) -> float | None:
        """The schedule's progress (0 to 1 after the warm-up) at ``step`` when a re-plan set an
        anchor: from the anchor's progress on, spread over the steps left to the plan's end."""
        if self.lr_anchor is None or step < self.lr_anchor[0]:
            return None
        s0, t0 = self.lr_anchor
        return min(1.0, t0 + (1.0 - t0) * (step - s0) / max(1, self.total_steps - s0))

    def _set_lr(self):
        c = self.cfg
        f = lr_factor(
            c.schedule, self.step, self.total_steps, warmup=self.warmup_steps, progress=self._progress(self.step),
            start=c.lr_start_factor if c.lr_start_factor is not None else 0.0,
            end=c.lr_end_factor if c.lr_end_factor is not None else 0.0,
            steps_per_epoch=self.steps_per_epoch, step_epochs=c.step_epochs, gamma=c.gamma,
        ) * self.lr_scale
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f

    def set_total_steps(self, n: int) -> None:
        """Change the planned run length (--time-limit): the warm-up keeps its fraction, the decay
        after it goes on from where it is to the new end (lr_anchor), and cfg.epochs follows so
        config.yaml and the progress display agree. (A repeat from config.yaml runs the final
        length on a plain schedule: the same length, not the same lr curve.)"""
        n = max(self.step, int(n), 1)
        if self.step > self.warmup_steps and n != self.total_steps:
            # Past the warm-up, a re-plan keeps the schedule where it is and spreads the rest over
            # the new length. Stretched instead, a longer plan sent an annealing lr back up (a
            # busy machine's plans of 11.5, 46.9, 17.9 epochs: the lr fell, rose, fell again).
            t = self._progress(self.step)
            if t is None:
                t = min(1.0, (self.step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            self.lr_anchor = (self.step, t)
        frac = self.warmup_steps / max(1, self.total_steps)
        self.total_steps = n
        self.warmup_steps = round(frac * n)
        if self.step < self.crop_end:  # still cropping: the phase keeps its fraction of the plan
            self.crop_end = min(n, max(self.step, round(self.crop_frac * n)))
        if self.crop_frac:  # config.yaml records the phase as run, so the run repeats from it exactly
            if self.crop_end:
                self.cfg.early_crop_fraction = min(0.9999, round(self.crop_end / n, 6))
            else:
                self.cfg.early_crop = 0
        self.cfg.epochs = round(n / self.steps_per_epoch, 4)
        if self.cfg.warmup_epochs is not None:
            self.cfg.warmup_epochs = round(self.warmup_steps / self.steps_per_epoch, 4)

    def crop_size(self) -> int:
        """Side of the next step's training crops; 0 for full images."""
        return (self.cfg.early_crop or 0) if self.step < self.crop_end else 0

    @property
    def settling(self) -> bool:
        """The steps so far all fell in the lr warm-up or on early crops: a validation score now
        says little about the run's end (the full CIFAR-10 run scored 0.60, 0.64, 0.59, 0.48,
        0.64, 0.69 at its first six epochs, all on crops, then rose to 0.90), so plateau and
        early stopping do not count it."""
        return self.step <= max(self.warmup_steps, self.crop_end)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[-1]["lr"]

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        for c in self.callbacks:
            c.on_train_start(self)
        # the run length may be re-planned while it runs (--time-limit): read it afresh each epoch
        while self.epoch < math.ceil(self.total_steps / self.steps_per_epoch) and self.step < self.total_steps \
                and not self.stop:
            epoch = self.epoch
            for c in self.callbacks:
                c.on_epoch_start(self, epoch)
            hook = getattr(self.model, "on_epoch_start", None)
            if callable(hook):
                hook(epoch)
            t0 = time.perf_counter()
            before = self.in_epoch["seconds"] if self.in_epoch and self.in_epoch["epoch"] == epoch else 0.0
            row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            # before validation, callbacks and the checkpoint: last.pt keeps the last good epoch and
            # no model is written from nan weights (the epoch's loss is on the host already)
            self._check_finite(row["train_loss"], epoch)
            row["seconds"] = time.perf_counter() - t0 + before
            last = self.step >= self.total_steps
            if self.val_loader is not None and ((epoch + 1) % self.cfg.eval_every == 0 or last):
                row.update(self.validate())
            self.epoch = epoch + 1
            self.history.append(row)
            for c in self.callbacks:
                c.on_epoch_end(self, row)
            self._track_best(row)
            if self.run_dir is not None and self.is_main:
                self.save_checkpoint(self.run_dir / "last.pt")
            if self.cfg.progress and self.is_main:
                self._print_row(row)
        for c in self.callbacks:
            c.on_train_end(self)
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        return self.history

    def train_epoch(self, epoch: int) -> dict:
        model, opt, dev = self.forward_model, self.optimizer, self.device
        model.train()
        # Augmentation draws and dropout masks depend only on (seed, epoch): exact resume.
        # Each rank of a distributed run draws its own (rank 0's are those of a 1-process run).
        rank = getattr(self.train_loader, "rank", 0)
        g = torch.Generator(device=dev).manual_seed(self.cfg.seed * 1_000_003 + epoch + 7_777_777 * rank)
        torch.manual_seed(self.cfg.seed * 7_919 + epoch + 7_777_777 * rank)
        parity = epoch % 2 if self.flip_mode == "alternate" else None
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev)
        seen, start, before = 0, 0, 0.0
        part, self.in_epoch = self.in_epoch, None
        if part is not None and part["epoch"] == epoch:  # resumed within this epoch: go on from there
            mine = part["ranks"][rank]  # this rank's own running figures and generators
            start, before, seen = part["batch"], part["seconds"], mine["seen"]
            loss_sum.fill_(mine["loss_sum"])
            correct.fill_(mine["correct"])
            # generator states are CPU byte tensors, whatever the device (load_checkpoint maps to it)
            g.set_state(mine["generator"].cpu())
            torch.set_rng_state(mine["rng"].cpu())
            if dev.type == "cuda" and mine.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(mine["cuda_rng"].cpu(), dev)
        every = self.cfg.checkpoint_minutes * 60 if self.cfg.checkpoint_minutes > 0 and self.run_dir is not None else 0
        bar = self._bar(epoch, start)
        t0 = time.perf_counter() - before
        saved = shown_at = time.perf_counter()

        def save(batches: int) -> None:
            self._save_within_epoch(
                {"epoch": epoch, "batch": batches, "seconds": time.perf_counter() - t0, "device": dev.type},
                {"seen": seen, "loss_sum": loss_sum.item(), "correct": correct.item(), "generator": g.get_state(),
                 "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None})

        done = start
        # Ctrl-C stops the run after the step in progress, saved (a second Ctrl-C: at once)
        with ctrl_c_between_steps(self.run_dir is not None and self.is_main and not self._distributed()) as asked:
            for i, (x, y) in enumerate(self.train_loader.epoch(epoch, start), start):
                if self.step >= self.total_steps:
                    break
                self._set_lr()
                xb, target = self.augment(x, y, g, parity, self.train_loader.last_indices, crop=self.crop_size())
                with self.precision.autocast(dev):
                    logits = model(xb)
                loss = self.loss_fn(logits.float(), target)
                if self.cfg.l2 > 0:
                    loss = loss + self.cfg.l2 * l2_penalty(self.model)
                opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.cfg.clip_grad:
                    self.scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
                self.scaler.step(opt)
                self.scaler.update()
                self.step += 1
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                for c in self.callbacks:
                    c.on_step_end(self)
                n = x.shape[0]
                seen += n
                with torch.no_grad():
                    loss_sum += loss.detach() * n
                    if not self.multilabel:
                        hard = target if target.ndim == 1 else target.argmax(1)
                        correct += (logits.argmax(1) == hard).sum()
                    else:
                        correct += ((logits > 0) == (target > 0.5)).float().mean(1).sum()
                if bar is not None and (i % 10 == 0 or i == self.steps_per_epoch - 1
                                        or time.perf_counter() - shown_at >= 1.0):
                    # the only host syncs in the step, for the display: every 10 steps, or after a
                    # second (slow steps, e.g. a CPU fine-tune at 1-3 s each, left the figures 10 steps
                    # behind the bar's count); a sync a second costs a GPU nothing measurable
                    shown_at = time.perf_counter()
                    el = shown_at - t0
                    shown = loss_sum.item() / seen
                    if self.reduce_world == 1 and not math.isfinite(shown):
                        bar.close()  # stop at once; distributed, the ranks stop together at the epoch's end
                        self._check_finite(shown, epoch)
                    bar.set_postfix(loss=f"{shown:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{seen / max(el, 1e-9):.0f}", lr=f"{self.lr:.3g}", refresh=False)
                if bar is not None:
                    bar.update(1)
                done = i + 1
                if asked.is_set():
                    break
                if every and done < self.steps_per_epoch and self.step < self.total_steps \
                        and self._checkpoint_due(saved, every):
                    save(done)
                    saved = time.perf_counter()
        if asked.is_set():  # Ctrl-C: the step it came in is saved, and the run stops
            if bar is not None:
                bar.close()
            save(done)
            raise KeyboardInterrupt
        if bar is not None:
            bar.close()
        stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=dev)])
        if self.reduce is not None:
            stats = self.reduce(stats)
        loss_sum, correct, seen_t = stats.tolist()
        seen_t = max(seen_t, 1)
        return {"train_loss": loss_sum / seen_t, "train_acc": correct / seen_t, "lr": self.lr,
                "images_per_s": seen_t / max(time.perf_counter() - t0, 1e-9)}  # all ranks together

    def _check_finite(self, loss: float, epoch: int) -> None:
        if math.isfinite(loss):
            return
        c = self.cfg
        hint = f"lower --lr (it is {c.lr:g})" if isinstance(c.lr, float) else "set a lower --lr"
        if c.optimizer == "muon" and c.muon_lr:
            hint += f" or --muon-lr (it is {c.muon_lr:g})"
        if self.precision.dtype is not None:  # bf16/fp16 overflow where fp32 would not
            hint += f", or use --precision fp32 (this run is {str(self.precision.dtype).removeprefix('torch.')})"
        saved = "; last.pt keeps the last good epoch" if self.epoch and self.run_dir is not None else ""
        raise UserError(f"training diverged in epoch {epoch + 1} (by step {self.step}): the training loss is {loss} "
                        f"(not a finite number); {hint}{saved}")

    def _bar(self, epoch: int, start: int = 0):
        if not (self.cfg.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        n_ep = math.ceil(self.cfg.epochs)
        steps = min(self.steps_per_epoch, start + self.total_steps - self.step)
        from imgclf.log import bar_interval

        return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{n_ep}", unit="step", leave=False,
                    dynamic_ncols=True, mininterval=bar_interval())

    def _print_row(self, row: dict) -> None:
        parts = [f"epoch {row['epoch']:>3}", f"loss {row['train_loss']:.4f}", f"acc {row['train_acc']:.4f}"]
        if "val_loss" in row:
            parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_acc']:.4f}"]
        if "val_map" in row:
            parts.append(f"val_mAP {row['val_map']:.4f}")
        parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.0f} img/s", f"{row['seconds']:.1f}s"]
        from tqdm.auto import tqdm

        tqdm.write("  ".join(parts))

    @torch.no_grad()
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def validate(self) -> dict:
        from imgclf.evaluate.inference import logits_for_loader

        model = self.eval_model()
        if self._distributed():
            # every rank scores its shard with rank 0's model: each rank's BatchNorm running
            # statistics (and its EMA copy's) follow its own shards, and rank 0's are the ones saved
            from imgclf.engine.distributed import broadcast_buffers

            broadcast_buffers(self.model)
            if self.ema is not None:
                broadcast_buffers(self.ema)
        logits, labels = logits_for_loader(model, self.val_loader, self.normalize, self.precision, self.device)
        if self.multilabel:
            # summed over labels, averaged over images: the scale of the training loss
            # (losses.MultiLabelLoss), so train_loss and val_loss can be read side by side
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(1).mean()
            acc = ((logits > 0) == (labels > 0.5)).float().mean()
        else:
            loss = F.cross_entropy(logits, labels)
            hit = logits.argmax(1) == labels
            acc = hit.float().mean()
        stats = torch.stack([loss * len(labels), acc * len(labels), torch.tensor(float(len(labels)))])
        if not self.multilabel:
            # images and correct ones per class, summed over ranks with the rest: balanced accuracy
            # (the mean recall over the classes in the val split), the figure that moves on
            # imbalanced data where val_acc rewards predicting the big class (--monitor val_bal_acc)
            n_cls = logits.shape[1]
            per = torch.stack([torch.bincount(labels, minlength=n_cls).float(),
                               torch.bincount(labels[hit], minlength=n_cls).float()]).flatten()
            stats = torch.cat([stats, per])
        if self.reduce is not None:
            stats = self.reduce(stats.to(self.device)).cpu()
        s = stats.tolist()
        out = {"val_loss": s[0] / max(s[2], 1), "val_acc": s[1] / max(s[2], 1)}
        if not self.multilabel:
            seen, right = stats[3:3 + n_cls], stats[3 + n_cls:]
            present = seen > 0
            out["val_bal_acc"] = float((right[present] / seen[present]).mean()) if present.any() else 0.0
        if self.multilabel:
            from imgclf.evaluate.multilabel_metrics import mean_average_precision

            # label accuracy is ~1 for any model on sparse labels; mAP is the figure that moves.
            # mAP is no sum over images: distributed, every rank gathers all shards' scores and
            # computes it over the whole val split, so early stopping, plateau and best-checkpoint
            # decisions (it is the multi-label monitor) are the same on every rank
            scores, truth = torch.sigmoid(logits), labels
            if self._distributed():
                from imgclf.engine.distributed import gather_rows

                scores, truth = gather_rows(scores, self.device), gather_rows(truth, self.device)
            out["val_map"] = mean_average_precision(scores.numpy(), truth.numpy())
        return out

    def _distributed(self) -> bool:
        return self.reduce is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _track_best(self, row: dict) -> None:
        m = self.cfg.monitor
        # EarlyStopping's rule (cb.improves), so the epoch kept is one it counted as an improvement
        best_row = next((r for r in self.history if r.get("epoch") == self.best_epoch), {})
        best = None if self.best is None else {"val_loss": best_row.get("val_loss"), m: self.best}
        if m not in row or not cb.improves(m, row, best, self.cfg.min_delta):
            return
        self.best, self.best_epoch = row[m], row["epoch"]
        if self.run_dir is not None and self.is_main:
            from imgclf.runs import save_weights

            save_weights(self.eval_model(), self.run_dir / "best.safetensors")

    def _ties_with_lower_loss(self, m: str, row: dict) -> bool:
        """An epoch that equals the best accuracy (or mAP) and has a lower val loss: on a small
        val split accuracy moves in steps of 1/n and ties are common, and the later epoch, trained
        longer at a lower lr, is the better model by the finer measure."""
        if m.endswith("loss") or self.best is None or row[m] != self.best or "val_loss" not in row:
            return False
        best_row = next((r for r in self.history if r.get("epoch") == self.best_epoch), None)
        loss = best_row.get("val_loss") if best_row else None
        return loss is not None and row["val_loss"] < loss

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "callbacks": [c.state_dict() for c in self.callbacks],
            "step": self.step,
            "epoch": self.epoch,
            "lr_scale": self.lr_scale,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "stop": self.stop,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "lr_anchor": self.lr_anchor,
            "crop_end": self.crop_end,
            "data": self.data_id,
        }

    def save_checkpoint(self, path: Path) -> None:
        atomic_save(self.state_dict(), path)

    # distributed, the ranks ask whether a checkpoint is due every this many steps, all at the same
    # ones (each asking costs an all-reduce and a host sync)
    CHECKPOINT_ASK_STEPS = 16

    def _checkpoint_due(self, since: float, every: float) -> bool:
        """Whether the step just taken ends in a checkpoint: ``every`` seconds have passed
        ``since`` the last (on any rank: all ranks take part in it)."""
        due = time.perf_counter() - since >= every
        if not self._distributed():
            return due
        if self.step % self.CHECKPOINT_ASK_STEPS:
            return False
        return self.reduce(torch.tensor([float(due)], device=self.device)).item() > 0

    def _save_within_epoch(self, where: dict, mine: dict) -> None:
        """last.pt in the middle of an epoch: the state as at an epoch's end, plus the epoch's
        position (``where``: batches done, seconds, device) and each rank's running loss and
        accuracy and the states of its augmentation and dropout generators (``mine`` on this
        rank), so --resume goes on from the next batch exactly. Every rank must call it."""
        t0 = time.perf_counter()
        ranks = [mine]
        if self._distributed():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        # a diverged step (non-finite running loss on any rank) is not saved: last.pt keeps the
        # last good state, as at epoch ends (_check_finite)
        if self.is_main and all(math.isfinite(r["loss_sum"]) for r in ranks):
            part = {**where, "world": len(ranks), "ranks": ranks}
            atomic_save({**self.state_dict(), "in_epoch": part}, self.run_dir / "last.pt")
        for c in self.callbacks:
            hook = getattr(c, "on_checkpoint", None)  # a callback written before the hook existed has none
            if hook is not None:
                hook(self, time.perf_counter() - t0)

    def load_checkpoint(self, path: Path) -> None:
        s = read_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s["ema"] is not None:
            self.ema.load_state_dict(s["ema"])
        for c, st in zip(self.callbacks, s["callbacks"]):
            c.load_state_dict(st)
        self.step, self.epoch, self.lr_scale = s["step"], s["epoch"], s["lr_scale"]
        self.best, self.best_epoch, self.history, self.stop = s["best"], s["best_epoch"], s["history"], s["stop"]
        self.resumed_data = s.get("data")
        self.in_epoch = part = s.get("in_epoch")
        if part is not None and (part["world"] != self.reduce_world or part["device"] != self.device.type):
            refuse_within_epoch(path, part)
        # a planned length (--time-limit) is part of the run: resume ends where the plan said
        if "total_steps" in s:
            self.warmup_steps = s["warmup_steps"]
            self.set_total_steps(s["total_steps"])  # cfg.epochs follows the checkpoint's plan
            self.warmup_steps = s["warmup_steps"]
            anchor = s.get("lr_anchor")
            self.lr_anchor = (int(anchor[0]), float(anchor[1])) if anchor is not None else None
            self.crop_end = s.get("crop_end", self.crop_end)


def read_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """A run's last.pt (weights_only: a checkpoint is data, never code). One that cannot be read
    (cut short by a full disk or a copy, empty, another file under its name) is one line that
    says what the run has left to go on from, not torch's traceback."""
    try:
        s = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except OSError as e:  # permissions, a vanished mount: the file may be fine
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            raise UserError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
        # readable, so the file itself is bad: torch answers EINVAL for a zip cut short within its
        # first 64 KiB (a copy or a full disk), which said only 'cannot read (Invalid argument)'
        raise UserError(damaged_checkpoint(path, "an empty file" if not head else
                                           "not a torch checkpoint (not a zip archive)" if head != b"PK\x03\x04"
                                           else "cut short (an incomplete zip archive)")) from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError, pickle errors here
        with open(path, "rb") as f:
            head = f.read(4)
        why = ("an empty file" if not head
               else "not a torch checkpoint (not a zip archive)" if head != b"PK\x03\x04"
               else (str(e).split(". ")[0].splitlines() or [""])[0][:160] or type(e).__name__)
        raise UserError(damaged_checkpoint(path, why)) from None
    if not isinstance(s, dict) or not {"model", "optimizer", "step", "epoch"} <= s.keys():
        raise UserError(damaged_checkpoint(path, "it holds no training state"))
    return s


def damaged_checkpoint(path: Path, why: str) -> str:
    """The message for an unreadable last.pt: atomic_save never leaves a half-written one, so it
    was damaged afterwards, and there is no older checkpoint to fall back to."""
    from imgclf.config import _COMMAND_LINE

    run = path.parent
    again = (f"'imgclf train --resume {run}'" if _COMMAND_LINE.get() is not None
             else f"imgclf.train(resume={str(run)!r})")
    if (run / "model.json").is_file() and (run / "model.safetensors").is_file():
        what = ("the run's model (model.safetensors) is not affected: evaluate, predict and export use it; "
                "to train on, start a new run")
    else:
        what = f"delete {path}, and {again} trains the run again from its beginning"
        if (run / "best.safetensors").is_file():
            best = run / "best.safetensors"
            what = (f"{best} keeps the weights of its best epoch so far (a new run with the same --model can "
                    f"start from them: --weights {best}); or {what}")
    return f"{path} is damaged (truncated or not a checkpoint): {why}; {what}"


# SIGTERM, when it stopped the run (_on_sigterm): the CLI exits 143, not Ctrl-C's 130
STOPPED_BY: list[int] = []


def _on_sigterm(signum, frame):
    STOPPED_BY[:] = [signum]
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (kill, a batch scheduler's stop) stops a run as Ctrl-C does: the step in progress is
    saved (ctrl_c_between_steps), or a new run without a checkpoint removes its folder, as the
    README says and as a run with --devices N did already (spawn_train). With SIGTERM's default
    action the process ended at once and left a folder that only blocked the same command (and
    under a default name the next run went to NAME-2). Only where SIGTERM has that default, in
    the main thread: sweep workers, spawned and torchrun processes keep their own handling.
    kill -9 cannot be caught: such a folder starts over when the same command is given again."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    STOPPED_BY.clear()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def ctrl_c_between_steps(enabled: bool):
    """Yields an Event that a Ctrl-C sets instead of raising KeyboardInterrupt mid-step, so the
    loop can save the step just finished (a mid-epoch checkpoint) and stop there: --resume then
    loses nothing. A second Ctrl-C raises at once. Only where SIGINT has Python's own handler, in
    the main thread: a sweep, a distributed worker or a notebook kernel keeps its own. SIGTERM
    alike where sigterm_as_ctrl_c took it over (also when SIGINT is ignored: a nohup'd run)."""
    import signal
    import threading

    asked = threading.Event()
    ours = [sig for sig, h in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _on_sigterm))
            if signal.getsignal(sig) is h]
    if not enabled or threading.current_thread() is not threading.main_thread() or not ours:
        yield asked
        return

    def handler(signum, frame):
        if signum == signal.SIGTERM:
            STOPPED_BY[:] = [signum]
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    old = {sig: signal.signal(sig, handler) for sig in ours}
    try:
        yield asked
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def refuse_within_epoch(path: Path, part: dict):
    """A checkpoint written within an epoch (``part``) resumed in another number of processes or
    on another kind of device: its generators' states are one per process, of that device."""
    n, dev = part["world"], part["device"]
    raise UserError(f"--resume {path.parent}: it stopped within epoch {part['epoch'] + 1}, in {n} process"
                    f"{'' if n == 1 else 'es'} on {dev}, and only the same can continue it: resume with --devices {n} "
                    f"--device {dev} (once it has passed that epoch's end, any can)")


def _ema_with_warmup(decay: float):
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates so far
    (TensorFlow's ExponentialMovingAverage num_updates rule; timm's ModelEmaV3 warms up too).
    torch's get_ema_multi_avg_fn uses the full decay from the first step: at 0.999 a 600-step
    run ends with over half its average still the step-1 network, and that average is what
    is validated and saved. n is AveragedModel's own counter, so a resumed run continues it;
    the decay stays a tensor (no host sync per step on a GPU)."""

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = num_averaged.float()
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        for e, p in zip(ema_params, params):
            if e.is_floating_point():
                e.lerp_(p, (1 - d).to(e.dtype))
            else:  # BatchNorm's num_batches_tracked: lerp has no integer kernel; the count is copied
                e.copy_(p)

    return update


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
