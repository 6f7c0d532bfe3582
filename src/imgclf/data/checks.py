"""Data checks: what silently ruins a model before training starts.

Unreadable files, a single class, empty or tiny classes, exact, near and mirrored duplicates within
a split and across train/val/test (leakage, label conflicts), val/test data that is the training
data's own files, class imbalance, image sizes (tiny images) and modes, pixel arrays read with the
wrong channel layout, and a PNG grid of random samples per class. Everything works on the
decoded-image cache that training uses, so checking decodes nothing twice.

``run_checks`` returns a :class:`CheckReport`; ``imgclf check`` prints it and ``imgclf train``
summarises it in a line or two and writes ``RUN/check.json``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data.cache import CachedSplit, release_pages
from imgclf.data.phash import equal_groups, hash_images, mirror_pairs, near_pairs
from imgclf.data.sources import DataSource, Split, one_class_advice
from imgclf.errors import UserError
from imgclf.paths import write_problem

SEVERITIES = ("error", "warning", "info")
SPLIT_ORDER = ("train", "val", "test")

NEAR_THRESHOLD = 4  # pHash bits; on CIFAR-10 every pair within 4 is the same photo (re-shot,
# recoloured or re-cropped), while at 6 a few different photos of similar scenes appear
MIN_CLASS_IMAGES = 10  # fewer training images than this is an error: the class cannot be learnt
MIN_CLASS_FRACTION = 0.1  # of the median class: a warning
IMBALANCE_WARN = 10.0  # largest / smallest class count

# Mean correlation of horizontally and vertically adjacent pixels (per image and channel), on
# 2,000 CIFAR-10 test JPEGs: 0.880 as they are (5th percentile of single images 0.75), 0.596
# when written planar and read interleaved, 0.294 when written interleaved and read planar.
# The score is a mean over up to _LAYOUT_SAMPLE images, so its own spread is about 0.005.
SCRAMBLED_BELOW = 0.75
_LAYOUT_SAMPLE = 500

GRID_COLS = 8
GRID_CELL = 64  # px per sample in the grid (small images are enlarged so a scramble is visible)
GRID_PAD = 2
GRID_LABEL_W = 120
GRID_MAX_ROWS = 100  # classes shown

_MAX_LISTED = 200  # pairs/paths kept per finding in the JSON
_CONFLICTS_SHOWN = 5  # label conflicts named in a message
TINY_SIDE = 0.25  # of the input side: a short side at or under this is blown up 4x or more


@dataclass
class Finding:
    kind: str
    severity: str  # "error" | "warning" | "info"
    message: str
    paths: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class CheckReport:
    data: str
    classes: list[str]
    image_size: int
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    grid: str | None = None
    seconds: float = 0.0

    @property
    def serious(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def kinds(self, severity: str | None = None) -> list[str]:
        return [f.kind for f in self.findings if severity is None or f.severity == severity]

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "classes": self.classes,
            "image_size": self.image_size,
            "serious": self.serious,
            "errors": self.count("error"),
            "warnings": self.count("warning"),
            "findings": [asdict(f) for f in self.findings],
            "stats": self.stats,
            "grid": self.grid,
            "seconds": round(self.seconds, 2),
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        check_outputs(json_path=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def summary(self, already_reported: frozenset[str] = frozenset()) -> str:
        """One line: counts by severity and the most serious finding not of an already-reported
        kind (``train`` has already printed the source's own problems once)."""
        if not self.findings:
            return f"data check: no problems found ({self.seconds:.1f} s)"
        parts = [f"{n} {s}{'s' if n > 1 else ''}" for s in SEVERITIES if (n := self.count(s))]
        fresh = [f for f in self.findings if f.kind not in already_reported]
        if not fresh:
            return f"data check: {', '.join(parts)} (reported above)"
        worst = min(fresh, key=lambda f: SEVERITIES.index(f.severity))
        return f"data check: {', '.join(parts)}; {worst.message}"


# ---------------------------------------------------------------------------------------------
# items: every cached image of every split, with a name (path or split[index]) and its label


@dataclass
class _Items:
    split: list[str]  # per split name, in SPLIT_ORDER
    caches: list[CachedSplit]
    sources: list[Split]
    origin: str
    classes: list[str]

    def name(self, s: int, row: int) -> str:
        paths = self.sources[s].paths
        return paths[row] if paths is not None else f"{self.split[s]}[{row}]"

    def short(self, name: str) -> str:
        """A path as messages show it: relative to the data folder when inside it."""
        return name.removeprefix(self.origin.rstrip("/") + "/")

    def label(self, lab: int | tuple[int, ...]) -> str:
        """A label as messages show it: a class name, or a multi-label image's class names."""
        if isinstance(lab, tuple):
            return ", ".join(_show(self.classes[c]) for c in lab) or "no class"
        return _show(self.classes[lab])


def _show(name: str) -> str:
    """A class name as messages list it: quoted like repr when the bare text would hide part of it
    (the trailing space of 'cat ', an empty name, a line break)."""
    return name if name and name.isprintable() and name == name.strip() else repr(name)


def _items(source: DataSource, cached: dict[str, CachedSplit]) -> _Items:
    splits = source.splits()
    names = [n for n in SPLIT_ORDER if n in cached and n in splits]
    return _Items(names, [cached[n] for n in names], [splits[n] for n in names], source.root or source.origin,
                  list(source.classes))


# ---------------------------------------------------------------------------------------------
# entry point


def check_outputs(out_dir: str | Path | None = None, json_path: str | Path | None = None) -> None:
    """A one-line UserError when the check could not write its files (an --out that is a file,
    a read-only place): to be called before the work, not found after it."""
    if out_dir is not None:
        problem = write_problem(Path(out_dir), create=False)
        if problem:
            raise UserError(f"cannot write the check's files to {out_dir}: {problem}")
    if json_path is not None:
        path = Path(json_path)
        problem = f"{path} is a folder" if path.is_dir() else write_problem(path.parent, create=False)
        if problem:
            raise UserError(f"cannot write the findings to {path}: {problem}")


def run_checks(
    source: DataSource,
    cached_splits: dict[str, CachedSplit],
    *,
    out_dir: str | Path | None = None,
    near_threshold: int = NEAR_THRESHOLD,
    max_images: int | None = None,
    size_sample: int = 2000,
    grid: bool = True,
    seed: int = 0,
    search_all: str = "run without --max-images to search them all",
) -> CheckReport:
    """Check ``source`` using its decoded ``cached_splits`` (from :func:`imgclf.data.cache.build_cache`).

    ``max_images`` caps how many images are hashed for duplicates (a random sample per split
    beyond it; None: all); ``search_all`` tells the user how to search them all. The sample grid
    is written to ``out_dir/samples.png`` when ``out_dir`` is given. Nothing here raises for a
    data problem: problems become findings.
    """
    t0 = time.perf_counter()
    if grid and out_dir is not None:
        check_outputs(out_dir)
    items = _items(source, cached_splits)
    size = int(items.caches[0].images.shape[1]) if items.caches else 0
    report = CheckReport(data=source.origin, classes=list(source.classes), image_size=size)
    rng = np.random.default_rng(seed)

    report.findings += _source_problems(source)
    if source.task == "single" and len(source.classes) < 2:
        # train refuses this (api.py): a check that passes must not leave it to train to say so
        report.findings.append(Finding(
            "one_class", "error",
            f"only one class ({', '.join(map(_show, source.classes))}) in {source.origin}; a classifier needs "
            f"two or more: {one_class_advice(source)}",
            details={"classes": list(source.classes)}))
    report.findings += _unreadable(items)
    counts, class_findings = _class_counts(items, source.classes)
    report.stats["counts"] = counts
    report.findings += class_findings
    layout_stats, layout_findings = _layout(source, items, rng)
    report.stats["layout"] = layout_stats
    report.findings += layout_findings
    # Perceptual hashes of scrambled pixels match by accident; exact copies stay exact.
    if near_threshold is not None and not 0 <= near_threshold <= 16:
        # the band search splits 64 bits into threshold + 1 bands: past 16 every band is a few
        # bits wide and all images pair up; below 0 nothing would be searched at all
        raise UserError(f"--near-threshold {near_threshold}: expected 0..16 bits of 64 (default {NEAR_THRESHOLD})")
    dup_findings, dup_stats = _duplicates(items, near_threshold if not layout_findings else None, max_images, rng,
                                          search_all)
    report.findings += dup_findings
    report.stats["duplicates"] = dup_stats
    size_stats, size_findings = _sizes_and_modes(items, size, size_sample, rng)
    report.stats["images"] = size_stats
    report.findings += size_findings
    if grid and out_dir is not None and items.caches:
        path = Path(out_dir) / "samples.png"
        write_sample_grid(items.caches[0], source.classes, path, seed=seed)
        report.grid = str(path)
    report.findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------
# what the source and the cache builder already know


def _source_problems(source: DataSource) -> list[Finding]:
    out = []
    for p in source.problems:
        if "has no images: class skipped" in p:
            folder = p.removeprefix("class folder ").split(" has no images")[0]
            out.append(Finding("empty_class", "error", p, [folder]))
        else:
            out.append(Finding("source", "warning", p))
    return out


def _unreadable(items: _Items) -> list[Finding]:
    out = []
    for s, (cs, split) in enumerate(zip(items.caches, items.sources)):
        if len(cs.rows) == len(split):
            continue
        bad = np.setdiff1d(np.arange(len(split)), cs.rows)
        paths = [items.name(s, int(i)) for i in bad[:_MAX_LISTED]]
        # the cache's problems are sorted by row, one per unreadable row
        reasons = ([_reason(p, path) for p, path in zip(cs.problems, paths)] if len(cs.problems) == len(bad)
                   else cs.problems[:_MAX_LISTED])
        first = items.short(paths[0]) + (f": {reasons[0]}" if len(cs.problems) == len(bad) else "")
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        out.append(Finding(
            "unreadable", "error",
            f"{len(bad)} unreadable image(s) in {items.split[s]}, skipped in training: {first}{more}; "
            "re-export or delete them (the findings' JSON lists every path)",
            paths, {"split": items.split[s], "count": int(len(bad)), "reasons": reasons},
        ))
    return out


def _reason(problem: str, path: str) -> str:
    """The reason of a cache problem '<path>: <reason>'. Its path is spelt as by the run that decoded
    the file, relative or absolute (the cache is keyed by real paths, so 'check --data d' reuses what
    '--data /abs/d' decoded): messages name the file as this run does, so the old spelling is cut off
    after the file's name."""
    head = Path(path).name + ": "
    i = problem.find(head)
    return problem[i + len(head):] if i >= 0 else problem


# ---------------------------------------------------------------------------------------------
# classes


def _label_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:  # multi-hot: images showing each class
        return (labels > 0.5).sum(axis=0).astype(np.int64)
    return np.bincount(labels.astype(np.int64), minlength=n_classes)[:n_classes]


GROUP_CLASSES = 3  # more classes than this with the same finding are said in one


def _some(classes: list[str], train: np.ndarray, picked: list[int], shown: int = 6) -> str:
    """'a' 3, 'b' 0, ... and N more: the fewest first."""
    order = sorted(picked, key=lambda c: (train[c], classes[c]))
    text = ", ".join(f"{classes[c]!r} {int(train[c])}" for c in order[:shown])
    return text + (f" and {len(order) - shown} more" if len(order) > shown else "")


def _class_counts(items: _Items, classes: list[str]) -> tuple[dict, list[Finding]]:
    per_split = {n: _label_counts(cs.labels, len(classes)) for n, cs in zip(items.split, items.caches)}
    counts = {n: {c: int(k) for c, k in zip(classes, v)} for n, v in per_split.items()}
    out: list[Finding] = []
    if "train" not in per_split or not classes:
        return counts, out
    train = per_split["train"]
    median = float(np.median(train))

    def where(c: int) -> str:
        others = [f"{n} {int(v[c])}" for n, v in per_split.items() if n != "train"]
        return f" ({', '.join(others)})" if others else ""

    # classes named 0..K-1 are the indices of integer labels (a pixel CSV's or an .npz's): one no
    # image has in any split is a number no row uses, labels from 1 (EMNIST letters) or with a
    # gap (Sign Language MNIST has no 9), not a class to 'add images to or remove'
    labelled_by_index = classes == [str(i) for i in range(len(classes))] and all(
        s.paths is None for s in items.sources)  # arrays: folders named 0..9 have no empty class
    unused = ([c for c in range(len(classes)) if all(v[c] == 0 for v in per_split.values())]
              if labelled_by_index else [])
    if unused:
        shown = ", ".join(classes[c] for c in unused[:10]) + (", ..." if len(unused) > 10 else "")
        out.append(Finding("unused_labels", "warning",
                           f"no image is labelled {shown}: integer labels are class indices 0..{len(classes) - 1}, "
                           f"so the model has {len(unused)} class(es) without images"
                           + (" (labels that start at 1? subtract 1 from every label)" if unused == [0] else ""),
                           details={"classes": [classes[c] for c in unused]}))
    too_few = [c for c, n in enumerate(train) if n < MIN_CLASS_IMAGES and c not in unused]
    scarce = [c for c, n in enumerate(train) if MIN_CLASS_IMAGES <= n < MIN_CLASS_FRACTION * median]
    flagged = set(too_few) | set(scarce)
    if len(too_few) > GROUP_CLASSES:
        # one finding for many classes: COCO128's 78 classes under 10 images were 78 errors, and
        # the check's real problems were lost among them
        out.append(Finding("few_images", "error",
                           f"{len(too_few)} of {len(classes)} classes have fewer than {MIN_CLASS_IMAGES} training "
                           f"images each ({_some(classes, train, too_few)}): each needs at least "
                           f"{MIN_CLASS_IMAGES}, better hundreds; add images or remove those classes",
                           details={"classes": {classes[c]: int(train[c]) for c in too_few}}))
        too_few = []
    if len(scarce) > GROUP_CLASSES:
        out.append(Finding("few_images", "warning",
                           f"{len(scarce)} classes have under {MIN_CLASS_FRACTION:.0%} of the median class's "
                           f"{median:g} training images ({_some(classes, train, scarce)})",
                           details={"classes": {classes[c]: int(train[c]) for c in scarce}}))
        scarce = []
    for c in too_few:
        n = train[c]
        out.append(Finding("few_images", "error",
                           f"class {classes[c]!r} has only {n} training image(s){where(c)}: "
                           f"it needs at least {MIN_CLASS_IMAGES}, better hundreds; add images or "
                           "remove the class",
                           details={"class": classes[c], "train": int(n)}))
    for c in scarce:
        n = train[c]
        out.append(Finding("few_images", "warning",
                           f"class {classes[c]!r} has {n} training images, under "
                           f"{MIN_CLASS_FRACTION:.0%} of the median class ({median:g}){where(c)}",
                           details={"class": classes[c], "train": int(n)}))
    # imbalance among the classes not reported above (those already explain their own ratio)
    rest = [c for c in range(len(train)) if c not in flagged]
    big = max(rest, key=lambda c: train[c], default=None)
    small = min(rest, key=lambda c: train[c], default=None)
    if len(rest) >= 2 and train[small] > 0 and train[big] / train[small] >= IMBALANCE_WARN:
        ratio = train[big] / train[small]
        out.append(Finding("imbalance", "warning",
                           f"classes are imbalanced: {classes[big]!r} has {train[big]} training images, "
                           f"{classes[small]!r} {train[small]} ({ratio:.0f}x)"
                           + (" among the classes not named above" if flagged else "") + "; consider --class-weights "
                           "balanced or --sampler balanced (and --monitor val_bal_acc to keep the epoch that "
                           "does best on every class), or collecting more of the small classes",
                           details={"ratio": round(float(ratio), 2)}))
    return counts, out


# ---------------------------------------------------------------------------------------------
# duplicates


def _sample_rows(items: _Items, max_images: int | None, rng) -> list[np.ndarray]:
    rows = [cs.rows for cs in items.caches]
    total = sum(len(r) for r in rows)
    if max_images is None or total <= max_images:
        return rows
    frac = max_images / total
    return [np.sort(rng.choice(r, max(1, int(len(r) * frac)), replace=False)) for r in rows]


def _duplicates(items: _Items, threshold: int | None, max_images: int | None, rng,
                search_all: str = "") -> tuple[list[Finding], dict]:
    """Exact copies (pixel digests) and, unless ``threshold`` is None, near duplicates and
    mirrored copies (pHash of each image against the others and their mirror images)."""
    t0 = time.perf_counter()
    rows = _sample_rows(items, max_images, rng)
    ph_parts, dg_parts, pm_parts = [], [], []
    for cs, r in zip(items.caches, rows):
        ph, dg, pm = hash_images(cs.images, r)
        ph_parts.append(ph)
        dg_parts.append(dg)
        pm_parts.append(pm)
    if not rows:
        return [], {}
    split_of = np.concatenate([np.full(len(r), s, dtype=np.int64) for s, r in enumerate(rows)])
    row_of = np.concatenate(rows).astype(np.int64)
    ph, dg, pm = np.concatenate(ph_parts), np.concatenate(dg_parts), np.concatenate(pm_parts)
    # label of each hashed image (single-label ints; multi-hot rows as tuples of their classes)
    label_of: list = []
    for cs, r in zip(items.caches, rows):
        pos = np.searchsorted(cs.rows, r)
        lab = np.asarray(cs.labels)[pos]
        label_of += [tuple(np.flatnonzero(x > 0.5).tolist()) if lab.ndim == 2 else int(x) for x in lab]

    read = [0]

    def pixels(g: int) -> np.ndarray:
        images = items.caches[split_of[g]].images
        read[0] += 1
        if read[0] % 256 == 0:  # a data set full of copies must not map the whole cache into RSS
            release_pages(images)
        return np.array(images[row_of[g]])

    # exact: equal digests, confirmed byte for byte
    exact_groups: list[np.ndarray] = []
    for group in equal_groups(dg):
        rest = list(group)
        while len(rest) > 1:
            ref = pixels(rest[0])
            same = [g for g in rest if g == rest[0] or np.array_equal(pixels(g), ref)]
            if len(same) > 1:
                exact_groups.append(np.asarray(same))
            taken = set(same)  # a set: 10k copies of one image must not cost 10k^2 list scans
            rest = [g for g in rest if g not in taken]
    group_id = np.full(len(ph), -1, dtype=np.int64)
    for k, g in enumerate(exact_groups):
        group_id[g] = k
    exact_pairs = [(int(g[0]), int(m)) for g in exact_groups for m in g[1:]]
    # A val/test image that is the very file of an image of another split (--val-data pointing into
    # the training folder, a link) is no copy to delete: the splits overlap. Checked against every
    # member of the group, as the pairs join each copy to the group's first image only.
    fid = {g: _file_id(items, int(split_of[g]), int(row_of[g])) for grp in exact_groups for g in grp}
    held = {(int(split_of[g]), f) for g, f in fid.items() if f is not None}
    overlap = [(a, b) for a, b in exact_pairs if split_of[a] != split_of[b] and
               ((int(split_of[a]), fid[b]) in held or (int(split_of[b]), fid[a]) in held)]
    gone = set(overlap)
    exact_pairs = [p for p in exact_pairs if p not in gone]
    none = np.zeros((0, 3), dtype=np.int64)
    near = near_pairs(ph, threshold) if threshold is not None else none
    near = near[(group_id[near[:, 0]] < 0) | (group_id[near[:, 0]] != group_id[near[:, 1]])]
    mirror = mirror_pairs(ph, pm, threshold) if threshold is not None else none
    # a pair that is also a plain near duplicate or copy (a symmetric picture) is reported as that
    seen = {(int(a), int(b)) for a, b, _ in near}
    mirror = mirror[[(int(a), int(b)) not in seen and (group_id[a] < 0 or group_id[a] != group_id[b])
                     for a, b, _ in mirror]] if len(mirror) else mirror
    stats = {
        "hashed": int(len(ph)),
        "of": int(sum(len(cs.rows) for cs in items.caches)),
        "exact_groups": len(exact_groups),
        "near_pairs": int(len(near)),
        "mirror_pairs": int(len(mirror)),
        "near_threshold": threshold,
    }
    out: list[Finding] = _overlap_findings(items, split_of, row_of, overlap)
    out += _pair_findings(items, split_of, row_of, label_of, exact_pairs, None)
    out += _pair_findings(items, split_of, row_of, label_of, [(int(a), int(b)) for a, b, _ in near], near[:, 2],
                          threshold)
    out += _pair_findings(items, split_of, row_of, label_of, [(int(a), int(b)) for a, b, _ in mirror], mirror[:, 2],
                          threshold, mirrored=True)
    if stats["hashed"] < stats["of"]:
        out.append(Finding("duplicates_sampled", "info",
                           f"duplicates searched in a random {stats['hashed']} of {stats['of']} images"
                           + (f" ({search_all})" if search_all else "")))
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return out, stats


def _file_id(items: _Items, s: int, row: int) -> tuple[int, int] | None:
    """(device, inode) of an image's file, the same through links; None for pixel arrays."""
    if items.sources[s].paths is None:
        return None
    try:
        st = os.stat(items.sources[s].paths[row])
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _overlap_findings(items, split_of, row_of, pairs) -> list[Finding]:
    by_splits: dict[tuple[int, int], list[int]] = {}
    for a, b in pairs:
        a, b = sorted((a, b), key=lambda g: int(split_of[g]))
        by_splits.setdefault((int(split_of[a]), int(split_of[b])), []).append(b)
    out = []
    for (sa, sb), bs in sorted(by_splits.items()):
        na, nb = items.split[sa], items.split[sb]
        files = list(dict.fromkeys(items.name(sb, int(row_of[b])) for b in bs))
        paths = items.sources[sb].paths
        try:  # the folder the user pointed at: the one all of the split's files share
            folder = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        except ValueError:
            folder = ""
        out.append(Finding(
            "same_files_across_splits", "error",
            f"{nb} data {folder or '?'} is (part of) the {na} data: the same files are in both ({len(files)} of "
            f"{len(items.caches[sb])} {nb} images, e.g. {items.short(files[0])}); {nb} scores would be scores "
            f"on {na} images: point --{nb}-data at images that are not in {na}",
            files[:_MAX_LISTED], {"splits": [na, nb], "count": len(files), "folder": folder}))
    return out


def _pair_findings(items, split_of, row_of, label_of, pairs, dist, threshold: int | None = None,
                   mirrored: bool = False) -> list[Finding]:
    exact = dist is None
    by_splits: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for k, (a, b) in enumerate(pairs):
        sa, sb = int(split_of[a]), int(split_of[b])
        if (sa, sb) != tuple(sorted((sa, sb))):
            a, b, sa, sb = b, a, sb, sa
        by_splits.setdefault((sa, sb), []).append((a, b, 0 if exact else int(dist[k])))
    if exact:
        what, sign = "exact copies", "="
    elif mirrored:  # training flips images: a mirrored copy is the same example to the model
        what, sign = f"mirrored copies (pHash distance <= {threshold} to the mirror image)", "~ mirror of"
    else:
        what, sign = f"near-duplicates (pHash distance <= {threshold})", "~"

    def name(g: int) -> str:
        return items.name(int(split_of[g]), int(row_of[g]))

    def pair(a: int, b: int, labels: bool) -> str:
        def one(g: int) -> str:
            return items.short(name(g)) + (f" ({items.label(label_of[g])})" if labels else "")
        return f"{one(b)} {sign} {one(a)}"

    out = []
    for (sa, sb), ps in sorted(by_splits.items()):
        na, nb = items.split[sa], items.split[sb]
        # pairs with different labels first, in the message and in the JSON: they are what to fix
        ps.sort(key=lambda p: label_of[p[0]] == label_of[p[1]])
        conflicts = sum(label_of[a] != label_of[b] for a, b, _ in ps)
        listed = [[name(a), name(b)] + ([] if exact else [d]) for a, b, d in ps[:_MAX_LISTED]]
        paths = list(dict.fromkeys(p for pr in listed for p in pr[:2]))
        note = ""
        if conflicts:
            shown = ", ".join(pair(a, b, True) for a, b, _ in ps[:min(conflicts, _CONFLICTS_SHOWN)])
            more = f" (and {conflicts - _CONFLICTS_SHOWN} more)" if conflicts > _CONFLICTS_SHOWN else ""
            note = f"; {conflicts} with different labels, fix the wrong label: {shown}{more}"
            if conflicts < len(ps):
                note += f"; {len(ps) - conflicts} with the same label"
        if conflicts < len(ps):
            note += f"{',' if conflicts else ';'} e.g. {pair(*ps[conflicts][:2], False)}"
        details = {"splits": [na, nb], "pairs": listed, "count": len(ps), "label_conflicts": int(conflicts)}
        if mirrored:
            details["mirrored"] = True
        if sa != sb:
            n_imgs = len({b for _, b, _ in ps})
            out.append(Finding(
                "duplicate_across_splits" if exact else "near_duplicate_across_splits", "error",
                f"{n_imgs} {nb} image(s) are {what} of {na} images: leakage, {nb} scores will be "
                f"inflated{note}; remove one image of each pair (the findings' JSON lists the pairs)",
                paths, details))
        else:
            extra = len({b for _, b, _ in ps})
            advice = ("; they weigh double in training: delete the extra copies" if exact else
                      "; harmless unless they are copies that should not be there")
            # An exact copy under two labels is a wrong label for certain (the same pixels cannot be
            # both, and training is taught both): serious, as an unreadable file is. A near duplicate
            # under two labels most likely is one too (at the default threshold pairs are the same
            # photo), but a re-crop can show another object: a warning, up from info.
            severity = ("error" if conflicts else "warning") if exact else ("warning" if conflicts else "info")
            out.append(Finding(
                "duplicate" if exact else "near_duplicate", severity,
                f"{len(ps)} pair(s) of {what} within {na} ({extra} redundant image(s)){note}{advice}",
                paths, details))
    return out


# ---------------------------------------------------------------------------------------------
# image sizes and modes (file headers only)


def _sizes_and_modes(items: _Items, size: int, sample: int, rng) -> tuple[dict, list[Finding]]:
    from PIL import Image

    from imgclf.data.images import _ALPHA_MODES

    sizes: Counter = Counter()
    modes: Counter = Counter()
    with_alpha: Counter = Counter()  # per mode: images with an alpha channel or a transparent colour
    formats: Counter = Counter()
    shapes = []  # (short side, width, height, path) of each sampled file
    readable = 0
    for split, cs in zip(items.sources, items.caches):
        readable += len(cs.rows)
        if split.paths is None:
            if split.images is not None and len(split.images):
                h, w = split.images.shape[1:3]
                sizes[f"{w}x{h}"] += len(split.images)
                modes["array"] += len(split.images)
            continue
        paths = split.paths
        # readable files only: the unreadable ones are reported (and counted) on their own
        pick = rng.choice(cs.rows, min(sample, len(cs.rows)), replace=False) if len(cs.rows) else []
        for i in pick:
            # PIL warns about big-but-allowed images (DecompressionBombWarning) and odd tags: as in
            # images._decode, the log gets no raw warnings (unreadable files are reported elsewhere)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(paths[i]) as im:  # reads the header only, no pixels decoded
                        w, h = im.size
                        sizes[f"{w}x{h}"] += 1
                        modes[im.mode] += 1
                        with_alpha[im.mode] += im.mode in _ALPHA_MODES or "transparency" in im.info
                        formats[im.format or "?"] += 1
                        shapes.append((min(w, h), w, h, paths[i]))
            except Exception:  # unreadable files are reported from the cache builder's list
                continue
    n = sum(modes.values())
    stats = {"sampled": n, "sizes": dict(sizes.most_common(10)), "distinct_sizes": len(sizes),
             "modes": dict(modes), "formats": dict(formats)}
    out: list[Finding] = []
    if shapes:
        ss = np.asarray([x[0] for x in shapes])
        stats["short_side"] = {"min": int(ss.min()), "median": float(np.median(ss)), "max": int(ss.max())}
        small = float((ss < size / 2).mean())
        if small > 0.25:
            out.append(Finding("upscaled", "warning",
                               f"{small:.0%} of sampled images are under half of the {size}px input side "
                               f"(median short side {np.median(ss):g}px): they are blown up; "
                               f"consider --image-size {int(np.median(ss))}"))
        # a few images far smaller than the input, and than the rest (when all are, the above says it)
        limit, median = int(size * TINY_SIDE), float(np.median(ss))
        tiny = sorted(x for x in shapes if x[0] <= limit and x[0] < median / 2)
        if tiny:
            of = f" of {n} sampled" if n < readable else ""
            out.append(Finding("tiny", "warning",
                               f"{len(tiny)} image(s){of} are far smaller than the {size}px input (short side "
                               f"{limit}px or less; e.g. {items.short(tiny[0][3])}, {tiny[0][1]}x{tiny[0][2]}): "
                               "blown up, they show next to nothing; check or delete them",
                               [x[3] for x in tiny[:_MAX_LISTED]], {"count": len(tiny), "max_side": limit}))
    odd = {m: k for m, k in modes.items() if m not in ("RGB", "array") or with_alpha[m]}
    if odd:
        desc = ", ".join(f"{k} {m}" for m, k in sorted(odd.items(), key=lambda x: -x[1]))
        # say what the conversion does to the modes present, not to modes that are not there
        how = []
        alpha = sorted(m for m in odd if with_alpha[m])
        if alpha:
            how.append(f"{'/'.join(alpha)}: transparency composited on white")
        deep = sorted(m for m in odd if m.startswith("I") or m == "F")
        if deep:
            how.append(f"{'/'.join(deep)}: high-bit-depth values scaled to 8 bits")
        out.append(Finding("modes", "info",
                           f"{sum(odd.values())} of {n} sampled images are not plain RGB ({desc}): converted to RGB"
                           + (f" ({'; '.join(how)})" if how else "")))
    return stats, out


# ---------------------------------------------------------------------------------------------
# channel layout of pixel arrays


class _Rows:
    """``images[rows]`` read lazily, a slice at a time (no copy of the whole sample)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows, self.shape = images, rows, (len(rows),) + tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: slice) -> np.ndarray:
        return np.asarray(self.images[self.rows[s]])


def neighbour_correlation(images: np.ndarray) -> float:
    """Mean Pearson correlation of horizontally and vertically adjacent pixels, per image and
    channel (flat channels left out): about 0.9 for photos, far lower for scrambled pixels."""
    sums, counts = [0.0, 0.0], [0, 0]
    # a few images at a time: 500 images of 256 px as float32 with their shifted copies take 2 GB
    step = max(1, (8 << 20) // max(1, 4 * int(np.prod(images.shape[1:]))))
    for i in range(0, len(images), step):
        x = np.asarray(images[i : i + step], dtype=np.float32).transpose(0, 3, 1, 2)  # [N, C, H, W]
        for d, (a, b) in enumerate(((x[..., :, :-1], x[..., :, 1:]), (x[..., :-1, :], x[..., 1:, :]))):
            a = a.reshape(a.shape[0] * a.shape[1], -1)
            b = b.reshape(b.shape[0] * b.shape[1], -1)
            a = a - a.mean(axis=1, keepdims=True)
            b = b - b.mean(axis=1, keepdims=True)
            den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
            ok = den > 1e-6
            sums[d] += float(((a * b).sum(axis=1)[ok] / den[ok]).sum())
            counts[d] += int(ok.sum())
    scores = [s / c for s, c in zip(sums, counts) if c]
    return float(np.mean(scores)) if scores else 1.0


def _as_if(images: np.ndarray, layout: str) -> np.ndarray:
    """The same bytes re-read as if their file layout were ``layout`` (the current reading being
    the other one)."""
    n, h, w, _ = images.shape
    if layout == "planar":  # read as interleaved: the bytes are images.reshape(n, -1)
        return images.reshape(n, 3, h, w).transpose(0, 2, 3, 1)
    return images.transpose(0, 3, 1, 2).reshape(n, h, w, 3)  # read as planar


def _layout(source: DataSource, items: _Items, rng) -> tuple[dict, list[Finding]]:
    split = source.train
    if split.images is None:
        # files are decoded by PIL, which knows their layout: the score is recorded, not judged
        cs = items.caches[0] if items.caches else None
        if cs is None or len(cs.rows) == 0:
            return {}, []
        pick = np.sort(rng.choice(cs.rows, min(_LAYOUT_SAMPLE, len(cs.rows)), replace=False))
        score = neighbour_correlation(_Rows(cs.images, pick))
        release_pages(cs.images)
        return {"neighbour_correlation": round(score, 3)}, []
    images = split.images
    if len(images) == 0 or min(images.shape[1:3]) < 4:
        return {}, []
    pick = np.sort(rng.choice(len(images), min(_LAYOUT_SAMPLE, len(images)), replace=False))
    sample = np.asarray(images[pick])
    score = neighbour_correlation(sample)
    alt = {lay: neighbour_correlation(_as_if(sample, lay)) for lay in ("planar", "interleaved")}
    stats = {"neighbour_correlation": round(score, 3), "if_planar": round(alt["planar"], 3),
             "if_interleaved": round(alt["interleaved"], 3), "threshold": SCRAMBLED_BELOW}
    if score >= SCRAMBLED_BELOW:
        return stats, []
    best = max(alt, key=alt.get)
    hint = (f"read as --csv-layout {best} they correlate {alt[best]:.2f}"
            if alt[best] > score + 0.1 else "no other layout looks better: check the image shape")
    return stats, [Finding(
        "scrambled", "error",
        f"pixels look scrambled: wrong --csv-layout? adjacent pixels correlate {score:.2f} "
        f"(real photos about 0.9, below {SCRAMBLED_BELOW} is suspicious); {hint}",
        [source.origin], {"score": round(score, 3), "suggested_layout": best if alt[best] > score + 0.1 else None},
    )]


# ---------------------------------------------------------------------------------------------
# sample grid


GRID_FOOTER = 20  # px for the line naming the classes past GRID_MAX_ROWS
GRID_LABEL_LINES = 4  # lines of a class name beside its row (the count takes a fifth)


def grid_size(n_classes: int, cols: int = GRID_COLS) -> tuple[int, int]:
    """(width, height) in pixels of the grid for ``n_classes`` rows."""
    rows = min(n_classes, GRID_MAX_ROWS)
    footer = GRID_FOOTER if n_classes > GRID_MAX_ROWS else 0
    return GRID_LABEL_W + cols * (GRID_CELL + GRID_PAD) + GRID_PAD, rows * (GRID_CELL + GRID_PAD) + GRID_PAD + footer


def _grid_font():
    """DejaVu Sans (matplotlib ships it): PIL's built-in font draws accented letters as boxes."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        ttf = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        try:
            return ImageFont.truetype(str(ttf), 10)
        except OSError:
            pass
    return ImageFont.load_default()


def _wrap_label(text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` px (after a space, _ or - where one is
    near), the last of ``max_lines`` ending in an ellipsis when the name is longer: names that
    differ only past their 16th letter (``plant_disease_leaf_03``) stay apart."""
    lines: list[str] = []
    rest = text
    while rest and len(lines) < max_lines:
        n = 1
        while n < len(rest) and font.getlength(rest[: n + 1]) <= width:
            n += 1
        if n < len(rest):
            cut = max(rest.rfind(ch, 0, n) for ch in " _-") + 1
            n = cut if cut > n // 2 else n
        lines.append(rest[:n].rstrip(" "))
        rest = rest[n:].lstrip(" ")
    if rest:
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def write_sample_grid(cs: CachedSplit, classes: list[str], path: str | Path, *, cols: int = GRID_COLS,
                      seed: int = 0) -> Path:
    """PNG of ``cols`` random training images per class (one row each, class name on the left):
    a wrong channel layout or a mislabelled folder shows at a glance."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = grid_size(len(classes), cols)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _grid_font()
    line_h = 12
    labels = np.asarray(cs.labels)
    for r, name in enumerate(classes[:GRID_MAX_ROWS]):
        members = cs.rows[(labels[:, r] > 0.5) if labels.ndim == 2 else (labels == r)]
        pick = np.sort(rng.choice(members, min(cols, len(members)), replace=False)) if len(members) else []
        y = GRID_PAD + r * (GRID_CELL + GRID_PAD)
        lines = _wrap_label(name, font, GRID_LABEL_W - 8, GRID_LABEL_LINES) + [f"({len(members)} images)"]
        top = y + (GRID_CELL - line_h * len(lines)) // 2
        for k, line in enumerate(lines):
            draw.text((4, top + k * line_h), line, fill="black", font=font)
        for c, row in enumerate(pick):
            img = Image.fromarray(np.asarray(cs.images[row]))
            # nearest when enlarging: pixels stay pixels, so scrambled rows are not blurred away
            resample = Image.Resampling.NEAREST if img.width <= GRID_CELL else Image.Resampling.BILINEAR
            x = GRID_LABEL_W + GRID_PAD + c * (GRID_CELL + GRID_PAD)
            canvas.paste(img.resize((GRID_CELL, GRID_CELL), resample), (x, y))
    if len(classes) > GRID_MAX_ROWS:
        draw.text((4, height - GRID_FOOTER + 4), f"... and {len(classes) - GRID_MAX_ROWS} more classes, not shown "
                  f"(the first {GRID_MAX_ROWS} of {len(classes)} are)", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# inside training


# Duplicates searched at the start of a training run: all images up to 2 GiB of decoded pixels
# (650,000 at 32 px, 14,000 at 224 px), a random sample beyond, so the check stays a few seconds.
TRAIN_HASH_BYTES = 2 << 30
TRAIN_MIN_HASHED = 20_000


# findings (errors, then warnings) that train prints; the rest are in RUN/check.json
TRAIN_FINDINGS_SHOWN = 3


def check_for_training(source: DataSource, cached_splits: dict[str, CachedSplit], run_dir: Path,
                       balancing: str | None = None, pretrained: bool = False) -> CheckReport | None:
    """The fast check at the start of ``train``: one or two lines and RUN/check.json. Findings
    never stop a run, and neither does a failure of the check itself. ``balancing``: the run's
    own imbalance option ('--class-weights balanced'), named instead of advice to use one.
    ``pretrained``: the run starts from pretrained weights, whose input size it takes."""
    from imgclf import log

    try:
        per_image = max(int(np.prod(cs.images.shape[1:])) for cs in cached_splits.values())
        cap = max(TRAIN_MIN_HASHED, TRAIN_HASH_BYTES // per_image)
        report = run_checks(source, cached_splits, out_dir=run_dir, max_images=cap,
                            search_all=f"'imgclf check --data {source.origin}' searches them all")
        if balancing:
            for f in report.findings:
                if f.kind == "imbalance":
                    f.message = f.message.split("; consider")[0] + f"; this run sets {balancing}"
        if pretrained:
            # a pretrained backbone's features expect the scale it was trained at: upscaling small
            # images to it is the point, and '--image-size 32' (the advice for nets from scratch)
            # would leave Lite0 a 1x1 map before its last stage
            for f in report.findings:
                if f.kind == "upscaled":
                    f.severity = "info"
                    f.message = (f.message.split("; consider")[0] + " to the pretrained model's input size, as its "
                                 "features expect; a smaller --image-size trains faster (on CIFAR-10's 32-px photos "
                                 "Lite0 did best at 128 px in a 15-minute budget)")
        report.write_json(Path(run_dir) / "check.json")
    except Exception as e:  # a check must never cost the user a training run
        log.warn(f"data check failed ({type(e).__name__}: {e}); training goes on")
        return None
    # the source's problems and unreadable files were printed once already by train
    shown = frozenset({"empty_class", "source", "unreadable"})
    # the summary names the worst finding; the next errors and warnings follow, a line each, up
    # to TRAIN_FINDINGS_SHOWN in all: an imbalance warning behind a few-images error was only in
    # check.json, and it is the one that says why top-1 will mislead
    fresh = sorted((f for f in report.findings if f.kind not in shown and f.severity in ("error", "warning")),
                   key=lambda f: SEVERITIES.index(f.severity))
    more = [f.message for f in fresh[1:TRAIN_FINDINGS_SHOWN]]
    say = log.warn if report.serious else log.info
    if report.serious:
        say(report.summary(shown))
        for m in more:
            say(f"data check: {m}")
        log.warn(f"data check: details in {Path(run_dir) / 'check.json'} and {report.grid}; "
                 f"'imgclf check --data {source.origin}' prints them all")
    elif report.findings:
        say(report.summary(shown) + ("" if more else f" (see {Path(run_dir) / 'check.json'})"))
        for i, m in enumerate(more):
            say(f"data check: {m}" + (f" (see {Path(run_dir) / 'check.json'})" if i == len(more) - 1 else ""))
    else:
        log.info(report.summary())
    return report
