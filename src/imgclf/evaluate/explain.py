"""Grad-CAM (Selvaraju et al. 2017): which pixels pushed the model toward a class.

Works for any network with a convolutional feature map: imgclf's FastNet and PlainCNN and timm
CNNs. The target layer is found by tracing one forward pass: the last module whose output is a
4-D feature map larger than 1x1 (i.e. the last conv stage before global pooling). Users can
name another layer (``--layer layers.1``).
"""

from __future__ import annotations

import io
import re
from pathlib import Path, PurePath

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclf.errors import UserError


def trace_feature_maps(model: nn.Module, image_size: int, device) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every named module that outputs a 4-D tensor, in execution order."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    names = {m: n for n, m in model.named_modules() if n}
    hooks = []

    def hook(module, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and module in names:
            seen.append((names[module], tuple(out.shape)))

    for m in names:
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # a module called twice appears twice: keep its last call
    last = {n: i for i, (n, _) in enumerate(seen)}
    return [s for i, s in enumerate(seen) if last[s[0]] == i]


def find_target_layer(model: nn.Module, image_size: int, device, layer: str | None = None,
                      maps: list[tuple[str, tuple[int, ...]]] | None = None) -> str:
    """The layer Grad-CAM reads: ``layer`` if given (checked), else the last spatial feature map."""
    maps = maps if maps is not None else trace_feature_maps(model, image_size, device)
    spatial = [n for n, s in maps if s[2] * s[3] > 1]
    if layer is not None:
        if layer in {n for n, _ in maps}:
            return layer
        # name the stages, not every conv/norm/act inside them; deeper names work too
        names = spatial or [n for n, _ in maps]
        for depth in (2, 1):
            shown = [n for n in names if n.count(".") <= depth]
            if len(shown) <= 20:
                break
        more = "..., " if len(shown) > 20 else ""
        raise UserError(f"unknown layer '{layer}': choose one of {more}{', '.join(shown[-20:])} "
                        "(or any deeper module name with a feature map)")
    if not spatial:
        raise UserError("Grad-CAM needs a convolutional feature map, and this model has none "
                        "(vision transformers and MLPs are not supported)")
    return spatial[-1]


class GradCAM:
    """``cam(x)`` -> heatmaps in [0, 1] at the input's size, and the logits, for a normalised batch.

    After a call, ``no_evidence[i]`` says image i's map was zero everywhere before scaling: no
    part of it pushed toward the class (common for a class the model does not predict, and for
    max-pooled nets). Its heatmap is all 0, which reads as "looked nowhere" unless it is said.
    """

    def __init__(self, model: nn.Module, image_size: int, device, layer: str | None = None):
        self.model, self.device = model, device
        maps = trace_feature_maps(model, image_size, device)
        self.layer = find_target_layer(model, image_size, device, layer, maps)
        shape = dict(maps)[self.layer]
        self.grid = (int(shape[2]), int(shape[3]))  # the heatmap's cells, before it is resized to the image
        self.module = dict(model.named_modules())[self.layer]
        self.no_evidence = np.zeros(0, dtype=bool)

    def where(self) -> str:
        """The layer as a title says it: "layer 'layers' (4x4 cells)", a bare module name read as a word."""
        return f"layer '{self.layer}' ({self.grid[0]}x{self.grid[1]} cells)"

    def __call__(self, x: torch.Tensor, classes: list[int] | None = None) -> tuple[np.ndarray, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        h = self.module.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                x = x.detach().float().requires_grad_(True)  # every activation then carries a graph
                logits = self.model(x).float()
                idx = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=logits.device)
                score = logits.gather(1, idx.view(-1, 1)).sum()
                act = store["act"]
                grad = torch.autograd.grad(score, act)[0]
        finally:
            h.remove()
            self.model.train(was_training)
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act.detach().float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        lo = cam.flatten(1).min(1).values.view(-1, 1, 1)
        hi = cam.flatten(1).max(1).values.view(-1, 1, 1)
        self.no_evidence = (hi.flatten() <= 0).cpu().numpy()
        cam = (cam - lo) / (hi - lo).clamp_min(1e-8)
        return cam.cpu().numpy(), logits.detach().cpu()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, size: int | None = None) -> np.ndarray:
    """Blend a jet-coloured heatmap over an RGB uint8 image, both resized to ``size`` (or the image's)."""
    import matplotlib
    from PIL import Image

    img = Image.fromarray(image)
    if size is not None and max(img.size) != size:
        s = size / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC)
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize(img.size, Image.Resampling.BILINEAR)
    colored = matplotlib.colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
    out = (1 - alpha) * (np.asarray(img).astype(np.float32) / 255.0) + alpha * colored
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def display_size(n: int) -> int:
    """Small inputs (CIFAR's 32 px) are upscaled so a person can see something; big ones capped."""
    return int(min(max(n, 224), 448))


