"""The ``imgclf`` command: one sub-command per job.

Every training option is generated from :class:`imgclf.config.TrainConfig`, so the CLI, YAML
files and the Python API can never drift apart. User errors are one line and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from imgclf.config import TrainConfig, parse_mapping
from imgclf.errors import UserError


def _parse_mapping(text: str) -> dict[str, Any]:
    """--model-args: config.parse_mapping (YAML files take the same form), its ValueError as
    argparse's one-line error; 'none' takes back a --config file's model arguments, as 'none' does
    for the other options."""
    if text.strip().lower() == "none":
        from imgclf.config import UNSET

        return UNSET
    try:
        return parse_mapping(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _MergeMapping(argparse.Action):
    """--model-args given twice: the second adds to the first (per key, the later wins), where
    argparse's store let it replace the first without a word: '--model-args channels=[16,32]
    ... --model-args dropout=0.3' trained the default channels."""

    def __call__(self, parser, namespace, values, option_string=None):
        from imgclf.config import UNSET, ReplacedArgs

        before = getattr(namespace, self.dest, None)
        if isinstance(before, dict) and isinstance(values, dict):
            values = type(before)({**before, **values})
        elif before is UNSET and isinstance(values, dict):  # 'none' first: the file's are taken back
            values = ReplacedArgs(values)
        setattr(namespace, self.dest, values)


def _unwrap(annotation):
    """Optional[X] -> X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _default_text(f) -> str:
    """A config field's default as its help shows it: on/off, 0.1, auto, none."""
    d = f.get_default(call_default_factory=True)
    if isinstance(d, bool):
        return "on" if d else "off"
    if d is None or d == {} or d == []:
        return "none"
    return f"{d:g}" if isinstance(d, float) else str(d)


def option_help_text(f) -> str:
    """The help of a training option: its description, ending with its default unless the
    description already states it (the None defaults: what the recipe picks)."""
    text = f.description or ""
    if f.is_required():
        return f"{text} (required, here or in --config)".strip()
    if "(default" not in text:
        text = f"{text} (default: {_default_text(f)})".strip()
    return text


def _or_none(kind):
    """An optional option's value type: 'none' takes back what a --config file set
    (--time-limit none, --batch-size none: the recipe chooses again)."""

    def parse(text: str):
        if text.strip().lower() == "none":
            from imgclf.config import UNSET

            return UNSET
        return kind(text)

    parse.__name__ = kind.__name__  # argparse's "invalid float value" names the type
    return parse


