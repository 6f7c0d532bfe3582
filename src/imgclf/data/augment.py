"""Augmentation and normalisation as batched tensor operations on the training device.

No per-image Python and no worker processes: a batch of uint8 NHWC images goes in, a normalised
float NCHW (channels_last) batch comes out. Random parameters are drawn from a seeded CPU
generator so a run (and a resumed run) is reproducible on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentSpec:
    flip: bool = True
    translate: int = 0  # pixels, reflect padding then random crop
    rotate: float = 0.0  # max degrees
    zoom: float = 0.0  # max fraction
    shift: float = 0.0  # max fraction of the size
    cutout: int = 0  # side in pixels
    mixup: float = 0.0  # alpha
    cutmix: float = 0.0  # alpha

    @property
    def needs_affine(self) -> bool:
        return self.rotate > 0 or self.zoom > 0 or self.shift > 0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class Normalize:
    """uint8 NHWC -> float NCHW (channels_last), (x/255 - mean) / std folded into one multiply-add."""

    def __init__(self, mean, std, device):
        std_t = torch.tensor(std, dtype=torch.float32, device=device) * 255.0
        self.scale = (1.0 / std_t).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device) * 255.0 / std_t).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # permute of an NHWC tensor is already channels_last in memory: no copy.
        x = x.permute(0, 3, 1, 2).float()
        return torch.addcmul(self.shift, x, self.scale)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = i.abs()
    return torch.where(i >= n, 2 * n - 2 - i, i)


def _crop_translate(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor, size: int = 0) -> torch.Tensor:
    """Per-sample crops of a reflect-padded NHWC batch as one gather (the padding is never built);
    ``size`` > 0 takes ``size`` x ``size`` windows instead of the input's own size."""
    n, h, w, _ = x.shape
    oh, ow = (size, size) if size else (h, w)
    iy = _reflect(oy.view(n, 1) - pad + torch.arange(oh, device=x.device), h).view(n, oh, 1)
    ix = _reflect(ox.view(n, 1) - pad + torch.arange(ow, device=x.device), w).view(n, 1, ow)
    return x[torch.arange(n, device=x.device).view(n, 1, 1), iy, ix]


