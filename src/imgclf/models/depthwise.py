"""Depthwise convolutions with a fast CPU backward pass.

PyTorch's CPU backward for depthwise convolutions (groups == channels, as in EfficientNet,
MobileNet, ConvNeXt) is many times slower than its forward: oneDNN runs the forward, but the
backward loops over channels. Measured on the 2-core dev machine, EfficientNet-Lite0 at 96 px,
batch 64, bf16: the 16 depthwise layers took ~485 ms of a ~660 ms training step, one stride-2
5x5 layer alone 141 ms, while the whole forward pass of all 49 convolutions took 22 ms.

The backward here uses only fast kernels, which is why it is written by hand:
- grad_input is the forward depthwise convolution of the (stride-dilated) output gradient
  with the flipped kernel;
- grad_weight is k*k strided products of input and output gradient, each summed per channel
  (memory stays one output-sized temporary, whatever the kernel size).

``enable_fast_depthwise(model)`` switches every eligible layer of a model (the class is swapped,
the parameters and state-dict keys stay as they are). The fast path runs only when it helps:
CPU tensors in bf16 (autocast), grad enabled, module in training mode; otherwise the layer is
PyTorch's own. Lite0 full fine-tuning at 96 px, bf16: 83 -> 173 images/s
(``benchmarks/transfer_cpu.py --measure 96``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        (sh, sw), (ph, pw) = ctx.stride, ctx.padding
        n, c, h, wd = x.shape
        kh, kw = w.shape[-2:]
        ho, wo = go.shape[-2:]
        go = go.to(x.dtype)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        gx = gw = gb = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                g = go
                if sh > 1 or sw > 1:  # put the gradient back on the input grid, zeros between
                    # allocated in its final layout: zeros().contiguous(channels_last) costs a copy
                    g = torch.empty((n, c, (ho - 1) * sh + 1, (wo - 1) * sw + 1), dtype=go.dtype,
                                    device=go.device, memory_format=fmt).zero_()
                    g[:, :, ::sh, ::sw] = go
                full = F.conv2d(g, w.flip(-2, -1), None, 1, (kh - 1, kw - 1), 1, c)
                # `full` covers padded-input rows 0 .. (ho-1)*sh+kh-1; drop the padding, and
                # zero-fill rows the strided window never reached
                lh, lw = full.shape[-2:]
                gx = F.pad(full, (-pw, wd + pw - lw, -ph, h + ph - lh))
            if ctx.needs_input_grad[1]:
                # channels-last views (N, H, W, C): each tap's product lands in one reused dense
                # buffer and is reduced over rows, a fast contiguous reduction per channel
                xp = (F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x).permute(0, 2, 3, 1)
                g2 = go.permute(0, 2, 3, 1)
                buf = torch.empty(g2.shape, dtype=torch.float32, device=x.device)
                gw = torch.empty((c, kh, kw), dtype=torch.float32, device=x.device)
                for i in range(kh):
                    for j in range(kw):
                        torch.mul(xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw], g2, out=buf)
                        gw[:, i, j] = buf.view(-1, c).sum(0)
                gw = gw.view(c, 1, kh, kw).to(w.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = go.sum((0, 2, 3), dtype=torch.float32).to(w.dtype)
        return gx, gw, gb, None, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=channels)`` with the fast backward."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # the cast autocast would do inside F.conv2d, done here
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        return _DepthwiseConv2d.apply(x, weight, bias, tuple(stride), tuple(padding))


def _use_fast(m: nn.Conv2d, x: torch.Tensor) -> bool:
    if not (m.training and x.device.type == "cpu" and torch.is_grad_enabled()
            and (x.requires_grad or m.weight.requires_grad)):
        return False
    # bf16 only: oneDNN's fp32 depthwise forward (which this backward is built from) is itself
    # slow in channels-last, so in fp32 PyTorch's own backward wins (transfer_cpu --measure 96:
    # fp32 123 native vs 98 images/s here; bf16 83 native vs 173 here)
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dt == torch.bfloat16


class FastDepthwiseConv2d(nn.Conv2d):
    def forward(self, x):
        if not _use_fast(self, x):
            return super().forward(x)
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding)


def _same_pad(x: torch.Tensor, k, s) -> torch.Tensor:
    # TensorFlow 'SAME' padding (timm's Conv2dSame): asymmetric, extra on the bottom/right
    def amount(size, k, s):
        return max((-(size // -s) - 1) * s + k - size, 0)

    ph, pw = amount(x.shape[-2], k[0], s[0]), amount(x.shape[-1], k[1], s[1])
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _eligible(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros" and not isinstance(m.padding, str))


_SAME_CLASSES: dict[type, type] = {}


def _fast_same_class(base: type) -> type:
    """A subclass of timm's Conv2dSame (padding computed per input) with the fast path."""
    if base not in _SAME_CLASSES:
        def forward(self, x):
            if not _use_fast(self, x):
                return base.forward(self, x)
            return depthwise_conv2d(_same_pad(x, self.kernel_size, self.stride), self.weight, self.bias,
                                    self.stride, (0, 0))

        _SAME_CLASSES[base] = type(f"FastDepthwise{base.__name__}", (base,), {"forward": forward})
    return _SAME_CLASSES[base]


def enable_fast_depthwise(model: nn.Module) -> int:
    """Switch the depthwise layers of ``model`` to the fast CPU backward; returns how many."""
    n = 0
    for m in model.modules():
        if not _eligible(m) or type(m).__name__.startswith("FastDepthwise"):
            continue
        if type(m) is nn.Conv2d:
            m.__class__ = FastDepthwiseConv2d
        elif type(m).__name__ == "Conv2dSame":  # timm's, used by TF-ported weights
            m.__class__ = _fast_same_class(type(m))
        else:
            continue  # an unknown subclass may have its own forward: leave it alone
        n += 1
    return n
