"""Compare runs: every run's curves overlaid on one figure per metric, and a table of final figures
and the config values that differ between them (printed, and as CSV and self-contained HTML).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import textwrap
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
# Config keys whose value is a dict of options (model_args: {width: 64, depth: 3}): the keys that
# differ get a column each (model_args.width), not one JSON cell that must be read side by side.
NESTED_CONFIG_DEFAULT = "(default)"  # a nested key a run does not set: the model's own default
# The terminal table: a cell wider than this wraps onto more lines (the CSV and HTML keep every
# value on one line), and runs that do not fit the terminal's width go on in another block.
CELL_WIDTH = 24
# Curves: colours first (tab10, as matplotlib's default), then line styles, then markers, so that
# every run has a line of its own: 10 runs differ by colour, 40 by colour and style.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "x")
COMPARE_FILES = ("compare.csv", "compare.html")


def natural_key(name: str) -> list:
    """Sort key with numbers as numbers: trial 2 before trial 10 (text sort: 0, 1, 10, 11, 2)."""
    return [int(t) if t.isdigit() else t.casefold() for t in re.split(r"(\d+)", name)]


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
    info["status"] = (f"unfinished: {info['progress']} (no model.json)" if info["progress"] is not None
                      else _ended_early(info) or "finished")
    return info


def _planned(info: dict) -> str:
    planned = info["config"].get("epochs")
    return f" of {math.ceil(planned)}" if isinstance(planned, (int, float)) else ""


def _ended_early(info: dict) -> str | None:
    """For a run with a model: how it ended when that was not its planned length, else None. A
    pruned sweep trial trains no further but writes its model as any run does, so only the
    trainer's stop reason (kept in last.pt) or, without one, the study's record tells it apart."""
    path = info["path"]
    stop, record = _stop_reason(path / "last.pt"), None
    if not stop:  # a sweep trial whose last.pt the sweep removed: its study kept the reason
        record = _trial_in_study(path)
        stop = (record or {}).get("stop")
    if stop:
        m = re.match(r"sweep: (?:pruned at epoch ([\d.]+)|(\S+) is NaN at epoch ([\d.]+))", stop)
        if m:
            epoch = m.group(1) or m.group(3)
            return f"pruned at epoch {epoch}{_planned(info)}" + (f" ({m.group(2)} NaN)" if m.group(2) else "")
        done = info["history"][-1].get("epoch") if info["history"] else None
        at = f" at epoch {done:g}{_planned(info)}" if isinstance(done, (int, float)) else ""
        return f"stopped{at}: {stop.split(':')[0]}"  # early stopping, time limit, a callback's own
    done, planned = (info["history"][-1].get("epoch") if info["history"] else None), info["config"].get("epochs")
    if isinstance(done, (int, float)) and isinstance(planned, (int, float)) and done >= math.ceil(planned):
        return None  # (a trial is not pruned at its last epoch)
    pruned = (record or {}).get("pruned_at")
    return None if pruned is None else f"pruned at epoch {pruned}{_planned(info)}"


def _stop_reason(last: Path) -> str | None:
    """The reason the trainer stopped before the planned length, as its checkpoint records it
    (mmap: the weights are not read); None when there was none or it cannot be read."""
    if not last.is_file():
        return None
    try:
        import torch

        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign last.pt: the status says what else is known
        return None
    stop = state.get("stop") if isinstance(state, dict) else None
    return stop if isinstance(stop, str) and stop else None


def _trial_in_study(path: Path) -> dict | None:
    """For a sweep trial's folder without its last.pt, what its study's SQLite file (the default
    storage, named in the folder's marker) records: ``pruned_at``, the epoch it was pruned at, and
    ``stop``, why the trainer stopped early (kept when the sweep removed last.pt); None when that
    cannot be read. Read-only, and without Optuna (the tune extra)."""
    import sqlite3

    from imgclf.tune.sweep import read_marker

    m = read_marker(path)
    url = (m or {}).get("storage")
    if not isinstance(url, str) or not url.startswith("sqlite:///") or not isinstance(m.get("trial"), int):
        return None
    db = Path(url.removeprefix("sqlite:///"))
    if not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT t.trial_id, t.state, s.study_id FROM trials t JOIN studies s ON "
                              "t.study_id = s.study_id WHERE s.study_name = ? AND t.number = ?",
                              (m.get("study"), m["trial"])).fetchone()
            if row is None:
                return None
            sid = con.execute("SELECT value_json FROM study_user_attributes WHERE study_id = ? AND key = ?",
                              (row[2], "imgclf_study_id")).fetchone()
            if m.get("study_id") and sid and json.loads(sid[0]) != m["study_id"]:
                return None  # a later study of the same name: not this folder's record
            step = con.execute("SELECT MAX(step) FROM trial_intermediate_values WHERE trial_id = ?",
                               (row[0],)).fetchone()
            stop = con.execute("SELECT value_json FROM trial_user_attributes WHERE trial_id = ? AND key = ?",
                               (row[0], "stop")).fetchone()
        finally:
            con.close()
        stop = json.loads(stop[0]) if stop else None
    except (sqlite3.Error, ValueError):
        return None
    pruned = int(step[0]) if row[1] == "PRUNED" and step and step[0] is not None else None
    return {"pruned_at": pruned, "stop": stop if isinstance(stop, str) and stop else None}


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
        # named by the images the temperature was fitted and scored on: a training run's val split,
        # or what `imgclf calibrate --data` was given (a test split's ECE labelled val_ece misled)
        where = _calibration_split(str(cal.get("split") or "val"))
        row[f"{where}_ece_before"] = cal.get("ece_before")
        row[f"{where}_ece_after"] = cal.get("ece_after") if applied else cal.get("ece_before")
    if "train_seconds" in s:
        row["train_seconds"] = s["train_seconds"]
    return row


def _calibration_split(split: str) -> str:
    """'val', 'test' or 'calib' (other images) from a calibration record's split, which is 'val'
    for a training run and says what `imgclf calibrate` read ('test split of DIR', 'the run's
    validation split of DIR', 'all of DIR')."""
    s = split.lower()
    if s.startswith("val") or "validation split" in s:
        return "val"
    if s.startswith("test"):
        return "test"
    return "calib"


def config_value(config: dict, key: str):
    """A config value by column name: model_args.width is model_args' width ("(default)" when
    the run's model_args leave it out)."""
    if key in config or "." not in key:
        return config.get(key)
    outer, inner = key.split(".", 1)
    sub = config.get(outer)
    if not isinstance(sub, dict):
        return None
    if inner not in sub and outer == "model_args":
        # an own net's default is known: channels_per_block 2 given in one run and left out in the
        # other is no difference (it was listed as '2 vs (default)')
        import inspect

        from imgclf.models.registry import OWN_MODELS

        net = OWN_MODELS.get(str(config.get("model") or ""))
        param = inspect.signature(net).parameters.get(inner) if net is not None else None
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return sub.get(inner, NESTED_CONFIG_DEFAULT)


def differing_config(infos: list[dict]) -> list[str]:
    """The config keys whose values differ between the runs; a dict-valued one (model_args) as
    its differing keys, model_args.width, where every run holds a dict or nothing there."""
    keys: list[str] = []
    for i in infos:
        keys += [k for k in i["config"] if k not in keys and k not in SKIP_CONFIG]
    out: list[str] = []
    for k in keys:
        values = [i["config"].get(k) for i in infos]
        if len({json.dumps(v, sort_keys=True) for v in values}) < 2:
            continue
        if all(isinstance(v, dict) or v is None for v in values) and any(values):
            inner: list[str] = []
            for v in values:
                inner += [s for s in (v or {}) if s not in inner]
            out += [f"{k}.{s}" for s in inner
                    if len({json.dumps(config_value(i["config"], f"{k}.{s}"), sort_keys=True) for i in infos}) > 1]
        else:
            out.append(k)
    return out


def _scale_note(key: str, task: str) -> str:
    if task != "multilabel":
        return ""
    if key.endswith("_acc"):
        return " (per-label binary accuracy)"
    if key.endswith("_loss"):
        return " (BCE summed over labels)"
    return ""


def curve_keys(infos: list[dict]) -> list[str]:
    """The metrics.csv columns that get a figure (KEY.png)."""
    metrics: list[str] = []
    for i in infos:
        for r in i["history"]:
            metrics += [k for k in r if k not in metrics and k not in SKIP_CURVES]
    return metrics


def curve_figures(infos: list[dict], labels: list[str]) -> dict[str, object]:
    """metric -> matplotlib figure with one line per run (one panel per task where runs of
    different tasks report a metric on different scales)."""
    from imgclf.evaluate.plots import plt

    metrics = curve_keys(infos)
    figs = {}
    style = {label: line_style(n) for n, label in enumerate(labels)}  # a run keeps its line in every figure
    for key in metrics:
        has = [(info, label) for info, label in zip(infos, labels) if any(key in r for r in info["history"])]
        tasks = list(dict.fromkeys(info["task"] for info, _ in has)) if key not in TASK_FREE_CURVES else [None]
        many = len(has) > 10  # the legend beside the panels: inside, 20 entries would hide the lines
        fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks) + (2.4 if many else 0), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for info, label in has:
                if task is not None and info["task"] != task:
                    continue
                pts = [(r["epoch"], r[key]) for r in info["history"] if key in r and "epoch" in r and r[key] == r[key]]
                if pts:
                    x, y = zip(*pts)
                    color, ls, marker = style[label]
                    ax.plot(x, y, color=color, linestyle=ls, marker=marker if len(pts) < 30 else None,
                            markersize=3, label=label)
            ax.set_xlabel("epoch")
            ax.set_ylabel(key + (_scale_note(key, task) if len(tasks) > 1 else ""))
            if key == "lr":
                ax.set_yscale("log")
            ax.set_title(f"{key}: {TASK_NAMES[task]} runs" if len(tasks) > 1 else key)
            ax.grid(alpha=0.3)
            if many:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
            else:
                ax.legend(fontsize=8)
        fig.tight_layout()
        figs[key] = fig
    return figs


def line_style(n: int) -> tuple[str, str, str]:
    """The n-th run's (colour, line style, marker): distinct for 240 runs."""
    from imgclf.evaluate.plots import plt

    colors = plt.get_cmap("tab10").colors
    return (colors[n % 10], LINE_STYLES[n // 10 % len(LINE_STYLES)],
            MARKERS[n // (10 * len(LINE_STYLES)) % len(MARKERS)])


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
    """The run folders named: a project folder ('compare runs') stands for the runs in it, in
    natural order (trials/2 before trials/10); a comparison's own folder (runs/compare, matched by
    runs/*) is passed over, with a line. Runs named in text order, as the shell's runs/* gives them
    (0, 1, 10, 11, 2), are put in natural order too; an order of one's own choosing is kept."""
    given = [Path(r) for r in runs]
    as_text = [str(p) for p in given]
    if as_text == sorted(as_text) or as_text == sorted(as_text, key=str.casefold):
        given.sort(key=lambda p: natural_key(str(p)))
    paths: list[Path] = []
    for r in given:
        if r.is_dir() and _is_comparison(r):
            log.info(f"{r} holds a comparison, not a run: left out")
            continue
        inside = [] if not r.is_dir() or (r / "config.yaml").exists() or (r / "metrics.csv").exists() else \
            sorted((d for d in r.iterdir() if d.is_dir() and ((d / "config.yaml").is_file() or
                                                             (d / "metrics.csv").is_file())),
                   key=lambda d: natural_key(d.name))
        paths += inside or [r]
    return _unique(paths)


def _unique(paths: list[Path]) -> list[Path]:
    """Each run folder once, however it was named (twice, through a symlink, as ./a and a, or
    inside a project folder named too), with one line for those left out."""
    seen: dict[Path, Path] = {}
    again: list[str] = []
    for p in paths:
        key = p.resolve()
        if key in seen:
            again.append(f"{p}" + (f" (= {seen[key]})" if str(p) != str(seen[key]) else ""))
        else:
            seen[key] = p
    if again:
        log.info(f"run(s) named more than once, compared once: {', '.join(again)}")
    return list(seen.values())


def _out_dir(out: str | Path | None, paths: list[Path], figures: list[str], exist_ok: bool) -> Path:
    """The folder the comparison goes to. By default <first run's parent>/compare, or compare-2,
    compare-3... when that is taken (as a run with no --name gets the next free name), the earlier
    comparison in it kept; with ``exist_ok``, compare itself, replaced. --out names one, refused
    when it holds the files this comparison writes unless ``exist_ok`` (as --name of an existing
    run is, without --exist-ok)."""
    if out is None:
        base = paths[0].parent / "compare"
        n, out_dir = 1, base
        while out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) \
                and not (exist_ok and _is_comparison(out_dir)):
            n += 1
            out_dir = base.with_name(f"{base.name}-{n}")
        return out_dir
    out_dir = Path(out)
    if out_dir.is_dir() and ((out_dir / "config.yaml").exists() or (out_dir / "metrics.csv").exists()):
        raise UserError(f"--out {out_dir} is a run folder: name a folder of its own for the comparison")
    held = [n for n in (*COMPARE_FILES, *(f"{k}.png" for k in figures)) if (out_dir / n).exists()]
    if held and not exist_ok:
        what = "an earlier comparison" if _is_comparison(out_dir) else ", ".join(held)
        raise UserError(f"--out {out_dir} holds {what}: pass --exist-ok to replace it, or name another folder "
                        f"(without --out, each comparison gets a folder of its own)")
    return out_dir


def _clear_comparison(out_dir: Path) -> None:
    """Replacing an earlier comparison (--exist-ok): its figures go too, or a metric the new runs
    lack would keep a figure of the old ones."""
    if _is_comparison(out_dir):
        for f in (*COMPARE_FILES, *(p.name for p in out_dir.glob("*.png"))):
            (out_dir / f).unlink(missing_ok=True)


def compare_runs(runs: list[str | Path], out: str | Path | None = None, exist_ok: bool = False) -> dict:
    """Write figures, compare.csv and compare.html into ``out`` (by default a new folder beside the
    first run); returns the table and file paths. ``exist_ok``: replace an earlier comparison there."""
    paths = _expand(runs)
    if len(paths) < 2:
        raise UserError("compare needs at least two run folders (or a folder that holds them, such as runs/)")
    if out is not None and Path(out).suffix.lower() in (".html", ".htm", ".csv", ".png"):
        raise UserError(f"--out {out}: the folder for the figures, compare.csv and compare.html; name a folder")
    infos = [_run_info(p) for p in paths]
    labels = _labels(paths)
    out_dir = _out_dir(out, paths, curve_keys(infos), exist_ok)
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
    rows = [[label, i["task"], i["status"]] + [f.get(k) for k in fig_cols]
            + [config_value(i["config"], k) for k in cfg_cols] for label, f, i in zip(labels, finals, infos)]
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
    if exist_ok:
        _clear_comparison(out_dir)
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


def format_table(header: list[str], rows: list[list], config_columns: list[str] = (),
                 width: int | None = None) -> str:
    """Plain-text table for the terminal, one column per run (runs are few, figures many). It
    keeps to the terminal's width: a long value wraps onto more lines, and the runs that do not
    fit go on in another block below, each block with the row names again."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns

    def wrap(text: str, w: int) -> list[str]:
        if len(text) > w and " " not in text and "/" in text:  # a path: broken after a /
            lines = [""]
            for part in re.findall(r"[^/]*/|[^/]+$", text):
                if lines[-1] and len(lines[-1]) + len(part) > w:
                    lines.append("")
                lines[-1] += part
            return [x[k:k + w] for x in lines for k in range(0, len(x), w)]
        return textwrap.wrap(text, w, break_on_hyphens=False) or [""]

    names = [wrap(h, CELL_WIDTH + 8) for h in header]
    name_w = max(len(x) for n in names for x in n)
    runs = [[wrap(_fmt(r[j], h, h in config_columns), CELL_WIDTH) for j, h in enumerate(header)] for r in rows]
    run_w = [max(len(x) for c in cells for x in c) for cells in runs]
    blocks: list[list[int]] = []
    used = width  # start a block with the first run
    for k, w in enumerate(run_w):
        if used + 2 + w > width and (not blocks or blocks[-1]):
            blocks.append([])
            used = name_w
        blocks[-1].append(k)
        used += 2 + w
    out: list[str] = []
    for b in blocks:
        if out:
            out.append("")
        for j, name in enumerate(names):
            for line in range(max(len(name), *(len(runs[k][j]) for k in b))):
                parts = [(name[line] if line < len(name) else "").ljust(name_w)]
                parts += [(runs[k][j][line] if line < len(runs[k][j]) else "").ljust(run_w[k]) for k in b]
                out.append("  ".join(parts).rstrip())
    return "\n".join(out)
