"""A pretrained backbone with a new, configurable classification head, and backbone freezing.

The classic transfer recipe (ResNet50 + Dense(512)-Dropout-Dense(256)-Dropout-softmax) is
``HeadedNet(backbone, num_classes, hidden=(512, 256), dropout=0.25)``. While the backbone is
frozen its parameters do not require gradients (backward stops at the head: several times
cheaper per step) and its BatchNorm layers stay in eval mode, so their running statistics are
not overwritten by a few batches of new data. The optimizer keeps the backbone's parameters in
their own group from the start (``keep_frozen``), so unfreezing never rebuilds the optimizer
and a resumed run continues exactly.
"""

from __future__ import annotations

import re

from torch import nn

from imgclf.engine.callbacks import Callback
from imgclf.errors import UserError


def parse_hidden(spec) -> list[int]:
    """'512,256' / '512 256' / [512, 256] / '' / 'linear' -> [512, 256] / [].

    Every size must be a positive integer: a zero-width layer trains a constant prediction and a
    negative one crashes in torch, and an empty part ('512,,256') is a typo, not a separator.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in ("", "none", "linear"):
            return []
        parts = [p.strip() for p in re.split(r"\s*,\s*|\s+", text)]
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        parts = [spec]
    sizes = []
    for p in parts:
        try:  # 512, '512' and 512.0 pass; True, 1.5, '' and 'abc' do not
            f = float("nan") if isinstance(p, bool) else float(p)
            n = int(f) if f.is_integer() else None
        except (TypeError, ValueError):
            n = None
        if n is None or n <= 0:
            what = "an empty size" if isinstance(p, str) and not p else repr(p)
            raise UserError(f"head sizes must be positive integers, e.g. 512,256 ('' or 'linear': one linear layer), "
                            f"not {what}")
        sizes.append(n)
    return sizes


_STEM = re.compile(r"(^|\.)(stem|conv_stem|act1|bn1|norm0)(\.|$)")


def _is_stem(name: str) -> bool:
    """Whether a feature level's module (timm's feature_info) is a part of the stem."""
    return bool(_STEM.search(name))


class HeadedNet(nn.Module):
    """``backbone`` (pooled features, e.g. a timm model with num_classes=0) followed by an MLP head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, hidden=(), dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        width = num_features
        for h in parse_hidden(hidden):  # model_args' head reaches here unchecked by the config
            layers += [nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.head = nn.Sequential(*layers)
        self.backbone_frozen = False
        self.bn_frozen = False  # the backbone's BatchNorm layers keep their running statistics (freeze_bn)
        self.backbone_lr_scale = 1.0
        self._stage_frozen: list[nn.Module] = []  # the modules of the always-frozen first stages

    def forward(self, x):
        return self.head(self.backbone(x))

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        for m in self._stage_frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        if self._stage_frozen:  # a ViT's position embedding and class token belong to its input end
            for p in self.backbone.parameters(recurse=False):
                p.requires_grad_(False)
        self.train(self.training)

    def freeze_stages(self, n: int) -> None:
        """Keep the stem and the first ``n`` stages of the backbone frozen for the whole run.

        Stages are timm's feature levels (``feature_info``: ResNet's layer1..4, EfficientNet's
        block groups, a ViT's blocks), counted from the input. Early stages hold generic edge and
        texture filters and run at the highest resolution, so freezing them makes a fine-tuning
        step much cheaper (backward stops at the first trainable stage; EfficientNet-Lite0 at
        96 px: ~1.8x the images/s with 3 of 5 frozen) at a small cost in accuracy.
        """
        n = int(n or 0)
        self.frozen_stages = n
        self._stage_frozen = []
        if n > 0:
            info = getattr(self.backbone, "feature_info", None)
            stages = [f["module"] for f in info] if isinstance(info, list) else []
            mods = dict(self.backbone.named_modules())
            first = mods.get(stages[0]) if stages else None
            bare = first is not None and not any(first.children()) and not any(True for _ in first.parameters())
            if stages and (bare or _is_stem(stages[0])):
                # many nets list the stem's end as level 0 (ResNet's 'act1', a bare activation,
                # RegNet's 'stem', MobileNetV3-Small's 'bn1'): it is no stage, and is frozen with
                # stage 1 anyway: --freeze-stages 1 is ResNet's layer1, RegNet's s1
                stages = stages[1:]
            if not stages:
                raise UserError(f"--freeze-stages: {type(self.backbone).__name__} does not list its stages")
            if n > len(stages):
                raise UserError(f"--freeze-stages {n}: this backbone has {len(stages)} stages "
                                f"({', '.join(stages)}); use --freeze-epochs to freeze all of it")
            last = self.frozen_up_to = stages[n - 1]
            # every module registered up to the end of the n-th stage: in timm's nets the
            # registration order is the forward order (stem, stage 1, stage 2, ...)
            names = [name for name, _ in self.backbone.named_modules()]
            end = max(i for i, name in enumerate(names) if name == last or name.startswith(last + "."))
            # modules holding weights or statistics themselves (BatchNormAct2d has an act child):
            # a plain container registered before its children ('blocks') spans later stages too
            self._stage_frozen = [m for m in (mods[name] for name in names[1:end + 1])
                                  if not any(m.children()) or any(True for _ in m.parameters(recurse=False))
                                  or any(True for _ in m.buffers(recurse=False))]
        self.freeze_backbone(self.backbone_frozen)

    def refresh_frozen_stages(self) -> None:
        """Re-resolve the frozen stages' modules after layers were swapped (SyncBatchNorm)."""
        self.freeze_stages(getattr(self, "frozen_stages", 0))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # frozen BN keeps its running statistics; no dropout/drop-path either
        elif self.bn_frozen and mode:  # --freeze-bn: normalised with the pretrained statistics, scale and
            for m in self.backbone.modules():  # shift still trained (Keras' BatchNormalization(training=False))
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for m in self._stage_frozen:
            m.eval()
        return self

    def param_groups(self) -> list[dict]:
        """Backbone and head in separate groups (discriminative lr); no decay on biases and norms."""
        groups = []
        # timm's own list of parameters that take no decay (a ViT's pos_embed, cls_token)
        named = getattr(self.backbone, "no_weight_decay", None)
        skip = {id(p) for n, p in self.backbone.named_parameters() if n in (set(named()) if callable(named) else ())}
        for name, module, scale in (("backbone", self.backbone, self.backbone_lr_scale), ("head", self.head, 1.0)):
            decay = [p for p in module.parameters() if p.ndim > 1 and id(p) not in skip]
            no_decay = [p for p in module.parameters() if p.ndim <= 1 or id(p) in skip]
            # keep_frozen: the frozen backbone stays in the optimizer, ready for unfreezing
            groups += [dict(params=ps, lr_scale=scale, name=f"{name}{suffix}", keep_frozen=True, **wd)
                       for ps, suffix, wd in ((decay, "", {}), (no_decay, "_no_decay", {"wd_scale": 0.0})) if ps]
        return groups

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class FreezeBackbone(Callback):
    """Backbone frozen for the first ``epochs`` epochs (a fraction of one too), trained (at its
    own lr scale) after.

    Stateless on purpose: whether the backbone is frozen follows from the step number alone,
    so a resumed run is in the same state as an uninterrupted one (``warned`` only keeps a
    warning from being given twice).
    """

    def __init__(self, epochs: float):
        self.epochs = epochs

    def _frozen(self, t) -> bool:
        return t.step < t.frozen_end

    def _apply(self, t) -> None:
        frozen = self._frozen(t)
        if frozen != t.model.backbone_frozen:
            t.model.freeze_backbone(frozen)
            if not frozen:
                from imgclf import log

                log.info(f"step {t.step} (epoch {t.step / t.steps_per_epoch:.2f}): backbone unfrozen "
                         f"({t.model.trainable_parameters() / 1e6:.2f}M trainable params, "
                         f"backbone lr x{t.model.backbone_lr_scale:g})")

    def on_train_start(self, t):
        t.frozen_end = round(self.epochs * t.steps_per_epoch)
        t.model.freeze_backbone(self._frozen(t))
        from imgclf.engine.callbacks import TimeBudget

        # a time limit without an --epochs cap plans the length later, always past this phase
        planned_later = any(isinstance(c, TimeBudget) and c.active and c.max_steps is None for c in t.callbacks)
        self.warned = not planned_later and t.frozen_end >= t.total_steps
        self._announce(t, planned_later)
        if self.warned:
            # head-only training is a fair request, but the log must not promise an unfreeze
            from imgclf import log

            log.warn(f"--freeze-epochs {self.epochs:g} covers the whole run of {t.total_steps / t.steps_per_epoch:g} "
                     "epoch(s): only the head trains and the backbone stays as loaded; lower --freeze-epochs to "
                     "fine-tune it too")

    def _announce(self, t, planned_later: bool) -> None:
        """The start-up line: the phase the run starts (or resumes) in, with its trainable count.
        Said here, where the step a resumed run goes on from is known, and only by training (the
        lr finder freezes the backbone for its sweep and says so itself)."""
        m = t.model
        if not callable(getattr(m, "trainable_parameters", None)) or not hasattr(m, "head"):
            return
        from imgclf import log

        total = sum(p.numel() for p in m.parameters())
        stages = getattr(getattr(t, "cfg", None), "freeze_stages", 0) or 0
        scale = "the same lr" if m.backbone_lr_scale == 1 else f"{m.backbone_lr_scale:g}x the lr"
        if t.step >= t.frozen_end:  # resumed past the unfreeze: the head-only phase is over
            since = (f"unfrozen since step {t.frozen_end} (--freeze-epochs {self.epochs:g}), resuming at step {t.step}"
                     if t.step else f"not frozen (--freeze-epochs {self.epochs:g} is under one step)")
            log.info(f"backbone {since}: training {m.trainable_parameters():,} of {total:,} parameters, the "
                     f"{'unfrozen stages' if stages else 'backbone'} at {scale}")
            return
        what = f"training {m.trainable_parameters():,} of {total:,} parameters (the head)"
        rest = f"then the {'unfrozen stages' if stages else 'backbone'} too, at {scale}"
        when = (f"for {self.epochs:g} epoch(s)" if t.step == 0 else
                f"until step {t.frozen_end} (--freeze-epochs {self.epochs:g}), resuming at step {t.step}")
        if self.warned:  # FreezeBackbone.on_train_start's warning says why no unfreeze is announced
            log.info(f"backbone frozen for the whole run: {what}")
        elif planned_later:
            log.info(f"backbone frozen {when}: {what}, {rest} if the time limit leaves room")
        else:
            log.info(f"backbone frozen {when}: {what}, {rest}")

    def on_epoch_start(self, t, epoch):
        self._apply(t)

    def on_step_end(self, t):
        if t.step % t.steps_per_epoch:  # a fractional epoch ends mid-epoch; whole ones at the next start
            self._apply(t)

    def on_train_end(self, t):
        if t.step <= t.frozen_end and t.step > 0 and not getattr(self, "warned", False):
            # a time limit (or early stopping) ended the run before the planned unfreeze
            from imgclf import log

            fix = "lower --freeze-epochs" + (" or raise --time-limit" if getattr(t.cfg, "time_limit", None) else "")
            log.warn(f"the run ended at step {t.step}, within the {t.frozen_end} head-only steps of --freeze-epochs "
                     f"{self.epochs:g}: the backbone was never trained ({fix})")
        t.model.freeze_backbone(False)


# -- glue used by api.train and `imgclf lr-find` ------------------------------------------------


def reused_head_dropout(arch: str, cfg, source) -> float | None:
    """The dropout of an earlier run's head that ``--weights RUN`` reuses as it was trained, where
    no --head-dropout (or another --head) says otherwise; None where the run's own option holds.
    The run's setup writes it into config.yaml, so a repeat from that file builds the same head
    (it used to record the default 0.2 beside a model trained with the run's 0.5)."""
    if not arch.startswith("timm:") or source is None:
        return None
    run_head, run_dropout = getattr(source, "head", None), getattr(source, "head_dropout", None)
    sizes = cfg.head if cfg.head is not None else run_head
    if run_head is None or run_dropout is None or list(sizes or []) != list(run_head) \
            or "head_dropout" in getattr(cfg, "model_fields_set", ()):
        return None
    return float(run_dropout)


def transfer_arch_args(arch: str, cfg, source) -> dict:
    """The model arguments a transfer run adds to model.json: head spec and what the weights need.

    Everything needed to rebuild the network is recorded; where the weights came from is not
    needed to load a run (model.json's ``weights_source`` only documents it). The caller lays
    the user's --model-args over these, so an argument the user set always wins.
    """
    if not arch.startswith("timm:"):
        if cfg.head is not None:
            raise UserError(f"--head replaces the classifier of a timm model; {arch} has its own (use --model timm:NAME)")
        # an earlier run's weights (fastnet width=1.5, ...): the network they were trained in
        return dict(source.arch_args) if source is not None else {}
    if source is None and cfg.head is None:
        return {}
    # no --head: an earlier run's weights bring their head's sizes (and its trained layers, setup_transfer)
    run_head = getattr(source, "head", None)
    sizes = cfg.head if cfg.head is not None else run_head
    reused = reused_head_dropout(arch, cfg, source)
    out = {"head": list(sizes or []), "head_dropout": cfg.head_dropout if reused is None else reused}
    if source is not None:
        out.update(source.arch_args)
        # keep the pretrained network as it was trained: ImageNet stems stay as they are, and
        # an imgclf run's weights bring their own small_stem (source.arch_args)
        out.setdefault("small_stem", False)
    return out


def check_weights_fit(arch: str, cfg, source, image_size: int = 0, classes: list[str] | None = None) -> None:
    """Raise now, before the data is decoded, the one-line UserError that loading ``--weights
    FILE`` into this run's model would raise after it (another architecture's tensors, other
    layer sizes): the model is built as the run builds it and every name and shape is checked;
    nothing is loaded or said. The image size and ``classes`` are the run's where known; without
    the size, tensors whose shape follows it (a plain CNN's flattened layer) are left to the load."""
    if source is None or not source.source.startswith("file:"):
        return
    import torch

    from imgclf.models.pretrained import _quiet, load_pretrained
    from imgclf.models.registry import arch_args_for_record, build_model

    size = int(image_size or getattr(cfg, "image_size", None) or source.input_size or 0)
    n = len(classes) if classes else len(source.classes or ()) or 10  # an output layer's rows are matched anyway

    def backbone(s: int) -> nn.Module:
        args = arch_args_for_record(arch, s, {**transfer_arch_args(arch, cfg, source), **(cfg.model_args or {})})
        model = build_model(arch, n, s, args)
        return model.backbone if isinstance(model, HeadedNet) else model

    # fork_rng: the run's own model, built next, draws the same random initial weights as without this check
    with _quiet(), torch.random.fork_rng(devices=[]):
        try:
            net = backbone(size or 64)
            ignore: set[str] = set()
            if not size:
                other = backbone(96).state_dict()
                ignore = {k for k, v in net.state_dict().items() if k not in other or other[k].shape != v.shape}
        except UserError:
            if size:  # the run's own size: the error its build will raise (bad --model-args, --head on an own net)
                raise
            return  # a guessed size: maybe not the run's
        except Exception:  # noqa: BLE001  a check only: never an error of its own
            return
        try:
            load_pretrained(net, arch, source, classes=classes, check_only=True, ignore=ignore)
        except UserError:
            raise
        except Exception:  # noqa: BLE001  anything else is the load's to raise, where it did before
            return


def setup_transfer(model: nn.Module, arch: str, cfg, source, *, classes: list[str] | None = None,
                   load_weights: bool = True) -> list[Callback]:
    """Load the pretrained weights, set the backbone's lr scale, and return the freezing callback.
    ``classes``: this run's class names, which an earlier run's output rows are matched to."""
    from imgclf import log
    from imgclf.models.pretrained import load_pretrained

    headed = isinstance(model, HeadedNet)
    if source is not None and load_weights:
        load_pretrained(model.backbone if headed else model, arch, source, head=model.head if headed else None,
                        classes=classes)
        log.info(f"weights from {source.source}")
    freeze = cfg.freeze_epochs or 0
    total = sum(p.numel() for p in model.parameters())
    if not headed:
        for flag, value in (("--freeze-epochs", freeze), ("--freeze-stages", cfg.freeze_stages)):
            if value and not arch.startswith("timm:"):  # --pretrained and --head are refused for these too
                raise UserError(f"{flag} works only with timm models (--model timm:NAME with --pretrained, "
                                f"--weights FILE or --head); {arch} has no separate backbone to freeze")
            if value:
                raise UserError(f"{flag} needs a timm backbone with a new head: add --pretrained, --weights FILE "
                                "or --head")
        if source is not None:  # fine-tuning a whole net from its weights: nothing is frozen
            log.info(f"training all {total:,} parameters (the whole network, from the loaded weights)")
        return []
    if cfg.freeze_stages:
        model.freeze_stages(cfg.freeze_stages)
        log.info(f"stem and first {cfg.freeze_stages} backbone stage(s) frozen for the whole run "
                 f"(up to '{model.frozen_up_to}'): {model.trainable_parameters():,} of "
                 f"{total:,} parameters train")
    model.backbone_lr_scale = float(cfg.backbone_lr_scale if cfg.backbone_lr_scale is not None else 1.0)
    model.bn_frozen = bool(cfg.freeze_bn)
    if model.bn_frozen:
        model.train(model.training)
    if freeze:
        # the start-up line (frozen for N epochs, or already past them on --resume) is the
        # callback's, at the start of training: only then is the step the run starts from known
        return [FreezeBackbone(freeze)]
    if not cfg.freeze_stages:  # nothing frozen: the count is still worth a line (the stages' one has it)
        scale = model.backbone_lr_scale
        log.info(f"training all {total:,} parameters: the head at the lr, the backbone at "
                 + ("the same lr" if scale == 1 else f"{scale:g}x it"))
    return []
