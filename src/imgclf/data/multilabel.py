"""Multi-label sources: COCO instances JSON, YOLO label folders and ``path,label1|label2`` CSVs.

Each becomes a :class:`DataSource` whose labels are multi-hot float32 ``[N, C]`` (task
"multilabel") or, in ``largest`` mode, the class of each image's largest object (task "single").
Real detection data is untidy (coco128 has images without label files and label files without
images), so mismatches are reported as one warning line per kind, never fatal.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.sources import DataSource, Split
from imgclf.errors import UserError

PATH_COLUMNS = ("path", "file", "filename", "image", "file_name")
LABEL_COLUMNS = ("labels", "label", "tags", "classes")
LABEL_SEP = "|"


@dataclass
class Options:
    task: str = "auto"  # auto | single | multilabel
    label_mode: str = "multilabel"  # multilabel | largest
    subset: list[str] | None = None  # keep only these classes
    images: str | None = None  # image folder of a COCO JSON
    keep_empty: bool = True  # keep images without (kept) objects as all-negative

    @property
    def largest(self) -> bool:
        return self.label_mode == "largest" or self.task == "single"


@dataclass
class _Objects:
    """Per image: (class index, area) of every object; the neutral form of COCO and YOLO."""

    paths: list[str]
    objects: list[list[tuple[int, float]]]
    classes: list[str]


def parse_classes(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    return names or None


def _few(names, k: int = 3) -> str:
    names = sorted(str(n) for n in names)
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


# ---------------------------------------------------------------------------------------------
# detection


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip().lower() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return []


def detect(path: Path) -> str | None:
    """'coco', 'yolo', 'csv' (multi-label CSV) or None (not a multi-label source)."""
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        if path.suffix.lower() == ".csv" and any(h in PATH_COLUMNS for h in _csv_header(path)):
            return "csv"
        return None
    if path.is_dir() and (path / "images").is_dir() and (path / "labels").is_dir():
        return "yolo"
    return None


# ---------------------------------------------------------------------------------------------
# COCO


def _coco_image_dir(json_path: Path, data: dict, images: str | None) -> Path:
    if images:
        d = Path(images).expanduser()
        if not d.is_dir():
            raise UserError(f"--images {images}: no such folder")
        return d
    first = next((im["file_name"] for im in data.get("images", [])), None)
    split = json_path.stem.split("_")[-1]  # instances_train2017 -> train2017
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    candidates = [root / "images" / split, root / "images", root / split, json_path.parent / "images", json_path.parent]
    for d in candidates:
        if d.is_dir() and (first is None or (d / first).exists()):
            return d
    raise UserError(f"{json_path}: cannot find its image folder (tried {', '.join(str(c) for c in candidates[:3])}); "
                    "pass it with --images FOLDER")


def read_coco(json_path: Path, images: str | None, problems: list[str]) -> _Objects:
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{json_path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or "categories" not in data or "images" not in data:
        raise UserError(f"{json_path} is not a COCO instances file (needs 'images', 'annotations' and 'categories')")
    folder = _coco_image_dir(json_path, data, images)
    # Ordered by category id, the COCO convention that YOLO class indices follow.
    cats = sorted(data["categories"], key=lambda c: c["id"])
    classes = [str(c["name"]) for c in cats]
    if len(set(classes)) != len(classes):
        raise UserError(f"{json_path}: category names are not unique")
    col = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict = {}
    for a in data.get("annotations", []):
        if a["category_id"] not in col:
            raise UserError(f"{json_path}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
        area = float(a.get("area") or (a["bbox"][2] * a["bbox"][3] if a.get("bbox") else 0.0))
        # A crowd region (iscrowd=1) marks a group of objects the annotators did not separate:
        # the class is present, so it counts for multi-label targets, but its area spans many
        # objects, so in 'largest' mode it only decides the label when nothing else is annotated:
        # mapped into (-1, 0), it sorts after every single object and still by its own size
        # (the largest of several crowd regions wins).
        if a.get("iscrowd"):
            area = -1.0 / (1.0 + area)
        by_image.setdefault(a["image_id"], []).append((col[a["category_id"]], area))
    paths, objects, missing = [], [], []
    for im in data["images"]:
        p = folder / im["file_name"]
        if not p.exists():
            missing.append(im["file_name"])
            continue
        paths.append(str(p))
        objects.append(by_image.get(im["id"], []))
    if missing:
        problems.append(f"{len(missing)} image(s) listed in {json_path.name} are not in {folder}: {_few(missing)}; skipped")
    return _Objects(paths, objects, classes)


# ---------------------------------------------------------------------------------------------
# YOLO


def _yolo_names(root: Path) -> list[str] | None:
    import yaml

    for name in ("data.yaml", "dataset.yaml"):
        f = root / name
        if f.is_file():
            try:
                names = (yaml.safe_load(f.read_text()) or {}).get("names")
            except yaml.YAMLError as e:
                raise UserError(f"{f} is not valid YAML ({e})") from None
            if isinstance(names, dict):  # Ultralytics style {0: person, 1: bicycle}
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    for name in ("classes.txt", "names.txt", "obj.names", "names"):
        f = root / name
        if f.is_file():
            return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    return None


def _yolo_pairs(images: Path, labels: Path, problems: list[str]) -> tuple[list[str], list[Path | None]]:
    imgs = {}
    for dirpath, dirnames, files in os.walk(images):
        dirnames[:] = sorted(dirnames)
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                p = Path(dirpath) / f
                imgs[str(p.relative_to(images).with_suffix(""))] = p
    labs = {str(p.relative_to(labels).with_suffix("")): p for p in labels.rglob("*.txt")}
    orphans = sorted(set(labs) - set(imgs))
    if orphans:
        problems.append(f"{len(orphans)} label file(s) in {labels} have no image: {_few(orphans)}; skipped")
    unlabelled = sorted(set(imgs) - set(labs))
    if unlabelled:
        problems.append(f"{len(unlabelled)} image(s) in {images} have no label file: {_few(unlabelled)}; "
                        "treated as images without objects")
    keys = sorted(imgs)
    return [str(imgs[k]) for k in keys], [labs.get(k) for k in keys]


def yolo_splits(root: Path) -> dict[str, tuple[Path, Path]]:
    """{'train'|'val'|'test': (images dir, labels dir)}; a flat images/ + labels/ is 'train'."""
    img, lab = root / "images", root / "labels"
    out = {}
    for split, names in (("train", ("train",)), ("val", ("val", "valid", "validation")), ("test", ("test",))):
        for n in names:
            if (img / n).is_dir() and (lab / n).is_dir():
                out[split] = (img / n, lab / n)
                break
    return out or {"train": (img, lab)}


def read_yolo(images: Path, labels: Path, names: list[str] | None, problems: list[str]) -> _Objects:
    paths, label_files = _yolo_pairs(images, labels, problems)
    objects: list[list[tuple[int, float]]] = []
    for lf in label_files:
        objs = []
        if lf is not None:
            for n, line in enumerate(lf.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cls = int(parts[0])
                    w, h = (float(parts[3]), float(parts[4])) if len(parts) >= 5 else (0.0, 0.0)
                except ValueError:
                    raise UserError(f"{lf}:{n}: expected 'class cx cy w h', got '{line.strip()}'") from None
                if cls < 0 or (names is not None and cls >= len(names)):
                    raise UserError(f"{lf}:{n}: class id {cls} is outside the {len(names or [])} class names")
                objs.append((cls, w * h))
        objects.append(objs)
    if names is None:
        k = 1 + max((c for objs in objects for c, _ in objs), default=-1)
        names = [str(i) for i in range(k)]
    return _Objects(paths, objects, names)


# ---------------------------------------------------------------------------------------------
# CSV of path,label1|label2


def read_label_csv(path: Path, problems: list[str]) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]]
    pcol = next(header.index(h) for h in PATH_COLUMNS if h in header)
    lcol = next((header.index(h) for h in LABEL_COLUMNS if h in header), None)
    if lcol is None:
        others = [i for i in range(len(header)) if i != pcol]
        if len(others) != 1:
            raise UserError(f"{path}: no label column (name one of {', '.join(LABEL_COLUMNS)})")
        lcol = others[0]
    paths, labels, missing = [], [], []
    for row in rows[1:]:
        if not row or not row[pcol].strip():
            continue
        p = Path(row[pcol].strip())
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            missing.append(row[pcol].strip())
            continue
        paths.append(str(p))
        text = row[lcol] if lcol < len(row) else ""
        labels.append([t.strip() for t in text.split(LABEL_SEP) if t.strip()])
    if missing:
        problems.append(f"{len(missing)} image file(s) named in {path.name} do not exist: {_few(missing)}; skipped")
    return paths, labels


# ---------------------------------------------------------------------------------------------
# objects -> targets


def _targets(obj: _Objects, opts: Options, classes: list[str], origin: str, problems: list[str]):
    """Multi-hot [N, C] (or largest-object class [N]) over ``classes`` plus the kept paths."""
    remap = np.full(len(obj.classes), -1, dtype=np.int64)
    for i, c in enumerate(obj.classes):
        if c in classes:
            remap[i] = classes.index(c)
    paths, rows = [], []
    for p, objs in zip(obj.paths, obj.objects):
        kept = [(int(remap[c]), a) for c, a in objs if c < len(remap) and remap[c] >= 0]
        if not kept and not (opts.keep_empty and not opts.largest):
            continue
        paths.append(p)
        rows.append(kept)
    dropped = len(obj.paths) - len(paths)
    if dropped:
        why = "no objects" if not opts.subset else f"no objects of {', '.join(opts.subset[:5])}"
        how = "single-label ('largest') mode needs one" if opts.largest else "--no-keep-empty"
        problems.append(f"{origin}: dropped {dropped} image(s) with {why} ({how})")
    if opts.largest:
        labels = np.asarray([max(objs, key=lambda o: o[1])[0] for objs in rows], dtype=np.int64)
    else:
        labels = np.zeros((len(rows), len(classes)), dtype=np.float32)
        for i, objs in enumerate(rows):
            for c, _ in objs:
                labels[i, c] = 1.0
    return Split(labels=labels, paths=paths)


def _class_list(all_classes: list[str], opts: Options, origin: str) -> list[str]:
    if not opts.subset:
        return list(all_classes)
    unknown = [c for c in opts.subset if c not in all_classes]
    if unknown:
        raise UserError(f"--classes: {', '.join(unknown)} not in {origin} (its classes: {_few(all_classes, 8)})")
    return list(dict.fromkeys(opts.subset))


def load(path: Path, kind: str, opts: Options, classes: list[str] | None = None) -> DataSource:
    """Read a COCO / YOLO / label-CSV source. ``classes`` aligns val/test data with training."""
    from imgclf.data.sources import _data_name

    problems: list[str] = []
    if kind == "csv":
        return _load_csv(path, opts, classes, problems)
    if kind == "coco":
        parts = {"train": read_coco(path, opts.images, problems)}
        name = path.parent.parent.name if path.parent.name == "annotations" else _data_name(path)
    else:
        names = _yolo_names(path)
        parts = {s: read_yolo(i, lab, names, problems) for s, (i, lab) in yolo_splits(path).items()}
        if names is None:  # numeric names: size them by the largest id of any split
            k = max(len(o.classes) for o in parts.values())
            for o in parts.values():
                o.classes = [str(i) for i in range(k)]
        name = _data_name(path)
    found = parts["train"].classes
    cls = classes if classes is not None else _class_list(found, opts, str(path))
    if classes is not None and opts.subset is None:
        used = {found[c] for o in parts.values() for objs in o.objects for c, _ in objs}
        extra = sorted(used - set(cls))
        if extra:
            problems.append(f"{path}: objects of classes the training data does not have are ignored: {_few(extra)}")
    splits = {s: _targets(o, opts, cls, f"{path} ({s})" if len(parts) > 1 else str(path), problems)
              for s, o in parts.items()}
    task = "single" if opts.largest else "multilabel"
    src = DataSource(name=name, origin=str(path), classes=cls, train=splits["train"], val=splits.get("val"),
                     test=splits.get("test"), task=task, problems=problems)
    return src


def _load_csv(path: Path, opts: Options, classes: list[str] | None, problems: list[str]) -> DataSource:
    from imgclf.data.sources import _data_name

    paths, labels = read_label_csv(path, problems)
    if not paths:
        raise UserError(f"{path}: no rows with an existing image file")
    found = sorted({t for ls in labels for t in ls})
    cls = classes if classes is not None else _class_list(found, opts, str(path))
    index = {c: i for i, c in enumerate(cls)}
    # auto: single-label when every labelled row has one label. Rows left blank are then more
    # likely unlabelled than "none of the classes": they are dropped, and the message says how
    # to keep them as negatives.
    single = opts.task == "single" or (opts.task == "auto" and all(len(ls) <= 1 for ls in labels)
                                       and any(labels))
    if single and opts.task == "auto" and not all(labels):
        problems.append(f"{path}: {sum(not ls for ls in labels)} row(s) have no label: skipped "
                        "(--task multilabel keeps them as images of none of the classes)")
    if single:
        bad = [p for p, ls in zip(paths, labels) if sum(t in index for t in ls) != 1]
        if bad and opts.task == "single":
            raise UserError(f"{path}: --task single needs exactly one label per row; {len(bad)} rows have "
                            f"none or several (e.g. {bad[0]})")
        keep = [i for i, ls in enumerate(labels) if ls and ls[0] in index]
        split = Split(labels=np.asarray([index[labels[i][0]] for i in keep], dtype=np.int64),
                      paths=[paths[i] for i in keep])
    else:
        obj = _Objects(paths, [[(index[t], 0.0) for t in ls if t in index] for ls in labels], cls)
        split = _targets(obj, Options(keep_empty=opts.keep_empty, subset=opts.subset), cls, str(path), problems)
    return DataSource(name=_data_name(path), origin=str(path), classes=cls, train=split,
                      task="single" if single else "multilabel", problems=problems)


# ---------------------------------------------------------------------------------------------
# helpers used by sources.load_source for every kind of source


def select_classes(src: DataSource, subset: list[str] | None) -> DataSource:
    """Keep only ``subset`` classes (idempotent; a multi-label source already applied it)."""
    if not subset or src.classes == subset:
        return src
    unknown = [c for c in subset if c not in src.classes]
    if unknown:
        raise UserError(f"--classes: {', '.join(unknown)} not in {src.origin} (its classes: {_few(src.classes, 8)})")
    cols = np.asarray([src.classes.index(c) for c in subset], dtype=np.int64)
    for attr in ("train", "val", "test"):
        s = getattr(src, attr)
        if s is None:
            continue
        if s.labels.ndim == 2:
            sub = Split(labels=np.ascontiguousarray(s.labels[:, cols]), paths=s.paths, images=s.images)
        else:
            lookup = np.full(len(src.classes), -1, dtype=np.int64)
            lookup[cols] = np.arange(len(cols))
            new = lookup[s.labels]
            keep = np.flatnonzero(new >= 0)
            sub = s.subset(keep)
            sub.labels = new[keep]
        setattr(src, attr, sub)
    src.classes = list(subset)
    return src


def to_multilabel(src: DataSource) -> DataSource:
    """Single-label data trained as multi-label (--task multilabel): one-hot float targets."""
    for attr in ("train", "val", "test"):
        s = getattr(src, attr)
        if s is not None and s.labels.ndim == 1:
            s.labels = np.eye(len(src.classes), dtype=np.float32)[s.labels]
    src.task = "multilabel"
    return src


