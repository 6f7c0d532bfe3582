"""Sub-commands that help a person understand a trained model: report, explain, calibrate, compare."""

from __future__ import annotations

import argparse

from imgclf.cli import DEVICE_HELP


def add_report(sub) -> None:
    p = sub.add_parser("report", help="write RUN/report.html: one self-contained page with curves, metrics, "
                                      "confusions, top losses, Grad-CAM and calibration")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", "--output", dest="out", help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar while decoding images the cache no longer holds (default: on)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from imgclf.evaluate.report import write_report

    print(f"report: {write_report(args.run, device=args.device, out=args.out, progress=args.progress)}")
    return 0


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM overlay PNGs: where the model looked")
    p.add_argument("run", help="run folder")
    p.add_argument("images", nargs="+", help="image files, folders, .zip/.tar(.gz) archives (read in place), "
                   "http(s) URLs, wildcards ('photos/*.jpg'), or - (stdin: an image, or image paths one a line)")
    p.add_argument("--layer", help="module to read (default: the last convolutional stage), e.g. layers.2")
    p.add_argument("--class", dest="class_name", help="explain this class instead of the predicted one")
    p.add_argument("--out", "--output", dest="out", help="folder for the PNGs (default: RUN/explain)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from imgclf.cli import stdin_inputs
    from imgclf.data.archives import row_name
    from imgclf.evaluate.explain import explain

    results = explain(args.run, stdin_inputs(args.images), layer=args.layer, class_name=args.class_name, out=args.out,
                      device=args.device)
    for r in results:  # names that are not UTF-8 as predict prints them: their bytes as \xNN
        if "error" in r:
            print(f"{row_name(r['input'])}\tERROR {r['error']}")
        else:
            top = "  ".join(f"{c} {p:.3f}" for c, p in r["top"])
            print(f"{row_name(r['input'])}\t{top}\t-> {row_name(r['output'])}")
    return 0 if all("error" not in r for r in results) else 1


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="refit the temperature (confidence calibration) of a trained run")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", help="held-out labelled images to fit on: its val/ split, else its test/ split, else all "
                                   "of it (default: the run's validation split)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar while decoding")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from imgclf.evaluate.calibrate import calibrate_run

    rec = calibrate_run(args.run, args.data, device=args.device, progress=args.progress)
    print(f"temperature {rec['temperature']:.4f} fitted on {rec['split']} (n={rec['n']}): "
          f"ECE {rec['ece_before']:.4f} -> {rec['ece_after']:.4f}, NLL {rec['nll_before']:.4f} -> {rec['nll_after']:.4f}")
    if "temperature_tta" in rec:
        print(f"with the run's test-time views (level {rec['tta_level']}): temperature {rec['temperature_tta']:.4f}, "
              f"ECE {rec['ece_before_tta']:.4f} -> {rec['ece_after_tta']:.4f}")
    print(f"stored in {args.run}/model.json (used by predict, evaluate and serve)")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="overlay the curves of several runs and tabulate what differs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", "--output", dest="out",
                   help="folder for figures, compare.csv and compare.html (default: <first run's parent>/compare, "
                        "or compare-2, compare-3... when that holds an earlier comparison)")
    p.add_argument("--exist-ok", action="store_true",
                   help="replace the comparison already in --out (or in <first run's parent>/compare)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from imgclf.evaluate.compare import compare_runs, format_table

    res = compare_runs(args.runs, args.out, exist_ok=args.exist_ok)
    print(format_table(res["header"], res["rows"], res["config_columns"]))
    print(f"figures, compare.csv and compare.html in {res['out_dir']}")
    return 0


COMMANDS = [add_report, add_explain, add_calibrate, add_compare]
