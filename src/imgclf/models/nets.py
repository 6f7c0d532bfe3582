"""imgclf's own networks: a fast net for small images and a configurable plain CNN."""

from __future__ import annotations

import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# FastNet: the airbench94 architecture (Keller Jordan), generalised to any input size.


class _BN(nn.BatchNorm2d):
    # Frozen scale, trainable shift: the scale is redundant before GELU+conv and freezing it
    # removes a source of instability at airbench's high learning rates.
    # eps 1e-3, not airbench's 1e-12: on a channel of ~zero batch variance BatchNorm's backward
    # multiplies the gradient by 1/sqrt(eps), per layer. Flat-colour images (blank scans, masks)
    # make such channels: their 2x2 patches span 3 of the stem's 12 whitening directions, so 18
    # of its 24 channels carry only the stem bias, and the Dirac-initialised convs copy those
    # constants through every group. At 1e-12 (1e6 per layer) a bf16 step gave the SGD-trained
    # stem bias and norm shifts gradients of ~1e28 and the next step overflowed to nan. On the
    # CIFAR-10 sample every channel's batch variance was above 0.3 (end of a 4-epoch run), where
    # 1e-3 changes an output by under 0.2%.
    def __init__(self, c: int, momentum: float):
        super().__init__(c, eps=1e-3, momentum=1 - momentum)
        self.weight.requires_grad = False


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        # Dirac init of the first cin filters: the block starts close to an identity map.
        torch.nn.init.dirac_(w[: w.size(1)])


class _Group(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__()
        self.conv1, self.pool = _Conv(cin, cout), nn.MaxPool2d(2)
        self.norm1, self.conv2, self.norm2 = _BN(cout, bn_momentum), _Conv(cout, cout), _BN(cout, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


def fastnet_stem_stride(image_size: int) -> int:
    """Patchify large inputs so the first group sees about 32-64 px: cost stays near CIFAR's."""
    return int(min(8, 2 ** max(0, math.floor(math.log2(max(image_size, 32) / 32)))))


class FastNet(nn.Module):
    """Whitening stem + three conv groups (64/256/256 at width 1) + global max pool + linear.

    ``init_from_data`` sets the stem to a PCA whitening of image patches (frozen weights),
    which is what lets this small net learn CIFAR-10 in a few epochs.
    """

    muon_normalize = True  # every trained conv feeds a BatchNorm: the filter scale is free (engine/optim.Muon)

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        widths: tuple[int, ...] = (64, 256, 256),
        width: float = 1.0,
        bn_momentum: float = 0.6,
        scale: float = 1 / 9,
        stem_stride: int | None = None,
        whiten_eps: float = 1e-2,
    ):
        super().__init__()
        # airbench uses 5e-4. On JPEG-compressed images the smallest patch eigenvalues (~1e-4:
        # chroma detail that 4:2:0 subsampling removed) are mostly compression noise, which a
        # small eps amplifies ~45x. Measured on a 10k CIFAR-10 JPEG subset, 10 epochs:
        # eps 5e-4 79.9% / 1e-2 80.9% / 5e-2 81.0% / 2e-1 80.4% (no TTA, one seed each).
        self.whiten_eps = whiten_eps
        s = stem_stride or fastnet_stem_stride(image_size)
        k = 2 if s == 1 else s
        self.stem_kernel = k
        wc = 2 * 3 * k * k
        self.whiten = nn.Conv2d(3, wc, kernel_size=k, stride=s, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        chans = [wc] + [max(8, int(round(c * width))) for c in widths]
        groups = [_Group(a, b, bn_momentum) for a, b in zip(chans[:-1], chans[1:])]
        post = (image_size - (k - s)) // s
        if post // 2 ** len(groups) > 8:  # very large inputs: one more group before pooling
            groups.append(_Group(chans[-1], chans[-1], bn_momentum))
        self.layers = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        self.scale = scale
        self.act = nn.GELU()

    def forward_features(self, x):
        return self.layers(self.act(self.whiten(x)))

    def forward(self, x):
        return self.head(self.pool(self.forward_features(x)).flatten(1)) * self.scale

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float | None = None) -> None:
        """PCA-whitening init of the stem from normalised training images (NCHW float)."""
        eps = self.whiten_eps if eps is None else eps
        k, s = self.stem_kernel, self.whiten.stride[0]
        # Covariance accumulated over chunks of images: the unfolded patches of a whole batch of
        # large images would not fit in memory (8x8 patches of 256-px images are 192x the pixels).
        cov = torch.zeros(3 * k * k, 3 * k * k, dtype=torch.float64)
        n = 0
        per_chunk = max(1, 2_000_000 // max(1, ((x.shape[2] - k) // s + 1) * ((x.shape[3] - k) // s + 1)))
        for i in range(0, len(x), per_chunk):
            patches = x[i : i + per_chunk].float().unfold(2, k, s).unfold(3, k, s).transpose(1, 3).reshape(-1, 3 * k * k)
            cov += (patches.T @ patches).double()
            n += len(patches)
        cov = cov / max(n, 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).float(), evecs.T.flip(0).float()
        # each patch row is laid out (C, kh, kw), the conv weight's own layout
        w = (evecs / torch.sqrt(evals.clamp_min(0) + eps).view(-1, 1)).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat((w, -w)).to(self.whiten.weight.dtype))

    def param_groups(self) -> list[dict]:
        """BatchNorm shifts get a 64x learning rate and 1/64 decay (airbench's bias scaler)."""
        norm = [p for n, p in self.named_parameters() if "norm" in n and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if "norm" not in n and p.requires_grad]
        return [dict(params=norm, lr_scale=64.0, wd_scale=1 / 64), dict(params=rest)]

    def on_epoch_start(self, epoch: int) -> None:
        # The stem bias adapts for 3 epochs then freezes: later drift only hurts (airbench).
        self.whiten.bias.requires_grad = epoch < 3


# ---------------------------------------------------------------------------------------------
# PlainCNN: the Conv/BN/Pool/Dropout/Dense stack people write by hand, made configurable.


_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}
PLAIN_HEADS = ("auto", "flatten", "avg")


