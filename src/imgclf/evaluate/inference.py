"""Batched inference shared by validation, evaluate, predict, the report and the server."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imgclf.data.augment import Normalize, tta_views


@torch.no_grad()
def forward_tta(model: nn.Module, x: torch.Tensor, precision, device: torch.device, tta_level: int = 0) -> torch.Tensor:
    """Logits of a normalised NCHW batch, averaged over the test-time views."""
    out = None
    for view, w in tta_views(x, tta_level):
        with precision.autocast(device):
            y = model(view.contiguous(memory_format=torch.channels_last)).float()
        out = y * w if out is None else out + y * w
    return out


@torch.no_grad()
def logits_for_loader(model, loader, normalize: Normalize, precision, device, tta_level: int = 0):
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in loader.epoch(0):
        outs.append(forward_tta(model, normalize(x), precision, device, tta_level).cpu())
        labels.append(y.cpu())
    model.train(was_training)
    if not outs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


@torch.no_grad()
def logits_for_array(model, images: np.ndarray, normalize: Normalize, precision, device, *, batch_size: int = 256,
                     tta_level: int = 0) -> torch.Tensor:
    """Logits for uint8 NHWC images (a numpy array or memory map)."""
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i : i + batch_size])).to(device)
        outs.append(forward_tta(model, normalize(x), precision, device, tta_level).cpu())
    return torch.cat(outs) if outs else torch.zeros(0)
