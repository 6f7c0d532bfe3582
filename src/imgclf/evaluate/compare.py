"""Compare runs: every run's curves overlaid on one figure per metric, and a table of final figures
and the config values that differ between them (printed, and as CSV and self-contained HTML).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from imgclf import log
from imgclf.errors import UserError
from imgclf.evaluate.report import CSS, esc, fig_uri, read_history
from imgclf.paths import write_problem

# Columns of metrics.csv that describe the machine, not the model: not worth a figure.
SKIP_CURVES = {"epoch", "seconds", "images_per_s"}
# Config keys that always differ or say nothing about the model.
SKIP_CONFIG = {"name", "project", "exist_ok", "progress", "tensorboard", "device", "workers", "cache_dir"}
# Curves whose scale is the task's: a multi-label run's accuracy is per-label binary accuracy
# (~0.96 for a model that finds nothing) and its loss BCE summed over the labels (tens), so
# they get a panel per task instead of sharing axes with single-label accuracy and CE.
TASK_FREE_CURVES = {"lr"}
TASK_NAMES = {"single": "single-label", "multilabel": "multi-label"}


def _run_info(path: Path) -> dict:
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    if not (path / "metrics.csv").exists() and not (path / "config.yaml").exists():
        raise UserError(f"{path}: not an imgclf run folder (no metrics.csv or config.yaml)")
    cfg = {}
    if (path / "config.yaml").exists():
        cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
        if isinstance(cfg, dict):
            cfg.pop("derived", None)  # the record of the recipe's choices, not an option

    def js(name):
        p = path / name
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except json.JSONDecodeError:
            return {}

    info = {"path": path, "history": read_history(path), "config": cfg, "metrics": js("metrics.json"),
            "summary": js("summary.json"), "model": js("model.json")}
    info["task"] = _task(info)
    info["progress"] = _progress(info)
    info["status"] = "finished" if info["progress"] is None else f"unfinished: {info['progress']} (no model.json)"
    return info


def _task(info: dict) -> str:
    """single or multilabel: as the model records it, else as configured, else as its curves show."""
    task = info["model"].get("task") or info["config"].get("task")
    if task in TASK_NAMES:
        return task
    return "multilabel" if any("val_map" in r for r in info["history"]) else "single"


def _progress(info: dict) -> str | None:
    """None for a finished run; else how far a run got that has no model.json (killed, crashed
    or still going): its last epoch is not its final one."""
    if (info["path"] / "model.json").exists():
        return None
    done = info["history"][-1].get("epoch") if info["history"] else None
    planned = info["config"].get("epochs")
    reached = f"epoch {done:g}" if isinstance(done, (int, float)) else "no epoch finished"
    return reached + (f" of {planned:g}" if isinstance(planned, (int, float)) else "")


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
        # a multi-label run's accuracy is per label (0.96 for a model that predicts nothing): its own
        # column, not one row beside single-label top-1 accuracies
        acc = (lambda k: k.replace("_acc", "_label_acc")) if info["task"] == "multilabel" else (lambda k: k)
        for k in ("val_acc", "val_map"):
            vals = [r[k] for r in h if k in r]
            if vals:
                row[f"best_{acc(k)}"] = max(vals)
        for k in ("val_loss", "train_loss", "train_acc"):
            vals = [r[k] for r in h if k in r]
            if vals:
                row[f"final_{acc(k)}"] = vals[-1]
        done = h[-1].get("epoch")  # config's "epochs" (planned) may be a column too
        row["epochs_trained"] = int(done) if isinstance(done, float) and done.is_integer() else done
    cal = info["model"].get("calibration")
    if isinstance(cal, dict):
        applied = cal.get("applied", True)  # a fit on too few images is recorded, not applied
        row["temperature"] = cal.get("temperature") if applied else 1.0
        row["val_ece_before"] = cal.get("ece_before")
        row["val_ece_after"] = cal.get("ece_after") if applied else cal.get("ece_before")
    if "train_seconds" in s:
        row["train_seconds"] = s["train_seconds"]
    return row


def differing_config(infos: list[dict]) -> list[str]:
    keys: list[str] = []
    for i in infos:
        keys += [k for k in i["config"] if k not in keys and k not in SKIP_CONFIG]
    return [k for k in keys if len({json.dumps(i["config"].get(k), sort_keys=True) for i in infos}) > 1]


def _scale_note(key: str, task: str) -> str:
    if task != "multilabel":
        return ""
    if key.endswith("_acc"):
        return " (per-label binary accuracy)"
    if key.endswith("_loss"):
        return " (BCE summed over labels)"
    return ""


def curve_figures(infos: list[dict], labels: list[str]) -> dict[str, object]:
    """metric -> matplotlib figure with one line per run (one panel per task where runs of
    different tasks report a metric on different scales)."""
    from imgclf.evaluate.plots import plt

    metrics: list[str] = []
    for i in infos:
        for r in i["history"]:
            metrics += [k for k in r if k not in metrics and k not in SKIP_CURVES]
    figs = {}
    for key in metrics:
        has = [(info, label) for info, label in zip(infos, labels) if any(key in r for r in info["history"])]
        tasks = list(dict.fromkeys(info["task"] for info, _ in has)) if key not in TASK_FREE_CURVES else [None]
        fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for info, label in has:
                if task is not None and info["task"] != task:
                    continue
                pts = [(r["epoch"], r[key]) for r in info["history"] if key in r and "epoch" in r and r[key] == r[key]]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, "-o" if len(pts) < 30 else "-", markersize=3, label=label)
            ax.set_xlabel("epoch")
            ax.set_ylabel(key + (_scale_note(key, task) if len(tasks) > 1 else ""))
            if key == "lr":
                ax.set_yscale("log")
            ax.set_title(f"{key}: {TASK_NAMES[task]} runs" if len(tasks) > 1 else key)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        figs[key] = fig
    return figs


def _fmt(v, column: str = "", config: bool = False) -> str:
    """A table cell: figures to 4 decimals (seconds to 0.1), config values as written (an lr of
    0.046875, 10.35 warm-up epochs, 0 freeze epochs: not 0.0469, 10.3500, 0.0000)."""
    if isinstance(v, float) and config:
        return f"{v:.10g}"
    if isinstance(v, float) and column.endswith("seconds"):
        return f"{v:.1f}"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:  # an lr of 1e-5 against 3e-5 must not read 0.0000 twice
            return f"{v:.4g}"
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else str(v)  # (config values of other types are shown as written)


def _is_comparison(path: Path) -> bool:
    """A folder compare wrote (runs/compare by default), which 'compare runs/*' then also names."""
    return (path / "compare.html").is_file() and not (path / "config.yaml").exists()


def _expand(runs: list[str | Path]) -> list[Path]:
    """The run folders named: a project folder ('compare runs') stands for the runs in it; a
    comparison's own folder (runs/compare, matched by runs/*) is passed over, with a line."""
    paths: list[Path] = []
    for r in map(Path, runs):
        if r.is_dir() and _is_comparison(r):
            log.info(f"{r} holds a comparison, not a run: left out")
            continue
        inside = [] if not r.is_dir() or (r / "config.yaml").exists() or (r / "metrics.csv").exists() else \
            sorted(d for d in r.iterdir() if d.is_dir() and ((d / "config.yaml").is_file() or
                                                            (d / "metrics.csv").is_file()))
        paths += inside or [r]
    return paths


