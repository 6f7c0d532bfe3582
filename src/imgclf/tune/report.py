"""The sweep report: one self-contained HTML file (PNG figures inlined as base64, no links) that
answers "what did each hyperparameter do", plus ``best.yaml`` ready for ``imgclf train --config``.

The figures are drawn here with matplotlib rather than with optuna.visualization.matplotlib
because they must show pruned trials too (at their last reported value, and dashed in the
curves): on a pruned study those are most of the evidence, and Optuna's plots drop them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from imgclf.config import TrainConfig, format_validation_error, load_yaml
from imgclf.errors import UserError
from imgclf.paths import write_problem
from imgclf.tune import sweep
from imgclf.tune.sweep import Param, Space, StudySpec, make_storage, tied_with_best

MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA's forest on fewer completed trials is noise


def min_trials_for_importance(n_params: int) -> int:
    """Completed trials fANOVA needs: a few per searched parameter, and never fewer than 4."""
    return max(MIN_TRIALS_FOR_IMPORTANCE, 2 * n_params + 2)

_STATE_COLOR = {"COMPLETE": "#1f77b4", "PRUNED": "#999999", "FAIL": "#d62728", "RUNNING": "#2ca02c", "WAITING": "#bcbd22"}


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to pick

    return Figure(figsize=(w, h), dpi=100)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


# ---------------------------------------------------------------------------------------------
# loading


def load_study_dir(study_dir: str | Path, storage: str | None = None):
    d = Path(study_dir)
    if not (d / "study.yaml").is_file():
        raise UserError(f"{d} is not a study folder (no study.yaml): give the folder 'imgclf sweep' wrote, studies/<name>")
    spec = StudySpec(**load_yaml(d / "study.yaml"))
    # the folder may have moved since the sweep, or be '.': its real parent ('.'.parent is '.')
    spec.directory = str(d.resolve().parent)
    if storage:
        spec.storage = storage
    elif (d / "study.db").exists() and (spec.storage or "").startswith("sqlite"):
        # the study.db beside study.yaml, wherever the folder is now and whatever it is called
        spec.storage = f"sqlite:///{(d / 'study.db').resolve()}"
    from imgclf.tune.sweep import _optuna

    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=spec.name, storage=make_storage(spec.storage_url, heartbeat=None))
    except KeyError:
        raise UserError(f"storage has no study named '{spec.name}' (give its --storage URL)") from None
    return spec, study


def _last_value(t) -> float | None:
    if t.value is not None:
        return t.value
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _duration(t) -> float | None:
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return None


def read_curve(run_dir: Path, metric: str) -> tuple[list[float], list[float]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return [], []
    xs, ys = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            v = row.get(metric)
            if v not in (None, ""):
                try:
                    y = float(v)
                except ValueError:
                    continue
                if not math.isnan(y):
                    xs.append(float(row["epoch"]))
                    ys.append(y)
    return xs, ys


# ---------------------------------------------------------------------------------------------
# figures


def importance(study, n_complete: int, n_params: int = 1) -> tuple[dict[str, float] | None, str]:
    """fANOVA importance, or None and the reason it cannot be computed yet."""
    need = min_trials_for_importance(n_params)
    if n_complete < need:
        return None, (f"parameter importance needs at least {need} completed trials for {n_params} parameter"
                      f"{'s' if n_params != 1 else ''} (this study has {n_complete}); run more trials")
    import optuna

    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as e:
        return None, f"parameter importance not available: {e}"
    if not imp:
        return None, "parameter importance not available: no parameter varied across the completed trials"
    return imp, ""


def plot_importance(imp: dict[str, float]) -> str:
    names = list(imp)[::-1]
    fig = _figure(6, 0.45 * len(names) + 1.0)
    ax = fig.add_subplot()
    ax.barh(names, [imp[n] for n in names], color="#1f77b4")
    for i, n in enumerate(names):
        ax.text(imp[n], i, f" {imp[n]:.2f}", va="center", fontsize=8)
    ax.set_xlabel("fANOVA importance (share of the metric's variance)")
    ax.set_xlim(0, max(imp.values()) * 1.2 or 1)
    return _png(fig)


def _x_values(p: Param, values: list) -> tuple[list[float], list[str] | None]:
    if p.kind == "categorical":
        labels = [str(p.decode(c)) for c in p.choices]
        return [float(p.choices.index(v)) if v in p.choices else math.nan for v in values], labels
    return [float(v) for v in values], None


def plot_param(p: Param, trials, metric: str, best_number: int | None) -> str:
    fig = _figure(3.3, 2.6)
    ax = fig.add_subplot()
    for state, marker, label in (("COMPLETE", "o", "complete"), ("PRUNED", "x", "pruned (last value)")):
        ts = [t for t in trials if t.state.name == state and p.name in t.params and _last_value(t) is not None]
        if not ts:
            continue
        xs, labels = _x_values(p, [t.params[p.name] for t in ts])
        ax.scatter(xs, [_last_value(t) for t in ts], marker=marker, s=22, color=_STATE_COLOR[state], label=label,
                   alpha=0.85)
    best = next((t for t in trials if t.number == best_number), None)
    if best is not None and p.name in best.params:
        bx, _ = _x_values(p, [best.params[p.name]])
        ax.scatter(bx, [best.value], marker="*", s=140, color="#ff7f0e", zorder=5, label="best")
    if p.kind == "categorical":
        labels = [str(p.decode(c)) for c in p.choices]
        ax.set_xticks(range(len(labels)), [lb[:12] for lb in labels], rotation=30 if len(labels) > 3 else 0, fontsize=7)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    else:
        if p.log:
            _log_axis(ax, p.low, p.high)
        pad = (p.high / p.low) ** 0.04 if p.log else (p.high - p.low) * 0.04
        ax.set_xlim(p.low / pad, p.high * pad) if p.log else ax.set_xlim(p.low - pad, p.high + pad)
    ax.set_xlabel(p.name.removeprefix("model_args.") + (" (model_args)" if p.name.startswith("model_args.") else ""))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no finished trial: an empty legend only warns
        ax.legend(fontsize=6, loc="best")
    return _png(fig)


def _log_axis(ax, low: float, high: float) -> None:
    """A log x axis labelled whatever its span. Over two decades or more, the powers of ten;
    under that there may be one power of ten in view or none (a blank axis), so four ticks
    spread over the range instead, with their values. Minor ticks carry no labels (they
    overlap at this size)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if high / low >= 100:
        return
    ticks = sorted({float(f"{v:.2g}") for v in np.geomspace(low, high, 4)})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.2g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis="x", labelsize=7)