class BatchAugment:
    """Train-time augmentation of uint8 NHWC batches; returns normalised inputs and targets."""

    def __init__(self, spec: AugmentSpec, normalize: Normalize, num_classes: int, multilabel: bool = False):
        self.spec, self.normalize, self.num_classes, self.multilabel = spec, normalize, num_classes, multilabel

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, flip_parity: int | None = None,
                 indices: torch.Tensor | None = None, crop: int = 0):
        """``crop``: a random ``crop`` x ``crop`` window of each (translated) image, at the same
        scale (the trainer's early-crop phase)."""
        s, n, dev = self.spec, x.shape[0], x.device
        crop = crop if 0 < crop < min(x.shape[1], x.shape[2]) else 0
        oy = ox = torch.zeros(n, dtype=torch.long, device=dev)
        if s.translate > 0:
            oy = torch.randint(0, 2 * s.translate + 1, (n,), generator=g, device=g.device).to(dev)
            ox = torch.randint(0, 2 * s.translate + 1, (n,), generator=g, device=g.device).to(dev)
        if crop:  # the window's offset in the translated image: still one gather for both
            oy = oy + torch.randint(0, x.shape[1] - crop + 1, (n,), generator=g, device=g.device).to(dev)
            ox = ox + torch.randint(0, x.shape[2] - crop + 1, (n,), generator=g, device=g.device).to(dev)
        if s.translate > 0 or crop:
            x = _crop_translate(x, s.translate, oy, ox, crop)
        if s.flip:
            if flip_parity is None or indices is None:
                mask = torch.rand(n, generator=g, device=g.device) < 0.5
            else:
                # Alternating flip (airbench): each image is flipped in every other epoch, so two
                # consecutive epochs see both views instead of a random 50% repeat. The starting
                # side per image comes from a multiplicative hash of its index.
                mask = ((indices.long() * 2654435761 >> 16) + flip_parity) % 2 == 0
            mask = mask.to(dev).view(n, 1, 1, 1)
            x = torch.where(mask, x.flip(2), x)
        xf = self.normalize(x)
        if s.needs_affine:
            xf = self._affine(xf, g)
        if s.cutout > 0:
            xf = self._cutout(xf, g)
        target: torch.Tensor = y
        if s.mixes:
            xf, target = self._mix(xf, y, g)
        return xf, target

    def _affine(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        s, n = self.spec, x.shape[0]
        d = g.device
        ang = (torch.rand(n, generator=g, device=d) * 2 - 1) * math.radians(s.rotate)
        scale = 1.0 + (torch.rand(n, generator=g, device=d) * 2 - 1) * s.zoom
        t = (torch.rand(n, 2, generator=g, device=d) * 2 - 1) * s.shift * 2  # grid coordinates span 2
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        # reflection padding: black corners would be a cue the test images never show
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last)

    def _cutout(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        size = self.spec.cutout
        cy = torch.randint(0, h, (n,), generator=g, device=g.device).to(x.device).view(n, 1, 1)
        cx = torch.randint(0, w, (n,), generator=g, device=g.device).to(x.device).view(n, 1, 1)
        yy = torch.arange(h, device=x.device).view(1, h, 1)
        xx = torch.arange(w, device=x.device).view(1, 1, w)
        y0, x0 = cy - size // 2, cx - size // 2  # a size x size square centred on (cy, cx), cut at the edges
        inside = (yy >= y0) & (yy < y0 + size) & (xx >= x0) & (xx < x0 + size)
        return x.masked_fill(inside.unsqueeze(1), 0.0)  # 0 is the mean after normalisation

    def _mix(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        s, n = self.spec, x.shape[0]
        onehot = y.float() if self.multilabel else F.one_hot(y, self.num_classes).float()
        perm = torch.randperm(n, generator=g, device=g.device).to(x.device)
        # the scalar draws below sync with the host: only when mixing is on
        use_cutmix = s.cutmix > 0 and (s.mixup == 0 or torch.rand(1, generator=g, device=g.device).item() < 0.5)
        alpha = s.cutmix if use_cutmix else s.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample().item()) if alpha > 0 else 1.0
        if use_cutmix:
            _, _, h, w = x.shape
            rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy = int(torch.randint(0, h, (1,), generator=g, device=g.device).item())
            cx = int(torch.randint(0, w, (1,), generator=g, device=g.device).item())
            y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
            x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = x * lam + x[perm] * (1 - lam)
        return x, onehot * lam + onehot[perm] * (1 - lam)


def tta_views(x: torch.Tensor, level: int, flip: bool = True) -> list[tuple[torch.Tensor, float]]:
    """Test-time views of a normalised NCHW batch with their weights.

    level 1: identity + mirror; level 2 adds 1-px translations (both mirrored), the airbench
    scheme that is worth a few tenths of a point on small images. ``flip=False`` (a model
    trained without flips: digits, text, arrows, where a mirror image may be another class)
    leaves the mirrored views out.
    """
    mirrors = (lambda v: [v, v.flip(3)]) if flip else (lambda v: [v])
    views = [(v, 1.0 / len(mirrors(x))) for v in mirrors(x)] if level >= 1 else [(x, 1.0)]
    if level >= 2:
        views = [(v, w * 0.5) for v, w in views]
        h, w = x.shape[2:]
        xp = F.pad(x, (1,) * 4, mode="reflect")
        for v in (xp[:, :, 0:h, 0:w], xp[:, :, 2 : h + 2, 2 : w + 2]):
            views += [(m, 0.25 / len(mirrors(v))) for m in mirrors(v)]
    return views
