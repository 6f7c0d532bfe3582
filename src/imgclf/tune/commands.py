"""``imgclf sweep`` and ``imgclf sweep-report``."""

from __future__ import annotations

import argparse
import json
import sys


def _duration(text: str) -> float:
    """--timeout as --time-limit reads it: 600, 90s, 20m, 1.5h. A plain number is passed on as it
    is, so a bad one is refused by load_spec with the study's own message."""
    from imgclf.config import parse_seconds

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_seconds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def add_sweep(sub) -> None:
    from imgclf.cli import _positive_int

    p = sub.add_parser("sweep", help="run a hyperparameter study from a YAML file (resumes if it exists)")
    p.add_argument("study", help="study YAML: name, base train options, space, sampler, pruner, budget")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes on this machine, 1 or more (cores split between them)")
    p.add_argument("--storage", help="SQLAlchemy URL shared by workers on several machines (default: sqlite file in the study folder)")
    p.add_argument("--n-trials", type=int, help="trials in the study (overrides the file)")
    p.add_argument("--timeout", type=_duration, metavar="DURATION",
                   help="time after which no trial starts: seconds, or 90s, 20m, 1.5h (overrides the file)")
    p.add_argument("--data", help="training data (overrides base.data)")
    p.add_argument("--directory", help="folder holding the study folder (default: studies)")
    # internal: one worker process of --workers N
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from imgclf.errors import UserError
    from imgclf.tune import sweep

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    spec = sweep.load_spec(args.study, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout,
                           data=args.data, directory=args.directory)
    if args.worker is not None:
        sweep.pin_worker(args.worker, args.of)
        try:
            sweep.run_worker(spec, args.worker)
        except KeyboardInterrupt:  # stopped by the sweep that started it, which says how to resume
            return 130
        return 0
    try:
        summary = sweep.run_study(spec, workers=args.workers, again=_again(args))
    except KeyboardInterrupt:  # run_study said how to resume the study
        return 130
    print(json.dumps(summary))
    print(f"report: imgclf sweep-report {spec.study_dir}")
    if summary.get("error"):  # every trial this sweep ran failed: scripts must not read that as success
        print(f"imgclf: error: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def _again(args: argparse.Namespace) -> str:
    """The command that resumes the study: this one (the study file as an absolute path, so that it
    works from the trial folders too)."""
    import os
    import shlex

    from imgclf.tune.sweep import _redact

    cmd = ["imgclf", "sweep", os.path.abspath(args.study)]
    storage = _redact(args.storage) if args.storage else None  # no password in a log line or a trial folder
    for flag, value in (("--workers", args.workers if args.workers != 1 else None), ("--storage", storage),
                        ("--n-trials", args.n_trials), ("--timeout", args.timeout), ("--data", args.data),
                        ("--directory", args.directory)):
        if value is not None:
            cmd += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(cmd)


def add_sweep_report(sub) -> None:
    p = sub.add_parser("sweep-report", help="HTML report of a study: what mattered and how, plus best.yaml")
    p.add_argument("study_dir", help="the study folder (studies/<name>)")
    p.add_argument("--storage", help="storage URL (default: the one recorded in STUDY_DIR/study.yaml)")
    p.add_argument("--out", "--output", dest="out", help="HTML file (default: STUDY_DIR/report.html)")
    p.set_defaults(func=cmd_sweep_report)


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from imgclf.tune.report import write_report

    res = write_report(args.study_dir, storage=args.storage, out=args.out)
    print(f"report: {res['html']}")
    if res.get("best_yaml"):
        print(f"best config: {res['best_yaml']}  (imgclf train --config {res['best_yaml']})")
    return 0


COMMANDS = [add_sweep, add_sweep_report]
