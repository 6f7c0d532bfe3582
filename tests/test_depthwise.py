"""The hand-written depthwise backward must give PyTorch's gradients, for every padding and
stride EfficientNet/MobileNet use, and switching a real timm network must change nothing but
speed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from imgclf.engine.cpu_alloc import tune_cpu_allocator
from imgclf.models.depthwise import FastDepthwiseConv2d, depthwise_conv2d, enable_fast_depthwise


def _layer(kind: str, c: int, k: int, s: int) -> nn.Module:
    if kind == "same":  # timm's TF 'SAME' padding: asymmetric, computed per input size
        from timm.layers import create_conv2d

        return create_conv2d(c, c, k, stride=s, depthwise=True, padding="same")
    return nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=True)


def _run(fn, x: torch.Tensor, params: list[torch.Tensor], bf16: bool):
    xi = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = fn(xi)
    # a non-uniform upstream gradient, so every tap and position is weighted differently
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.float().detach(), xi.grad.float()] + [p.grad.float() for p in params]


def _close(a, b, tol, what):
    for name, u, v in zip(("output", "grad_input", "grad_weight", "grad_bias"), a, b):
        assert u.shape == v.shape, name
        err = ((u - v).abs().max() / u.abs().max()).item()
        assert err < tol, f"{what}: {name} relative error {err:.2e}"


CASES = [("sym", 8, 3, 1, 9), ("sym", 8, 3, 2, 9), ("sym", 8, 3, 2, 10), ("sym", 16, 5, 1, 7),
         ("same", 16, 5, 2, 9), ("same", 16, 5, 2, 12), ("same", 16, 3, 2, 13), ("same", 16, 5, 1, 6)]


@pytest.mark.parametrize("kind,c,k,s,hw", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_fast_depthwise_gradients_match_pytorch(kind, c, k, s, hw, layout):
    torch.manual_seed(0)
    ref = _layer(kind, c, k, s).train()
    x = torch.randn(3, c, hw, hw)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = [p for p in (ref.weight, ref.bias) if p is not None]
    want = _run(ref, x, params, bf16=False)
    # the op itself in fp32: the same math as PyTorch's to rounding
    if kind == "same":
        from imgclf.models.depthwise import _same_pad

        got = _run(lambda t: depthwise_conv2d(_same_pad(t, ref.kernel_size, ref.stride), ref.weight, ref.bias,
                                              ref.stride, (0, 0)), x, params, bf16=False)
    else:
        got = _run(lambda t: depthwise_conv2d(t, ref.weight, ref.bias, ref.stride, ref.padding), x, params, bf16=False)
    _close(want, got, 1e-5, "fp32 op")
    # the switched layer under bf16 autocast, where it takes the fast path
    fast = copy.deepcopy(ref)
    assert enable_fast_depthwise(fast) == 1
    fparams = [p for p in (fast.weight, fast.bias) if p is not None]
    _close(_run(ref, x, params, bf16=True), _run(fast, x, fparams, bf16=True), 2e-2, "bf16 layer")


def test_switching_a_timm_efficientnet_keeps_weights_and_gradients():
    import timm
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
    used = []
    fast.blocks[1][0].conv_dw.register_forward_hook(lambda m, i, o: used.append(type(o.grad_fn).__name__))
    for m in (ref, fast):
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
    assert used and "DepthwiseConv2d" in used[0]  # the hand-written backward really ran
    # relative to the largest gradient of the network: the biases of BatchNorms that feed another
    # BatchNorm have a true gradient of 0, so their own scale is rounding noise
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    checked = 0
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is None:
            continue
        err = (p.grad - q.grad).abs().max().item() / scale
        assert err < 2e-2, f"{name}: gradient error {err:.2e} of the largest gradient (bf16)"
        checked += "conv_dw" in name
    assert checked == 16


def test_fast_path_only_runs_when_it_is_needed():
    layer = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    enable_fast_depthwise(layer)
    assert type(layer) is FastDepthwiseConv2d
    x = torch.randn(1, 4, 5, 5, requires_grad=True)

    def kind(bf16=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        return "fast" if y.grad_fn is not None and "DepthwiseConv2d" in type(y.grad_fn).__name__ else "pytorch"

    assert kind() == "fast"
    assert kind(bf16=False) == "pytorch"  # fp32: PyTorch's backward is the faster one
    with torch.no_grad():
        assert kind() == "pytorch"
    layer.eval()
    assert kind() == "pytorch"  # eval and export: PyTorch's own convolution
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