def explanation_png(image: np.ndarray, cam: np.ndarray, title: str, alpha: float = 0.45) -> bytes:
    """PNG of the image and its Grad-CAM overlay side by side, with ``title`` above."""
    from PIL import Image

    from imgclf.evaluate.plots import plt

    size = display_size(max(image.shape[:2]))
    over = overlay(image, cam, alpha, size)
    base = np.asarray(Image.fromarray(image).resize((over.shape[1], over.shape[0]), Image.Resampling.BICUBIC))
    # panels shaped like the image: a wide crop in a square layout left half the figure blank
    ratio = float(np.clip(over.shape[0] / over.shape[1], 0.3, 2.0))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.9 * ratio + 1.0))
    for ax, im, sub in zip(axes, (base, over), ("image", "Grad-CAM")):
        ax.imshow(im)
        ax.set_title(sub, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _display_image(clf, source: Path | bytes, model_view: np.ndarray) -> np.ndarray:
    """The image to draw on: the original (a file, or an archive member's bytes) when the model
    saw all of it (stretch), else the model's view."""
    from imgclf.data.images import BadImage, load_rgb

    if clf.resize != "stretch" or not isinstance(source, str | Path | bytes):
        return model_view
    try:
        img = load_rgb(source if isinstance(source, bytes) else str(source))
    except BadImage:  # read once already; gone or changed since (a file rewritten as we went)
        return model_view
    h, w = img.shape[:2]
    if max(h, w) > 1024:  # the heatmap is coarse anyway; keep the PNG small
        from PIL import Image

        s = 1024 / max(h, w)
        img = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC))
    return img


def _did_you_mean(name: str, classes: list[str]) -> str:
    """' (did you mean 'cat'?)' for 'Cat', 'cats' or 'cta'; '' when no class is close. A model of
    1000 classes lists only its first 30, so the near name is what tells the user what to type."""
    import difflib

    folded = {c.casefold(): c for c in classes}
    key = name.strip().casefold()
    if key not in folded:
        key = next(iter(difflib.get_close_matches(key, list(folded), n=1, cutoff=0.7)), None)
    return f" (did you mean '{folded[key]}'?)" if key is not None else ""