def compare_runs(runs: list[str | Path], out: str | Path | None = None) -> dict:
    """Write figures, compare.csv and compare.html into ``out``; returns the table and file paths."""
    paths = _expand(runs)
    if len(paths) < 2:
        raise UserError("compare needs at least two run folders (or a folder that holds them, such as runs/)")
    if out is not None and Path(out).suffix.lower() in (".html", ".htm", ".csv", ".png"):
        raise UserError(f"--out {out}: the folder for the figures, compare.csv and compare.html; name a folder")
    infos = [_run_info(p) for p in paths]
    labels = _labels(paths)
    out_dir = Path(out) if out else paths[0].parent / "compare"
    problem = write_problem(out_dir, create=False)
    if problem:
        raise UserError(f"cannot write the comparison to {out_dir}: {problem}")
    finals = [final_figures(i) for i in infos]
    fig_cols: list[str] = []
    for f in finals:
        fig_cols += [k for k in f if k not in fig_cols]
    cfg_cols = differing_config(infos)
    lead = ["task", "status"]
    # a config key named like a figure (or the lead columns) gets its own name: one header, one meaning
    cfg_names = [f"config_{k}" if k in fig_cols or k in lead else k for k in cfg_cols]
    header = ["run"] + lead + fig_cols + cfg_names
    rows = [[label, i["task"], i["status"]] + [f.get(k) for k in fig_cols] + [i["config"].get(k) for k in cfg_cols]
            for label, f, i in zip(labels, finals, infos)]
    notes = []
    by_task: dict[str, list[str]] = {}
    for label, i in zip(labels, infos):
        by_task.setdefault(i["task"], []).append(label)
    if len(by_task) > 1:
        notes.append("the runs mix tasks (" + "; ".join(f"{TASK_NAMES[t]}: {', '.join(ls)}" for t, ls in by_task.items())
                     + "): their accuracy and loss are not on one scale (multi-label accuracy is per-label binary "
                     "accuracy, its loss BCE summed over labels), so those curves get one panel per task")
    unfinished = [f"{label} ({i['progress']})" for label, i in zip(labels, infos) if i["progress"] is not None]
    if unfinished:
        notes.append(f"unfinished run(s) (no model.json): {', '.join(unfinished)}; their figures are from the last "
                     "epoch they reached")
    for n in notes:
        log.warn(n)

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[_fmt(v, h, h in cfg_names) for h, v in zip(header, r)] for r in rows])
    figs = curve_figures(infos, labels)
    images = {}
    for key, fig in figs.items():
        fig.savefig(out_dir / f"{key}.png", dpi=100)
        images[key] = fig_uri(fig)  # closes the figure
    table = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(_fmt(v, h, h in cfg_names))}</td>" for h, v in zip(header, r))
                       + "</tr>" for r in rows) + "</table>")
    cfg_note = (f"config values that differ: {esc(', '.join(cfg_cols))}" if cfg_cols
                else "the runs' configs do not differ (other than name and output options)")
    notes_html = "".join(f'<p class="bad">{esc(n)}</p>' for n in notes)
    body = "".join(f'<section id="curve-{esc(k)}"><h2>{esc(k)}</h2><img class="fig" src="{u}" alt="{esc(k)} per epoch">'
                   "</section>" for k, u in images.items())
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>imgclf compare</title>'
           f"<style>{CSS}</style></head><body><main><h1>imgclf compare: {len(paths)} runs</h1>"
           f'<section id="table"><h2>Final figures</h2>{notes_html}<p class="note">{cfg_note}</p>{table}</section>{body}'
           "</main></body></html>")
    (out_dir / "compare.html").write_text(doc, encoding="utf-8")
    return {"header": header, "rows": rows, "out_dir": out_dir, "figures": sorted(out_dir / f"{k}.png" for k in figs),
            "differing": cfg_cols, "config_columns": cfg_names, "notes": notes}


def format_table(header: list[str], rows: list[list], config_columns: list[str] = ()) -> str:
    """Plain-text table for the terminal, one column per run (runs are few, figures many)."""
    cells = [[h] + [_fmt(r[j], h, h in config_columns) for r in rows] for j, h in enumerate(header)]
    widths = [max(len(c[j]) for c in cells) for j in range(len(cells[0]))]
    return "\n".join("  ".join(c[j].ljust(widths[j]) for j in range(len(c))).rstrip() for c in cells)
