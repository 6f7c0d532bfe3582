"""PNG figures of a run: learning curves and the confusion matrix."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Class names in scripts the default font lacks (日本, emoji): fonts that have them are tried after
# it where installed (matplotlib falls back along the list glyph by glyph); where none is, the
# glyphs are boxes and matplotlib warned once per glyph and figure, two lines each, with its
# source path. One line instead (missing_glyphs).
matplotlib.rcParams["font.sans-serif"] = list(dict.fromkeys(
    [*matplotlib.rcParams["font.sans-serif"], "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK KR",
     "WenQuanYi Zen Hei", "Noto Sans", "Noto Color Emoji"]))
warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)


@functools.cache
def _charmaps() -> list[set[int]]:
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    maps: dict[str, set[int]] = {}
    for name in matplotlib.rcParams["font.sans-serif"]:
        try:
            path = findfont(FontProperties(family=name), fallback_to_default=False)
        except ValueError:  # not installed
            continue
        if path not in maps:
            maps[path] = set(FT2Font(path).get_charmap())
    return list(maps.values())


_said: set[str] = set()


def missing_glyphs(names: list[str]) -> None:
    """Say once per process which class names the installed fonts cannot draw."""
    try:
        maps = _charmaps()
    except Exception:  # a font file matplotlib cannot open: say nothing rather than fail a plot
        return
    lacking = [n for n in names if n not in _said and any(
        not ch.isspace() and not any(ord(ch) in m for m in maps) for ch in n)]
    if lacking:
        from imgclf import log

        _said.update(lacking)
        log.info(f"class name(s) {', '.join(repr(n) for n in lacking[:5])} have characters no installed font has: "
                 "they are boxes in the PNG figures (the HTML report and CSV files show them; a font such as "
                 "fonts-noto-cjk draws them)")


def plot_curves(history: list[dict], path: Path, title: str = "", kept: float | None = None) -> None:
    """Loss and accuracy per epoch (train and val) and the learning rate; ``kept``: the epoch
    whose weights the run kept (an earlier, better one than the last), marked on every panel."""
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    # multi-label runs: mAP is the figure that moves (label accuracy sits near 1 on sparse labels)
    second = "map" if any("val_map" in r for r in history) else "acc"
    few = len(ep) < 30  # markers: a single epoch is a point, which a plain line would not draw
    for ax, key in zip(axes[:2], ("loss", second)):
        for split, style in (("train", "-o" if few else "-"), ("val", "-o")):
            pts = [(r["epoch"], r[f"{split}_{key}"]) for r in history if f"{split}_{key}" in r and r[f"{split}_{key}"] == r[f"{split}_{key}"]]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel({"acc": "accuracy", "map": "mAP"}.get(key, "loss"))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(ep, [r.get("lr", np.nan) for r in history], "-o" if few else "-", markersize=3)
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    if kept is not None:
        for ax in axes:
            ax.axvline(kept, color="tab:green", linestyle="--", linewidth=1, label=f"weights kept (epoch {kept:g})")
        axes[0].legend()
    for ax in axes:  # whole epochs (a 2-epoch run ticked 1.0, 1.2, 1.4 ...); a time-limited run's last may be 7.06
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm, classes: list[str], path: Path, title: str = "confusion matrix (row-normalised)") -> None:
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    if n <= 120:
        missing_glyphs(classes)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 120:
        font = 10 if n <= 40 else 6
        ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 45, ha="right" if n <= 6 else "center",
                      fontsize=font)
        ax.set_yticks(range(n), classes, fontsize=font)
    else:  # hundreds of names would merge into a black band: the cells carry the picture, confusion.csv the names
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=10 if n <= 12 else 7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
