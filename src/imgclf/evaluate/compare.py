"""Compare runs: every run's curves overlaid on one figure per metric, and a table of final figures
and the config values that differ between them (printed, and as CSV and self-contained HTML).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from imgclf.errors import UserError
from imgclf.evaluate.report import CSS, esc, fig_uri, read_history

# Columns of metrics.csv that describe the machine, not the model: not worth a figure.
SKIP_CURVES = {"epoch", "seconds", "images_per_s"}
# Config keys that always differ or say nothing about the model.
SKIP_CONFIG = {"name", "project", "exist_ok", "progress", "tensorboard", "device", "workers", "cache_dir"}


def _run_info(path: Path) -> dict:
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    if not (path / "metrics.csv").exists() and not (path / "config.yaml").exists():
        raise UserError(f"{path}: not an imgclf run folder (no metrics.csv or config.yaml)")
    cfg = {}
    if (path / "config.yaml").exists():
        cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}

    def js(name):
        p = path / name
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except json.JSONDecodeError:
            return {}

    return {"path": path, "history": read_history(path), "config": cfg, "metrics": js("metrics.json"),
            "summary": js("summary.json"), "model": js("model.json")}


def _labels(paths: list[Path]) -> list[str]:
    """Run folder names, or parent/name where two runs share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def final_figures(info: dict) -> dict:
    """The numbers a person compares runs by; absent ones are left out."""
    h, m, s = info["history"], info["metrics"], info["summary"]
    row: dict = {}
    for k in ("top1", "top5", "balanced_accuracy", "macro_f1", "nll", "map", "map_micro"):
        if isinstance(m.get(k), (int, float)):
            row[f"{m.get('split', 'test')}_{k}"] = m[k]
    if h:
        for k in ("val_acc", "val_map"):
            vals = [r[k] for r in h if k in r]
            if vals:
                row[f"best_{k}"] = max(vals)
        for k in ("val_loss", "train_loss", "train_acc"):
            vals = [r[k] for r in h if k in r]
            if vals:
                row[f"final_{k}"] = vals[-1]
        row["epochs"] = h[-1].get("epoch")
    cal = info["model"].get("calibration")
    if isinstance(cal, dict):
        row["temperature"] = cal.get("temperature")
        row["val_ece_before"], row["val_ece_after"] = cal.get("ece_before"), cal.get("ece_after")
    if "train_seconds" in s:
        row["train_seconds"] = s["train_seconds"]
    return row


def differing_config(infos: list[dict]) -> list[str]:
    keys: list[str] = []
    for i in infos:
        keys += [k for k in i["config"] if k not in keys and k not in SKIP_CONFIG]
    return [k for k in keys if len({json.dumps(i["config"].get(k), sort_keys=True) for i in infos}) > 1]


def curve_figures(infos: list[dict], labels: list[str]) -> dict[str, object]:
    """metric -> matplotlib figure with one line per run."""
    from imgclf.evaluate.plots import plt

    metrics: list[str] = []
    for i in infos:
        for r in i["history"]:
            metrics += [k for k in r if k not in metrics and k not in SKIP_CURVES]
    figs = {}
    for key in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for info, label in zip(infos, labels):
            pts = [(r["epoch"], r[key]) for r in info["history"] if key in r and "epoch" in r and r[key] == r[key]]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "-o" if len(pts) < 30 else "-", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        if key == "lr":
            ax.set_yscale("log")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs[key] = fig
    return figs


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:  # an lr of 1e-5 against 3e-5 must not read 0.0000 twice
            return f"{v:.4g}"
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else str(v)  # (config values of other types are shown as written)


def compare_runs(runs: list[str | Path], out: str | Path | None = None) -> dict:
    """Write figures, compare.csv and compare.html into ``out``; returns the table and file paths."""
    if len(runs) < 2:
        raise UserError("compare needs at least two run folders")
    paths = [Path(r) for r in runs]
    infos = [_run_info(p) for p in paths]
    labels = _labels(paths)
    finals = [final_figures(i) for i in infos]
    fig_cols: list[str] = []
    for f in finals:
        fig_cols += [k for k in f if k not in fig_cols]
    cfg_cols = differing_config(infos)
    header = ["run"] + fig_cols + cfg_cols
    rows = [[label] + [f.get(k) for k in fig_cols] + [i["config"].get(k) for k in cfg_cols]
            for label, f, i in zip(labels, finals, infos)]

    out_dir = Path(out) if out else paths[0].parent / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[_fmt(v) for v in r] for r in rows])
    figs = curve_figures(infos, labels)
    images = {}
    for key, fig in figs.items():
        fig.savefig(out_dir / f"{key}.png", dpi=100)
        images[key] = fig_uri(fig)  # closes the figure
    table = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows) + "</table>")
    cfg_note = (f"config values that differ: {esc(', '.join(cfg_cols))}" if cfg_cols
                else "the runs' configs do not differ (other than name and output options)")
    body = "".join(f'<section id="curve-{esc(k)}"><h2>{esc(k)}</h2><img class="fig" src="{u}" alt="{esc(k)} per epoch">'
                   "</section>" for k, u in images.items())
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>imgclf compare</title>'
           f"<style>{CSS}</style></head><body><main><h1>imgclf compare: {len(paths)} runs</h1>"
           f'<section id="table"><h2>Final figures</h2><p class="note">{cfg_note}</p>{table}</section>{body}'
           "</main></body></html>")
    (out_dir / "compare.html").write_text(doc, encoding="utf-8")
    return {"header": header, "rows": rows, "out_dir": out_dir, "figures": sorted(out_dir / f"{k}.png" for k in figs),
            "differing": cfg_cols}


def format_table(header: list[str], rows: list[list]) -> str:
    """Plain-text table for the terminal, one column per run (runs are few, figures many)."""
    cells = [[h] + [_fmt(r[j]) for r in rows] for j, h in enumerate(header)]
    widths = [max(len(c[j]) for c in cells) for j in range(len(cells[0]))]
    return "\n".join("  ".join(c[j].ljust(widths[j]) for j in range(len(c))).rstrip() for c in cells)