def _read_once(path: str | Path, name: str) -> bytes:
    """The bytes of a path that is not a regular file (a pipe, a FIFO, /dev/stdin)."""
    from imgclf.data.images import BadImage

    try:
        with open(path, "rb") as fp:
            data = fp.read()
    except OSError as e:
        raise BadImage(name, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise BadImage(name, "empty file (nothing was written to this pipe or device)")
    return data


def explain(run: str | Path, images: list[str | Path], *, layer: str | None = None, class_name: str | None = None,
            out: str | Path | None = None, top_k: int = 3, device: str = "auto") -> list[dict]:
    """Write a Grad-CAM PNG per image into ``out`` (default RUN/explain); returns one record per
    image. ``images``: files, folders and archives (.zip/.tar[.gz], read in place), as predict takes."""
    import itertools

    from imgclf.api import iter_sources, load
    from imgclf.runs import read_meta

    run_dir, _ = read_meta(run)
    out_dir = Path(out) if out else run_dir / "explain"
    if out_dir.exists() and not out_dir.is_dir():  # before the model loads: a typo costs nothing
        raise UserError(f"--out {out_dir} is a file: name a folder for the PNGs")
    clf = load(run, device)
    sources = iter_sources(list(images), clf.read_opts)  # lazily: an archive's members are read one at a time
    first = next(sources, None)
    if first is None:
        raise UserError("no images to explain")
    target = None
    if class_name is not None:
        if class_name not in clf.classes:
            raise UserError(f"unknown class '{class_name}'{_did_you_mean(class_name, clf.classes)}: the model's "
                            f"classes are {', '.join(clf.classes[:30])}{', ...' if len(clf.classes) > 30 else ''}")
        target = clf.classes.index(class_name)
    cam = GradCAM(clf.model, clf.image_size, clf.device, layer)
    # the folders this call creates (out_dir and missing parents), removed again if no PNG lands
    # in them: a run of unreadable images must not leave an empty folder that looks like output
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:  # created once the class and layer are known good: a typo there leaves no empty folder
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create the folder ({e.strerror or e})") from None
    try:
        # a named class or layer is part of each PNG's name: 'explain RUN cat.jpg --class dog' after
        # the plain call would otherwise overwrite cat_gradcam.png, the top class's map
        tag = "".join(f"_{_safe_name(v)}" for v in (class_name, layer) if v)
        return _explain_all(clf, cam, itertools.chain([first], sources), out_dir, target, class_name, top_k, tag)
    finally:
        for d in created:  # innermost first; a folder that holds anything stays
            try:
                d.rmdir()
            except OSError:
                break


def _safe_name(text: str) -> str:
    """A file-name part: no separators or characters Windows refuses."""
    return re.sub(r'[<>:"|?*\\/\s]+', "-", text).strip("-") or "x"


def _explain_all(clf, cam, sources, out_dir: Path, target: int | None, class_name: str | None,
                 top_k: int, tag: str = "") -> list[dict]:
    from imgclf import log
    from imgclf.data.archives import shown_name
    from imgclf.data.images import BadImage

    temperature = float(clf.meta.get("temperature") or 1.0)
    results, used = [], set()
    for name, src, error in sources:
        if error:  # an archive member that could not be read
            results.append({"input": name, "error": error})
            continue
        try:
            if isinstance(src, str | Path) and not Path(src).is_file():
                # a pipe (/dev/stdin, <(curl ...)) can be read once: its bytes serve both the
                # model's view and the full-size picture drawn on
                src = _read_once(src, name)
            view = clf.preprocess(src, name)
        except BadImage as e:
            results.append({"input": name, "error": e.reason})
            continue
        f = PurePath(name)  # a file's path or <archive>/<member>: for titles and PNG names
        # in titles and messages, a name that is not UTF-8 (os.listdir's lone surrogates, which
        # matplotlib cannot draw) has its bytes as \xNN; the PNG's own name keeps the bytes
        shown_file = shown_name(f.name)
        x = clf.normalize(torch.from_numpy(view[None]).to(clf.device))
        heat, logits = cam(x, None if target is None else [target])
        scaled = logits / temperature
        # a multi-label model's scores are independent sigmoids, as predict reports them
        probs = (torch.sigmoid(scaled) if clf.meta.get("task") == "multilabel" else torch.softmax(scaled, 1))[0]
        top = probs.topk(min(top_k, len(clf.classes)))
        tops = [(clf.classes[int(j)], float(p)) for p, j in zip(top.values, top.indices)]
        shown = class_name if target is not None else tops[0][0]
        blank = bool(cam.no_evidence[0])
        title = f"{shown_file}: " + ", ".join(f"{c} {p:.2f}" for c, p in tops) + f"\nGrad-CAM for '{shown}' at {cam.where()}"
        if blank:  # a bare blank panel reads as a rendering fault or as 'looked nowhere'
            title += f"\nno positive evidence for '{shown}' in this image (blank map)"
            log.warn(f"{shown_name(str(f))}: no positive evidence for '{shown}' in this image: its Grad-CAM at {cam.where()} is blank",
                     once=False)
        png = explanation_png(_display_image(clf, src, view), heat[0], title)
        own = re.sub(r"\.parquet#(\d+)$", r"_row\1", f.name, flags=re.I)  # file.parquet#3: file_row3
        own = PurePath(own).stem if own == f.name else own
        own = re.sub(r'[<>:"|?*\\]', "", own) or "image"  # '<stdin>', a URL's query: no name Windows refuses
        stem = own if own not in used else f"{f.parent.name}_{own}"
        base, n = stem, 2
        while stem in used:  # train/cat/1.jpg, val/cat/1.jpg, test/cat/1.jpg: one file each
            stem, n = f"{base}_{n}", n + 1
        used.add(stem)
        dest = out_dir / f"{stem}_gradcam{tag}.png"
        try:
            dest.write_bytes(png)
        except OSError as e:  # a full disk or a folder gone read-only: the PNGs written so far stay
            raise UserError(f"cannot write {dest} ({e.strerror or e})") from None
        results.append({"input": name, "output": str(dest), "top": tops, "class": shown, "layer": cam.layer,
                        "heatmap": heat[0], "no_evidence": blank})
    return results
