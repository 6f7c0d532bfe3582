"""The hand-written depthwise backward must give PyTorch's gradients, for every padding and
stride EfficientNet/MobileNet use, and switching a real timm network must change nothing but
speed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imgclf.engine.cpu_alloc import tune_cpu_allocator
from imgclf.models.depthwise import FastDepthwiseConv2d, enable_fast_depthwise


def _grads(layer: nn.Module, x: torch.Tensor, bf16: bool):
    layer.train()
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(xi)
    # a non-uniform upstream gradient, so every tap and position is weighted differently
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * w).sum().backward()
    return y.float().detach(), xi.grad.float(), layer.weight.grad.float(), \
        None if layer.bias is None else layer.bias.grad.float()


def _layer(kind: str, c: int, k: int, s: int) -> nn.Module:
    if kind == "same":  # timm's TF 'SAME' padding: asymmetric, computed per input size
        from timm.layers import create_conv2d

        return create_conv2d(c, c, k, stride=s, depthwise=True, padding="same")
    return nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=True)


CASES = [("sym", 8, 3, 1, 9), ("sym", 8, 3, 2, 9), ("sym", 8, 3, 2, 10), ("sym", 16, 5, 1, 7),
         ("same", 16, 5, 2, 9), ("same", 16, 5, 2, 12), ("same", 16, 3, 2, 13), ("same", 16, 5, 1, 6)]


@pytest.mark.parametrize("kind,c,k,s,hw", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_fast_depthwise_gradients_match_pytorch(kind, c, k, s, hw, layout):
    torch.manual_seed(0)
    ref = _layer(kind, c, k, s)
    fast = copy.deepcopy(ref)
    assert enable_fast_depthwise(fast) == 1
    x = torch.randn(3, c, hw, hw)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for bf16, tol in ((False, 1e-5), (True, 2e-2)):
        ref.zero_grad()
        fast.zero_grad()
        a, b = _grads(ref, x, bf16), _grads(fast, x, bf16)
        for name, u, v in zip(("output", "grad_input", "grad_weight", "grad_bias"), a, b):
            if u is None:
                assert v is None
                continue
            assert u.shape == v.shape, name
            err = ((u - v).abs().max() / u.abs().max()).item()
            assert err < tol, f"{name} ({'bf16' if bf16 else 'fp32'}): relative error {err:.2e}"


def test_switching_a_timm_efficientnet_keeps_weights_and_gradients():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("efficientnet_lite0", num_classes=10, pad_type="same").to(memory_format=torch.channels_last)
    fast = copy.deepcopy(ref)
    n = enable_fast_depthwise(fast)
    assert n == 16  # every depthwise layer of Lite0, and nothing else
    assert enable_fast_depthwise(fast) == 0  # idempotent
    assert list(ref.state_dict()) == list(fast.state_dict())
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ref.eval(), fast.eval()
    with torch.no_grad():  # inference takes PyTorch's own path: bit-identical
        assert torch.equal(ref(x), fast(x))
    ref.train(), fast.train()
    y = torch.tensor([0, 1, 2, 3])
    for m in (ref, fast):
        torch.manual_seed(1)  # the same dropout masks
        torch.nn.functional.cross_entropy(m(x), y).backward()
    # relative to the largest gradient of the network: the biases of BatchNorms that feed another
    # BatchNorm have a true gradient of 0, so their own scale is rounding noise
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    checked = 0
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is None:
            continue
        err = (p.grad - q.grad).abs().max().item() / scale
        assert err < 1e-5, f"{name}: gradient error {err:.2e} of the largest gradient"
        checked += "conv_dw" in name
    assert checked == 16


def test_fast_path_only_runs_when_it_is_needed():
    layer = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    enable_fast_depthwise(layer)
    assert type(layer) is FastDepthwiseConv2d
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.eval()
    y = layer(x.requires_grad_(True))
    assert "DepthwiseConv2d" not in type(y.grad_fn).__name__  # eval: PyTorch's own convolution
    layer.train()
    y = layer(x)
    assert "DepthwiseConv2d" in type(y.grad_fn).__name__
    # grouped but not depthwise, dilated or string-padded convolutions are left alone
    others = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(4, 4, 3, dilation=2, groups=4),
                           nn.Conv2d(4, 4, 3, padding="same", groups=4), nn.Conv2d(4, 4, 3))
    assert enable_fast_depthwise(others) == 0


def test_allocator_tuning_is_idempotent_on_linux():
    import sys

    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert first