class ModelArgError(ValueError):
    """A model argument (or the image size) a net cannot be built with; the message is complete
    (models.registry.build_model shows it as '<arch>: <message>')."""


def _conv_out(size: int, kernel_size: int) -> int:
    # padding kernel_size // 2 keeps odd kernels' size; an even kernel adds one pixel per conv
    return size + 2 * (kernel_size // 2) - kernel_size + 1


def plaincnn_sizes(image_size: int, blocks: int, convs_per_block: int = 2, kernel_size: int = 3) -> list[int]:
    """The feature-map side after each pooling block that fits (as many as ``blocks``, fewer where
    a 2x2 pool would meet a map under 2 px)."""
    sizes, size = [], image_size
    for _ in range(blocks):
        for _ in range(convs_per_block):
            size = _conv_out(size, kernel_size)
        if size < 2:
            break
        size //= 2
        sizes.append(size)
    return sizes


def plaincnn_max_blocks(image_size: int, convs_per_block: int = 2, kernel_size: int = 3) -> int:
    """How many (conv x convs_per_block + 2x2 pool) blocks an ``image_size`` input allows."""
    return len(plaincnn_sizes(image_size, 64, convs_per_block, kernel_size))


def check_plaincnn_size(image_size: int, channels=(32, 64, 128), convs_per_block: int = 2,
                        kernel_size: int = 3) -> None:
    """Raise ModelArgError, in one line, where ``channels`` has more pooling blocks than
    ``image_size`` allows (each halves the map: a 2x2 pool of a 1-px map fails in the first step)."""
    n = len(channels)
    fits = plaincnn_max_blocks(image_size, convs_per_block, kernel_size)
    if n <= fits:
        return
    lo, hi = image_size, max(image_size, 1) * 2 ** (n - fits)  # the smallest size taking n blocks
    while plaincnn_max_blocks(hi, convs_per_block, kernel_size) < n:
        hi *= 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plaincnn_max_blocks(mid, convs_per_block, kernel_size) >= n else (mid, hi)
    listed = "[" + ", ".join(str(c) for c in channels) + "]"
    raise ModelArgError(f"channels={listed} makes {n} pooling blocks, each halving the image, and {image_size}-px "
                        f"images allow at most {fits}: use fewer blocks (at most {fits} channels values) or a "
                        f"larger --image-size (at least {hi} for {n} blocks)")


def _whole_numbers(name: str, v, *, minimum: int = 1) -> tuple[int, ...]:
    vals = (v,) if isinstance(v, int) and not isinstance(v, bool) else v
    ok = isinstance(vals, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum
                                                 for x in vals)
    if not ok:
        shown = "[" + ", ".join(repr(x) for x in v) + "]" if isinstance(v, list | tuple) else repr(v)
        raise ModelArgError(f"{name}={shown}: expected a list of whole numbers >= {minimum}, e.g. {name}=[32,64] "
                            f"(brackets around the list; {name}=[] for none)")
    return tuple(vals)


def _whole_number(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ModelArgError(f"{name}={v!r}: expected a whole number >= {minimum}")
    return v


def _rate(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
        raise ModelArgError(f"{name}={v!r}: a dropout rate is a fraction from 0 (none) up to, not including, 1")
    return float(v)


class PlainCNN(nn.Module):
    """Blocks of (conv-[BN]-act) x ``convs_per_block`` + pool + dropout, then dense layers.

    ``channels=(32, 64, 128)`` gives three blocks; ``dense=(256,)`` one hidden dense layer (a single
    number is a list of one). ``head='flatten'`` mirrors Keras' Flatten; ``'avg'`` uses global
    average pooling (``'auto'``: flatten while the last feature map is at most 8x8, else avg).
    Each block halves the image: ``plaincnn_max_blocks(image_size)`` says how many fit.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        channels: tuple[int, ...] = (32, 64, 128),
        convs_per_block: int = 2,
        kernel_size: int = 3,
        batchnorm: bool = True,
        pool: str = "max",
        dropout: float = 0.25,
        dense: tuple[int, ...] = (256,),
        dense_dropout: float = 0.5,
        activation: str = "relu",
        head: str = "auto",
        in_channels: int = 3,
    ):
        super().__init__()
        # every argument checked before any layer is made: a one-line error, not a shape error
        # (or torch's zero-size warning) in the first step
        if activation not in _ACTS:
            raise ModelArgError(f"activation={activation!r}: use one of {', '.join(_ACTS)}")
        if pool not in ("max", "avg"):
            raise ModelArgError(f"pool={pool!r}: use max or avg")
        if head not in PLAIN_HEADS:
            raise ModelArgError(f"head={head!r}: use auto (flatten up to an 8x8 map, else avg), flatten or avg")
        channels, dense = _whole_numbers("channels", channels), _whole_numbers("dense", dense)
        convs_per_block = _whole_number("convs_per_block", convs_per_block, 1)
        kernel_size = _whole_number("kernel_size", kernel_size, 1)
        in_channels = _whole_number("in_channels", in_channels, 1)
        dropout, dense_dropout = _rate("dropout", dropout), _rate("dense_dropout", dense_dropout)
        check_plaincnn_size(image_size, channels, convs_per_block, kernel_size)
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for out in channels:
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2, bias=not batchnorm)]
                if batchnorm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(_ACTS[activation]())
                c = out
                size = _conv_out(size, kernel_size)
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            size //= 2
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.muon_normalize = batchnorm  # conv -> BN: the filter scale is free (engine/optim.Muon)
        if head == "auto":
            head = "flatten" if size <= 8 else "avg"
        if head == "avg":
            self.pool: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            n = c
        else:
            self.pool = nn.Flatten()
            n = c * size * size
        hidden: list[nn.Module] = []
        for d in dense:
            hidden += [nn.Linear(n, d), _ACTS[activation]()]
            if dense_dropout > 0:
                hidden.append(nn.Dropout(dense_dropout))
            n = d
        self.classifier = nn.Sequential(*hidden, nn.Linear(n, num_classes))

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
