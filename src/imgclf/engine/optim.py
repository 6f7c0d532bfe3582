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
        scale = g.get("lr_scale", 1.0)
        wd = cfg.weight_decay * g.get("wd_scale", 1.0)
        out.append(dict(params=params, lr=cfg.lr * scale, weight_decay=wd, base_lr=cfg.lr * scale, lr_scale=scale,
                        name=g.get("name", "")))
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "muon":
        normalize = bool(getattr(model, "muon_normalize", False))
        return Muon(_split_muon(out, cfg, normalize), momentum=cfg.momentum, muon_momentum=cfg.muon_momentum,
                    nesterov=cfg.nesterov and cfg.momentum > 0, normalize=normalize)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(out, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(out, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(out, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    raise ValueError(f"optimizer {cfg.optimizer!r} was not resolved")


def muon_eligible(p: torch.Tensor) -> bool:
    """Conv filter banks (out, in, kh, kw) with in > 1: not depthwise filters, which are per
    channel vectors with nothing to orthogonalise, and not biases, norms or the linear head."""
    return p.ndim == 4 and p.shape[1] > 1


def _split_muon(groups: list[dict], cfg: TrainConfig, normalize: bool) -> list[dict]:
    out = []
    for g in groups:
        filt = [p for p in g["params"] if muon_eligible(p)]
        rest = [p for p in g["params"] if not muon_eligible(p)]
        if filt:
            # the Muon lr is its own scale (an orthogonalised step has a fixed size whatever the
            # loss), so cfg.lr does not enter; a group's lr_scale (e.g. a 0.1x backbone) does
            lr = cfg.muon_lr * g["lr_scale"]
            wd = 0.0 if normalize else g["weight_decay"]  # renormalised filters need no decay
            out.append({**g, "params": filt, "muon": True, "lr": lr, "base_lr": lr, "weight_decay": wd})
        if rest:  # after the filters: the last group stays the one at cfg.lr, as without Muon
            out.append({**g, "params": rest, "muon": False})
    return out


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic beats fp32 on ``device``: any CUDA GPU torch supports bf16 on; a
    CPU with AMX, or with AVX512-BF16 where a timed probe says so (:mod:`imgclf.engine.cpu_bf16`).
    Elsewhere (AVX2-only CPUs: AMD Zen 2/3, most desktop Intel) bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from imgclf.engine.cpu_bf16 import bf16_pays

        return bf16_pays()
    return False


_NS_DTYPE: dict[torch.device, torch.dtype] = {}


def ns_dtype(device: torch.device) -> torch.dtype:
    """The Newton-Schulz iteration's dtype: bf16 where it is native, else fp32. Measured on an
    AVX2-only 2-core CPU (AMD Zen 3), FastNet's seven filter banks took 2.7 s per step in
    emulated bf16 and 0.085 s in fp32: a third of each training step at batch 1024."""
    if device not in _NS_DTYPE:
        _NS_DTYPE[device] = torch.bfloat16 if native_bf16(device) else torch.float32
    return _NS_DTYPE[device]


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T by a quintic Newton-Schulz iteration (Muon), in ``dtype``
    (default: ns_dtype of g's device). The coefficients push small singular values up fast; the
    result has singular values in about (0.5, 1.5), which trains as well as exact
    orthogonalisation (Jordan et al., 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype or ns_dtype(g.device))
    x = x / (x.norm() + eps)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * (m @ m)) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon for conv filter banks, Nesterov SGD for every other parameter, in one optimizer so
    schedules, lookahead, checkpoints and resume treat it like any other.

    Groups with ``muon=True``: momentum (``muon_momentum``) on the gradient, the update
    orthogonalised (each filter bank reshaped to out x in*kh*kw), then a step of size lr. With
    ``normalize`` (models whose every conv feeds a BatchNorm, so the filter scale is irrelevant:
    imgclf's FastNet) each bank is first rescaled to norm sqrt(out) and takes no weight decay,
    as in airbench94_muon; otherwise the step is scaled by sqrt(max(1, out/in)) and decay is
    decoupled. Written here because torch.optim.Muon takes 2-D weights only and has no
    normalised variant; measured on FastNet/CIFAR-10 it is worth ~20% fewer epochs.
    """

    def __init__(self, groups: list[dict], *, momentum: float, nesterov: bool, muon_momentum: float,
                 normalize: bool, ns_steps: int = 3):
        defaults = dict(momentum=momentum, nesterov=nesterov, muon=False, weight_decay=0.0)
        super().__init__(groups, defaults)
        self.muon_momentum, self.normalize, self.ns_steps = muon_momentum, normalize, ns_steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if g["muon"]:
                    self._muon_step(p, g)
                else:
                    self._sgd_step(p, g)
        return loss

    def _muon_step(self, p: torch.Tensor, g: dict) -> None:
        mu = self.muon_momentum
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        buf.mul_(mu).add_(p.grad)
        d = p.grad.add(buf, alpha=mu) if g["nesterov"] else buf
        update = orthogonalize(d.reshape(len(d), -1), self.ns_steps).reshape(d.shape).to(p.dtype)
        if self.normalize:
            p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
            p.add_(update, alpha=-g["lr"])
        else:
            if g["weight_decay"]:
                p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(update, alpha=-g["lr"] * max(1.0, p.shape[0] / p[0].numel()) ** 0.5)

    def _sgd_step(self, p: torch.Tensor, g: dict) -> None:
        d = p.grad if not g["weight_decay"] else p.grad.add(p, alpha=g["weight_decay"])
        if g["momentum"]:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = d.clone()
            else:
                buf.mul_(g["momentum"]).add_(d)
            d = d.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
        p.add_(d, alpha=-g["lr"])


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Keras' kernel_regularizer=l2(c) is c * sum(w**2) over conv and dense kernels."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad]
    return torch.stack([w.float().pow(2).sum() for w in ws]).sum()