def _normalise(p: Param, values: list) -> list[float]:
    if p.kind == "categorical":
        n = max(1, len(p.choices) - 1)
        return [p.choices.index(v) / n if v in p.choices else math.nan for v in values]
    f = math.log10 if p.log else float
    vals = [float(v) for v in values]
    lo, hi = f(min([p.low, *vals])), f(max([p.high, *vals]))
    return [(f(v) - lo) / (hi - lo) if hi > lo else 0.5 for v in vals]


def plot_parallel(params: list[Param], trials, metric: str, direction: str) -> str | None:
    # every scored trial: one whose optimizer does not read a conditional parameter (sgd's momentum
    # in an sgd/adam study) is drawn through that axis's 'unused' mark, not left out of the figure
    ts = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and _last_value(t) is not None]
    if not ts or not params:
        return None
    import matplotlib

    unused_y = -0.25  # apart from the axis, whose low end (0) is labelled at -0.05
    cols = []
    for p in params:
        drawn = [t.params[p.name] for t in ts if p.name in t.params]
        scaled = iter(_normalise(p, drawn)) if drawn else iter(())
        cols.append([next(scaled) if p.name in t.params else unused_y for t in ts])
    vals = [_last_value(t) for t in ts]
    vlo, vhi = min(vals), max(vals)
    cols.append([(v - vlo) / (vhi - vlo) if vhi > vlo else 0.5 for v in vals])
    n_axes = len(cols)
    fig = _figure(max(6.0, 1.5 * n_axes), 4.0)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    good = (lambda v: v) if direction == "maximize" else (lambda v: 1 - v)
    order = sorted(range(len(ts)), key=lambda i: (ts[i].state.name == "COMPLETE", good(cols[-1][i])))
    for i in order:  # best last, so it is drawn on top
        ys = [c[i] for c in cols]
        if ts[i].state.name == "COMPLETE":
            ax.plot(range(n_axes), ys, color=cmap(good(cols[-1][i])), lw=1.6, alpha=0.9)
        else:
            ax.plot(range(n_axes), ys, color="#aaaaaa", lw=0.9, ls="--", alpha=0.7)
    for j in range(n_axes):
        ax.axvline(j, color="black", lw=0.8)
    labels = [p.name.removeprefix("model_args.") for p in params] + [metric]
    ax.set_xticks(range(n_axes), labels, fontsize=8)
    ax.set_yticks([])
    partial = [j for j, p in enumerate(params) if any(p.name not in t.params for t in ts)]
    ax.set_ylim(unused_y - 0.06 if partial else -0.08, 1.08)
    for j in partial:
        ax.text(j + 0.03, unused_y, "unused", fontsize=6, va="center", style="italic")
    for j, p in enumerate(params):
        if p.kind == "categorical":
            n = max(1, len(p.choices) - 1)
            for k, c in enumerate(p.choices):
                ax.text(j + 0.03, k / n, str(p.decode(c))[:10], fontsize=6, va="center")
        else:
            drawn = [float(t.params[p.name]) for t in ts if p.name in t.params]
            lo, hi = min([p.low, *drawn]), max([p.high, *drawn])
            ax.text(j + 0.03, -0.05, f"{lo:.3g}", fontsize=6)
            ax.text(j + 0.03, 1.03, f"{hi:.3g}" + (" (log)" if p.log else ""), fontsize=6)
    ax.text(n_axes - 1 + 0.03, -0.05, f"{vlo:.3g}", fontsize=6)
    ax.text(n_axes - 1 + 0.03, 1.03, f"{vhi:.3g}", fontsize=6)
    ax.set_title("each line a trial (colour: metric, grey dashed: pruned)", fontsize=9)
    ax.set_xlim(-0.2, n_axes - 0.6)
    for s in ax.spines.values():
        s.set_visible(False)
    return _png(fig)


