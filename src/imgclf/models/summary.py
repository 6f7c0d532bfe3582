"""A layer table like Keras' ``model.summary()``: each layer's output shape and parameter count,
found by one forward pass of a single zero image (eval mode, no gradients), then the totals.

``summary(model, 32)`` or ``summary(model, (3, 32, 32))``; ``depth=1`` lists the top-level blocks
only (a timm net has hundreds of layers), each with the parameters of everything inside it.
"""

from __future__ import annotations

import torch
from torch import nn


def _shape(out) -> str:
    if isinstance(out, torch.Tensor):
        return "(" + ", ".join(["None", *(str(d) for d in out.shape[1:])]) + ")"  # None: any batch size
    if isinstance(out, list | tuple) and out:
        return _shape(out[0]) + (f" +{len(out) - 1}" if len(out) > 1 else "")
    return "-"


def _rows_of(model: nn.Module, depth: int | None) -> list[tuple[str, nn.Module]]:
    """The modules to list: every leaf (depth None), or the modules ``depth`` levels down and the
    leaves above that level."""
    rows = []
    for name, m in model.named_modules():
        if not name:
            continue
        level = name.count(".") + 1
        leaf = next(m.children(), None) is None
        if (depth is None and leaf) or (depth is not None and (level == depth or (leaf and level < depth))):
            rows.append((name, m))
    return rows


def _input_shape(input_shape) -> tuple[int, ...]:
    if isinstance(input_shape, int) and not isinstance(input_shape, bool):
        return (3, input_shape, input_shape)
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (3, *shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input_shape {input_shape!r}: give the image size (32) or (channels, height, width)")
    return shape


def summary(model: nn.Module, input_shape: int | tuple[int, ...], depth: int | None = None) -> str:
    """The model's layers in call order with output shapes and parameters, and the totals.

    A layer called twice (a shared activation) has a row per call and its parameters on the
    first; parameters held outside the listed layers (a ViT's position embedding) get a row of
    their own, so the rows add up to the total."""
    shape = _input_shape(input_shape)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    if device.type == "meta":
        raise ValueError("the model is on the meta device: build it on a real one (cpu) for a summary")
    rows: list[tuple[str, str, int]] = []
    seen: set[int] = set()
    counted: set[int] = set()

    def hook(name):
        def record(m, _inp, out):
            n = 0
            if id(m) not in seen:
                seen.add(id(m))
                for p in m.parameters():
                    if id(p) not in counted:
                        counted.add(id(p))
                        n += p.numel()
            rows.append((f"{name} ({type(m).__name__})", _shape(out), n))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in _rows_of(model, depth)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape, device=device, dtype=dtype))
    except RuntimeError as e:
        first_line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f"a {shape} input does not pass through {type(model).__name__}: {first_line}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    rest = sum(p.numel() for p in params if id(p) not in counted)
    if rest:
        rows.append(("(parameters outside the layers above)", "-", rest))
    w0 = max([len("Layer (type)"), *(len(r[0]) for r in rows)])
    w1 = max([len("Output shape"), *(len(r[1]) for r in rows)])
    head = f"{'Layer (type)':<{w0}}  {'Output shape':<{w1}}  {'Param #':>12}"
    line = "=" * len(head)
    out = [f"{type(model).__name__}, input {_shape(torch.empty(1, *shape, device='meta'))}", line, head, line]
    out += [f"{a:<{w0}}  {b:<{w1}}  {c:>12,}" for a, b, c in rows]
    out += [line, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(out) + "\n"


def write_summary(model: nn.Module, input_shape: int | tuple[int, ...], path) -> bool:
    """Write ``summary`` and the module tree (``str(model)``: kernel sizes, strides, paddings) to
    ``path`` (a run's model.txt). Never fails a run: returns False where it could not."""
    from pathlib import Path

    try:
        text = summary(model, input_shape) + "\n" + str(model) + "\n"
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except (ValueError, RuntimeError, OSError):
        return False
    return True
