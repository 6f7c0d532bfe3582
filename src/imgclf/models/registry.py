"""One registry for every model: imgclf's own nets by name, and timm's architectures as
``timm:<name>``. A model is fully described by (architecture, arguments, num_classes,
image_size), which is what ``model.json`` stores, so loading never needs pickled objects.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from imgclf.errors import UserError
from imgclf.models.nets import FastNet, ModelArgError, PlainCNN

OWN_MODELS: dict[str, type[nn.Module]] = {"fastnet": FastNet, "plaincnn": PlainCNN}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resolve_name(name: str) -> str:
    """Canonical architecture name: 'auto' -> 'fastnet'; a bare timm name gets 'timm:'."""
    if name in ("auto", ""):
        return "fastnet"
    if name in OWN_MODELS or name.startswith("timm:"):
        if name.startswith("timm:"):
            _check_timm(name[5:])
        return name
    import timm

    if timm.is_model(name):
        return f"timm:{name}"
    close = _close_names(name, [*OWN_MODELS, *timm.list_models()]) or timm.list_models(f"*{name}*")[:5]
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown model '{name}': use fastnet, plaincnn or timm:<name>{hint}")


def _close_names(name: str, names: list[str]) -> list[str]:
    """Up to 5 names that a typo of ``name`` may have meant (case and '-'/'_' ignored)."""
    import difflib

    key = lambda n: n.lower().replace("-", "_")  # noqa: E731
    by_key: dict[str, str] = {}
    for n in names:
        by_key.setdefault(key(n), n)
    return [by_key[k] for k in difflib.get_close_matches(key(name), list(by_key), n=5, cutoff=0.6)]


def _check_timm(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = [f"timm:{n}" for n in _close_names(name, timm.list_models())]
        close = close or [f"timm:{n}" for n in timm.list_models(f"*{name.split('_')[0]}*")[:5]]
        own = _close_names(name, list(OWN_MODELS))
        hint = f"; did you mean: {', '.join((own + close)[:5])}?" if own or close else ""
        raise UserError(f"timm has no model '{name}'{hint}")
    if "." in name:  # is_model ignores the tag: an unknown one raised from timm.create_model, after decoding
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            arch = name.split(".", 1)[0]
            tags = timm.list_pretrained(f"{arch}.*")[:8]
            raise UserError(f"timm:{name}: {arch} has no tag '{name.split('.', 1)[1]}'; tags with weights: "
                            f"{', '.join(tags) or 'none'}") from None


def _shown_default(v: Any) -> str:
    """A constructor default as --model-args writes it: [32, 64, 128], 0.25, true, max."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_shown_default(x) for x in v) + "]"
    if v is None:
        return "auto"
    return f"{v:g}" if isinstance(v, float) else str(v)