def plot_curves(study_dir: Path, trials, metric: str, best_number: int | None) -> str | None:
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    drawn = 0
    for t in trials:
        xs, ys = read_curve(study_dir / t.user_attrs.get("run_dir", f"trials/{t.number}"), metric)
        if not xs:
            continue
        style = {"COMPLETE": "-", "PRUNED": "--"}.get(t.state.name, ":")
        best = t.number == best_number
        ax.plot(xs, ys, style, color="black" if best else cmap(t.number % 20), lw=2.5 if best else 1.1,
                marker="o" if len(xs) < 3 else None, ms=3, alpha=1 if best else 0.8,
                label=f"#{t.number} (best)" if best else None)
        drawn += 1
    if not drawn:
        return None
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="grey", ls="-", label="complete"), Line2D([], [], color="grey", ls="--", label="pruned"),
               Line2D([], [], color="grey", ls=":", label="failed / running")]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=7, loc="best")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"validation curves of {drawn} trials", fontsize=9)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# best config


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def best_options(space: Space, best) -> tuple[dict[str, Any], str]:
    """What the study set for the best trial: base, fixed values and the trial's parameters, as
    recorded when it ran (whatever study.yaml says now); for a trial from before that record, the
    study.yaml with its parameters. Not its run folder's config.yaml, which also holds what the
    recipe resolved for the trial's length (warm-up, lr, batch size, epochs as run...): short trials
    then one long `imgclf train --config best.yaml --epochs N` must resolve those afresh.
    Returns the options and where they came from."""
    opts = best.user_attrs.get("options")
    if isinstance(opts, dict):
        return opts, f"trial {best.number}'s options"
    return sweep.study_options(space, best.params), "study.yaml with the trial's parameters"


def write_best_config(spec: StudySpec, space: Space, best, path: Path) -> dict[str, Any]:
    """The best trial's options, checked as `imgclf train --config` would read them, then written."""
    opts, source = best_options(space, best)
    head = (f"# best trial {best.number} of study '{spec.name}': {spec.metric} {best.value:.4f} (from {source})\n"
            f"# imgclf train --config {path.name}\n")
    body = yaml.safe_dump(opts, sort_keys=False)
    try:  # before writing: a best.yaml that would not train is never left behind
        TrainConfig(**{str(k).replace("-", "_"): v for k, v in (yaml.safe_load(body) or {}).items()})
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path))) from None
    _write_atomic(path, head + body)
    return opts


