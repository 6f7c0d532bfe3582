"""Hyperparameter studies: a search space in YAML, Optuna's samplers and pruners, one run folder
per trial, and any number of workers sharing one Optuna storage.

A study file::

    name: plaincnn-adam                  # studies/<name>/ holds study.db, study.yaml, trials/<n>/
    base: {data: photos/, model: plaincnn, optimizer: adam, epochs: 9}   # any train option
    space:
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      batch_size: {choices: [64, 128]}
      model_args.dropout: {low: 0.0, high: 0.5}
      schedule: cosine                   # a fixed value
    sampler: tpe                         # grid | random | tpe (or {type: tpe, n_startup_trials: 5})
    pruner: median                       # median | halving | none (or {type: halving, reduction_factor: 3})
    n_trials: 30                         # and/or timeout: 1200 (seconds); one is needed unless grid
    metric: val_acc                      # val_acc, val_loss, val_map, val_bal_acc, train_loss or train_acc;
                                         # direction follows the metric unless given

A range is a float or int range as its train option is (``mixup {low: 0, high: 1}`` draws
floats, ``batch_size {low: 32, high: 256, step: 32}`` ints); ``model_args.*`` ranges are floats
unless ``type: int`` is given, and an explicit ``type`` always wins. Trials keep the weights of
their best epoch by the study's metric (``monitor`` follows it when it is val_acc, val_loss,
val_map or val_bal_acc). A trial is one process: ``devices`` > 1 is refused, ``--workers`` runs trials side by side.

Budget: ``n_trials`` counts the finished (complete or pruned) trials of the study (every worker,
every restart), so a killed study started again runs only what is missing. Failed trials do not
count; 5 failures in a row end the study, and a grid point that failed is not tried again. A
sweep whose trials all failed, or that 5 failures in a row stopped, exits 1. Trials that were
running when their process died are failed by Optuna's heartbeat and queued again with the same
parameters, as is the trial stopped by Ctrl-C or SIGTERM (marked interrupted, not failed; its
folder removed; one line says the command that resumes the study). The worker processes of
``--workers N`` stop with the sweep that started them, however it ends (kill -9 included). A study
resumed with another metric or direction is refused (Optuna keeps the first direction), as is one
with another base or space (its trials must train alike to compare; where a trial runs, device or
workers, may change), and study.yaml keeps the study as it began. Each trial folder holds
``study.json`` naming its study, so a new study (a new storage, a deleted study.db) refuses to
overwrite an old study's trial folders, and 'imgclf report' or 'train --resume' on a trial that did
not finish points to the sweep. ``direction`` must suit the metric (down for a loss). The
optimizer-specific options (beta1, beta2, eps; momentum, nesterov; muon_*) are drawn only for
trials whose optimizer reads them; a grid point that differs from an earlier trial's only in such
an option is marked duplicate and not trained. A finished trial keeps its model files, curves and
metrics, not its last.pt (``keep_checkpoints: true`` keeps it, to train a trial further). ``imgclf.sweep(study, **flags)`` runs a study from Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import typing
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from imgclf import log
from imgclf.config import TrainConfig, format_validation_error, load_yaml, paths_beside, suggest_key
from imgclf.data.sources import check_spec
from imgclf.engine.callbacks import Callback
from imgclf.errors import UserError

# Options the sweep sets itself for every trial: a study may not choose them.
_SWEEP_OWNED = ("project", "name", "exist_ok")
# Trial defaults that differ from `imgclf train`: parallel workers would interleave progress bars,
# and TensorBoard is one more writer per trial that a study's report replaces.
_TRIAL_DEFAULTS = {"progress": False, "tensorboard": False}
_MAX_CONSECUTIVE_FAILURES = 5
# What a study may optimise: the metrics.csv columns a run writes per epoch (engine/trainer.py)
# that score a model (lr, images_per_s and seconds are columns too, but say nothing of one).
METRICS = ("val_acc", "val_loss", "val_map", "val_bal_acc", "train_loss", "train_acc")
# Of those, the ones a run can follow (TrainConfig.monitor): best weights, early stopping, plateau.
MONITORS = typing.get_args(TrainConfig.model_fields["monitor"].annotation)
# Study identity kept in the storage (Optuna user attrs) and beside each trial's run folder.
_ATTR_METRIC, _ATTR_DIRECTION, _ATTR_SETTINGS, _ATTR_ID = ("imgclf_metric", "imgclf_direction",
                                                            "imgclf_settings", "imgclf_study_id")
TRIAL_MARKER = "study.json"
# Keys a fixed value in the space may not hold: typos of a range (min/max) or range-only keys.
_RANGE_TYPOS = ("log", "step", "type", "min", "max", "lo", "hi")
# The data options, each checked as the loader would before any trial (data/sources.py check_spec).
_DATA_OPTIONS = ("data", "val_data", "test_data")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="study name (folder and storage key)")
    directory: str = Field("studies", description="folder holding the study folder")
    storage: str | None = Field(None, description="SQLAlchemy URL (default: sqlite file studies/<name>/study.db)")
    base: dict[str, Any] = Field(default_factory=dict, description="train options shared by every trial")
    space: dict[str, Any] = Field(default_factory=dict, description="option -> range, choices or fixed value")
    sampler: str | dict[str, Any] = "tpe"
    pruner: str | dict[str, Any] = "median"
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds; no trial starts after it")
    metric: str = "val_acc"
    direction: Literal["maximize", "minimize"] | None = None
    seed: int | None = Field(None, description="sampler seed (worker i uses seed + i)")
    heartbeat: int = Field(10, ge=1, description="seconds between a running trial's liveness beats")
    keep_checkpoints: bool = Field(False, description="keep each finished trial's last.pt (weights and optimizer "
                                   "state, to train it further); by default only its model files stay, as 100 "
                                   "trials of a large net would keep 100 checkpoints of 2-3x the model's size")
    # how to resume the study, as its caller started it ("imgclf sweep study.yaml"): said on Ctrl-C
    # and kept beside each trial (trial_advice)
    _again: str | None = PrivateAttr(None)

    @property
    def study_dir(self) -> Path:
        return Path(self.directory).expanduser() / self.name  # directory: ~/studies in the YAML file

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.study_dir / 'study.db').resolve()}"

    @property
    def resolved_direction(self) -> str:
        return self.direction or metric_direction(self.metric)


# ---------------------------------------------------------------------------------------------
# the search space


@dataclass
class Param:
    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    encoded: bool = False  # choices are JSON strings (lists/dicts), Optuna only stores scalars

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)

    def decode(self, value):
        return json.loads(value) if self.encoded else value

    def grid(self) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None:
            raise UserError(f"space '{self.name}': the grid sampler needs 'choices' or a 'step' for a range")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        vals = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in vals] if self.kind == "int" else [round(v, 12) for v in vals]


_SCALAR = (str, int, float, bool, type(None))


# What YAML 1.2 reads as a number and PyYAML (YAML 1.1) as a string: 1e-4, 5E3 (no dot)
_YAML11_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(v):
    """A choice written 1e-4 (a string to PyYAML) as the number it means; anything else as it is."""
    if isinstance(v, str) and _YAML11_NUMBER.fullmatch(v.strip()):
        return float(v)
    return v


def _range_shaped(v) -> bool:
    return isinstance(v, dict) and bool({"low", "high", "choices"} & set(v))


def _number(name: str, key: str, v) -> float:
    # PyYAML reads 1e-4 (no dot) as a string: accept it rather than make users learn YAML 1.1
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"space '{name}': '{key}' must be a number, got {v!r}") from None


def _field_kind(name: str) -> str | None:
    """'float' or 'int' from a TrainConfig field's annotation (float wins: lr is float | 'auto');
    None for other fields."""
    field = TrainConfig.model_fields.get(name)
    if field is None:
        return None
    args = typing.get_args(field.annotation) or (field.annotation,)
    if float in args:
        return "float"
    if int in args:
        return "int"
    return None


def parse_param(name: str, spec) -> Param | None:
    """A range/choices mapping -> Param; anything else is a fixed value (None)."""
    if isinstance(spec, dict) and name != "model_args" and not ({"low", "high", "choices"} & set(spec)):
        typo = next((k for k in spec if k in _RANGE_TYPOS), None)
        if typo is not None:
            raise UserError(f"space '{name}': '{typo}' without 'low'/'high': a range is given as "
                            f"{{low: ..., high: ...}} (or 'choices: [...]', or a fixed 'value')")
    if not isinstance(spec, dict) or not ({"low", "high", "choices"} & set(spec)):
        return None
    if "value" in spec:
        raise UserError(f"space '{name}': give either a fixed 'value' or low/high/choices, not both")
    known = {"type", "low", "high", "log", "step", "choices"}
    extra = set(spec) - known
    if extra:
        raise UserError(f"space '{name}': unknown key(s) {', '.join(sorted(extra))} (use low, high, log, step, choices, type)")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"space '{name}': 'choices' must be a non-empty list")
        choices = [_yaml_number(c) for c in choices]  # [1e-3, 1e-2]: PyYAML's strings, meant as numbers
        encoded = not all(isinstance(c, _SCALAR) for c in choices)
        if encoded:
            choices = [json.dumps(c) for c in choices]
        return Param(name, "categorical", choices=choices, encoded=encoded)
    if "low" not in spec or "high" not in spec:
        raise UserError(f"space '{name}': a range needs both 'low' and 'high'")
    low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
    # An explicit type wins; else the train option's own type (mixup {low: 0, high: 1} is a float
    # range); model arguments are floats unless 'type: int' says otherwise.
    kind = spec.get("type")
    if kind is None:
        if name.startswith("model_args."):
            kind = "float"
        else:
            kind = _field_kind(name) or ("int" if all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                                                      for k in ("low", "high")) else "float")
    if kind not in ("int", "float"):
        raise UserError(f"space '{name}': type must be int or float for a range, got {kind!r}")
    if not low < high:
        raise UserError(f"space '{name}': low ({low}) must be below high ({high})")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise UserError(f"space '{name}': an int range needs whole-number ends (got low {low:g}, high {high:g})")
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):  # bool("false") is True: a quoted value would silently mean log
        raise UserError(f"space '{name}': 'log' must be true or false, got {log_scale!r}")
    if log_scale and low <= 0:
        raise UserError(f"space '{name}': a log range needs low > 0 (got {low}); use e.g. low: 1.0e-6")
    step = _number(name, "step", spec["step"]) if spec.get("step") is not None else None
    if step is not None and not step > 0:
        raise UserError(f"space '{name}': 'step' must be above 0 (got {step:g})")
    if step is not None and kind == "int" and not step.is_integer():
        raise UserError(f"space '{name}': an int range needs a whole-number 'step' (got {step:g})")
    if step is not None and log_scale:
        raise UserError(f"space '{name}': 'step' and 'log' cannot be combined")
    return Param(name, kind, low=low, high=high, log=log_scale, step=step)


def _check_key(key: str, where: str) -> None:
    if key.startswith("model_args."):
        return
    if key in _SWEEP_OWNED:
        raise UserError(f"{where}: '{key}' is set by the sweep (trials go to studies/<name>/trials/<n>); remove it")
    if key not in TrainConfig.model_fields:
        hint = suggest_key(key, fallback="; see 'imgclf train --help' (model arguments: model_args.<name>)")
        raise UserError(f"{where}: unknown train option '{key}'{hint}")


# The train options only some optimizers read (engine/optim.py build_optimizer): a trial draws
# them only when its optimizer uses them, so an sgd trial records no beta1 it never trained with.
OPTIMIZER_OPTIONS = {"sgd": ("momentum", "nesterov"), "muon": ("momentum", "nesterov", "muon_lr", "muon_momentum"),
                     "adam": ("beta1", "beta2", "eps"), "adamw": ("beta1", "beta2", "eps")}
_CONDITIONAL = {k for opts in OPTIMIZER_OPTIONS.values() for k in opts}


class Space:
    """The study's parameters (sampled) and fixed values (merged into every trial)."""

    def __init__(self, spec: StudySpec):
        self.base = {str(k).replace("-", "_"): v for k, v in spec.base.items()}
        # the run follows the study's metric (best weights, early stopping) where it can
        self.monitor = spec.metric if spec.metric in MONITORS else None
        self.params: dict[str, Param] = {}
        self.fixed: dict[str, Any] = {}
        for k in self.base:
            _check_key(k, "base")
        for arg, v in (self.base.get("model_args") or {}).items() if isinstance(self.base.get("model_args"), dict) else ():
            if _range_shaped(v):
                raise UserError(f"base: model_args.{arg} is a range, but base values are fixed: search it under "
                                f"space: as model_args.{arg}: {{low: ..., high: ...}} (or choices: [...])")
        for raw, s in spec.space.items():
            key = str(raw).replace("-", "_") if not str(raw).startswith("model_args.") else str(raw)
            _check_key(key, "space")
            if key == "model_args" and isinstance(s, dict):
                nested = next((k for k, v in s.items() if _range_shaped(v)), None)
                if nested is not None:
                    raise UserError(f"space 'model_args': '{nested}' inside it would be taken as a fixed value, not "
                                    f"searched: write one key per searched argument, model_args.{nested}: "
                                    f"{{low: ..., high: ...}} (or choices: [...])")
            p = parse_param(key, s)
            if p is None:
                value = s["value"] if isinstance(s, dict) and set(s) == {"value"} else s
                if key.startswith("model_args."):
                    value = _yaml_number(value)
                elif key == "model_args" and isinstance(value, dict):
                    value = {k: _yaml_number(v) for k, v in value.items()}
                self.fixed[key] = value
            else:
                self.params[key] = p
        if isinstance(self.base.get("model_args"), dict):  # model arguments reach the net as they are: no coercion
            self.base["model_args"] = {k: _yaml_number(v) for k, v in self.base["model_args"].items()}

    def _optimizer(self, drawn: dict[str, Any]) -> str | None:
        """The optimizer a trial trains with, from its drawn values, the fixed ones and the base;
        'auto' as the recipe resolves it (muon for fastnet, adamw for the rest); None when that
        depends on the data (model auto)."""
        opts = self.options(drawn)
        opt = str(opts.get("optimizer", "auto")).lower()
        if opt != "auto":
            return opt
        model = str(opts.get("model", "auto")).lower()
        if model == "auto":
            return None
        from imgclf.models.registry import resolve_name

        return "muon" if resolve_name(model) == "fastnet" else "adamw"

    def uses(self, name: str, drawn: dict[str, Any]) -> bool:
        """Whether a trial with these drawn values trains with option ``name`` (see OPTIMIZER_OPTIONS)."""
        if name not in _CONDITIONAL:
            return True
        opt = self._optimizer(drawn)
        return opt is None or name in OPTIMIZER_OPTIONS.get(opt, ())

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's parameters, define-by-run: the model and optimizer first, then each other
        parameter the trial's optimizer uses."""
        first = [k for k in ("model", "optimizer") if k in self.params]
        drawn = {k: self.params[k].suggest(trial) for k in first}
        for k, p in self.params.items():
            if k not in drawn and self.uses(k, drawn):
                drawn[k] = p.suggest(trial)
        return drawn

    def _check_conditional(self) -> None:
        """A searched optimizer option that no trial's optimizer reads (beta1 with sgd) is a mistake."""
        for name in self.params:
            if name not in _CONDITIONAL:
                continue
            combos = [{}]
            for key in ("optimizer", "model"):  # every optimizer (and model, for auto) a trial may draw
                if key in self.params:
                    combos = [{**c, key: v} for c in combos for v in self.params[key].choices]
            if not any(self.uses(name, c) for c in combos):
                opt = self._optimizer({})
                takers = sorted(o for o, ks in OPTIMIZER_OPTIONS.items() if name in ks)
                raise UserError(f"space '{name}': optimizer {opt} does not use it (only {', '.join(takers)} do), so "
                                f"no trial would search it; remove it, or search optimizer too")

    def options(self, params: dict[str, Any]) -> dict[str, Any]:
        """Base + fixed + decoded params -> train options (``model_args.x`` keys merged)."""
        opts = dict(self.base)
        model_args = dict(opts.get("model_args") or {})
        values = {**self.fixed, **{k: self.params[k].decode(v) if k in self.params else v for k, v in params.items()}}
        for k, v in values.items():
            if k.startswith("model_args."):
                model_args[k.split(".", 1)[1]] = v
            elif k == "model_args":
                model_args.update(v or {})
            else:
                opts[k] = v
        if model_args:
            opts["model_args"] = model_args
        if self.monitor is not None and "monitor" not in opts:
            opts["monitor"] = self.monitor
        return opts

    def validate(self) -> None:
        """Check the base, every fixed value and each range's ends and choices before any trial."""
        probes: list[dict[str, Any]] = [{}]
        for p in self.params.values():
            if p.kind == "categorical":
                probes += [{p.name: c} for c in p.choices]
            else:
                probes += [{p.name: p.low if p.kind == "float" else int(p.low)},
                           {p.name: p.high if p.kind == "float" else int(p.high)}]
        if "data" not in self.base and "data" not in self.fixed:
            raise UserError("study: base needs 'data' (the training data every trial uses)")
        if self.monitor is not None:
            if "monitor" in self.params:
                raise UserError(f"study: 'monitor' cannot be searched: trials follow the study's metric "
                                f"({self.monitor}) for their best weights; remove it from space")
            set_to = self.fixed.get("monitor", self.base.get("monitor", self.monitor))
            if set_to != self.monitor:
                raise UserError(f"study: monitor {set_to} differs from the study's metric {self.monitor}: trials "
                                f"would keep the weights best by {set_to} but be judged by {self.monitor}; drop "
                                f"monitor (trials follow the metric) or set it to {self.monitor}")
        configs = []
        for probe in probes:
            opts = self.options(probe)
            try:
                cfg = TrainConfig(**opts)
            except ValidationError as e:
                raise UserError(self._validation_error(e, probe)) from None
            if cfg.devices > 1:
                raise UserError(f"study: devices {cfg.devices}: a trial is one process (pruning would not reach "
                                f"the spawned ones); run trials side by side with 'imgclf sweep --workers N' instead")
            for key in _DATA_OPTIONS:
                where = (f"space value {self._shown(probe)}" if key in probe
                         else "space (a fixed value)" if key in self.fixed else "base")
                check_spec(f"study {where}: {key}", getattr(cfg, key))
            configs.append((probe, cfg))
        self._check_model_args()
        self._check_conditional()
        self._build_models(configs)

    def _shown(self, probe: dict[str, Any]) -> dict[str, Any]:
        """A probe as the study file wrote it (list and dict choices are stored as JSON text)."""
        return {k: self.params[k].decode(v) if k in self.params else v for k, v in probe.items()}

    def _validation_error(self, e: ValidationError, probe: dict[str, Any]) -> str:
        """The problems of one probe's options, each blamed on where its value came from: the space's
        value being probed, a fixed value under space (with how a range is written), or base."""
        def origin(key: str) -> str:
            top = key.split(".")[0]
            if probe:
                return f"study space value {self._shown(probe)}"
            if top in self.fixed or any(k.startswith(top + ".") for k in self.fixed):
                return "study space (a fixed value)"
            return "study base"

        msg = format_validation_error(e, origin)
        fixed_bad = not probe and any(origin(".".join(map(str, err["loc"]))) != "study base" for err in e.errors())
        if fixed_bad:
            msg += ("; under space:, a searched option is a range {low: ..., high: ...} or {choices: [...]}, "
                    "anything else a fixed value")
        return msg

    def _build_models(self, configs: list[tuple[dict[str, Any], TrainConfig]]) -> None:
        """Build each probe's model once (the base, each range's ends, each choice: the values every
        trial draws between), so model arguments a net cannot take fail here, not in every trial.
        Only imgclf's own nets and timm models with model arguments (cheap to build; a timm model
        without any is built as train builds it)."""
        import inspect

        from imgclf.models.registry import OWN_MODELS, build_model, resolve_name

        seen: set[str] = set()
        for probe, cfg in configs:
            arch = resolve_name(cfg.model)
            args = dict(cfg.model_args)
            if arch not in OWN_MODELS and not args:
                continue
            key = json.dumps([arch, args, cfg.image_size], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            try:
                with warnings.catch_warnings():  # e.g. torch's on zero-size layers: the trial says what fails
                    warnings.simplefilter("ignore")
                    build_model(arch, 10, cfg.image_size or 32, args)
            except UserError as e:
                where = f"space value {self._shown(probe)}" if probe else "base"
                hint = ""
                if arch in OWN_MODELS:  # a number where the net takes a list (channels: [32, 64])
                    sig = inspect.signature(OWN_MODELS[arch].__init__).parameters
                    lists = [k for k, v in args.items() if k in sig and isinstance(sig[k].default, (tuple, list))
                             and not isinstance(v, (tuple, list))]
                    if lists:
                        hint = (f"; {arch} takes a list for {', '.join(lists)}: search it with choices, e.g. "
                                f"model_args.{lists[0]}: {{choices: [[32, 64], [64, 128]]}}")
                raise UserError(f"study {where}: {e}{hint}") from None

    def _check_model_args(self) -> None:
        import inspect

        from imgclf.models.registry import OWN_MODELS, resolve_name

        names = {k.split(".", 1)[1] for k in [*self.params, *self.fixed] if k.startswith("model_args.")}
        names |= set(self.base.get("model_args") or {})
        models = {self.options({}).get("model", "auto")}
        if "model" in self.params:
            models = {self.params["model"].decode(c) for c in self.params["model"].choices}
        for m in models:
            arch = resolve_name(m)
            if arch in OWN_MODELS:
                sig = inspect.signature(OWN_MODELS[arch].__init__).parameters
                bad = sorted(n for n in names if n not in sig)
                if bad:
                    allowed = ", ".join(p for p in sig if p not in ("self", "num_classes", "image_size"))
                    raise UserError(f"study: model_args {', '.join(bad)} not known to {arch}; it takes: {allowed}")
                for p in self.params.values():  # model_args ranges are floats unless 'type: int'
                    arg = p.name.split(".", 1)[1] if p.name.startswith("model_args.") else None
                    if p.kind == "float" and arg in sig and sig[arg].annotation in (int, "int"):
                        raise UserError(f"space '{p.name}': {arch} takes a whole number; add 'type: int' to the range")


def _study_key_hint(key: str) -> str:
    # the study's own keys first (n_trails -> n_trials); the train options' help would not list them
    if key in TrainConfig.model_fields:  # a train option at the top level
        return f"; train options go under 'base:' (fixed) or 'space:' (searched), e.g. base: {{{key}: ...}}"
    return suggest_key(key, StudySpec.model_fields.keys(),
                       fallback=f"; the study keys are {', '.join(StudySpec.model_fields)}")


def load_spec(path: str | Path | dict, **overrides: Any) -> StudySpec:
    """Read a study YAML (or take its mapping: the Python API's ``imgclf.sweep({...})``);
    ``overrides`` (None: keep) replace top-level keys, ``data`` the base's."""
    if isinstance(path, dict):
        raw, where = json.loads(json.dumps(path, default=str)), "study"  # a copy: the caller's dict stays as it is
    else:
        raw, where = load_yaml(path), str(path)
    data = overrides.pop("data", None)
    if isinstance(raw.get("base"), dict) and not isinstance(path, dict):  # data: photos beside the study file, run
        # from elsewhere (a path in neither place is refused by Space.validate, after the file's other mistakes)
        paths_beside(Path(path), raw["base"], given=["data"] if data is not None else [])
    given = {k: v for k, v in overrides.items() if v is not None}
    raw.update(given)
    try:
        spec = StudySpec(**raw)
    except ValidationError as e:
        # a bad command-line value (--n-trials 0) is not the file's fault: name the flag it came from
        def origin(key: str) -> str:
            top = key.split(".")[0]
            return "--" + top.replace("_", "-") if top in given else where

        raise UserError(format_validation_error(e, origin, noun="study key", suggest=_study_key_hint)) from None
    if data is not None:
        check_spec("--data", str(data))  # the flag's mistake, not the file's
        spec.base = {**spec.base, "data": str(data)}
    if spec.metric not in METRICS:
        raise UserError(f"{where}: metric '{spec.metric}' is not a score a trial writes; use one of {', '.join(METRICS)}")
    natural = metric_direction(spec.metric)
    if spec.direction is not None and spec.direction != natural:  # the study would search for the worst model
        raise UserError(f"{where}: direction {spec.direction} with metric {spec.metric}: {spec.metric} is "
                        f"{'lower' if natural == 'minimize' else 'higher'} for better models, so it needs direction "
                        f"{natural} (or leave direction out: it follows the metric)")
    if spec.n_trials is None and spec.timeout is None and _sampler_kind(spec) != "grid":
        raise UserError(f"{where}: give n_trials or timeout (or both): a {_sampler_kind(spec)} study has no end of its own")
    space = Space(spec)
    space.validate()
    make_sampler(spec, space)  # a typo in the sampler or pruner, before any study.db is made
    make_pruner(spec)
    return spec


def metric_direction(metric: str) -> str:
    """The direction that finds better models by ``metric``: down for a loss, up for the rest."""
    return "minimize" if metric.endswith("loss") else "maximize"


def _sampler_kind(spec: StudySpec) -> str:
    return spec.sampler if isinstance(spec.sampler, str) else spec.sampler.get("type", "tpe")


# ---------------------------------------------------------------------------------------------
# Optuna objects


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # imgclf prints its own line per trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _retry_callback(max_retry: int | None = 2):
    optuna = _optuna()
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=max_retry)


