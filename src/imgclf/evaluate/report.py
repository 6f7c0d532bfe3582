"""The run report: one self-contained HTML file (``RUN/report.html``) a person can open anywhere.

Everything is inline: CSS in a <style> block, every figure and thumbnail a base64 ``data:`` URI,
no JavaScript, no fonts or links to fetch. Each section reads what the run folder holds and is
left out (with a note) when its inputs are missing, so a report of an older or partial run, or
of a task a section does not cover yet, still renders.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgclf import log
from imgclf.data.archives import shown_name
from imgclf.data.cache import release_pages
from imgclf.errors import UserError
from imgclf.paths import write_problem

SAMPLE_LIMIT = 2000  # images per split whose loss is computed: enough to surface the worst ones, fast on CPU
SAMPLE_BYTES = 64 * 2**20  # and at most this much decoded pixels held at once (large images)
N_TOP_LOSSES = 12
N_PAIRS, N_PAIR_EXAMPLES = 6, 4
N_CAM = 8
THUMB = 96
CM_TABLE_MAX = 30  # classes up to which the confusion counts are a table; past it the figure scrolls

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:0 0 10px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:16px 20px;margin:16px 0}
nav a{margin-right:12px;color:#2457a6;text-decoration:none}
table{border-collapse:collapse;font-size:.9em}td,th{padding:3px 10px;border-bottom:1px solid #eceff3;text-align:left}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.fig{max-width:100%;height:auto}
.grid{display:flex;flex-wrap:wrap;align-items:flex-start;gap:10px}
figure{margin:0;width:min-content;font-size:.78em;line-height:1.25}
figure img{display:block;image-rendering:auto;border:1px solid #ccd}
figcaption{margin-top:3px;width:0;min-width:100%;overflow-wrap:anywhere}
.scroll{overflow:auto;max-height:90vh;border:1px solid #e3e6eb}.scroll img{max-width:none}
.bad{color:#b3261e}.na{color:#889}.good{color:#1b7a3a}.note{color:#667;font-size:.9em}
.pair{margin:10px 0}.kv td:first-child{color:#556}
details summary{cursor:pointer;color:#2457a6}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def png_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fig_uri(fig) -> str:
    from imgclf.evaluate.plots import plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return png_uri(buf.getvalue())


def thumb_uri(image: np.ndarray, size: int = THUMB) -> str:
    """A small inline picture: PNG for tiny inputs (sharp, few bytes), JPEG for photos."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image))
    s = size / max(img.size)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                     Image.Resampling.NEAREST if s >= 3 else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if max(image.shape[:2]) <= 64:
        img.save(buf, format="PNG", optimize=False)
        return png_uri(buf.getvalue())
    img.save(buf, format="JPEG", quality=85)
    return png_uri(buf.getvalue(), "image/jpeg")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def read_history(run_dir: Path) -> list[dict]:
    """metrics.csv as a list of rows of floats (empty cells dropped)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# per-sample analysis (single-label): losses, predictions, Grad-CAM


@dataclass
class SplitSample:
    """Predictions on (a subset of) one split: ``rows`` index the cache, ``paths`` name the files.
    ``logits`` are single views (as predict sees an image); ``tta_logits`` the run's averaged
    test-time views (as its metrics were computed), where asked for."""

    name: str
    images: np.ndarray  # uint8 NHWC of the subset
    labels: np.ndarray
    logits: torch.Tensor
    paths: list[str | None] = field(default_factory=list)
    of: int = 0  # images in the whole split
    tta_logits: torch.Tensor | None = None
    tta_level: int = 0

    def loss(self, temperature: float = 1.0) -> np.ndarray:
        """Cross-entropy of the probabilities the captions show (logits / temperature)."""
        return F.cross_entropy(self.logits / temperature, torch.from_numpy(self.labels), reduction="none").numpy()

    @property
    def pred(self) -> np.ndarray:
        return self.logits.argmax(1).numpy()


def sample_split(model, meta: dict, name: str, cs, paths: list[str] | None, device, limit: int = SAMPLE_LIMIT,
                 tta_level: int = 0, tta_all: torch.Tensor | None = None, precision: str = "auto") -> SplitSample:
    """``tta_all``: the whole split's TTA logits, when the caller scored them already (training's
    closing evaluation): scoring the sample's views again would push a --time-limit run past it."""
    from imgclf.evaluate.calibrate import split_logits

    n = len(cs.rows)
    limit = max(1, min(limit, SAMPLE_BYTES // max(1, int(np.prod(cs.images.shape[1:])))))
    pick = np.linspace(0, n - 1, min(limit, n)).astype(np.int64) if n else np.zeros(0, np.int64)
    rows = cs.rows[pick]
    labels = np.asarray(cs.labels)[pick].astype(np.int64)
    images = np.asarray(cs.images[rows])
    release_pages(cs.images)
    from types import SimpleNamespace

    view = SimpleNamespace(rows=np.arange(len(rows)), labels=labels, images=images)
    logits, _ = split_logits(model, meta, view, device, precision)
    if not tta_level:
        tta = None
    elif tta_all is not None and len(tta_all) == n:
        tta = tta_all[torch.from_numpy(pick)]
    else:
        tta = split_logits(model, meta, view, device, precision, tta_level=tta_level)[0]
    names = [paths[int(r)] if paths is not None and int(r) < len(paths) else None for r in rows]
    return SplitSample(name, images, labels, logits, names, of=n, tta_logits=tta, tta_level=tta_level)


def load_samples(run_dir: Path, meta: dict, device, model=None, cached=None, paths=None,
                 tta_level: int = 0, tta_logits: torch.Tensor | None = None,
                 progress: bool = False, precision: str = "auto") -> tuple[dict, object, str]:
    """Rebuild the run's data (cache hits after training) when the caller did not pass it in.
    The split the run was evaluated on also gets its ``tta_level`` views, as its metrics did."""
    if model is None:
        from imgclf.runs import load_model

        model, meta = load_model(run_dir, device)
    if cached is None:
        from imgclf.config import make_config
        from imgclf.data.cache import build_cache, cache_root
        from imgclf.evaluate.calibrate import check_classes, source_from_config

        cfg = make_config(run_dir / "config.yaml")
        root = cache_root(cfg.cache_dir)
        src = source_from_config(cfg, root)
        # the folder may have changed since training: a renamed or added class would caption
        # images with another class's name (or index past the model's outputs); a new order or
        # a class removed only renumbers, as evaluate does
        check_classes(cfg.data, src.classes, meta["classes"])
        remap = np.asarray([meta["classes"].index(c) for c in src.classes], dtype=np.int64)
        cached, paths = {}, {}
        for k in ("train", "test", "val"):
            split = src.splits().get(k)
            if split is not None:
                split.labels = remap[np.asarray(split.labels, dtype=np.int64)]
                cached[k] = build_cache(split, meta["image_size"], meta["resize"], root / "images",
                                       progress=progress, desc=f"decoding {k}")
                paths[k] = split.paths
    paths = paths or {}
    samples = {}
    evaluated = "test" if "test" in cached else "val"
    for k in ("train", evaluated):
        if k in cached and len(cached[k]):
            samples[k] = sample_split(model, meta, k, cached[k], paths.get(k), device,
                                      tta_level=tta_level if k == evaluated else 0,
                                      tta_all=tta_logits if k == evaluated else None, precision=precision)
    return samples, model, evaluated


# ---------------------------------------------------------------------------------------------
# sections: each returns (id, title, html body) or None when it has nothing to show


def _table(rows: list[list], head: list[str] | None = None, cls: str = "") -> str:
    out = [f'<table class="{cls}">']
    if head:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = []
        for v in r:
            if v is None or (isinstance(v, float) and not np.isfinite(v)):
                cells.append('<td class="num na" title="not defined for this class or split">n/a</td>')
            elif isinstance(v, float):
                cells.append(f'<td class="num">{v:.4f}</td>')
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v}</td>')
            else:
                cells.append(f"<td>{esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _figure(uri: str, caption_html: str, alt: str, title: str = "") -> str:
    """A thumbnail; ``caption_html`` is already escaped, ``alt``/``title`` are plain text."""
    t = f' title="{esc(title)}"' if title else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}"{t}><figcaption{t}>{caption_html}</figcaption></figure>'


def section_config(run_dir: Path, meta: dict) -> str | None:
    import yaml

    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.exists() else None
    model_rows = [[k, json.dumps(meta[k]) if isinstance(meta[k], (list, dict)) else meta[k]]
                  for k in ("architecture", "arch_args", "image_size", "resize", "task", "temperature", "weights_from",
                            "epochs_trained", "data", "imgclf_version") if k in meta]
    body = "<h3>model</h3>" + _table(model_rows, cls="kv")
    if isinstance(cfg, dict):
        # options as configured (lr 3e-05, ema 0.99995): _table's 4 decimals are for figures
        rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else
                 (f"{v:g}" if isinstance(v, float) else v))] for k, v in cfg.items()]
        body += f"<details><summary>training options ({len(rows)})</summary>{_table(rows, cls='kv')}</details>"
    return body


