"""Batched inference shared by validation, evaluate, predict, the report and the server."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imgclf.data.augment import Normalize, tta_views


@torch.no_grad()
def forward_tta(model: nn.Module, x: torch.Tensor, precision, device: torch.device, tta_level: int = 0,
                tta_flip: bool = True) -> torch.Tensor:
    """Logits of a normalised NCHW batch, averaged over the test-time views."""
    out = None
    for view, w in tta_views(x, tta_level, tta_flip):
        with precision.autocast(device):
            y = model(view.contiguous(memory_format=torch.channels_last)).float()
        out = y * w if out is None else out + y * w
    return out


@torch.no_grad()
def logits_for_loader(model, loader, normalize: Normalize, precision, device, tta_level: int = 0,
                      tta_flip: bool = True):
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in loader.epoch(0):
        outs.append(forward_tta(model, normalize(x), precision, device, tta_level, tta_flip).cpu())
        labels.append(y.cpu())
    model.train(was_training)
    if not outs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


# uint8 bytes read per inference batch: bounds memory by the batch, not by the image size
# (256 images of 256 px as float32 plus a net's activations would take gigabytes).
_BATCH_BYTES = 12 << 20


# On a CPU, a forward pass is fastest per image when a batch's activations stay in the caches:
# about half a million input pixels per batch. Measured (2 cores, bf16, ms/image; the rule's
# pick in brackets): EfficientNet-Lite0 at 96 px 1.15 / 0.84 / [0.71] / 0.66-1.08 / 1.6-4.3 at
# batch 8 / 16 / 32 / 64 / 256; at 224 px 4.0 / [3.7] / 5.9 / 18 at 4 / 8 / 16 / 256; ResNet-50
# at 128 px 5.3 / [4.6] / 6-10.6 at 16 / 32 / 64; FastNet at 32 px flat 0.33-0.45 up to
# [256], 0.46-0.57 at 512. GPUs want large batches, so they keep the byte bound only.
_CPU_BATCH_PIXELS = 1 << 19


def auto_batch_size(shape: tuple[int, ...], cap: int = 256, device: torch.device | str | None = None) -> int:
    """Images per inference batch for uint8 images of ``shape`` ([H, W, C]) on ``device``."""
    bs = min(cap, _BATCH_BYTES // max(1, int(np.prod(shape))))
    if device is None or torch.device(device).type == "cpu":
        pixels = max(1, int(shape[0]) * int(shape[1]))
        bs = min(bs, 2 ** int(np.floor(np.log2(max(1, _CPU_BATCH_PIXELS // pixels)))))
    return max(1, bs)


@torch.no_grad()
def logits_for_array(model, images: np.ndarray, normalize: Normalize, precision, device, *,
                     batch_size: int | None = None, tta_level: int = 0, rows: np.ndarray | None = None,
                     tta_flip: bool = True) -> torch.Tensor:
    """Logits for uint8 NHWC images (a numpy array or memory map), of ``images[rows]`` if given.

    A memory map is read a batch at a time and its pages released as it goes, so a pass over
    a cache larger than RAM keeps the resident set at about one batch.
    """
    from imgclf.data.cache import release_pages

    model.eval()
    bs = batch_size or auto_batch_size(images.shape[1:], device=device)
    n = len(images) if rows is None else len(rows)
    outs = []
    for i in range(0, n, bs):
        x = np.array(images[i : i + bs] if rows is None else images[rows[i : i + bs]])
        release_pages(images)
        x = torch.from_numpy(x).to(device)
        outs.append(forward_tta(model, normalize(x), precision, device, tta_level, tta_flip).cpu())
    return torch.cat(outs) if outs else torch.zeros(0)