def add_config_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = p.add_argument_group("training options (also valid as keys of a --config YAML file)")
    for name, f in TrainConfig.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        ann = _unwrap(f.annotation)
        # default=SUPPRESS: an option not typed is absent, so a --config file's value is not
        # overridden by the default; the help states the default instead
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=option_help_text(f).replace("%", "%%"))
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is Literal:
            kw["choices"] = list(typing.get_args(ann))
        elif typing.get_origin(ann) is dict:
            kw["type"], kw["metavar"], kw["action"] = _parse_mapping, "K=V,...", _MergeMapping
        elif ann in (int, float, str):
            kw["type"] = _or_none(ann) if type(None) in typing.get_args(f.annotation) else ann
        elif type(None) in typing.get_args(f.annotation):  # --time-limit 10m, --lr auto: read by the config
            kw["type"] = _or_none(str)
        action = group.add_argument(flag, **kw)
        action.config_key = name  # errors in its value name the flag (_typed_options)


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless its text already says it; on/off pairs
    say which one is the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction):
            # Python's own suffix shows True/False/None
            text = text.replace(" (default: %(default)s)", "")
            if default is None or default is argparse.SUPPRESS or "(default" in text:
                return text
            return f"{text} (default: {'on' if default else 'off'})"
        if (not action.option_strings or default is None or default is argparse.SUPPRESS or "(default" in text
                or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._HelpAction
                              | argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and where to read more, not the whole usage (50 lines for
    train) above the one line that matters. Exit status 2, as argparse's."""

    def error(self, message: str) -> typing.NoReturn:
        m = _invalid_choice(message)
        if m:
            close = difflib.get_close_matches(m[0], m[1], n=1, cutoff=0.6)
            if close:
                message += f"; did you mean '{close[0]}'?"
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


def _invalid_choice(message: str) -> tuple[str, list[str]] | None:
    """argparse's "invalid choice: 'x' (choose from 'a', 'b')" -> ('x', ['a', 'b'])."""
    m = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
    if not m:
        return None
    return m.group(1), re.findall(r"'([^']*)'", m.group(2))


def _unknown_arguments(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unknown option --img-size; did you mean --image-size?' for what the command did not read."""
    from imgclf.config import OTHER_NAMES, other_setting
    from imgclf.data.arrays import is_number

    # compared without the dashes, which every option shares ('--bogus' is not close to '--out')
    known = [o[2:] for o in parser._option_string_actions if o.startswith("--")]
    unknown = []
    for tok in extras:
        if not tok.startswith("-") or tok == "-" or is_number(tok):
            continue  # an unknown option's value, most likely
        name = tok.split("=", 1)[0]
        hint = other_setting(name, [k.replace("-", "_") for k in known], flag=True)
        if hint is None:
            other = OTHER_NAMES.get(name.lstrip("-").replace("-", "_").lower(), "").replace("_", "-")
            close = [other] if other in known else difflib.get_close_matches(name.lstrip("-"), known, n=1, cutoff=0.6)
            hint = f"did you mean --{close[0]}?" if close else None
        unknown.append((name, hint))
    if not unknown:  # only stray words: one positional argument too many
        what = f"unexpected argument '{extras[0]}'"
    elif len(unknown) == 1:
        name, hint = unknown[0]
        what = f"unknown option {name}" + (f"; {hint}" if hint else "")
    else:
        what = "unknown options " + ", ".join(n + (f" ({h})" if h else "") for n, h in unknown)
    return f"{what} (unrecognized arguments: {' '.join(extras)})"


def _typed_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """Training options as typed on the command line, config key -> "--flag VALUE" (the last
    one wins, as in argparse), so an error in a value names what the user wrote."""
    flags = {o: a for a in parser._actions if getattr(a, "config_key", None) for o in a.option_strings}
    typed: dict[str, str] = {}
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        name, eq, value = tok.partition("=")
        action = flags.get(name)
        if action is None:
            continue
        if eq:
            typed[action.config_key] = f"{name} {value}"
        elif action.nargs == 0 or i + 1 >= len(argv):
            typed[action.config_key] = name
        else:
            typed[action.config_key] = f"{name} {argv[i + 1]}"
    return typed


def _dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """'--older-than -5m' as '--older-than=-5m': argparse takes a value that starts with '-' and is
    not a plain number for an option, and answers 'expected one argument' instead of the option's
    own error ('must be a positive finite duration'). Values of options that take one only."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return out + argv[i:]
        action = parser._option_string_actions.get(tok)
        if (action is not None and action.nargs is None and i + 1 < len(argv)
                and re.match(r"-\.?\d", argv[i + 1]) and argv[i + 1] not in parser._option_string_actions):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def build_parser() -> argparse.ArgumentParser:
    # no abbreviated options: argparse would silently read '--warmup 2' as --warmup-epochs, and a
    # script's abbreviation breaks the day another option shares its prefix
    p = _Parser(prog="imgclf", description="Train, evaluate, tune, explain, export and serve image classifiers.",
                allow_abbrev=False, formatter_class=_HelpFormatter)
    from imgclf import __version__

    p.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND",
                           parser_class=functools.partial(_Parser, allow_abbrev=False, formatter_class=_HelpFormatter))

    t = sub.add_parser("train", help="train a model (a run folder holds everything it produced)")
    t.add_argument("--config", help="YAML file of options; command-line options override it")
    t.add_argument("--resume", metavar="RUN", help="continue a killed or stopped run from its last checkpoint")
    add_config_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="top-1/top-5, per-class P/R/F1 and the confusion matrix on test data")
    e.add_argument("run", help="run folder")
    e.add_argument("--data", help="test data (default: the run's own test split, else its validation split)")
    e.add_argument("--label-column", help="label column of a pixel or label CSV given as --data (default: the "
                   "run's --label-column, else label)")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="test-time augmentation (default: the run's setting)")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--out", "--output", dest="out", help="folder for the figures (default: RUN/eval-<data>)")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar while decoding")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify image files and folders")
    pr.add_argument("run", help="run folder")
    pr.add_argument("inputs", nargs="+", help="image files, folders, .zip/.tar[.gz] archives of images (read in place), "
                    "http(s) URLs, wildcards ('photos/*.jpg'), or - (stdin: an image, or image paths one a line)")
    pr.add_argument("--top-k", type=_positive_int, default=5, help="classes per image (default: 5)")
    pr.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                    help="average the run's test-time views (flips, shifts), as evaluate does")
    pr.add_argument("--output", "--out", dest="output",
                    help="write predictions to a .csv or .json file (its folder is made if missing)")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.add_argument("--precision", choices=["fp32", "auto", "bf16", "fp16"], default="fp32",
                    help="fp32 (default): the exported model's answers; auto/bf16: autocast, ~2x the batch "
                         "throughput on CPUs with bf16 instructions, probabilities differ slightly")
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="train, evaluate and predict on the built-in CIFAR-10 sample",
                       description="Train the default recipe on the CIFAR-10 sample shipped in the package "
                       "(3,000 training photos, 10 classes), evaluate it on its 1,000 test photos and classify a "
                       "few: the whole flow in a few minutes on a laptop CPU, into runs/demo-fastnet-N.",
                       epilog="examples:\n  imgclf demo\n  imgclf demo --epochs 5 --project /tmp/runs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--project", default="runs", help="folder for the run")
    d.add_argument("--epochs", type=float, default=None, help="training epochs (default: the recipe's for the sample's size)")
    d.set_defaults(func=cmd_demo)

    for extra in _extension_commands():
        extra(sub)
    for cmd in sub.choices.values():
        _alias(cmd, "--out", "--output")  # one spelling of the other works everywhere
    return p


def _alias(parser: argparse.ArgumentParser, flag: str, alias: str) -> None:
    """Let ``alias`` mean ``flag`` where a command defines only ``flag`` (commands added by
    other modules)."""
    opts = parser._option_string_actions
    if flag in opts and alias not in opts:
        opts[flag].option_strings.append(alias)
        opts[alias] = opts[flag]


DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"


# Modules that add sub-commands: each defines COMMANDS, a list of functions taking the
# sub-parsers object. Listed here (not discovered) so the command set is explicit.
EXTENSION_MODULES = (
    "imgclf.data.commands",  # check, cache
    "imgclf.evaluate.commands",  # report, explain, calibrate, compare
    "imgclf.models.commands",  # lr-find
    "imgclf.deploy.commands",  # export, serve
    "imgclf.tune.commands",  # sweep, sweep-report
)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {n}")
    return n


def _output_file(text: str) -> Path:
    """--output checked before any image is read: a bad path found after classifying a large
    folder would lose every prediction."""
    out = Path(text)
    if out.is_dir():
        raise UserError(f"--output {text}: is a folder; name a .csv or .json file")
    if out.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--output {text}: name a .csv or .json file")
    from imgclf.paths import write_problem

    problem = write_problem(out.parent, create=True)
    if problem:
        raise UserError(f"--output {text}: cannot write there ({problem})")
    return out


def _extension_commands():
    import importlib

    out = []
    for mod in EXTENSION_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        out += getattr(m, "COMMANDS", [])
    return out


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields}


def cmd_train(args: argparse.Namespace) -> int:
    from imgclf.api import RESUME_OPTIONS, train

    opts = _train_options(args)
    if args.resume:
        from imgclf.tune.sweep import trial_advice

        advice = trial_advice(args.resume)  # resumed outside its study, the study would never see it
        if advice:
            raise UserError(advice)
        extra = set(opts) - RESUME_OPTIONS | ({"config"} if args.config else set())
        if extra:
            raise UserError(f"--resume continues a run with its saved config; drop: {', '.join('--' + k.replace('_', '-') for k in sorted(extra))}")
        res = train(resume=args.resume, **opts)
    else:
        if "data" not in opts and not args.config:
            raise UserError("train needs --data (a folder, a CSV, a CIFAR pickle folder or 'cifar10') or --config")
        if args.config and Path(args.config).is_dir():  # else the API's advice about its first argument
            raise UserError(f"--config {args.config} is a folder: give a YAML file")
        res = train(args.config, **opts)
    if os.environ.get("RANK", "0") != "0" or res.extras.get("finished_already"):  # under torchrun every rank
        return 0  # runs this: rank 0 speaks; a finished run given to --resume: train said so in one line
    print(f"run folder: {res.run_dir}")
    if res.test:
        _print_metrics(res.test)
    return 0


def _print_multilabel_metrics(m: dict) -> None:
    print(f"{m.get('split', 'test')}: n={m['n']}  mAP {m['map']:.4f} (micro {m['map_micro']:.4f})  "
          f"F1 micro {m['f1_micro']:.4f} macro {m['f1_macro']:.4f}  exact match {m['exact_match']:.4f}  "
          f"(thresholds: {m.get('thresholds', '0.5')})")
    print(f"{'class':<20} {'AP':>7} {'thresh':>7} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for r in sorted(m["per_class"], key=lambda r: -r["support"]):
        if r["support"] == 0:
            continue
        print(f"{r['class'][:20]:<20} {r['ap']:>7.4f} {r['threshold']:>7.3f} {r['precision']:>9.4f} {r['recall']:>9.4f} "
              f"{r['f1']:>9.4f} {r['support']:>8}")
    absent = sum(1 for r in m["per_class"] if r["support"] == 0)
    if absent:
        print(f"({absent} classes without positives in this split: no AP)")


def _print_metrics(m: dict) -> None:
    if m.get("task") == "multilabel":
        return _print_multilabel_metrics(m)
    topk = [k for k in m if k.startswith("top") and k != "top1"]
    head = f"{m.get('split', 'test')}: n={m['n']}  top-1 {m['top1']:.4f}"
    for k in topk:
        head += f"  top-{k[3:]} {m[k]:.4f}"
    head += f"  balanced acc {m['balanced_accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
    print(head)
    from imgclf.evaluate.metrics import majority_baseline

    if base := majority_baseline(m):
        print(f"(imbalanced classes: always answering '{base[0]}' scores top-1 {base[1]:.4f}, balanced acc {base[2]:.4f})")
    print(f"{'class':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for r in m["per_class"]:
        print(f"{r['class'][:20]:<20} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} {r['support']:>8}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgclf.api import evaluate

    m = evaluate(args.run, args.data, tta=args.tta, device=args.device, out=args.out, progress=args.progress,
                 label_column=args.label_column)
    _print_metrics(m)
    print(f"figures: {m['out_dir']}")
    return 0


# with --output, the terminal shows this many predictions (and every unreadable input): the file
# has them all, and 10,000 lines scrolled past say nothing
PREDICT_ROWS_SHOWN = 20


class StdinImage(bytes):
    """An image's bytes piped in as '-', named '<stdin>' in predict's and explain's rows."""

    imgclf_name = "<stdin>"


def stdin_inputs(inputs: list[str]) -> list:
    """``inputs`` with '-' (when no file is named so) read from stdin: an image piped in
    (``curl -s URL | imgclf predict RUN -``), or a list of paths, one a line (``find shoot -name
    '*.jpg' | imgclf predict RUN -``), as the command's inputs."""
    if "-" not in inputs or os.path.exists("-"):
        return list(inputs)
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("-: reads an image, or a list of image paths one a line, from stdin, and nothing was "
                        "piped in (e.g. find photos -name '*.jpg' | imgclf predict RUN -)")
    import io

    from PIL import Image, UnidentifiedImageError

    data = sys.stdin.buffer.read()
    try:
        with Image.open(io.BytesIO(data)):
            piped: list = [StdinImage(data)]
    except (UnidentifiedImageError, OSError, ValueError):
        try:
            piped = [line.strip("\r") for line in data.decode("utf-8").split("\n") if line.strip()]
        except UnicodeDecodeError:
            piped = [StdinImage(data)]  # neither an image nor text: its row says why
        if not piped:
            raise UserError("-: stdin was empty: pipe in an image, or image paths one a line") from None
    out: list = []
    for it in inputs:
        out += piped if it == "-" else [it]
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from imgclf.api import load
    from imgclf.data.archives import row_name, shown_name
    from imgclf.data.images import IMAGE_EXTENSIONS

    out = _output_file(args.output) if args.output else None
    inputs = stdin_inputs(args.inputs)
    clf = load(args.run, args.device, args.precision)
    # each unreadable input is said once, as its ERROR row below (it was a warning line too)
    preds = clf.predict(inputs, top_k=args.top_k, tta=args.tta, warn=False)
    if not preds:
        raise UserError(f"no images in {', '.join(map(str, inputs))} (extensions read: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    k = min(args.top_k, len(clf.classes))
    multilabel = clf.meta.get("task") == "multilabel"
    if out:  # written before anything is printed: a terminal that cannot show a name loses nothing
        if out.suffix.lower() == ".json":
            # a name that is not UTF-8 as \xNN (as class folder names are): a lone surrogate
            # (\udce9) is valid JSON text that strict parsers (serde, Go) refuse
            out.write_text(json.dumps([{**r, "input": shown_name(r["input"])} for r in preds], indent=2))
        else:
            # file names that are not UTF-8 (Linux hands them over as lone surrogates) are
            # written back as the bytes they were
            with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                w = csv.writer(f)
                w.writerow(["input", "error"] + (["labels"] if multilabel else [])
                           + [x for i in range(1, k + 1) for x in (f"class{i}", f"prob{i}")])
                for r in preds:
                    row = [r["input"], r.get("error", "")]
                    if multilabel:  # the labels above their tuned thresholds: the model's answer
                        row.append("|".join(c for c, _ in r.get("labels", [])))
                    for c, p in r.get("top", []):
                        row += [c, f"{p:.6f}"]
                    w.writerow(row)
    shown = 0
    for r in preds:
        if "error" in r:  # every problem is shown, whatever the file holds
            print(f"{row_name(r['input'])}\tERROR {r['error']}")
        elif out is None or shown < PREDICT_ROWS_SHOWN:  # with --output the file has every row
            shown += 1
            print(f"{row_name(r['input'])}\t" + "  ".join(f"{c} {p:.3f}" for c, p in r["top"])
                  + ("\tlabels: " + (", ".join(c for c, _ in r["labels"]) or "-") if "labels" in r else ""))
    if out:
        bad = sum("error" in r for r in preds)
        rest = len(preds) - bad - shown
        print((f"... {rest} more in {out}\n" if rest else "")
              + f"wrote {out}: {len(preds)} input{'' if len(preds) == 1 else 's'}" + (f", {bad} unreadable" if bad else ""))
    return 0 if all("error" not in r for r in preds) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from imgclf.api import load, train
    from imgclf.engine.recipe import default_run_name
    from imgclf.models.registry import resolve_name
    from imgclf.sample import sample_dir

    if args.epochs is not None and not (0 < args.epochs < float("inf")):  # as train says it, not pydantic's words
        raise UserError(f"--epochs {args.epochs:g}: must be greater than 0")
    data = sample_dir()
    print(f"imgclf demo: training on the built-in CIFAR-10 sample in {data}")
    # demo-fastnet-N, not cifar10-fastnet-N: a demo run is not mistaken for one on the real data
    name = default_run_name(Path(args.project), "demo", resolve_name("auto"))
    res = train(data=str(data), project=args.project, epochs=args.epochs, name=name)
    print(f"run folder: {res.run_dir}")
    # train's closing evaluation scored the sample's test split with the run's test-time views,
    # as 'imgclf evaluate' would: the same figures, without decoding and scoring it twice
    if res.test:
        _print_metrics(res.test)
    some = sorted((data / "test").glob("*/*.jpg"))[::97][:5]
    for r in load(res.run_dir).predict(some, top_k=3):
        print(f"{Path(r['input']).parent.name}/{Path(r['input']).name}: " + ", ".join(f"{c} {p:.2f}" for c, p in r["top"]))
    print(f"curves: {res.run_dir / 'curves.png'}  confusion: {res.run_dir / 'confusion.png'}")
    return 0


# optional packages -> the extra that installs them (or the pip install line, where no extra does)
_EXTRAS = {"onnx": "deploy", "onnxruntime": "deploy", "fastapi": "deploy", "uvicorn": "deploy",
           "multipart": "deploy", "optuna": "tune", "psycopg2": "pip install psycopg2-binary",
           "psycopg": "pip install psycopg2-binary"}


class _ClosedPipeSafe:
    """sys.stdout or sys.stderr while a command runs: once the reader of a pipe has gone
    (``imgclf predict RUN photos/ | head -1``), what is written after is dropped, not raised as
    BrokenPipeError, and the descriptor is pointed at os.devnull, as Python's docs advise (Note on
    SIGPIPE), so the interpreter's last flush does not fail either. The command carries on: for
    predict and evaluate only printing is left by then; a training run (``imgclf train ... 2>&1 |
    head``) finishes and writes its run folder, where the error used to stop it mid-epoch and,
    before its first checkpoint, remove the folder. Exiting at once, as SIGPIPE's default would,
    saves nothing worth a lost run."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def _close(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's capture): dropping is enough
            pass

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer...: the stream's own
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a file name the terminal cannot show is escaped, not a crash
            stream.reconfigure(errors="backslashreplace")
    streams = sys.stdout, sys.stderr
    guarded = sys.stdout, sys.stderr = _ClosedPipeSafe(sys.stdout), _ClosedPipeSafe(sys.stderr)
    try:
        return _main(argv)
    finally:
        for g in guarded:
            g.flush()  # still guarded: a reader gone by now is dropped too
        sys.stdout, sys.stderr = streams


def _main(argv: list[str] | None) -> int:
    from imgclf.config import command_line_options

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _subparsers(parser)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:  # argparse: 'invalid choice' + 14 names
        close = difflib.get_close_matches(argv[0], list(commands), n=1, cutoff=0.5)
        parser.error(f"unknown command '{argv[0]}'; " + (f"did you mean '{close[0]}'?" if close else
                                                         f"the commands are {', '.join(commands)}"))
    if argv and argv[0] in commands:
        argv = argv[:1] + _dash_values(commands[argv[0]], argv[1:])
    args, extras = parser.parse_known_args(argv)
    command = commands.get(getattr(args, "command", None) or "", parser)
    if extras:  # named by the command's own parser, with its options to suggest from
        command.error(_unknown_arguments(command, extras))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with command_line_options(_typed_options(command, argv)):
            return args.func(args)
    except UserError as e:
        print(f"imgclf: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise  # a missing core dependency is a broken install: keep the traceback
        # the README installs from the clone: there is no 'imgclf' on a package index to name
        how = extra if extra.startswith("pip ") else f"from the imgclf clone, pip install -e '.[{extra}]'"
        print(f"imgclf: error: this command needs the optional package '{e.name}': {how}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # SIGTERM, taken as Ctrl-C to stop a run cleanly (trainer.sigterm_as_ctrl_c): the status says so
        trainer = sys.modules.get("imgclf.engine.trainer")  # imported by any command that trains
        if trainer is not None and trainer.STOPPED_BY:
            print("imgclf: terminated", file=sys.stderr)
            return 128 + trainer.STOPPED_BY[0]
        print("imgclf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