def _png_bytes(png: Path | None) -> bytes | None:
    """A figure training has just written from the same figures (no second rendering: matplotlib
    takes about a second for the curves and the matrix, a sixth of a small run's time)."""
    try:
        return png.read_bytes() if png is not None else None
    except OSError:
        return None


def section_curves(run_dir: Path, meta: dict, png: Path | None = None) -> str | None:
    from imgclf.evaluate.plots import plot_curves

    history = read_history(run_dir)
    if not history or "epoch" not in history[0]:
        return None
    data = _png_bytes(png)
    if data is None:
        buf = io.BytesIO()
        plot_curves(history, buf, title=f"{meta.get('architecture', '')}")
        data = buf.getvalue()
    return f'<img class="fig" src="{png_uri(data)}" alt="learning curves">'


def metrics_title(metrics: dict | None) -> str:
    split = (metrics or {}).get("split")
    return f"Final metrics ({split})" if split else "Run summary (no held-out evaluation)"


# metrics.json keys whose names say little in a table read by people
METRIC_NAMES = {"error_rate_n": "misclassified images", "n": "images scored", "nll": "nll (log loss)"}


def section_metrics(metrics: dict | None, summary: dict | None, n_classes: int = 0) -> str | None:
    if not metrics and not summary:
        return None
    rows, notes, seen = [], [], set()
    for src in (metrics or {}, summary or {}):
        for k, v in src.items():
            if not isinstance(v, (int, float, str)) or isinstance(v, bool) or k in seen:
                continue
            seen.add(k)
            # top-k over all the classes (top2 of 2, top4 of 4) is 1 whatever the model does
            if k.startswith("top") and k[3:].isdigit() and int(k[3:]) > 1 and n_classes and int(k[3:]) >= n_classes:
                notes.append(f"{k} left out: with {n_classes} classes every image's true class is among the top "
                             f"{k[3:]}, so it is 1 whatever the model does.")
                continue
            if k.endswith("_seconds") and isinstance(v, (int, float)):
                v = f"{v:.1f} s"
            rows.append([METRIC_NAMES.get(k, k), v])
    split = (metrics or {}).get("split")
    if not metrics:
        notes.insert(0, "No test or validation split was evaluated: there are no held-out figures. "
                        "Score the model with 'imgclf evaluate RUN --data DIR'.")
    elif split == "val":
        used = []
        if metrics.get("task") == "multilabel":
            used.append("its decision thresholds were tuned on it")
        if str((summary or {}).get("weights", "")).startswith("best"):
            used.append("the weights kept are those of the epoch that scored best on it")
        if used:
            notes.insert(0, f"Measured on the validation split, which the run also fitted to ({'; '.join(used)}): "
                            "expect lower figures on new images. A test/ folder gives an unbiased estimate.")
    return "".join(f'<p class="note">{esc(n)}</p>' for n in notes) + _table(rows, ["figure", "value"], cls="kv")


