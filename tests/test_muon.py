"""Muon (engine/optim.Muon): orthogonalised steps for conv filters, Nesterov SGD for the rest."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

import imgclf
from imgclf.config import TrainConfig
from imgclf.engine import recipe
from imgclf.engine.optim import Muon, build_optimizer, orthogonalize
from imgclf.models.nets import FastNet, PlainCNN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 576), (256, 64), (10, 10)])
def test_orthogonalize_flattens_the_spectrum(shape, dtype):
    g = torch.Generator().manual_seed(0)
    # a badly conditioned matrix: singular values spread over 4 decades
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    s = torch.logspace(0, -4, k)
    m = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    out = orthogonalize(m, steps=5, dtype=dtype)
    assert out.dtype == dtype
    sv = torch.linalg.svdvals(out.float())
    # the quintic iteration maps every singular value above ~1e-3 of the largest into ~(0.5, 1.5)
    big = s > 3e-3
    assert sv[big].min() > 0.4 and sv.max() < 1.6
    # the directions are kept: the result lines up with m's own U V^T
    uv = u[:, :k][:, big] @ v[:, :k][:, big].T
    assert (out.float() * uv).sum() / big.sum() > 0.6


@pytest.mark.parametrize("amx, avx512_bf16, expect", [(False, False, torch.float32), (False, True, torch.bfloat16),
                                                      (True, False, torch.bfloat16)])
def test_newton_schulz_runs_in_fp32_where_bf16_is_emulated(monkeypatch, tmp_path, amx, avx512_bf16, expect):
    """On an AVX2-only CPU, emulated bf16 matmuls made Muon's step 30x slower than fp32 (2.7 s vs
    0.085 s for FastNet's filters on a 2-core Zen 3): the iteration's dtype follows the hardware,
    and autocast's choice follows the same test (AVX512-BF16 alone: a probe where bf16 is faster)."""
    from imgclf.engine import cpu_bf16, optim

    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_bf16, "_ANSWER", {})
    monkeypatch.setattr(cpu_bf16, "timings", lambda: (0.5, 1.0))
    from imgclf.engine.trainer import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(optim, "_NS_DTYPE", {})
    cpu = torch.device("cpu")
    assert optim.ns_dtype(cpu) == expect
    assert resolve_precision("auto", cpu).dtype == (None if expect == torch.float32 else torch.bfloat16)
    assert orthogonalize(torch.randn(8, 16)).dtype == expect


def _resolved(arch: str, **kw) -> TrainConfig:
    cfg = TrainConfig(data="x", **kw)
    return recipe.resolve(cfg, n_train=50_000, image_size=32, arch=arch)


def test_fastnet_recipe_uses_muon_on_its_convs_only():
    cfg = _resolved("fastnet")
    assert (cfg.optimizer, cfg.muon_lr, cfg.muon_momentum, cfg.momentum) == ("muon", 0.24, 0.6, 0.85)
    torch.manual_seed(0)
    net = FastNet(10)
    opt = build_optimizer(net, cfg)
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m is not net.whiten]
    assert muon == {id(m.weight) for m in convs} and len(convs) == 6
    assert all(g["lr"] == 0.24 and g["weight_decay"] == 0 for g in opt.param_groups if g["muon"])
    # the head, BN shifts and the stem bias keep airbench's SGD settings (BN shifts: 64x lr)
    rest = sorted(g["lr"] for g in opt.param_groups if not g["muon"])
    assert rest == pytest.approx([1.5, 96.0])
    # other architectures keep their own optimizers unless asked
    assert _resolved("timm:resnet18").optimizer == "adamw"
    assert _resolved("timm:resnet18", optimizer="muon").muon_lr == 0.02


def test_muon_step_normalises_filters_and_the_rest_is_exactly_sgd():
    torch.manual_seed(0)
    net = PlainCNN(10, channels=(8, 16), dense=(32,))
    ref = copy.deepcopy(net)
    cfg = _resolved("plaincnn", optimizer="muon", lr=0.05, weight_decay=1e-3, momentum=0.9)
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, Muon) and opt.normalize
    filt = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    ref_params = [p for (n, p), q in zip(ref.named_parameters(), net.parameters()) if id(q) not in filt]
    # torch's SGD with the same groups on the non-filter parameters
    sgd = torch.optim.SGD([
        dict(params=[p for p in ref_params if p.ndim > 1], weight_decay=1e-3),
        dict(params=[p for p in ref_params if p.ndim <= 1], weight_decay=0.0),
    ], lr=0.05, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients for both (backprop would differ once the filters do)
        grads = [torch.randn(p.shape, generator=g) for p in net.parameters()]
        for model, o in ((net, opt), (ref, sgd)):
            for p, gr in zip(model.parameters(), grads):
                p.grad = gr.clone()
            o.step()
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        if id(p) in filt:
            # renormalised to norm sqrt(out channels) before each step, then one step of size lr
            assert p.norm().item() == pytest.approx(len(p) ** 0.5, rel=0.15), n
        else:
            assert torch.allclose(p, q, atol=1e-6), n


def test_default_fastnet_run_records_muon_and_learns(small_sample, tmp_path):
    # resume and determinism with the default optimizer are covered by test_core's resume tests
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), epochs=4, progress=False, tensorboard=False,
                       seed=3)
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert (cfg["optimizer"], cfg["muon_lr"], cfg["muon_momentum"]) == ("muon", 0.24, 0.6)
    # 400 training images of 10 classes: far above the 10% of chance after 4 short epochs
    assert res.history[-1]["train_acc"] > 0.35 and res.test["top1"] > 0.25


def test_without_batchnorm_filters_keep_their_scale_and_take_bounded_steps():
    torch.manual_seed(0)
    net = PlainCNN(10, channels=(32, 16), dense=(), batchnorm=False)  # 3->32 is a tall 32x27 bank
    cfg = _resolved("plaincnn", optimizer="muon", weight_decay=0.1)
    opt = build_optimizer(net, cfg)
    assert not opt.normalize and cfg.muon_lr == 0.24
    w0 = net.features[0].weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    step = (net.features[0].weight.detach() - w0 * (1 - 0.24 * 0.1)).reshape(32, -1)
    # one orthogonalised step: its singular values are lr * sqrt(32/27) times ~(0.5, 1.5)
    sv = torch.linalg.svdvals(step) / (0.24 * (32 / 27) ** 0.5)
    assert 0.3 < sv.min() and sv.max() < 1.6