# ---------------------------------------------------------------------------------------------
# the page


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td.l{text-align:left}tr.best td{background:#fff3d6;font-weight:600}
.COMPLETE{color:#1f77b4}.PRUNED{color:#777}.FAIL{color:#d62728}.grid img{margin:4px}
.note{color:#666;font-style:italic}pre{background:#f6f6f6;padding:8px;font-size:12px}
"""


def _describe(choice: str | dict) -> str:
    if isinstance(choice, str):
        return choice
    rest = {k: v for k, v in choice.items() if k != "type"}
    return f"{choice.get('type', '?')} (" + ", ".join(f"{k}={v}" for k, v in rest.items()) + ")" if rest else choice.get("type", "?")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _epochs_cell(t, searched: bool) -> str:
    """The epochs a trial ran; where epochs is searched, also the number it drew when it ran fewer
    (pruned, stopped early): one column, not the parameter's beside the run's."""
    ran = t.user_attrs.get("epochs", "")
    drawn = t.params.get("epochs") if searched else None
    if drawn is None:
        return _fmt(ran)
    if ran == "" or float(ran) >= float(drawn):
        return _fmt(drawn)
    return f"{_fmt(ran)} of {_fmt(drawn)}"


def _trial_table(trials, space: Space, best_number: int | None) -> str:
    names = [n for n in space.params if n != "epochs"]  # a searched epochs is the epochs column
    searched_epochs = "epochs" in space.params
    head = "".join(f"<th>{html.escape(n.removeprefix('model_args.'))}</th>" for n in names)
    rows = []
    for t in trials:
        cells = "".join(f"<td>{_fmt(space.params[n].decode(t.params[n])) if n in t.params else ''}</td>" for n in names)
        if t.state.name == "PRUNED" and t.intermediate_values:
            note = f"pruned at epoch {max(t.intermediate_values)} ({_last_value(t):.4f})"
        elif sweep.duplicate(t):
            note = f"trains as #{t.user_attrs['same_as']} did (its optimizer does not read the other values): not run"
        elif sweep.interrupted(t):
            note = "interrupted (Ctrl-C or SIGTERM): queued again"
        elif t.state.name == "FAIL":
            note = t.user_attrs.get("error") or "worker died or was interrupted (queued again)"
        else:
            note = ""
        retry = t.system_attrs.get("failed_trial")
        if retry is not None:
            note = (note + f"; retry of #{retry}").lstrip("; ")
        dur = _duration(t)
        value = "" if t.value is None else f"{t.value:.4f}"
        cls = ' class="best"' if t.number == best_number else ""
        state = "duplicate" if sweep.duplicate(t) else "interrupted" if sweep.interrupted(t) else t.state.name.lower()
        rows.append(f"<tr{cls}><td>{t.number}</td><td class=\"l {t.state.name}\">{state}</td>"
                    f"<td>{value}</td>{cells}<td>{_epochs_cell(t, searched_epochs)}</td>"
                    f"<td>{'' if dur is None else f'{dur:.0f}'}</td><td class=\"l\">{html.escape(note)}</td></tr>")
    return (f"<table><tr><th>#</th><th>state</th><th>value</th>{head}<th>epochs</th><th>seconds</th><th>note</th></tr>"
            + "".join(rows) + "</table>")


def _out_path(out: str | Path | None, d: Path) -> Path:
    """Where the page goes: ``out`` (a folder: report.html in it), else STUDY_DIR/report.html; its
    folder is made, and one that cannot be is said in one line before any figure is drawn."""
    path = Path(out).expanduser() if out else d / "report.html"
    if path.is_dir():
        path = path / "report.html"
    problem = write_problem(path.parent, create=True)  # a real write: access() passes root everywhere
    if problem:
        what = "write in" if path.parent.is_dir() else "make the folder"
        raise UserError(f"--out {out or path}: cannot {what} {path.parent}: {problem}")
    return path


def write_report(study_dir: str | Path, storage: str | None = None, out: str | Path | None = None) -> dict[str, Any]:
    spec, study = load_study_dir(study_dir, storage)
    d = Path(study_dir)
    out_path = _out_path(out, d)
    space = Space(spec)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    best_number = best.number if best else None
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    # Ctrl-C or SIGTERM: Optuna's FAIL, but nothing failed (queued again), as sweep.summarize counts them
    counts["INTERRUPTED"] = sum(map(sweep.interrupted, trials))
    counts["FAIL"] -= counts["INTERRUPTED"]
    counts["DUPLICATE"] = sum(map(sweep.duplicate, trials))  # grid points an earlier trial trained: not run
    counts["PRUNED"] -= counts["DUPLICATE"]
    result: dict[str, Any] = {"trials": len(trials), **{k.lower(): v for k, v in counts.items()}}

    parts = [f"<h1>Study {html.escape(spec.name)}</h1>",
             f"<p>{len(trials)} trials: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
             + f". Objective: {spec.resolved_direction} {html.escape(spec.metric)} (best epoch of each trial). "
             + f"Sampler {html.escape(_describe(spec.sampler))}, pruner {html.escape(_describe(spec.pruner))}.</p>"]
    total = sum(_duration(t) or 0 for t in trials)
    parts.append(f"<p>Trial time in total: {total / 60:.1f} min.</p>")

    if best is not None:
        best_path = d / "best.yaml"
        opts = write_best_config(spec, space, best, best_path)
        result.update(best_yaml=str(best_path), best_trial=best.number, best_value=best.value)
        parts.append(f"<h2>Best: trial {best.number}, {html.escape(spec.metric)} {best.value:.4f}</h2>"
                     f"<p>Written to <code>{html.escape(str(best_path))}</code>; train it with "
                     f"<code>imgclf train --config {html.escape(str(best_path))}</code>.</p>"
                     f"<pre>{html.escape(yaml.safe_dump(opts, sort_keys=False))}</pre>")
        tied = tied_with_best(complete, best.value)
        if tied > 1:
            result["tied"] = tied
            parts.append(f"<p class=note>{tied} trials tie at this value: trial {best.number} is the first of "
                         "them, not a winner; more epochs or validation images would tell them apart.</p>")
    else:
        parts.append("<h2>Best</h2><p class=note>no trial has completed yet: no best config.</p>")

    parts.append("<h2>Trials</h2>" + _trial_table(trials, space, best_number))

    imp, why = (importance(study, len(complete), len(space.params)) if space.params
                else (None, "the study has no searched parameters"))
    result["importance"] = {k: float(v) for k, v in imp.items()} if imp else None
    parts.append("<h2>What mattered: parameter importance (fANOVA)</h2>")
    if imp:
        parts.append(_img(plot_importance(imp), "parameter importance")
                     + f"<p class=note>from {len(complete)} completed trials</p>")
    else:
        parts.append(f"<p class=note>{html.escape(why)}</p>")

    params = list(space.params.values())
    if imp:  # most important first
        params.sort(key=lambda p: -imp.get(p.name, 0.0))
    if params:
        parts.append(f"<h2>How: {html.escape(spec.metric)} against each parameter</h2><div class=grid>")
        parts += [_img(plot_param(p, trials, spec.metric, best_number), p.name) for p in params]
        parts.append("</div>")
        pc = plot_parallel(params, trials, spec.metric, spec.resolved_direction)
        parts.append("<h2>Parallel coordinates</h2>"
                     + (_img(pc, "parallel coordinates") if pc else "<p class=note>no finished trials yet</p>"))
    curves = plot_curves(d, trials, spec.metric, best_number)
    parts.append("<h2>Validation curves (pruned trials dashed)</h2>"
                 + (_img(curves, "validation curves") if curves else "<p class=note>no trial folder with metrics.csv here</p>"))

    page = (f"<!doctype html><html><head><meta charset=utf-8><title>study {html.escape(spec.name)}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")
    try:
        _write_atomic(out_path, page)
    except OSError as e:
        raise UserError(f"cannot write the report {out_path}: {e.strerror or e}") from None
    result["html"] = str(out_path)
    return result