def section_data_check(run_dir: Path) -> str | None:
    """The data check train ran (RUN/check.json): its errors and warnings, worst first. An
    imbalance or leakage warning explains figures further down (a high top-1 from the big class, a
    test score inflated by near-copies) and used to be only in the console and the JSON."""
    check = _read_json(run_dir / "check.json")
    found = [f for f in (check or {}).get("findings", []) if isinstance(f, dict) and f.get("severity") != "info"]
    if not found:
        return None
    found.sort(key=lambda f: f.get("severity") != "error")
    rows = [[f.get("severity", ""), f.get("kind", ""), f.get("message", "")] for f in found]
    return (f'<p class="note">What the check at the start of training found in {esc(check.get("data", "the data"))}; '
            f"'imgclf check' lists every finding.</p>" + _table(rows, ["severity", "kind", "finding"]))


def section_per_class(metrics: dict | None) -> str | None:
    per = (metrics or {}).get("per_class")
    if not per or not isinstance(per, list) or not isinstance(per[0], dict):
        return None
    keys = list(per[0].keys())
    return _table([[r.get(k, "") for k in keys] for r in per], keys)


def section_confusion(metrics: dict | None, classes: list[str], png: Path | None = None) -> str | None:
    from imgclf.evaluate.plots import plot_confusion

    cm = (metrics or {}).get("confusion")
    if cm is None or len(cm) != len(classes):
        return None
    data = _png_bytes(png)
    if data is None:
        buf = io.BytesIO()
        plot_confusion(cm, classes, buf, title=f"{metrics.get('split', 'test')} confusion (row-normalised)")
        data = buf.getvalue()
    img = f'<img class="fig" src="{png_uri(data)}" alt="confusion matrix">'
    n = len(classes)
    if n > CM_TABLE_MAX:
        # scaled to the page, the names and cells of a large matrix are a few pixels tall
        return (f'<p class="note">{n} classes: the matrix is shown at full size (scroll inside the frame); '
                "its counts are in confusion.csv in the run folder, and the most-confused pairs below.</p>"
                f'<div class="scroll">{img}</div>')
    # the figure's colours show the pattern; the exact counts (confusion.csv) as a table
    cells = np.asarray(cm, dtype=np.int64)
    head = "".join(f'<th title="{esc(c)}">{j + 1}</th>' for j, c in enumerate(classes))
    rows = "".join(f"<tr><th>{i + 1}. {esc(c)}</th>" + "".join(
        f'<td class="num">{"<b>" if i == j else ""}{int(v)}{"</b>" if i == j else ""}</td>'
        for j, v in enumerate(cells[i])) + f'<td class="num">{int(cells[i].sum())}</td></tr>'
        for i, c in enumerate(classes))
    return (img + '<p class="note">Counts: rows are the true classes, columns the predicted ones (numbered as '
            f"the rows); the last column is each class's image count.</p><table><tr><th>true \\ predicted</th>{head}"
            f"<th>images</th></tr>{rows}</table>")