def make_storage(url: str, heartbeat: int | None = 10):
    """An RDB storage with heartbeats, so trials of dead workers are failed and queued again."""
    optuna = _optuna()
    kw: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several worker processes share the file: wait for the write lock instead of failing
        kw["connect_args"] = {"timeout": 120}
    else:
        kw["pool_pre_ping"] = True
    url = _postgres_driver(url)
    hb: dict[str, Any] = {}
    if heartbeat:
        cb_kw = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                 else "failed_trial_callback")
        hb = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat, cb_kw: _retry_callback()}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kw, **hb)
    except ImportError as e:
        raise UserError(f"storage {url.split(':', 1)[0]} needs a database driver: {e} (e.g. pip install psycopg2-binary)") from None
    except Exception as e:  # sqlalchemy's errors for unreachable servers, bad URLs, bad passwords
        if type(e).__module__.startswith("sqlalchemy"):
            raise UserError(f"cannot open storage {_redact(url)}: {str(e).splitlines()[0]}") from None
        raise


def _postgres_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; use psycopg2 when only that is installed."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _checked_args(what: str, cls, cfg: dict[str, Any], own: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, an argument ``cls`` does not take (a typo), naming the closest of the
    ones it does; ``own``: arguments the sweep passes itself (GridSampler's search space)."""
    import difflib
    import inspect

    sig = inspect.signature(cls).parameters
    known = [k for k, p in sig.items() if k not in own and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in cfg:
        if key in known:
            continue
        if key in own:
            raise UserError(f"{what}: '{key}' is set by the sweep (from the space); remove it")
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"{what}: unknown argument '{key}'; {hint}it takes {', '.join(known) or 'none'}")


def make_sampler(spec: StudySpec, space: Space, worker: int = 0, done: int = 0):
    """``done``: trials already in the study. It enters the seed so that a resumed study (or a
    second worker) does not draw the same random points again. A seed in the sampler's mapping
    ({type: tpe, seed: 1}) is the study's seed (it wins over a top-level one)."""
    optuna = _optuna()
    cfg = {"type": spec.sampler} if isinstance(spec.sampler, str) else dict(spec.sampler)
    kind = cfg.pop("type", "tpe")
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "grid": optuna.samplers.GridSampler}
    if kind not in classes:
        raise UserError(f"unknown sampler '{kind}': use grid, random or tpe")
    what = f"sampler {kind}"
    _checked_args(what, classes[kind], cfg, own=("search_space",) if kind == "grid" else ())
    user_seed = cfg.pop("seed", spec.seed)
    if user_seed is not None and (isinstance(user_seed, bool) or not isinstance(user_seed, int)):
        raise UserError(f"{what}: seed must be a whole number, got {user_seed!r}")
    seed = None if user_seed is None else (user_seed * 1_000_003 + worker * 10_007 + done) % 2**31
    args = ({k: p.grid() for k, p in space.params.items()},) if kind == "grid" else ()
    try:
        return classes[kind](*args, seed=seed, **cfg)
    except (TypeError, ValueError) as e:  # a value of the wrong kind: Optuna's own words, one line
        raise UserError(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def make_pruner(spec: StudySpec):
    optuna = _optuna()
    cfg = {"type": spec.pruner} if isinstance(spec.pruner, str) else dict(spec.pruner)
    kind = cfg.pop("type", "median")
    classes = {"median": optuna.pruners.MedianPruner, "halving": optuna.pruners.SuccessiveHalvingPruner,
               "none": optuna.pruners.NopPruner}
    if kind not in classes:
        raise UserError(f"unknown pruner '{kind}': use median, halving or none")
    _checked_args(f"pruner {kind}", classes[kind], cfg)
    try:
        return classes[kind](**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"pruner {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def grid_size(space: Space, spec: StudySpec) -> int | None:
    if _sampler_kind(spec) != "grid":
        return None
    return math.prod(len(p.grid()) for p in space.params.values())


def settings_hash(spec: StudySpec, *, as_written: bool = False, machine: bool = True) -> str:
    """A digest of what every trial trains with (base and space): a resumed study is refused when
    it changed. Data paths count as absolute ones, so the study resumed from another folder (data:
    ../photos) is the same study; ``as_written``: the digest studies made before that recorded.
    ``machine=False``: without the options that say where a trial runs (device, workers...), which
    may change between runs; new studies record that digest."""
    base = dict(spec.base)
    if not machine:
        base = {k: v for k, v in base.items() if k not in _machine_options()}
    for key in () if as_written else _DATA_OPTIONS:
        v = base.get(key)
        if isinstance(v, str) and v.strip() and "://" not in v and Path(v).expanduser().exists():
            base[key] = os.path.realpath(os.path.expanduser(v))
    blob = json.dumps({"base": base, "space": spec.space}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_study(spec: StudySpec, worker: int = 0, heartbeat: bool = True, warn: bool = False):
    """Create or load the study. A new study records its metric, direction, settings digest and a
    random id (its identity beside each trial folder); a loaded one must have the same metric and
    direction (Optuna would keep the stored direction); with ``warn`` (the sweep's start), the space
    must suit the study's trials (check_space), and a change of settings is said."""
    optuna = _optuna()
    space = Space(spec)
    storage = make_storage(spec.storage_url, spec.heartbeat if heartbeat else None)
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.resolved_direction,
                                sampler=make_sampler(spec, space, worker), pruner=make_pruner(spec),
                                load_if_exists=True)
    attrs = study.user_attrs
    had, want = study.direction.name.lower(), spec.resolved_direction
    had_metric = attrs.get(_ATTR_METRIC)
    if had != want or (had_metric is not None and had_metric != spec.metric):
        raise UserError(f"study '{spec.name}' was started to {had} {had_metric or 'its metric'}, and this file asks to "
                        f"{want} {spec.metric}: Optuna keeps a study's direction, so start a new study (another name) "
                        f"or put metric/direction back")
    if warn:  # the sweep's own open: a space its trials cannot draw is an error, not this warning
        check_space(study, space, spec)
    if _ATTR_ID not in attrs:  # a new study (or one from before these records)
        study.set_user_attr(_ATTR_METRIC, spec.metric)
        study.set_user_attr(_ATTR_DIRECTION, want)
        study.set_user_attr(_ATTR_SETTINGS, settings_hash(spec, machine=False))
        study.set_user_attr(_ATTR_ID, uuid.uuid4().hex)
    elif warn and not study.get_trials(deepcopy=False):  # refused before its first trial: nothing to compare
        study.set_user_attr(_ATTR_SETTINGS, settings_hash(spec, machine=False))
    elif warn and attrs.get(_ATTR_SETTINGS) not in (settings_hash(spec), settings_hash(spec, as_written=True),
                                                     settings_hash(spec, machine=False)):
        raise UserError(f"study '{spec.name}': {_what_changed(spec)} since the study began, and its trials must "
                        f"train alike for their scores to compare: put it back, or start a new study (another "
                        f"name{'' if spec.storage else f', or delete {spec.study_dir}'})")
    return study


def _what_changed(spec: StudySpec) -> str:
    """'base.epochs 2 -> 3' (the first of what differs from the study.yaml the study began with),
    or 'base or space changed' where that file is not here or shows no difference."""
    try:
        old = yaml.safe_load((spec.study_dir / "study.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "base or space changed"
    machine, data = _machine_options(), None
    for part, new_part in (("base", spec.base), ("space", spec.space)):
        was = old.get(part) if isinstance(old.get(part), dict) else {}
        for key in sorted(set(was) | set(new_part), key=str):
            a, b = was.get(key, "(not set)"), new_part.get(key, "(not set)")
            if part == "base" and key in machine or json.dumps(a, sort_keys=True, default=str) == json.dumps(
                    b, sort_keys=True, default=str):
                continue
            what = f"{part}.{key} changed ({_brief(a)} -> {_brief(b)})"
            if part == "base" and key in _DATA_OPTIONS:  # maybe the same folder written another way: said last
                data = data or what
                continue
            return what
    return data or "base or space changed"


def _brief(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _machine_options() -> frozenset[str]:
    """Base options a study may change between runs: where it runs, not what a trial learns (the
    options 'imgclf train --resume' takes)."""
    from imgclf.api import RESUME_OPTIONS

    return RESUME_OPTIONS


def _distribution(p: Param):
    """The Optuna distribution ``p.suggest`` records for the parameter."""
    d = _optuna().distributions
    if p.kind == "float":
        return d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    if p.kind == "int":
        return d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return d.CategoricalDistribution(p.choices)


def _describe_distribution(dist) -> str:
    if hasattr(dist, "choices"):
        return "choices [" + ", ".join(str(c) for c in dist.choices) + "]"
    kind = "an int" if type(dist).__name__.startswith("Int") else "a float"
    return f"{kind} range" + (" (log)" if dist.log else "")


def check_space(study, space: Space, spec: StudySpec) -> None:
    """Refuse, before any trial, a space whose parameter Optuna cannot take in this study: one that
    changed kind, log scale or choices since its trials drew it. Every trial would fail on it."""
    from optuna.distributions import check_distribution_compatibility

    new = {name: _distribution(p) for name, p in space.params.items()}
    for t in study.get_trials(deepcopy=False):
        for name, old in t.distributions.items():
            if name not in new:
                continue
            try:
                check_distribution_compatibility(old, new[name])
            except ValueError:
                where = f"delete {spec.study_dir}" if spec.storage is None else "delete it from its storage"
                raise UserError(f"space '{name}': {_describe_distribution(new[name])}, but study '{spec.name}' "
                                f"drew it from {_describe_distribution(old)} (trial {t.number}), and a study cannot "
                                f"change that: give the study a new name, or {where} to start over") from None


def _data_keys() -> set[str]:
    """Train options that decide what the data is (its task, whether it has validation images):
    the ones load_source takes, so a new data option is covered without a list to keep."""
    import inspect

    from imgclf.data.sources import load_source

    return set(inspect.signature(load_source).parameters) - {"cache_dir"}


def check_data(spec: StudySpec, space: Space) -> None:
    """Refuse, before any trial, a metric the data cannot produce: val_map on single-label data (the
    trainer refuses --monitor val_map there), or a val_ metric without validation images. The data
    is read only when such a metric could be missing, and not when the space searches data options."""
    if not spec.metric.startswith("val_") or any(k in space.params for k in _data_keys()):
        return
    cfg = TrainConfig(**space.options({}))  # validated by load_spec
    if spec.metric not in ("val_map", "val_bal_acc") and (cfg.val_split > 0 or cfg.val_data):
        return  # a val/ folder is read only when there is no split
    from imgclf.data.cache import cache_root
    from imgclf.evaluate.calibrate import source_from_config

    src = source_from_config(cfg, cache_root(cfg.cache_dir))  # the data as the trials' training reads it
    if spec.metric == "val_map" and src.task == "single":
        raise UserError(f"study: metric val_map is for multi-label data, and {cfg.data} has one label per image: "
                        f"use val_acc or val_loss")
    if spec.metric == "val_bal_acc" and src.task == "multilabel":
        raise UserError(f"study: metric val_bal_acc is for single-label data, and {cfg.data} has several labels per "
                        f"image: use val_map")
    if src.val is None:
        raise UserError(f"study: metric {spec.metric} needs validation images, and {cfg.data} has none (no val "
                        f"folder, val_split 0): set val_split in base (e.g. 0.1), or use a train_ metric")


def study_id(study) -> str | None:
    return study.user_attrs.get(_ATTR_ID)


def read_marker(run_dir: Path) -> dict | None:
    """The study a trial folder belongs to (written before its trial trains), or None."""
    try:
        m = json.loads((run_dir / TRIAL_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _write_marker(run_dir: Path, spec: StudySpec, sid: str | None, number: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (TRIAL_MARKER + ".tmp")
    tmp.write_text(json.dumps({"study": spec.name, "study_id": sid, "trial": number,
                               "storage": _redact(spec.storage_url), "resume": spec._again}))
    os.replace(tmp, run_dir / TRIAL_MARKER)


def trial_advice(run_dir: str | Path) -> str | None:
    """For a sweep trial's folder whose training did not finish (no model.json): that its study
    resumes it, with the command to run, rather than 'imgclf train --resume' (which would train it
    outside the study, and the study would never see the result). None for any other folder."""
    run_dir = Path(run_dir)
    m = read_marker(run_dir) if run_dir.is_dir() else None
    if m is None or (run_dir / "model.json").is_file():
        return None
    how = f"'{m['resume']}'" if isinstance(m.get("resume"), str) and m["resume"] else "its 'imgclf sweep' command"
    return (f"{run_dir} is trial {m.get('trial', '?')} of study '{m.get('study', '?')}' and did not finish: the study "
            f"trains it again, so resume the study with {how} (not 'imgclf train --resume')")


def _foreign(run_dir: Path, spec: StudySpec, sid: str | None) -> str | None:
    """Why ``run_dir`` may not take a trial of this study (it holds another study's), or None."""
    m = read_marker(run_dir)
    if m is None or sid is None or m.get("study_id") == sid:
        return None
    return (f"{run_dir} holds trial {m.get('trial', '?')} of another study '{m.get('study', '?')}' "
            f"(storage {m.get('storage', '?')}), not of study '{spec.name}' in {_redact(spec.storage_url)}: "
            f"move {run_dir.parent} away, or give this study another name or directory")


def check_trial_folders(spec: StudySpec, sid: str | None) -> None:
    """Refuse to start when the trial folders belong to another study (a new storage, a deleted
    study.db): its trial numbers start at 0 again and would overwrite them."""
    trials = spec.study_dir / "trials"
    if not trials.is_dir():
        return
    for d in sorted(trials.iterdir()):
        why = _foreign(d, spec, sid) if d.is_dir() else None
        if why:
            raise UserError(why)


def counted(trial) -> bool:
    """Whether a trial uses up n_trials: one that finished (complete or pruned) or may still
    (running, or queued again). Failed trials are not: n_trials is the number of results the user
    asked for, and a run of failures ends the study instead (_MAX_CONSECUTIVE_FAILURES). A trial
    whose process died (no error recorded) comes back as a queued retry, which is counted."""
    return trial.state.name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING") and not duplicate(trial)


def duplicate(trial) -> bool:
    """A grid point that trains as an earlier trial did (an sgd trial's grid points differ only in
    the beta1 it does not read): pruned without training, and not a result (counted is false)."""
    return trial.state.name == "PRUNED" and "same_as" in trial.user_attrs


def interrupted(trial) -> bool:
    """A trial stopped by Ctrl-C or SIGTERM (queued again): FAIL to Optuna, not a failure."""
    return trial.state.name == "FAIL" and bool(trial.user_attrs.get("interrupted"))


def attempted(trial) -> bool:
    """Whether a trial used up a grid point: counted, or failed with an error (a grid point that
    fails is not tried again, or a failing point would be drawn for ever)."""
    return counted(trial) or duplicate(trial) or (trial.state.name == "FAIL" and "error" in trial.user_attrs)


def _same_training(trial, params: dict[str, Any], space: Space) -> int | None:
    """The earlier trial that trains exactly as this one will, where the grid sampler drew a point
    whose differing values this trial's optimizer does not read; None for any other trial. Grid
    only: a point is used once, so the grid still ends (TPE would draw a skipped point again)."""
    if len(params) == len(space.params) or not hasattr(trial, "study"):
        return None
    for t in sorted(trial.study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.number != trial.number and t.params == trial.params and t.state.name in (
                "COMPLETE", "PRUNED", "RUNNING", "WAITING"):
            return int(t.user_attrs.get("same_as", t.number))
    return None


# ---------------------------------------------------------------------------------------------
# one trial


class PruneOnMetric(Callback):
    """Reports the study's metric after each validated epoch; stops training when Optuna prunes."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric, self.pruned_at = trial, metric, None

    def on_epoch_end(self, t, row):
        v = row.get(self.metric)
        if v is None:
            return
        v = float(v)
        if math.isnan(v):  # a diverged run: no point training it further
            self.pruned_at = row["epoch"]
            t.stop = f"sweep: {self.metric} is NaN at epoch {row['epoch']}"
            return
        self.trial.report(v, step=int(row["epoch"]))
        if row["epoch"] >= math.ceil(t.cfg.epochs):
            return  # the work is done: pruning now would only throw the result away
        if self.trial.should_prune():
            self.pruned_at = row["epoch"]
            t.stop = f"sweep: pruned at epoch {row['epoch']} ({self.metric} {v:.4f})"


def _drop_checkpoint(run_dir: Path, trial, pruning: PruneOnMetric) -> None:
    """Remove a finished trial's last.pt, first keeping in the study what only it recorded: why the
    trainer stopped before the planned length (early stopping, a time limit), which compare shows."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return
    if pruning.pruned_at is None:
        from imgclf.evaluate.compare import _stop_reason

        stop = _stop_reason(last)
        if stop:
            trial.set_user_attr("stop", stop)
    last.unlink(missing_ok=True)


def _short(params: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k.removeprefix('model_args.')}={fmt(v)}" for k, v in params.items())


_SPACE_CHANGED = ("dynamic value space", "different distribution kind", "different log configuration")


@contextlib.contextmanager
def _sweep_resume_advice(number: int):
    """During a trial, the trainer's "continue with 'imgclf train --resume RUN'" (said when Ctrl-C
    stops a run with a checkpoint) would resume the trial folder outside the study: the sweep
    queues the trial again and removes its folder instead, and says how to resume the study
    (run_study), so the trainer only says the trial stopped."""
    from imgclf.api import STOPPED_ADVICE

    token = STOPPED_ADVICE.set(f"trial {number} stopped")
    try:
        yield
    finally:
        STOPPED_ADVICE.reset(token)


def study_options(space: Space, params: dict[str, Any]) -> dict[str, Any]:
    """The train options the study sets for a trial (base, fixed values, the trial's parameters),
    with local paths absolute as in the run's config.yaml, so that they read the same data from any
    folder. Not what the recipe derives from them for the trial (lr, batch size, warm-up, epochs,
    early crop...) as config.yaml has it: that depends on the run's length, and a longer run with
    the best trial's options must derive it afresh."""
    from imgclf.api import _PATH_OPTIONS

    opts = space.options(params)
    for k in _PATH_OPTIONS:
        v = opts.get(k)
        if isinstance(v, str) and v and "://" not in v and Path(v).expanduser().exists():
            opts[k] = os.path.abspath(os.path.expanduser(v))
    return json.loads(json.dumps(opts, default=str))  # as Optuna stores a user attr


def make_objective(spec: StudySpec, space: Space, current: dict | None = None):
    """``current["number"]``: the trial being run, for a worker to queue it again on Ctrl-C."""
    trials_dir = spec.study_dir / "trials"

    def objective(trial) -> float:
        optuna = _optuna()
        if current is not None:
            current["number"] = trial.number
        run_dir = trials_dir / str(trial.number)
        if trial.user_attrs.get("interrupted"):  # a retry of a trial Ctrl-C stopped: the copy is not
            trial.set_user_attr("interrupted", False)
        trial.set_user_attr("run_dir", f"trials/{trial.number}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        pruning = PruneOnMetric(trial, spec.metric)
        from imgclf.api import train

        ours = True  # whether run_dir is this study's to write error.txt into
        sid = None
        try:
            sid = study_id(trial.study) if hasattr(trial, "study") else None
            why = _foreign(run_dir, spec, sid)
            if why:
                ours = False
                raise UserError(why)
            try:
                params = space.suggest(trial)
            except ValueError as e:
                if not any(m in str(e) for m in _SPACE_CHANGED):
                    raise
                raise UserError(f"the search space changed since study '{spec.name}' began ({e}); a new space "
                                f"wants a new study: give it another name") from None
            twin = _same_training(trial, params, space) if _sampler_kind(spec) == "grid" else None
            if twin is not None:
                unread = ", ".join(sorted(k for k in space.params if k not in params))
                trial.set_user_attr("same_as", twin)
                log.info(f"trial {trial.number}: trains as trial {twin} did ({unread} unused with "
                         f"{_short({k: params[k] for k in ('model', 'optimizer') if k in params}) or 'its optimizer'}"
                         "): not run")
                raise optuna.TrialPruned(f"same training as trial {twin}")
            opts = {**_TRIAL_DEFAULTS, **space.options(params)}
            trial.set_user_attr("options", study_options(space, params))  # best.yaml is written from it
            log.info(f"trial {trial.number}: {_short(params) or 'base options'}")
            _write_marker(run_dir, spec, sid, trial.number)
            (run_dir / "error.txt").unlink(missing_ok=True)  # from an earlier attempt at this folder
            with _sweep_resume_advice(trial.number):
                res = train(callbacks=[pruning], final_eval=False, project=str(trials_dir), name=str(trial.number),
                            exist_ok=True, **opts)
            values = [float(r[spec.metric]) for r in res.history if spec.metric in r]
            values = [v for v in values if not math.isnan(v)]
            trial.set_user_attr("epochs", len(res.history))
            if not spec.keep_checkpoints:  # finished (complete or pruned): model.safetensors is what is read
                _drop_checkpoint(run_dir, trial, pruning)
            if pruning.pruned_at is not None:
                raise optuna.TrialPruned(f"pruned at epoch {pruning.pruned_at}")
            if not values:
                raise UserError(f"metric '{spec.metric}' was never reported: the data needs a validation split "
                                f"(val_split > 0 or a val/ folder), and metric must be a metrics.csv column such as "
                                f"val_acc")
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: Optuna fails the trial (it has no other end for one that stopped) and
            # run_worker queues its parameters again; it is marked interrupted, not an error, and its
            # folder goes: the retry trains in a folder of its own, from the beginning
            with contextlib.suppress(Exception):
                trial.set_user_attr("interrupted", True)
            m = read_marker(run_dir) if ours else None
            if m is not None and m.get("trial") == trial.number and m.get("study_id") == sid:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        except Exception as e:
            msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            trial.set_user_attr("error", msg.splitlines()[0][:500] if msg else type(e).__name__)
            if ours:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
            raise
        # the run keeps the weights of its best epoch, so that epoch's value is the trial's
        return max(values) if spec.resolved_direction == "maximize" else min(values)

    return objective


# ---------------------------------------------------------------------------------------------
# a worker: run trials until the study's budget is used


def _report_trial(t, metric: str) -> None:
    secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0
    if t.state.name == "COMPLETE":
        log.info(f"trial {t.number} done: {metric} {t.value:.4f} in {secs:.0f}s")
    elif duplicate(t):  # said when it was drawn
        return
    elif t.state.name == "PRUNED":
        last = max(t.intermediate_values) if t.intermediate_values else 0
        log.info(f"trial {t.number} pruned at epoch {last} in {secs:.0f}s")
    elif t.state.name == "FAIL":
        log.info(f"trial {t.number} failed: {t.user_attrs.get('error', 'interrupted')}")


def run_worker(spec: StudySpec, worker: int = 0) -> str | None:
    """Run trials one at a time until n_trials are counted in the study, the timeout passes,
    (grid) every point is done, or too many trials in a row fail. Safe to run in many processes
    at once on one storage. Returns why it stopped early (too many failures in a row: summarize
    finds them too, and the sweep exits 1), else None. A worker process of ``--workers N``
    (IMGCLF_SWEEP_PARENT set) ends with its parent (_follow_parent)."""
    _follow_parent()
    spec._again = spec._again or os.environ.get(_AGAIN_ENV)
    space = Space(spec)
    study = open_study(spec, worker)
    check_trial_folders(spec, study_id(study))
    study.sampler = make_sampler(spec, space, worker, done=len(study.get_trials(deepcopy=False)))
    current: dict[str, int] = {}
    objective = make_objective(spec, space, current)
    gs = grid_size(space, spec)

    def budget_used(trials) -> bool:
        return ((spec.n_trials is not None and sum(map(counted, trials)) >= spec.n_trials)
                or (gs is not None and sum(map(attempted, trials)) >= gs))

    # each trial is a training run that says its warnings anew: say each once for the study
    with log.said_once():
        return _run_trials(spec, study, objective, current, gs, budget_used)


def _run_trials(spec: StudySpec, study, objective, current: dict, gs: int | None, budget_used) -> str | None:
    optuna = _optuna()
    deadline = time.monotonic() + spec.timeout if spec.timeout else None
    failures, said_waiting = 0, False
    while deadline is None or time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state.name == "WAITING" for t in trials)
        if budget_used(trials) and not waiting:
            if not any(t.state.name == "RUNNING" for t in trials):
                break
            # Others' trials are running: wait, since a dead worker's trial comes back as WAITING.
            if not said_waiting:
                log.info("budget reached; waiting for the running trials of other workers")
                said_waiting = True
            time.sleep(min(5.0, spec.heartbeat))
            continue
        before = {t.number for t in trials}
        finished: list = []
        current.clear()
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _s, t, out=finished: out.append(t)])
        except KeyboardInterrupt:
            # Optuna has FAILED the trial; queue its parameters again so that a restart redoes it.
            # The trial may be a queued one (a retry), whose number was already in the study.
            me = f"{socket.gethostname()}:{os.getpid()}"
            for t in study.get_trials(deepcopy=False):
                mine = t.number == current.get("number") or (t.number not in before and t.user_attrs.get("worker") == me)
                if mine and t.state.name == "FAIL" and "error" not in t.user_attrs:
                    _retry_callback(max_retry=None)(study, t)
            raise
        if not finished:
            continue
        last = finished[-1]
        _report_trial(last, spec.metric)
        failures = failures + 1 if last.state.name == "FAIL" else 0
        if failures >= _MAX_CONSECUTIVE_FAILURES:
            log.info(f"stopping: {failures} trials in a row failed")
            return _failures_message(spec, last, failures)
    return None


def _failures_message(spec: StudySpec, last, failures: int) -> str:
    err = spec.study_dir / "trials" / str(last.number) / "error.txt"
    see = f" (see {err})" if err.exists() else ""
    return (f"{failures} trials in a row failed, the last with: {last.user_attrs.get('error')}; fix the study "
            f"and run the sweep again{see}")


# ---------------------------------------------------------------------------------------------
# the study: one process, or N pinned worker processes


def write_spec(spec: StudySpec, path: Path | None = None, keep: bool = False) -> Path:
    """Save the resolved study (storage URL included): ``path``, by default study.yaml beside the
    trials, which the report reads. ``keep``: leave a study.yaml that is there as it is: once a
    study has trials, it records the study as it began (open_study refuses another base or space;
    a run's n_trials, timeout, sampler or pruner are its own)."""
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    path = path or spec.study_dir / "study.yaml"
    if keep and path.is_file():
        return path
    data = spec.model_dump(mode="json")
    data["storage"] = spec.storage_url
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


def pin_worker(worker: int, workers: int) -> int:
    """Give each worker its own slice of the cores and as many torch threads as it has cores."""
    import torch

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // workers)
    start = (worker * per) % len(cores)
    mine = cores[start : start + per] or cores[:per]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return len(mine)


_PARENT_ENV = "IMGCLF_SWEEP_PARENT"  # set for the worker processes of --workers N: their parent's pid


class _InterruptOnce:
    """A signal handler that raises KeyboardInterrupt (as Ctrl-C does: the running trial is
    queued again) the first time, and ignores the signals after it, which would otherwise break
    into that clean-up (a worker gets Ctrl-C from the terminal and SIGTERM from its parent)."""

    def __init__(self):
        self.fired = False

    def __call__(self, signum, frame):
        if self.fired:
            return
        self.fired = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self, signals=(signal.SIGTERM,)):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _follow_parent() -> None:
    """In a worker process of ``--workers N``: stop like on Ctrl-C (the running trial queued
    again, then exit) when the sweep's parent process dies, however it dies (kill -9 included),
    or is stopped with SIGTERM, rather than go on running trials as an orphan beside the workers
    of a sweep started again. Linux tells the worker at once (PR_SET_PDEATHSIG); elsewhere, and
    in case that fails, a thread looks at the parent pid every second."""
    parent = os.environ.pop(_PARENT_ENV, None)
    if not parent or threading.current_thread() is not threading.main_thread():
        return
    parent_pid = int(parent)
    from imgclf.procs import end_with_parent

    stop = _InterruptOnce()  # its second signal and later ones are ignored
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not end_with_parent(parent_pid):  # it died before the worker could ask to be told
        raise KeyboardInterrupt


def _worker_cmd(spec_path: Path, worker: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "imgclf", "sweep", str(spec_path), "--worker", str(worker), "--of", str(workers)]


_AGAIN_ENV = "IMGCLF_SWEEP_AGAIN"  # for the worker processes: how to resume the study (their markers say it)


def _first_trial_started(spec: StudySpec, since: float) -> bool:
    trials = spec.study_dir / "trials"
    if not trials.is_dir():
        return False
    return any((d / "config.yaml").exists() and (d / "config.yaml").stat().st_mtime >= since for d in trials.iterdir())


def run_study(spec: StudySpec, workers: int = 1, again: str | None = None) -> dict:
    """Run (or resume) the study with ``workers`` processes; returns the summary. ``again``: the
    command that resumes it (said when Ctrl-C or SIGTERM stops it, which raises KeyboardInterrupt
    after the running trials are queued again)."""
    spec._again = again or spec._again
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, heartbeat=False, warn=True)  # create it once here, not racing in every worker
    check_trial_folders(spec, study_id(study))
    check_data(spec, Space(spec))
    before = {t.number for t in study.get_trials(deepcopy=False)}
    host = socket.gethostname()
    write_spec(spec, keep=bool(before))
    log.info(f"study {spec.name}: storage {_redact(spec.storage_url)}, trials in {spec.study_dir / 'trials'}")
    # SIGTERM (kill, a scheduler's stop) ends the sweep as Ctrl-C does: the running trial is queued
    # again, the workers are stopped with it
    try:
        with _InterruptOnce().installed():
            if workers <= 1:
                run_worker(spec)
                return summarize(spec, before, {f"{host}:{os.getpid()}"})
            # the workers read this run's study (its overrides included), not study.yaml (as it began)
            run_file = write_spec(spec, spec.study_dir / f".run-{os.getpid()}.yaml")
            try:
                procs = _run_workers(spec, run_file, workers)
            finally:
                run_file.unlink(missing_ok=True)
    except KeyboardInterrupt:
        queued = sum(t.state.name == "WAITING" for t in open_study(spec, heartbeat=False).get_trials(deepcopy=False))
        how = f"run the same 'imgclf sweep' command again ({spec._again})" if spec._again else \
            "run the same 'imgclf sweep' command again"
        q = f" ({queued} trial{'s' if queued > 1 else ''} queued again)" if queued else ""
        log.info(f"study {spec.name} stopped{q}: to resume it, {how}")
        raise
    return summarize(spec, before, {f"{host}:{p.pid}" for p in procs})


def _run_workers(spec: StudySpec, path: Path, workers: int) -> list[subprocess.Popen]:
    """Start the ``workers`` processes and wait for them; on Ctrl-C or SIGTERM, stop them first.
    Each worker ends with this process (_follow_parent), even when it is killed with -9."""
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // workers)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **{_PARENT_ENV: str(os.getpid())})
    if spec._again:
        env[_AGAIN_ENV] = spec._again
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.time()
        procs.append(subprocess.Popen(_worker_cmd(path, 0, workers), env=env))
        # Let the first worker decode the data into the shared cache before the others start,
        # rather than every worker decoding the same images at once.
        while procs[0].poll() is None and not _first_trial_started(spec, t0 - 1) and time.time() - t0 < 900:
            time.sleep(0.5)
        for i in range(1, workers):
            procs.append(subprocess.Popen(_worker_cmd(path, i, workers), env=env))
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # SIGTERM: the worker queues its trial again and exits
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        raise UserError(f"{len(bad)} of {workers} workers exited with an error (status {bad[0]}); see their messages above")
    return procs


def tied_with_best(done: list, best: float) -> int:
    """How many finished trials share the best value (within float noise)."""
    return sum(t.value is not None and math.isclose(t.value, best, rel_tol=1e-9, abs_tol=1e-12) for t in done)


def summarize(spec: StudySpec, before: set[int] | None = None, workers: set[str] | None = None) -> dict:
    """The study's counts and best trial. With ``before`` (the trial numbers before this run) and
    ``workers`` (this run's worker ids), ``error`` says why this run failed when none of the trials
    it ran finished and some failed, or when a worker stopped after _MAX_CONSECUTIVE_FAILURES
    failures in a row: the sweep ran, and exits 1."""
    study = open_study(spec, heartbeat=False)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    out: dict[str, Any] = {"study": spec.name, "trials": len(trials), **{k.lower(): v for k, v in states.items()}}
    stopped = sum(map(interrupted, trials))
    if stopped:  # Ctrl-C: Optuna records the trial as failed, but nothing failed (it is queued again)
        out["fail"] -= stopped
        out["interrupted"] = stopped
    same = sum(map(duplicate, trials))
    if same:  # grid points that train as an earlier trial: Optuna's PRUNED, but never run
        out["pruned"] -= same
        out["duplicate"] = same
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        params = Space(spec).params
        # list/dict choices are stored as JSON strings (Optuna keeps scalars): show the values
        shown = {k: params[k].decode(v) if k in params and v in (params[k].choices or ()) else v
                 for k, v in best.params.items()}
        out.update(best_trial=best.number, best_value=best.value, best_params=shown)
        tied = tied_with_best(done, best.value)
        if tied > 1:  # five trials at chance on 18 val images: trial 0 'won' by being first
            out["tied"] = tied
            log.warn(f"study '{spec.name}': {tied} trials tie at the best {spec.metric} {best.value:.4f}, so the "
                     "best trial is the first of them, not a winner: more epochs or validation images tell them apart")
    if before is not None:
        mine = [t for t in trials if t.number not in before and t.user_attrs.get("worker") in (workers or ())]
        failed = {t.number for t in mine if t.state.name == "FAIL" and "error" in t.user_attrs}
        # a worker that stopped after too many failures in a row (run_worker): its last trials failed
        stopped = None
        for w in sorted(workers or ()):
            tail = [t for t in mine if t.user_attrs.get("worker") == w][-_MAX_CONSECUTIVE_FAILURES:]
            if len(tail) == _MAX_CONSECUTIVE_FAILURES and all(t.number in failed for t in tail):
                stopped = tail[-1]
        if failed and not any(t.state.name in ("COMPLETE", "PRUNED") for t in mine):
            last = stopped or [t for t in mine if t.number in failed][-1]
            err = spec.study_dir / "trials" / str(last.number) / "error.txt"
            see = f" (see {err})" if err.exists() else ""
            why = f" ({_MAX_CONSECUTIVE_FAILURES} failures in a row stop a sweep)" if stopped else ""
            out["error"] = (f"no trial finished: the {len(failed)} trial{'s' if len(failed) > 1 else ''} this sweep ran "
                            f"failed{why}, the last with: {last.user_attrs['error']}{see}")
        elif stopped is not None:
            out["error"] = _failures_message(spec, stopped, _MAX_CONSECUTIVE_FAILURES)
    return out