def accepted_args(cls) -> dict[str, str]:
    """An own net's model arguments and their defaults as written on the command line
    (``{'channels': '[32, 64, 128]', 'dropout': '0.25', ...}``)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: _shown_default(p.default) for k, p in params.items() if k not in ("self", "num_classes", "image_size")}


def _coerce_args(cls, args: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in args if k not in params or k in ("self", "num_classes", "image_size")]
    if unknown:
        allowed = accepted_args(cls)
        close = list(dict.fromkeys(c for k in unknown for c in _close_names(k, list(allowed))))
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"model argument(s) {', '.join(unknown)} not known to {cls.__name__}{hint}; it takes "
                        f"(default values): {', '.join(f'{k}={v}' for k, v in allowed.items())}")
    out = {}
    for k, v in args.items():  # width=abc: said as such, not as "type str doesn't define __round__"
        default = params[k].default
        number = isinstance(default, int | float) and not isinstance(default, bool)
        if number and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise UserError(f"{cls.__name__}: model argument {k}={v!r} is not a number (its default: {default})")
        if isinstance(default, bool) and not isinstance(v, bool):
            raise UserError(f"{cls.__name__}: model argument {k}={v!r} is not true or false (its default: {default})")
        if isinstance(default, tuple) and isinstance(v, int) and not isinstance(v, bool):
            v = (v,)  # dense=512: a list of one, as dense=[512]
        # YAML/CLI give lists; the nets take tuples
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def small_input_stem(model: nn.Module, image_size: int, force: bool = False) -> bool:
    """Stop a timm ImageNet stem from throwing away resolution on small (<= 64 px) inputs.

    ResNets lose 4x in conv1+maxpool and EfficientNets/MobileNets 2x in conv_stem: at 32 px
    that leaves a 1x1 map before the last stage. Returns whether the model was changed.
    ``force``: at any size (an explicit small_stem=true, e.g. a 32-px run's weights reused at 96).
    """
    if image_size > 64 and not force:
        return False
    changed = False
    conv1 = getattr(model, "conv1", None)
    if conv1 is not None and hasattr(model, "maxpool"):
        first = conv1[0] if isinstance(conv1, nn.Sequential) else conv1
        if isinstance(conv1, nn.Sequential):
            first.stride = (1, 1)
        else:
            model.conv1 = nn.Conv2d(first.in_channels, first.out_channels, 3, 1, 1, bias=first.bias is not None)
        model.maxpool = nn.Identity()
        changed = True
    elif isinstance(getattr(model, "conv_stem", None), nn.Conv2d):
        model.conv_stem.stride = (1, 1)
        changed = True
    return changed


def build_model(arch: str, num_classes: int, image_size: int, args: dict[str, Any] | None = None) -> nn.Module:
    """Build an untrained model. ``args`` are the architecture's own keyword arguments."""
    args = dict(args or {})
    if arch in OWN_MODELS:
        cls = OWN_MODELS[arch]
        try:
            return cls(num_classes=num_classes, image_size=image_size, **_coerce_args(cls, args))
        except ModelArgError as e:  # the net's own check: a complete message
            raise UserError(f"{arch}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{arch}: bad model arguments {args}: {e}") from None
    if arch.startswith("timm:"):
        import timm

        name = arch[5:]
        _check_timm(name)
        small = args.pop("small_stem", None)
        # a new head (models.head.HeadedNet) replaces timm's classifier: transfer learning
        head, head_dropout = args.pop("head", None), float(args.pop("head_dropout", 0.0))
        n_out = 0 if head is not None else num_classes
        bad = (TypeError, ValueError, AssertionError)  # what timm's constructors raise for unusable arguments
        try:
            try:
                model = timm.create_model(name, pretrained=False, num_classes=n_out, img_size=image_size, **args)
            except TypeError:  # CNNs take any input size and have no img_size argument
                model = timm.create_model(name, pretrained=False, num_classes=n_out, **args)
        except bad as e:
            what = f"bad model arguments {args}" if args else f"cannot be built for {image_size}-px images"
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise UserError(f"{arch}: {what}: {first}") from None
        if small is None or small:
            # True applies at <= 64 px only (what runs recorded before "always" existed were built with)
            small_input_stem(model, image_size, force=small == "always")
        if head is not None:
            from imgclf.models.head import HeadedNet

            width = getattr(model, "head_hidden_size", None) or model.num_features
            model = HeadedNet(model, width, num_classes, head, head_dropout)
        return model
    raise UserError(f"unknown architecture '{arch}'")


def arch_args_for_record(arch: str, image_size: int, args: dict[str, Any]) -> dict[str, Any]:
    """Arguments to store in model.json so build_model rebuilds exactly the same network."""
    out = dict(args)
    if arch.startswith("timm:") and "small_stem" not in out:
        out["small_stem"] = image_size <= 64
    elif arch.startswith("timm:") and out["small_stem"] is True and image_size > 64:
        # asked for (or a <= 64-px run's weights reused) at a larger size: build and record it as
        # "always", since True alone did nothing above 64 px and older runs were built that way
        out["small_stem"] = "always"
    return out


def default_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if arch.startswith("timm:"):
        return IMAGENET_MEAN, IMAGENET_STD
    return None, None  # own nets: computed from the training data


def check_buildable(arch: str, image_size: int, args: dict[str, Any] | None = None) -> None:
    """Raise the UserError ``build_model`` would, without allocating weights: imgclf's own nets
    are built on the meta device (a plaincnn too deep for ``image_size`` says so before the data is
    decoded). timm models are left to ``build_model``."""
    if arch not in OWN_MODELS:
        return
    import torch

    with torch.device("meta"):
        build_model(arch, 2, image_size, args)
