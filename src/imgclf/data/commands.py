"""``imgclf check``: the data checks of :mod:`imgclf.data.checks` as a command."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from imgclf.config import TrainConfig

# The options of 'train' that decide what is read and how it is decoded: the same values give the
# same splits and the same cache keys, so a check before training decodes nothing twice.
DATA_OPTIONS = ("data", "val_data", "test_data", "val_split", "split_seed", "csv_layout", "csv_shape", "label_column",
                "image_size", "resize", "cache_dir", "workers", "task", "label_mode", "classes", "images",
                "keep_empty", "progress")


def add_check(sub) -> None:
    from imgclf.cli import add_config_options

    p = sub.add_parser(
        "check",
        help="check data before training: unreadable files, duplicates and leakage, class balance, layout",
        description="Find what silently ruins a model: unreadable files, exact and near duplicates within a "
        "split and across train/val/test, tiny or imbalanced classes, image sizes and modes, pixel arrays "
        "read with the wrong channel layout; writes a JSON file and a PNG grid of samples per class. "
        "Exit status 1 when something serious was found.",
    )
    p.add_argument("folder", nargs="?", metavar="DATA", help="the data, as --data takes it ('imgclf check photos/')")
    p.add_argument("--config", help="a training YAML file: its data options are used")
    p.add_argument("--near-threshold", type=int, default=None,
                   help="max pHash Hamming distance of near duplicates (default 4 of 64 bits)")
    p.add_argument("--max-images", type=int, default=None, help="hash at most this many images for duplicates (default: all)")
    p.add_argument("--out", "--output", dest="out", help="folder for check.json and samples.png (default runs/check-<data>)")
    p.add_argument("--json", help="write the findings here instead of OUT/check.json")
    add_config_options(p, skip=tuple(f for f in TrainConfig.model_fields if f not in DATA_OPTIONS))
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from imgclf.config import load_yaml, make_config
    from imgclf.data.cache import build_cache, cache_root
    from imgclf.data.checks import NEAR_THRESHOLD, check_outputs, run_checks
    from imgclf.data.sources import load_source
    from imgclf.engine import recipe
    from imgclf.errors import UserError

    # the check's own options before any image is decoded (a large set takes minutes), as a typo
    # in a training option is: run_checks says the same of the threshold, for its Python callers
    if args.near_threshold is not None and not 0 <= args.near_threshold <= 16:
        raise UserError(f"--near-threshold {args.near_threshold}: expected 0..16 bits of 64 (default {NEAR_THRESHOLD})")
    if args.max_images is not None and args.max_images < 2:
        # 0 or -5 hashed a few images per split and searched nothing: leave it out to search them all
        raise UserError(f"--max-images {args.max_images}: expected 2 or more images to compare "
                        "(leave it out to search every image)")
    opts = {k: v for k, v in vars(args).items() if k in DATA_OPTIONS and v is not None}
    if args.folder is not None:  # 'imgclf check photos/', as evaluate and predict take their inputs
        if "data" in opts and opts["data"] != args.folder:
            raise UserError(f"check takes the data once: {args.folder} or --data {opts['data']}")
        opts["data"] = args.folder
    if "data" not in opts and not (args.config and "data" in load_yaml(args.config)):
        raise UserError("check needs --data (a folder, a CSV, a CIFAR pickle folder or 'cifar10') or --config")
    # the same validation, defaults and messages as 'train': a training config is read whole, so
    # a typo in any of its options is said before the data are checked, not when training starts
    cfg = make_config(args.config, **opts)
    check_outputs(args.out, args.json)  # an unwritable --out/--json before decoding, not after
    root = cache_root(cfg.cache_dir)
    src = load_source(cfg.data, val_data=cfg.val_data, test_data=cfg.test_data, val_split=cfg.val_split,
                      split_seed=cfg.split_seed, csv_layout=cfg.csv_layout, csv_shape=cfg.csv_shape,
                      label_column=cfg.label_column, cache_dir=root, task=cfg.task, label_mode=cfg.label_mode, classes=cfg.classes,
                      images=cfg.images, keep_empty=cfg.keep_empty)
    native = src.train.images.shape[1] if src.train.images is not None else None
    size = cfg.image_size or recipe.auto_image_size(src.train.paths, native)
    # build_cache directly, not api._cache_splits: unreadable files are findings here, not warnings
    cached = {name: build_cache(split, size, cfg.resize, root / "images", workers=cfg.workers,
                                progress=cfg.progress, desc=f"decoding {name}")
              for name, split in src.splits().items()}
    out = Path(args.out) if args.out else Path("runs") / f"check-{src.name}"
    report = run_checks(src, cached, out_dir=out, max_images=args.max_images,
                        near_threshold=NEAR_THRESHOLD if args.near_threshold is None else args.near_threshold)
    json_path = report.write_json(Path(args.json) if args.json else out / "check.json")
    print_report(report, cached)
    print(f"findings: {json_path}   samples: {report.grid}")
    return 1 if report.serious else 0


def print_report(report, cached) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=False)
    sizes = ", ".join(f"{n} {len(cs)}" for n, cs in cached.items())
    # paths and class names are the user's text, not markup: "[bold]" or "img[/1].jpg" in a name
    # would be styled away, or raise rich's MarkupError
    console.print(f"[bold]{escape(str(report.data))}[/bold]: {len(report.classes)} class{'es' if len(report.classes) != 1 else ''}, {sizes} readable images, "
                  f"{report.image_size}px; checked in {report.seconds:.1f} s", highlight=False,
                  soft_wrap=True)  # one line: piped output (80 columns) would break it mid-phrase
    if not report.findings:
        console.print("[green]no problems found[/green]")
        return
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    table = Table(show_lines=False)
    table.add_column("severity")
    table.add_column("kind")
    table.add_column("finding", overflow="fold")
    for f in report.findings:
        table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.kind, escape(f.message))
    console.print(table)


def add_cache(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="list or free the cache: decoded images, extracted archives, downloads",
        description="Every run decodes its images once into the cache folder (~/.cache/imgclf, IMGCLF_CACHE "
        "or --cache-dir) and later runs reuse them; nothing there is removed behind your back. This lists "
        "the entries, the oldest-used first, and --clear removes them (each is rebuilt when a run needs it). "
        "Downloaded data sets and saved arrays are kept unless --downloads is given.",
    )
    p.add_argument("--cache-dir", help="the cache folder (default: IMGCLF_CACHE, else ~/.cache/imgclf)")
    p.add_argument("--older-than", metavar="AGE",
                   help="only entries no run has used for AGE: seconds, or a number ending in m, h or d (30d)")
    p.add_argument("--clear", action="store_true", help="remove the entries listed (and left-over partial files)")
    p.add_argument("--downloads", action="store_true",
                   help="include the data itself: downloaded data sets (CIFAR) and arrays saved by "
                        "imgclf.train(data=(x, y)), which runs trained on them read to resume or evaluate")
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from imgclf.config import parse_seconds
    from imgclf.data.cache import _gib, cache_root
    from imgclf.data.cache_admin import age_text, entries, remove_partial
    from imgclf.errors import UserError

    root = cache_root(args.cache_dir)
    try:
        min_age = None if args.older_than is None else parse_seconds(args.older_than)
    except ValueError as e:
        if re.fullmatch(r"\s*0+(\.0*)?\s*[smhd]?\s*", args.older_than):  # 'everything' is --clear alone
            raise UserError(f"--older-than {args.older_than}: must be more than 0; 'imgclf cache --clear' without "
                            "--older-than removes every entry") from None
        raise UserError(f"--older-than {args.older_than}: {e}") from None
    if not root.is_dir():
        if args.cache_dir:
            raise UserError(f"--cache-dir {args.cache_dir}: no such folder")
        print(f"{root}: empty (no run has used it yet)")
        return 0
    now = time.time()
    aged = [e for e in entries(root) if min_age is None or now - e.used > min_age]
    chosen = [e for e in aged if args.downloads or e.kind not in ("download", "arrays")]
    age = f" --older-than {args.older_than}" if min_age is not None else ""
    if not args.clear:
        if aged:
            table = Table(title=escape(str(root)), title_justify="left")
            for col in ("kind", "size", "last used"):
                table.add_column(col, justify="right" if col == "size" else "left", no_wrap=True)
            table.add_column("what", overflow="fold")
            for e in aged:
                table.add_row(e.kind, _gib(e.nbytes), age_text(now - e.used), escape(e.what))
            Console(soft_wrap=False).print(table)
        kept = "" if args.downloads or len(chosen) == len(aged) else " (downloads and arrays are kept unless --downloads)"
        print(f"{len(aged)} entries{f' unused for {args.older_than}' if age else ''}, "
              f"{_gib(sum(e.nbytes for e in aged))}; 'imgclf cache --clear{age}' removes {len(chosen)} of them, "
              f"{_gib(sum(e.nbytes for e in chosen))}{kept}")
        return 0
    freed, failed, busy = 0, [], []
    for e in chosen:
        if e.in_use():  # a running training or evaluation reads it: deleting it frees nothing until it ends
            busy.append(e)
            continue
        try:
            e.remove()
            freed += e.nbytes
        except OSError as err:  # someone else's file in a shared cache; Windows: open by a run
            failed.append(f"{e.paths[0]}: {err.strerror or err}")
    remove_partial(root)
    print(f"removed {len(chosen) - len(failed) - len(busy)} entries from {root}, {_gib(freed)} freed"
          + (f"; kept {len(busy)} in use by a running process ({_gib(sum(e.nbytes for e in busy))}): "
             "run the same command again when it has finished" if busy else ""))
    for e in busy:
        print(f"  in use: {e.paths[0]} ({e.what})")
    for line in failed:
        print(f"  kept {line}")
    return 1 if failed else 0


COMMANDS = [add_check, add_cache]