def _caption(s: SplitSample, i: int, classes: list[str], temperature: float, extra: str = "",
             logits: torch.Tensor | None = None) -> tuple[str, str, str]:
    """(caption HTML, alt text, hover title: the file's path when known). ``logits``: other
    predictions of the same images (the TTA views) instead of the single-view ones."""
    logits = s.logits if logits is None else logits
    p = torch.softmax(logits[i] / temperature, 0)
    t, q = int(s.labels[i]), int(logits[i].argmax())
    ok = "good" if t == q else "bad"
    cap = (f'true <b>{esc(classes[t])}</b><br><span class="{ok}">pred {esc(classes[q])} {float(p[q]):.2f}</span>'
           + (f"<br>{esc(extra)}" if extra else ""))
    alt = f"{s.name} image, true {classes[t]}, predicted {classes[q]}"
    return cap, alt, s.paths[i] or alt


def section_confused_pairs(metrics: dict | None, s: SplitSample | None, classes: list[str],
                           temperature: float) -> str | None:
    """The pairs, their counts and their examples all come from one set of predictions: those of
    the scored images with the views the run's metrics used (a pair counted with TTA but shown
    with single-view examples listed images that were not among the ones counted).
    ``temperature``: the one fitted for those views."""
    if s is not None:
        from imgclf.evaluate.metrics import confusion_matrix

        logits = s.tta_logits if s.tta_logits is not None else s.logits
        pred = logits.argmax(1).numpy()
        cm = np.asarray(confusion_matrix(pred, s.labels, len(classes)))
        views = f"with TTA (level {s.tta_level})" if s.tta_level else "single view"
        scope = f"all {s.of}" if s.of == len(s.labels) else f"{len(s.labels)} evenly spaced of the {s.of}"
        note = (f'<p class="note">Counts and examples: the model\'s predictions {views}, as in the metrics above, '
                f"on {scope} {esc(s.name)} images.</p>")
    else:  # no images to show: the counts of the run's final evaluation, without examples
        cm = np.asarray((metrics or {}).get("confusion") or [])
        level = int((metrics or {}).get("tta_level") or 0)
        views = f"with TTA (level {level})" if level else "single view"
        note = (f'<p class="note">Counts from the run\'s final evaluation ({views}, metrics.json); no examples: '
                "the images could not be read.</p>")
    if cm.ndim != 2 or cm.shape[0] != len(classes):
        return None
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:N_PAIRS]
    pairs = [(int(i) // len(classes), int(i) % len(classes)) for i in order if off.flat[int(i)] > 0]
    if not pairs:
        return note + '<p class="note">no confusions: every image was classified correctly</p>'
    out = [note]
    for a, b in pairs:
        support = max(int(cm[a].sum()), 1)
        head = (f"<b>{esc(classes[a])}</b> predicted as <b>{esc(classes[b])}</b>: {int(off[a, b])} images "
                f"({100 * off[a, b] / support:.1f}% of {esc(classes[a])})")
        figs = ""
        if s is not None:
            idx = np.flatnonzero((s.labels == a) & (pred == b))
            # ordered by the probability the captions show (at the run's temperature)
            conf = (logits[idx] / temperature).softmax(1)[:, b].numpy() if len(idx) else np.zeros(0)
            for i in idx[np.argsort(-conf)][:N_PAIR_EXAMPLES]:
                figs += _figure(thumb_uri(s.images[i]), *_caption(s, int(i), classes, temperature, logits=logits))
        out.append(f'<div class="pair"><p>{head}</p><div class="grid">{figs}</div></div>')
    return "".join(out)


def section_top_losses(samples: dict[str, SplitSample], classes: list[str], temperature: float) -> str | None:
    if not samples:
        return None
    scale = f"the run's temperature T = {temperature:.3g}" if abs(temperature - 1) > 1e-6 else "no temperature"
    out = ['<p class="note">The images the model finds hardest (highest cross-entropy), among up to '
           f'{SAMPLE_LIMIT} per split: mislabelled, ambiguous or unusual images show up here first. '
           f"Single-view predictions; the loss is -log of the probability of the true class, with {esc(scale)}, "
           "as the probabilities shown are.</p>"]
    for name, s in samples.items():
        loss = s.loss(temperature)
        figs = ""
        for i in np.argsort(-loss)[:N_TOP_LOSSES]:
            figs += _figure(thumb_uri(s.images[i]), *_caption(s, int(i), classes, temperature, f"loss {loss[i]:.2f}"))
        out.append(f"<h3>{esc(name)} ({len(s.labels)} images scored)</h3><div class=\"grid\">{figs}</div>")
    return "".join(out)


def section_gradcam(model, meta: dict, s: SplitSample | None, device, classes: list[str], temperature: float) -> str | None:
    if s is None or not len(s.labels):
        return None
    from imgclf.data.augment import Normalize
    from imgclf.evaluate.explain import GradCAM, overlay

    try:
        cam = GradCAM(model, meta["image_size"], device)
    except UserError as e:  # e.g. a vision transformer: no feature map to read
        return f'<p class="note">{esc(e)}</p>'
    rng = np.random.default_rng(0)
    right, wrong = np.flatnonzero(s.pred == s.labels), np.flatnonzero(s.pred != s.labels)
    half = N_CAM // 2
    pick_w = rng.choice(wrong, min(len(wrong), half), replace=False) if len(wrong) else np.zeros(0, np.int64)
    pick_r = rng.choice(right, min(len(right), N_CAM - len(pick_w)), replace=False) if len(right) else np.zeros(0, np.int64)
    idx = np.concatenate([pick_r, pick_w]).astype(np.int64)
    x = Normalize(meta["mean"], meta["std"], device)(torch.from_numpy(s.images[idx]).to(device))
    # large inputs one at a time: Grad-CAM keeps activations and gradients in fp32, and 8 images
    # of 1024 px through a plain CNN peaked at 3.2 GB, above what training itself had used
    per = 1 if meta["image_size"] >= 384 else max(1, len(idx))
    heats, blanks = [], []
    for j in range(0, len(idx), per):
        h, _ = cam(x[j:j + per])
        heats.append(h)
        blanks += list(cam.no_evidence)
    heat = np.concatenate(heats) if heats else np.zeros((0,))
    size = THUMB * 2
    figs = ""
    for h, i, blank in zip(heat, idx, blanks):
        cap, alt, title = _caption(s, int(i), classes, temperature)
        figs += _figure(thumb_uri(s.images[i], size), cap, alt, title)
        what = f"Grad-CAM for {classes[int(s.pred[i])]}"
        cap_cam = esc(what)
        if blank:  # an empty overlay is not "looked nowhere": nothing in the map pushed toward the class
            what += ": no positive evidence (blank map)"
            cap_cam += '<br><span class="bad">no positive evidence</span>'
        figs += _figure(png_uri(_png(overlay(s.images[i], h, size=size))), cap_cam, f"{what}: {alt}", title)
    n_blank = int(np.sum(cam.no_evidence))
    blank_note = (f" {n_blank} map(s) are blank: no part of the image adds positive evidence for the "
                  "predicted class at this layer." if n_blank else "")
    return (f'<p class="note">Where the model looked for its predicted class (layer <code>{esc(cam.layer)}</code>, '
            f"a {cam.grid[0]}x{cam.grid[1]} map), for {len(pick_r)} correct and {len(pick_w)} wrong {esc(s.name)} predictions.{blank_note}</p>"
            f'<div class="grid">{figs}</div>')


def section_pr_curves(run_dir: Path, metrics: dict | None) -> str | None:
    """A multi-label run's precision-recall curves, as its final evaluation drew them."""
    path = run_dir / "pr_curves.png"
    if not path.is_file():
        return None
    m = metrics or {}
    head = ""
    if isinstance(m.get("map"), (int, float)):
        head = (f'<p class="note">{esc(m.get("split", "test"))}: mAP {m["map"]:.4f}'
                + (f' (micro {m["map_micro"]:.4f})' if isinstance(m.get("map_micro"), (int, float)) else "")
                + "; the most frequent classes and the micro curve over all of them.</p>")
    return head + f'<img class="fig" src="{png_uri(path.read_bytes())}" alt="precision-recall curves">'


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def reliability_figure(logits: torch.Tensor, labels: np.ndarray, temperature: float, split: str):
    from imgclf.evaluate.calibrate import expected_calibration_error, reliability_bins, softmax_np
    from imgclf.evaluate.plots import plt

    cases = [("before (T = 1)", 1.0)]
    if abs(temperature - 1.0) > 1e-6:
        cases.append((f"after (T = {temperature:.3f})", temperature))
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4.4), squeeze=False)
    eces = []
    for ax, (label, t) in zip(axes[0], cases):
        probs = softmax_np(logits, t)
        b = reliability_bins(probs, labels)
        ece = expected_calibration_error(probs, labels)
        eces.append(ece)
        centers = (b["edges"][:-1] + b["edges"][1:]) / 2
        has = b["count"] > 0
        w = 1 / len(centers)
        ax.bar(centers[has], b["accuracy"][has], width=w * 0.95, color="#4c78a8", label="accuracy")
        ax.bar(centers[has], (b["confidence"] - b["accuracy"])[has], bottom=b["accuracy"][has], width=w * 0.95,
               color="#e45756", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{split} {label}: ECE {ece:.4f}")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig, eces


def _calibration_table(rec: dict) -> str:
    """The fit's record (model.json "calibration") as figures per kind of scores: single views and,
    where the run has TTA, its averaged views (the record's ``*_tta`` keys)."""
    cols = [("single view", "")]
    if "temperature_tta" in rec:
        cols.append((f"with TTA (level {rec.get('tta_level', '?')})", "_tta"))
    labels = [("temperature", "temperature T"), ("ece_before", "ECE at T = 1"), ("ece_after", "ECE at T"),
              ("nll_before", "NLL at T = 1"), ("nll_after", "NLL at T"), ("n", "images fitted on")]
    rows = [[label] + [rec.get(key + suffix) for _, suffix in cols] for key, label in labels]
    rows = [r for r in rows if any(v is not None for v in r[1:])]
    applied = rec.get("applied", True)
    note = (f"Fitted on the {rec.get('split', 'val')} split ({rec.get('bins', 15)} bins for the ECE); "
            + ("applied: predict and the probabilities in this report divide the logits by T."
               if applied else f"not applied ({rec.get('not_applied', 'too few images to pin it down')}): "
                               "scores keep T = 1."))
    if rec.get("applied_tta") is False:
        note += " The TTA views' temperature is not applied (it raised their ECE): TTA scores keep T = 1."
    return f'<p class="note">{esc(note)}</p>' + _table(rows, ["temperature scaling"] + [c for c, _ in cols], cls="kv")


def section_calibration(meta: dict, s: SplitSample | None) -> str | None:
    rec = meta.get("calibration")
    temperature = float(meta.get("temperature") or 1.0)
    parts = []
    if rec:
        parts.append(_calibration_table(rec))
    else:
        parts.append('<p class="note">not calibrated (no validation split, or not a single-label run): '
                     "temperature 1</p>")
    if s is not None and len(s.labels):
        fig, eces = reliability_figure(s.logits, s.labels, temperature, s.name)
        figure_note = f"ECE (15 bins) on {len(s.labels)} {esc(s.name)} images: before {eces[0]:.4f}"
        if len(eces) > 1:
            figure_note += f", after temperature scaling {eces[1]:.4f}"
        parts.append(f"<p>{figure_note} (single-view predictions).</p>")
        parts.append(f'<img class="fig" src="{fig_uri(fig)}" alt="reliability diagram">')
    return "".join(parts) if (rec or s is not None) else None


# ---------------------------------------------------------------------------------------------


def _run_precision(run_dir: Path) -> str:
    """The precision the run was trained and evaluated with, as config.yaml records it; "auto"
    where it cannot be read (a run copied without its config)."""
    from imgclf.config import load_yaml

    try:
        value = load_yaml(run_dir / "config.yaml").get("precision", "auto")
    except (OSError, UserError):
        return "auto"
    return value if value in ("auto", "bf16", "fp16", "fp32") else "auto"


def write_report(run: str | Path, *, model=None, meta: dict | None = None, cached: dict | None = None,
                 paths: dict | None = None, device="auto", out: str | Path | None = None,
                 eval_logits: torch.Tensor | None = None, figures: dict[str, Path] | None = None,
                 progress: bool = False, precision: str | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``). ``model``/``cached``/``paths`` skip reloading after
    training, ``eval_logits`` (the closing evaluation's TTA logits of the whole split) rescoring,
    and ``figures`` ("curves", "confusion": PNGs training wrote from the same figures) plotting.
    ``progress``: a bar while images are decoded (the cache gone, or the run made elsewhere).
    ``precision``: the samples' (default: the run's own, as config.yaml says), so the captions score
    as the run's metrics did, and an fp32 run's report does not time bf16 on a new machine."""
    from imgclf.runs import read_meta, resolve_device

    t0 = time.perf_counter()
    run_dir, disk_meta = read_meta(run)
    dest = Path(out) if out else run_dir / "report.html"
    # before the model loads and the images are scored: a typo in --out then costs nothing
    if dest.is_dir():
        raise UserError(f"cannot write the report to {dest}: it is a folder (name the HTML file, "
                        f"e.g. {dest / 'report.html'})")
    if dest.suffix.lower() not in (".html", ".htm"):
        # the report is HTML whatever the name says: a .pdf (or .png) of HTML opens as a broken file
        raise UserError(f"cannot write the report to {dest}: it is an HTML page, so name it "
                        f"{dest.stem if dest.suffix else dest.name}.html")
    problem = write_problem(dest.parent, create=False)
    if problem:
        raise UserError(f"cannot write the report to {dest}: {problem}")
    meta = meta or disk_meta
    dev = resolve_device(device) if isinstance(device, str) else device
    classes: list[str] = meta["classes"]
    temperature = float(meta.get("temperature") or 1.0)
    metrics = _read_json(run_dir / "metrics.json")
    summary = _read_json(run_dir / "summary.json")
    notes: list[str] = []
    samples: dict[str, SplitSample] = {}
    eval_name = None
    single = meta.get("task", "single") == "single"
    if single:
        # the confused pairs are counted with the views the run's metrics were computed with
        level = int((metrics or {}).get("tta_level", meta.get("tta_level")) or 0)
        try:
            samples, model, eval_name = load_samples(run_dir, meta, dev, model, cached, paths, tta_level=level,
                                                     tta_logits=eval_logits, progress=progress,
                                                     precision=precision or _run_precision(run_dir))
        except UserError as e:  # the data moved or is gone: the figures from the run folder still render
            notes.append(f"image-level sections left out: {e}")
    else:
        notes.append("the confusion matrix, confused pairs, top losses, Grad-CAM and calibration sections cover "
                     "single-label runs only")
    evals = samples.get(eval_name) if eval_name else None
    if model is not None:
        model.eval()
    sections = [
        ("config", "Configuration", section_config(run_dir, meta)),
        ("curves", "Learning curves", section_curves(run_dir, meta, (figures or {}).get("curves"))),
        ("metrics", esc(metrics_title(metrics)), section_metrics(metrics, summary, len(classes))),
        ("data-check", "Data check", section_data_check(run_dir)),
    ]
    if single:
        from imgclf.api import temperature_for

        pairs_t = temperature_for(meta, evals.tta_level) if evals is not None else temperature
        sections += [
            ("per-class", "Per-class precision, recall, F1", section_per_class(metrics)),
            ("confusion", "Confusion matrix", section_confusion(metrics, classes, (figures or {}).get("confusion"))),
            ("confused-pairs", "Most-confused class pairs", section_confused_pairs(metrics, evals, classes, pairs_t)),
            ("top-losses", "Highest-loss images (label-noise candidates)",
             section_top_losses(samples, classes, temperature)),
            ("gradcam", "Grad-CAM: correct and wrong predictions",
             section_gradcam(model, meta, evals, dev, classes, temperature) if model is not None else None),
            ("calibration", "Calibration: reliability diagram", section_calibration(meta, evals)),
        ]
    else:
        sections += [
            ("per-class", "Per-class AP, precision, recall, F1", section_per_class(metrics)),
            ("pr-curves", "Precision-recall curves", section_pr_curves(run_dir, metrics)),
        ]
    present = [(i, t, b) for i, t, b in sections if b]
    nav = "".join(f'<a href="#{i}">{t}</a>' for i, t, _ in present)
    body = "".join(f'<section id="{i}"><h2>{t}</h2>{b}</section>' for i, t, b in present)
    missing = [t for i, t, b in sections if not b and i != "data-check"]  # a clean check is no gap
    if missing:
        notes.append("left out (nothing to show in this run folder): " + ", ".join(missing))
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    title = f"imgclf report: {run_dir.name}"
    subtitle = f"{meta.get('architecture', '')} on {meta.get('data', '')}, {len(classes)} classes"
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
           f"<h1>{esc(title)}</h1><p>{esc(subtitle)}</p><nav>{nav}</nav>{note_html}{body}"
           f'<p class="note">written by imgclf {esc(meta.get("imgclf_version", ""))} on '
           f'{time.strftime("%Y-%m-%d %H:%M")}</p></main></body></html>')
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    # a file name that is not UTF-8 (Latin-1/GBK, from os.listdir's surrogateescape) reaches the
    # captions as lone surrogates, which UTF-8 cannot hold: shown as \xNN, as class names are
    doc = shown_name(doc)
    try:
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(f"report {dest} ({len(doc) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
    return dest
