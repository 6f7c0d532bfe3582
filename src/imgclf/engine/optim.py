"""Optimizers from the config, with per-group learning-rate and decay scales.

A model may offer ``param_groups()`` (list of dicts with ``params`` and optional ``lr_scale``,
``wd_scale``); otherwise biases and norm parameters get no weight decay, the usual practice.
"""

from __future__ import annotations

import torch
from torch import nn

from imgclf.config import TrainConfig


def default_param_groups(model: nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [dict(params=decay), dict(params=no_decay, wd_scale=0.0)]


def param_groups(model: nn.Module) -> list[dict]:
    fn = getattr(model, "param_groups", None)
    return fn() if callable(fn) else default_param_groups(model)


def build_optimizer(model: nn.Module, cfg: TrainConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    groups = groups if groups is not None else param_groups(model)
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad or g.get("keep_frozen")]
        if not params and not g.get("keep_frozen"):
            continue
        lr = cfg.lr * g.get("lr_scale", 1.0)
        wd = cfg.weight_decay * g.get("wd_scale", 1.0)
        out.append(dict(params=params, lr=lr, weight_decay=wd, base_lr=lr, name=g.get("name", "")))
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(out, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(out, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(out, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    raise ValueError(f"optimizer {cfg.optimizer!r} was not resolved")


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Keras' kernel_regularizer=l2(c) is c * sum(w**2) over conv and dense kernels."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad]
    return torch.stack([w.float().pow(2).sum() for w in ws]).sum()
