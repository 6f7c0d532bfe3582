"""Inference batch size: CPU batches sized to the caches, GPU batches large."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from imgclf.data.augment import Normalize
from imgclf.engine.trainer import resolve_precision
from imgclf.evaluate.inference import auto_batch_size, logits_for_array
from imgclf.models.registry import build_model


@pytest.mark.parametrize("side,cpu,cuda", [(32, 256, 256), (96, 32, 256), (128, 32, 256), (224, 8, 83), (1024, 1, 4)])
def test_batch_follows_the_device(side, cpu, cuda):
    shape = (side, side, 3)
    assert auto_batch_size(shape, device="cpu") == cpu
    assert auto_batch_size(shape, device=torch.device("cuda")) == cuda  # only the rule: no GPU needed
    assert auto_batch_size(shape) == cpu  # no device given: the CPU rule, the safe one


def _seconds(model, images, bs, prec) -> float:
    norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        out = logits_for_array(model, images, norm, prec, torch.device("cpu"), batch_size=bs)
        best = min(best, time.perf_counter() - t0)
    assert out.shape == (len(images), 10)
    return best


def test_cpu_batch_is_faster_than_a_large_one():
    # EfficientNet-Lite0 at 128 px: 256 images in cache-sized batches vs one batch of 256
    torch.manual_seed(0)
    model = build_model("timm:efficientnet_lite0", 10, 128, {"small_stem": False}).to(memory_format=torch.channels_last)
    images = np.random.default_rng(0).integers(0, 256, (256, 128, 128, 3), dtype=np.uint8)
    prec = resolve_precision("auto", torch.device("cpu"))
    auto = auto_batch_size(images.shape[1:], device="cpu")
    _seconds(model, images[:64], auto, prec)  # kernels set up for both shapes first
    _seconds(model, images[:64], 64, prec)
    t_auto, t_big = _seconds(model, images, auto, prec), _seconds(model, images, 256, prec)
    # measured ~2x apart on a 2-core CPU; equal results either way
    assert t_auto < t_big, (t_auto, t_big)
