"""Multi-label sources: COCO instances JSON, YOLO label folders (images/ + labels/, or Roboflow's
train/images + train/labels) and CSVs of ``path,label1|label2`` or one 0/1 column per class.

Each becomes a :class:`DataSource` whose labels are multi-hot float32 ``[N, C]`` (task
"multilabel") or, in ``largest`` mode, the class of each image's largest object (task "single").
Real detection data is untidy (coco128 has images without label files and label files without
images), so mismatches are reported as one warning line per kind, never fatal.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.arrays import sniff_delimiter
from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.data.sources import DataSource, Split
from imgclf.errors import UserError

PATH_COLUMNS = ("path", "file", "filename", "image", "file_name", "image_path", "file_path", "filepath")
# Kaggle's label CSVs name each image by an id, the file sitting in a folder beside the CSV:
# id,label + train/<id>.tif (Histopathologic Cancer), id_code,diagnosis + train_images/<id>.png
# (APTOS), image_id,label + train_images/ (Cassava), id,breed + train/<id>.jpg (Dog Breed). Such a
# column is a path column only when its first cell names an image file (a pixel CSV may have an
# id column too).
ID_COLUMNS = ("id", "image_id", "id_code", "image_name", "img", "img_id", "img_name", "fname", "name")
LABEL_COLUMNS = ("labels", "label", "tags", "classes", "class", "category", "target")
LABEL_SEP = "|"


@dataclass
class Options:
    task: str = "auto"  # auto | single | multilabel
    label_mode: str = "multilabel"  # multilabel | largest
    subset: list[str] | None = None  # keep only these classes
    images: str | None = None  # image folder of a COCO JSON or a label CSV
    keep_empty: bool = True  # keep images without (kept) objects as all-negative
    label_column: str = "label"  # a label CSV's label column (--label-column), when it has one by that name

    @property
    def largest(self) -> bool:
        return self.label_mode == "largest" or self.task == "single"


@dataclass
class _Objects:
    """Per image: (class index, area) of every object; the neutral form of COCO and YOLO."""

    paths: list[str]
    objects: list[list[tuple[int, float]]]
    classes: list[str]
    label_files: list[Path | None] | None = None  # YOLO: each image's label file (None: it has none)


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


def _rows(path: Path, n: int | None = None) -> list[list[str]]:
    """The first ``n`` rows of a label CSV (all when None), split at the delimiter of its header."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = f.readline()
        return list(itertools.islice(csv.reader(itertools.chain([first], f), delimiter=sniff_delimiter(first)), n))


def _csv_header(path: Path) -> list[str]:
    try:
        return [h.strip().lower() for h in next(iter(_rows(path, 1)), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


# YOLO split folders: images/<split>/ + labels/<split>/ (Ultralytics) or <split>/images/ +
# <split>/labels/ (Roboflow's export); Ultralytics' full COCO names them train2017/val2017/test2017
YOLO_SPLITS = (("train", ("train", "train2017")), ("val", ("val", "valid", "validation", "val2017")),
               ("test", ("test", "test2017")))


def _split_first_yolo(root: Path) -> bool:
    """Roboflow's layout: train/images/ + train/labels/ (+ valid/, test/, data.yaml)."""
    return (root / "train" / "images").is_dir() and (root / "train" / "labels").is_dir()


def _first_row(path: Path) -> list[str]:
    try:
        rows = _rows(path, 2)
        return rows[1] if len(rows) > 1 else []
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _path_column(path: Path, header: list[str], images: str | None = None,
                 finder: ImageFinder | None = None) -> int | None:
    """The column of a label CSV naming its images: a path column by name, or an id column whose
    first cell names an image file (see ID_COLUMNS); None for any other CSV. ``finder``: the one
    that will read the rows, so a 220k-file train/ is listed once."""
    pcol = next((header.index(h) for h in PATH_COLUMNS if h in header), None)
    if pcol is not None or len(header) >= 64:  # a pixel CSV has a column per pixel
        return pcol
    row = _first_row(path)
    for h in ID_COLUMNS:
        if h in header and header.index(h) < len(row) and row[header.index(h)].strip():
            if (finder or ImageFinder(path.parent, images)).find(row[header.index(h)].strip()) is not None:
                return header.index(h)
    return None


def has_labels(path: Path, images: str | None = None) -> bool:
    """A label CSV with labels to read: a label column by name, a path and one other column, or
    0/1 cells beside the path (one column per class); not a path,width,height metadata table."""
    header = _csv_header(path)
    pcol = _path_column(path, header, images)
    if pcol is None:
        return False
    if any(h in LABEL_COLUMNS for h in header) or len(header) == 2:
        return True
    row = _first_row(path)
    return len(header) > 2 and all(i < len(row) and row[i].strip() in _FLAG_VALUES for i in range(len(header))
                                   if i != pcol)


def detect(path: Path, images: str | None = None) -> str | None:
    """'coco', 'yolo', 'csv' (a label CSV: a path or image-id column) or None (another source)."""
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        tabular = path.suffix.lower() in (".csv", ".tsv")
        if tabular and _path_column(path, _csv_header(path), images) is not None:
            return "csv"
        return None
    if path.is_dir() and (((path / "images").is_dir() and (path / "labels").is_dir()) or _split_first_yolo(path)):
        # a class-folder data set whose classes are 'images' and 'labels' is no YOLO set: its labels/
        # holds photos, not .txt files (read as YOLO it became a multi-label set of 0 classes)
        labels = [la for _, la in yolo_splits(path).values()]
        if any(_holds_txt(la) for la in labels) or not any(_holds_images(la) for la in labels):
            return "yolo"
    return None


def _holds_txt(folder: Path) -> bool:
    return next(iter(folder.rglob("*.txt")), None) is not None


def _holds_images(folder: Path) -> bool:
    return any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for _, _, files in os.walk(folder) for f in files)


# ---------------------------------------------------------------------------------------------
# COCO


def _coco_image_dir(json_path: Path, data: dict, images: str | None) -> Path:
    if images:
        d = Path(images).expanduser()
        if not d.is_dir():
            raise UserError(f"--images {images}: no such folder")
        return d
    # The folder holding most of a sample of the listed files: testing only the first one sent
    # a set whose first image is missing looking elsewhere (and failing) though the rest were there.
    sample = [im["file_name"] for im in data.get("images", [])[:20] if isinstance(im, dict) and "file_name" in im]
    split = json_path.stem.split("_")[-1]  # instances_train2017 -> train2017
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    candidates = [root / "images" / split, root / "images", root / split, json_path.parent / "images", json_path.parent]
    best, hits = None, 0
    for d in candidates:
        if not d.is_dir():
            continue
        if not sample:
            return d
        n = sum((d / f).exists() for f in sample)
        if n > hits:
            best, hits = d, n
    if best is not None:
        return best
    raise UserError(f"{json_path}: cannot find its image folder (tried {', '.join(str(c) for c in candidates[:3])}); "
                    "pass it with --images FOLDER")


def read_coco(json_path: Path, images: str | None, problems: list[str]) -> _Objects:
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{json_path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or "categories" not in data or "images" not in data:
        raise UserError(f"{json_path} is not a COCO instances file (needs 'images', 'annotations' and 'categories')")
    _check_coco_entries(json_path, data)
    folder = _coco_image_dir(json_path, data, images)
    # Ordered by category id, the COCO convention that YOLO class indices follow.
    cats = sorted(data["categories"], key=lambda c: c["id"])
    classes = [str(c["name"]) for c in cats]
    if len(set(classes)) != len(classes):
        raise UserError(f"{json_path}: category names are not unique")
    col = {c["id"]: i for i, c in enumerate(cats)}
    image_ids = {im["id"] for im in data["images"]}
    by_image: dict = {}
    stray: list = []
    for a in data.get("annotations") or []:
        if a["category_id"] not in col:
            raise UserError(f"{json_path}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
        if a["image_id"] not in image_ids:
            stray.append(a.get("id", "?"))
            continue
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
    if stray:
        problems.append(f"{json_path.name}: {len(stray)} annotation(s) name an image_id that no entry of 'images' has "
                        f"(annotation ids {_few(stray)}): ignored")
    return _Objects(paths, objects, classes)


def _check_coco_entries(json_path: Path, data: dict) -> None:
    """One line naming the file and the entry for a COCO file missing a key it needs (a
    KeyError traceback before): images need id and file_name, categories id and name,
    annotations image_id and category_id."""
    need = (("images", ("id", "file_name")), ("categories", ("id", "name")),
            ("annotations", ("image_id", "category_id")))
    for key, fields in need:
        entries = data.get(key)
        if entries is None and key == "annotations":
            continue
        if not isinstance(entries, list):
            raise UserError(f"{json_path}: '{key}' is not a list (a COCO instances file has lists of images, "
                            "annotations and categories)")
        for k, e in enumerate(entries):
            lacking = [f for f in fields if not isinstance(e, dict) or f not in e]
            if lacking:
                what = f"{key}[{k}]" + (f" (id {e['id']})" if isinstance(e, dict) and "id" in e else "")
                raise UserError(f"{json_path}: {what} has no '{lacking[0]}' (each of '{key}' needs "
                                f"{' and '.join(fields)})")
    ids = [c["id"] for c in data["categories"]]
    dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if dup:
        raise UserError(f"{json_path}: category id {dup[0]} is used by more than one category")


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
                try:
                    ids = sorted(names, key=int)
                except (TypeError, ValueError):
                    raise UserError(f"{f}: names must be a list or map class ids 0, 1, 2, ... to names") from None
                if [int(k) for k in ids] != list(range(len(ids))):  # a gap would shift every later name
                    raise UserError(f"{f}: the names' class ids are not 0..{len(ids) - 1} (got {_few(ids, 5)})")
                return [str(names[k]) for k in ids]
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
    """{'train'|'val'|'test': (images dir, labels dir)}; a flat images/ + labels/ is 'train'.
    Both images/<split>/ + labels/<split>/ and <split>/images/ + <split>/labels/ are read."""
    img, lab = root / "images", root / "labels"
    flat = img.is_dir() and lab.is_dir()
    out = {}
    for split, names in YOLO_SPLITS:
        for n in names:
            i, la = (img / n, lab / n) if flat else (root / n / "images", root / n / "labels")
            if i.is_dir() and la.is_dir():
                out[split] = (i, la)
                break
    return out or {"train": (img, lab)}


_BOX_TOLERANCE = 0.01  # exporters round (1.0000002, -1e-7): not worth a warning


def _yolo_box(vals: list[float]) -> tuple[float, float] | str:
    """Width and height of a line's box (cx cy w h) or of a segment's polygon (x1 y1 x2 y2 ...),
    or why the line is not a YOLO box."""
    if len(vals) == 4:
        w, h = vals[2], vals[3]
    elif len(vals) >= 6 and len(vals) % 2 == 0:  # YOLO segmentation: the polygon's bounding box
        w, h = max(vals[0::2]) - min(vals[0::2]), max(vals[1::2]) - min(vals[1::2])
    else:
        return "not 5 values (class cx cy w h) nor a polygon (class x1 y1 x2 y2 x3 y3 ...)"
    if not all(-_BOX_TOLERANCE <= v <= 1 + _BOX_TOLERANCE for v in vals):  # also NaN and inf
        return "coordinates outside 0..1 (YOLO coordinates are fractions of the image size)"
    if not (w > 0 and h > 0):
        return "zero or negative width or height"
    return w, h


def read_yolo(images: Path, labels: Path, names: list[str] | None, problems: list[str]) -> _Objects:
    paths, label_files = _yolo_pairs(images, labels, problems)
    objects: list[list[tuple[int, float]]] = []
    # A wrong class id or a word where a number belongs is fatal (a names file that does not fit,
    # or not YOLO labels at all); a line with a bad box is skipped with a warning, since in
    # 'largest' mode a bogus box would decide the image's label.
    bad: dict[str, list[str]] = {}
    n_lines = 0
    for lf in label_files:
        objs = []
        if lf is not None:
            for n, line in enumerate(lf.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                n_lines += 1
                try:
                    cid = float(parts[0])
                    vals = [float(v) for v in parts[1:]]
                except ValueError:
                    raise UserError(f"{lf}:{n}: expected 'class cx cy w h', got '{line.strip()}'") from None
                if not cid.is_integer():
                    raise UserError(f"{lf}:{n}: class id {parts[0]} is not a whole number")
                cls = int(cid)  # "3" or "3.0" (written by np.savetxt)
                if cls < 0:
                    raise UserError(f"{lf}:{n}: class id {cls} is negative; YOLO class ids count from 0")
                if names is not None and cls >= len(names):
                    raise UserError(f"{lf}:{n}: class id {cls} is outside the {len(names)} class names "
                                    f"(ids 0..{len(names) - 1})")
                box = _yolo_box(vals)
                if isinstance(box, str):
                    bad.setdefault(box, []).append(f"{lf.relative_to(labels)}:{n}")
                    continue
                objs.append((cls, box[0] * box[1]))
        objects.append(objs)
    if bad:
        n_bad = sum(len(v) for v in bad.values())
        why = "; ".join(f"{k} ({len(v)}, e.g. {', '.join(v[:2])})" for k, v in bad.items())
        if 2 * n_bad > n_lines:  # most of it: not a few stray lines but labels in another format
            raise UserError(f"{labels}: {n_bad} of {n_lines} label lines are not YOLO boxes: {why}")
        problems.append(f"{labels}: {n_bad} of {n_lines} label line(s) skipped, not YOLO boxes: {why}")
    if names is None:  # load() names them (and checks the ids) over all splits
        k = 1 + max((c for objs in objects for c, _ in objs), default=-1)
        names = [str(i) for i in range(k)]
    return _Objects(paths, objects, names, label_files)


def _first_line_with_id(label_file: Path, cid: int) -> str:
    """'FILE:LINE' of the first line of a YOLO label file whose class id is ``cid``."""
    try:
        for n, line in enumerate(label_file.read_text().splitlines(), 1):
            parts = line.split()
            if parts and float(parts[0]) == cid:
                return f"{label_file}:{n}"
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    return str(label_file)


def _id_ranges(ids: list[int], k: int = 6) -> str:
    """[1, 2, 3, 7, 81, ..., 199] -> '1-3, 7, 81-199'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs[:k])
    return text + (f", ... ({len(runs) - k} more ranges)" if len(runs) > k else "")


_COCO_NAMES_MAX_BYTES = 200 << 20  # instances_train2017.json (450 MB) would take a minute to compare


def _names_from_coco(root: Path, parts: dict[str, _Objects], problems: list[str]) -> list[str] | None:
    """Class names for YOLO labels without a names file, from a COCO instances JSON beside them
    (coco128, Ultralytics' COCO download), when its categories in id order give the label files'
    class ids: checked on the images both describe, so a JSON of another numbering is not used."""
    from imgclf import log

    # instances_*.json first: captions_ and person_keypoints_ files sit beside them in COCO
    jsons = sorted((p for d in (root / "annotations", root) if d.is_dir() for p in d.glob("*.json")),
                   key=lambda p: (not p.name.startswith("instances"), str(p)))
    yolo = {Path(p).stem: {c for c, _ in objs} for o in parts.values() for p, objs in zip(o.paths, o.objects)}
    top = max((c for ids in yolo.values() for c in ids), default=-1)
    lead = f"{root}: no names file, so the classes are the label files' numbers"
    unused: list[str] = []  # why each COCO JSON found was not used; reported when none was
    for jp in jsons:
        use = f"pass --data {jp} to read its annotations, or add a names file (data.yaml with names:, or classes.txt)"
        try:
            if jp.stat().st_size > _COCO_NAMES_MAX_BYTES:
                unused.append(f"{lead}; {jp} may hold their names but is too large to compare: {use}")
                continue
            data = json.loads(jp.read_text())
            cats = sorted(data["categories"], key=lambda c: c["id"])
            col = {c["id"]: i for i, c in enumerate(cats)}
            stem = {im["id"]: Path(im["file_name"]).stem for im in data["images"]}
            coco: dict[str, set] = {s: set() for s in stem.values()}
            for a in data.get("annotations", []):
                coco.setdefault(stem.get(a["image_id"], ""), set()).add(col.get(a["category_id"], -1))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            continue  # not a COCO instances file
        both = [s for s in yolo if s in coco and (yolo[s] or coco[s])]
        agree = sum(yolo[s] == coco[s] for s in both)
        if both and top >= len(cats) and agree >= 0.9 * len(both):
            # the JSON names these labels (they agree image by image), so an id past its categories
            # is a wrong label, not a reason to number every class: say where it is
            where = next((f for o in parts.values() for f, objs in zip(o.label_files or [], o.objects)
                          if f is not None and any(c == top for c, _ in objs)), None)
            at = _first_line_with_id(where, top) if where is not None else str(root)
            raise UserError(f"{at}: class id {top} is outside the {len(cats)} categories of {jp} (ids 0..{len(cats) - 1}), "
                            f"which name these labels' classes (they agree on {agree} of {len(both)} images)")
        if both and top < len(cats) and agree >= 0.9 * len(both):
            log.info(f"{root}: no names file beside the YOLO labels: class names taken from {jp} (its categories "
                     f"in id order; they match the labels' class ids on {agree} of {len(both)} images)",
                     once=True)  # evaluate reads a run's data twice (its classes, then its split)
            return [str(c["name"]) for c in cats]
        why = (f"they match the class ids on only {agree} of {len(both)} images" if both
               else "it describes none of these images")
        unused.append(f"{lead}; {jp} has category names, but {why}: {use}")
    problems.extend(unused[:1])
    return None


def _yolo_classes(root: Path, parts: dict[str, _Objects], problems: list[str], training: bool) -> list[str]:
    """Class names of YOLO labels without a names file: a COCO JSON's beside them, else the ids."""
    names = _names_from_coco(root, parts, problems)
    if names is not None:
        return names
    used = sorted({c for o in parts.values() for objs in o.objects for c, _ in objs})
    k = used[-1] + 1 if used else 0
    if training and len(used) < k:
        # without names every id up to the largest is a class: one stray 200 made 201 classes
        never = sorted(set(range(k)) - set(used))
        where = next((Path(p).name for o in parts.values() for p, objs in zip(o.paths, o.objects)
                      if any(c == k - 1 for c, _ in objs)), "?")
        problems.append(f"{root}: class ids run to {k - 1} (in the labels of {where}) but only {len(used)} distinct "
                        f"ids are used: ids {_id_ranges(never)} never appear, yet each becomes a class; add a names "
                        "file (data.yaml with names:, or classes.txt), or correct the stray ids")
    return [str(i) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# CSV of path,label1|label2


_FLAG_VALUES = {"", "0", "1", "0.0", "1.0"}


def _indicator_columns(path: Path, rows: list[list[str]], pcol: int) -> list[int]:
    """The columns of a one-hot CSV (path,person,dog,cat with 0/1 cells), or a UserError saying
    what layouts are read."""
    header = rows[0]
    others = [i for i in range(len(header)) if i != pcol]
    data = [r for r in rows[1:] if r and pcol < len(r) and r[pcol].strip()]
    not_flags = [header[i].strip() or f"column {i + 1}" for i in others
                 if any(i < len(r) and r[i].strip() not in _FLAG_VALUES for r in data)]
    names = [header[i].strip() for i in others]
    if not_flags or not all(names):
        raise UserError(f"{path}: no label column (name one of {', '.join(LABEL_COLUMNS)}, holding label1|label2), "
                        f"and its other columns are not one 0/1 column per class either "
                        f"({_few(not_flags) if not_flags else 'a column has no name'})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{path}: class column(s) {', '.join(dup)} appear more than once")
    return others


_WINDOWS_ABS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")  # C:\ or \\server\share
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


class ImageFinder:
    """The image file a label CSV's cell names: the cell as a path (absolute, or relative to the
    CSV's folder), else a file in a folder at most two levels below it (``--images``' folder
    first) whose name or name without extension is the cell: Kaggle's ``train/<id>.tif``,
    ``train_images/<id>.png``, or ``train/train/<id>.jpg`` as its zips unpack. Each folder is
    listed once, on first need, so 220k rows cost dictionary lookups, not a stat call per
    extension tried; new folders are looked through only for the first cells (a CSV whose images
    are all missing must not list the tree once per row)."""

    SEARCHES = 20  # cells that may look through folders not yet known to hold the images
    MAX_FOLDERS = 200

    def __init__(self, base: Path, images: str | None = None):
        self.base = base
        self.images = Path(images).expanduser() if images else None
        self.known: list[Path] = []  # folders that held an image already found
        self.listed: dict[Path, dict[str, str]] = {}
        self.searches = 0
        self._folders: list[Path] | None = None

    def folders(self) -> list[Path]:
        if self._folders is None:
            skip = ("__MACOSX", "@eaDir", "#recycle")

            def below(d: Path) -> list[Path]:
                try:  # DirEntry.is_dir needs no stat call per file on most file systems
                    with os.scandir(d) as it:
                        return sorted(Path(e.path) for e in it if e.is_dir() and not e.name.startswith(".")
                                      and e.name not in skip)
                except OSError:
                    return []

            found = below(self.base)
            if len(found) <= 20:  # train/train/; not every folder of a class tree beside the CSV
                found += [d for top in found for d in below(top)]
            # train-ish and image-ish folders first: a test/ of the same ids must not win
            found.sort(key=lambda d: (not any(w in d.name.lower() for w in ("train", "image", "img")), len(d.parts)))
            self._folders = ([self.images] if self.images else []) + [self.base] + found[: self.MAX_FOLDERS]
        return self._folders

    def _entries(self, folder: Path) -> dict[str, str]:
        got = self.listed.get(folder)
        if got is None:
            got = {}
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        stem, ext = os.path.splitext(e.name)
                        if ext.lower() in IMAGE_EXTENSIONS:
                            got.setdefault(e.name, e.name)
                            got.setdefault(stem, e.name)
            except OSError:
                pass
            self.listed[folder] = got
        return got

    def _in(self, root: Path, cell: Path) -> Path | None:
        folder = root / cell.parent
        name = self._entries(folder).get(cell.name)
        return folder / name if name is not None else None

    def find(self, cell: str) -> Path | None:
        p = Path(cell)
        if p.is_absolute() and p.is_file():
            return p
        foreign = p.is_absolute() or _WINDOWS_ABS.match(cell) is not None
        if foreign or "\\" in cell:
            # written on another machine (/kaggle/input/x/train/a.jpg, C:\data\train\a.jpg) or
            # on Windows (train\a.jpg): its last parts, looked for below the CSV's folder
            parts = [x for x in re.split(r"[\\/]+", cell) if x and not _WINDOWS_DRIVE.fullmatch(x)]
            tails = [Path(*parts[-k:]) for k in range(min(3, len(parts)), 0, -1)] if foreign else [Path(*parts)]
        else:
            tails = [p]
        for tail in tails:
            if tail.parts and ".." not in tail.parts:
                hit = self._relative(tail)
                if hit is not None:
                    return hit
        return None

    def _relative(self, p: Path) -> Path | None:
        for root in self.known:  # ids: a lookup, no stat call per row
            hit = self._in(root, p)
            if hit is not None:
                return hit
        direct = self.base / p
        if direct.is_file():
            return direct
        if self.searches >= self.SEARCHES:
            return None
        self.searches += 1
        for root in self.folders():
            if root not in self.known:
                hit = self._in(root, p)
                if hit is not None:
                    self.known.append(root)
                    return hit
        return None


# Missing values as tools write them into a CSV: pandas' str(nan), str(None), str(pd.NA), str(NaT),
# R's NA, SQL's NULL, Excel's #N/A. Case as written: 'none' in lower case may be a class.
_MISSING = frozenset({"nan", "NaN", "NAN", "None", "null", "NULL", "Null", "NA", "N/A", "#N/A", "<NA>",
                      "NaT"})
_INTEGRAL_FLOAT = re.compile(r"-?\d+\.0+")  # pandas writes an int column holding a NaN as 0.0, 1.0


def _space_tags(labels) -> bool:
    """Whether labels holding spaces are lists of tags (Planet's 'clear primary', 'haze primary
    agriculture'): tags recur in many combinations, so their words are far fewer than the distinct
    labels, where multi-word class names (golden retriever, german shepherd) have more words than
    names."""
    distinct = {" ".join(t.split()) for t in labels} - {""}
    words = {w for t in distinct for w in t.split()}
    return any(" " in t for t in distinct) and 2 * len(words) <= len(distinct)


def _split_cells(path: Path, cells: list[str], tags: bool, task: str, problems: list[str]) -> list[list[str]]:
    """Each row's labels from its label cell: 'a|b'; or words separated by spaces in a column named
    tags (Kaggle's Planet: 'haze primary agriculture'; not with --task single), or with --task
    multilabel when the words recur as tags do. Missing values (NaN, None, NA) are no label;
    pandas' floats of a column of class ids (0.0, 1.0) are the ids an int column gives ('0', '1')."""
    na = Counter(c for c in cells if c in _MISSING)
    if na:
        problems.append(f"{path.name}: {sum(na.values())} label cell(s) hold {'/'.join(map(repr, na))}, "
                        "a missing value: read as no label")
    cells = ["" if c in _MISSING else c for c in cells]
    plain = not any(s in c for c in cells for s in (LABEL_SEP, ";", ","))
    spaces = tags and task != "single" or task == "multilabel" and _space_tags(cells)
    sep = None if plain and spaces else LABEL_SEP  # None: str.split's runs of whitespace
    labels = [[t.strip() for t in c.split(sep) if t.strip()] for c in cells]
    words = [t for ls in labels for t in ls]
    if words and all(_INTEGRAL_FLOAT.fullmatch(t) for t in words):
        labels = [[str(int(t.split(".")[0])) for t in ls] for ls in labels]
    return labels


def _repeats(path: Path, paths: list[str], labels: list[list[str]], where: list[tuple[int, str]], task: str,
             problems: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per image file. A file on several rows with other labels: in a multi-label CSV its
    labels are merged (some tools write one row per image and label); in a single-label one the
    first row's label is used, said in one line. Exact repeats are dropped without a word (left in,
    the duplicate-image check took them for copies of a file to delete)."""
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    if len(first) == len(paths):
        return paths, labels
    multi = task == "multilabel" or any(len(ls) > 1 for ls in labels)
    merged, clash = [], []
    for i, (p, ls) in enumerate(zip(paths, labels)):
        j = first[p]
        new = [t for t in ls if t not in labels[j]]
        if j == i or not new:
            continue
        if multi or not labels[j]:  # a first row without a label takes the later one's
            if labels[j]:
                merged.append((j, i))
            labels[j] += new
        else:
            clash.append((j, i))
    if clash:
        (j, i), n = clash[0], len({paths[j] for j, _ in clash})
        more = f"; so do the rows of {n - 1} more image(s)" if n > 1 else ""
        problems.append(f"{path.name}: lines {where[j][0]} and {where[i][0]} give {where[j][1]} two labels "
                        f"({labels[j][0]}, {labels[i][0]}): the first is used{more} (a CSV of one row per "
                        "image and label is read with --task multilabel)")
    if merged:
        (j, i), n = merged[0], len({paths[j] for j, _ in merged})
        problems.append(f"{path.name}: {n} image(s) are on several rows with different labels (e.g. "
                        f"{where[j][1]} on lines {where[j][0]} and {where[i][0]}): their labels are merged")
    keep = sorted(first.values())
    return [paths[k] for k in keep], [labels[k] for k in keep]


def read_label_csv(path: Path, problems: list[str], images: str | None = None, label_column: str = "label",
                   task: str = "auto") -> tuple[list[str], list[list[str]], list[str] | None]:
    """(paths, labels per image, the class columns of a one-hot CSV or None)."""
    rows = _rows(path)
    header = [h.strip().lower() for h in rows[0]]
    finder = ImageFinder(path.parent, images)
    pcol = _path_column(path, header, images, finder)
    if pcol is None:
        raise UserError(f"{path}: no column names the images (one of {', '.join(PATH_COLUMNS + ID_COLUMNS)}, "
                        "holding file paths or ids of files in a folder beside the CSV)")
    wanted = label_column.strip().lower()
    if wanted in header and header.index(wanted) != pcol:
        lcol = header.index(wanted)
    elif wanted != "label":  # named on purpose
        raise UserError(f"{path}: --label-column {label_column}: no such column (it has {', '.join(rows[0])})")
    else:
        lcol = next((header.index(h) for h in LABEL_COLUMNS if h in header), None)
    flags: list[int] | None = None
    if lcol is None:
        others = [i for i in range(len(header)) if i != pcol]
        if len(others) == 1:
            lcol = others[0]
        else:  # path,person,dog,cat with 0/1 rows: one indicator column per class
            flags = _indicator_columns(path, rows, pcol)
    paths, labels, cells, where, missing = [], [], [], [], []
    physical = 1 + sum(c.count("\n") for c in rows[0])  # the file's line each row starts on
    for line, row in enumerate(rows[1:], 2):
        physical += 1
        used = [pcol] + (flags if flags is not None else [lcol])  # a free-text column may span lines
        spread = next((row[i] for i in used if i < len(row) and ("\n" in row[i] or "\r" in row[i])), None)
        if spread is not None:
            # an unmatched quote: the csv module reads on to the next quote, so the following rows
            # became one cell (their text turned into dozens of bogus class names, silently)
            n = spread.count("\n")
            raise UserError(f"{path}:{physical}: a cell runs over {n + 1} lines ('{spread.splitlines()[0][:40]}...'): "
                            "an unmatched '\"' on this line swallows the rows after it; close or remove the quote")
        physical += sum(c.count("\n") for c in row)
        if not row or not row[pcol].strip():
            continue
        p = finder.find(row[pcol].strip())
        if p is None:
            missing.append(row[pcol].strip())
            continue
        paths.append(str(p))
        where.append((line, row[pcol].strip()))
        if flags is not None:
            labels.append([rows[0][i].strip() for i in flags if i < len(row) and row[i].strip() in ("1", "1.0")])
        else:
            cells.append(row[lcol].strip() if lcol < len(row) else "")
    if missing:
        problems.append(f"{len(missing)} image file(s) named in {path.name} do not exist: {_few(missing)}; skipped")
    if flags is None:
        labels = _split_cells(path, cells, header[lcol] == "tags", task, problems)
    paths, labels = _repeats(path, paths, labels, where, task, problems)
    return paths, labels, [rows[0][i].strip() for i in flags] if flags is not None else None


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` is a likely typo of ``b``: two neighbouring letters swapped (dgo), or one left
    out or added (persn). Edits that mostly make other real words are not counted: a changed
    letter under 7 letters (cat, car; horse, house), a letter added or dropped at the start
    (corn, acorn) or in names under 4 letters (sea, seal). COCO's and CIFAR-10/100's names then
    hold no such pair."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        d = [i for i in range(len(a)) if a[i] != b[i]]
        if len(d) == 2 and d[1] == d[0] + 1 and a[d[0]] == b[d[1]] and a[d[1]] == b[d[0]]:
            return len(a) >= 3
        return len(d) == 1 and len(a) >= 7
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long_[k]), len(short))
    return short[i:] == long_[i + 1:] and i > 0 and len(short) >= 4


def _deletions(t: str) -> set[str]:
    return {t} | {t[:i] + t[i + 1:] for i in range(len(t))}


def _near(name: str, classes: list[str]) -> str | None:
    """A class ``name`` was probably meant to be (case, one typo, or difflib's closest)."""
    import difflib

    key = " ".join(name.split()).casefold()
    return (next((c for c in classes if " ".join(c.split()).casefold() == key), None)
            or next((c for c in classes if _one_edit(name, c)), None)
            or next(iter(difflib.get_close_matches(name, classes, n=1, cutoff=0.75)), None))


def _name_problems(path: Path, labels: list[list[str]], training: bool, columns: bool = False) -> list[str]:
    """Class names a CSV most likely did not mean: another separator than '|' (person;dog is one
    class, and so is 'haze primary' when its words recur as tags do), and in training data the same
    name written twice (Person, person) or a rare typo of a frequent name (persn beside person),
    each of which silently became a class of its own."""
    out = []
    count = Counter(t for ls in labels for t in ls)
    if not columns and not any(len(ls) > 1 for ls in labels):
        for sep in (";", ","):
            hits = [t for t in count if sep in t]
            pieces = {p.strip() for t in hits for p in t.split(sep)}
            # a comma can be part of a name (ImageNet's 'tench, Tinca tinca'): only when its
            # pieces are labels of their own, or shared by several labels, is it a separator
            shared = Counter(p.strip() for t in hits for p in set(t.split(sep)))
            if hits and (sep == ";" or pieces & set(count) or any(n > 1 for n in shared.values())):
                n = sum(count[t] for t in hits)
                out.append(f"{path}: {n} label(s) hold '{sep}' (e.g. '{hits[0]}') and none '|': the labels of a row "
                           f"are separated by '|' (a|b), so '{hits[0]}' is read as one class; write "
                           f"'{LABEL_SEP.join(p.strip() for p in hits[0].split(sep))}' for several labels")
                break
        spaced = sorted((t for t in count if " " in t), key=lambda t: -count[t])
        if not out and spaced and _space_tags(count):  # Planet's tags under another column name than tags
            words = {w for t in count for w in t.split()}
            out.append(f"{path}: {sum(count[t] for t in spaced)} label(s) hold spaces (e.g. '{spaced[0]}') "
                       f"and their {len(words)} words recur across {len(count)} different labels, as tags do: "
                       "each label is read as one class; if a label's words are several labels, pass --task "
                       f"multilabel (or write '{LABEL_SEP.join(spaced[0].split())}')")
    if not training or len(count) < 2:
        return out
    pairs = []
    by_key: dict[str, list[str]] = {}
    for t in count:
        by_key.setdefault(" ".join(t.split()).casefold(), []).append(t)
    for group in by_key.values():
        if len(group) > 1:
            group.sort(key=lambda t: -count[t])
            pairs += [(t, group[0]) for t in group[1:]]
    # A typo is rare beside what it misspells (10x fewer rows). Names one edit apart share a
    # one-letter deletion, so only those are compared: linear in the number of names.
    by_deletion: dict[str, list[str]] = {}
    for t in count:
        for k in _deletions(t):
            by_deletion.setdefault(k, []).append(t)
    for t in sorted(count, key=lambda t: (count[t], t)):
        near = [f for k in _deletions(t) for f in by_deletion[k] if count[f] >= 10 * count[t] and _one_edit(t, f)]
        if near:
            f = max(near, key=lambda f: (count[f], f))
            if (t, f) not in pairs:
                pairs.append((t, f))
    if pairs:
        shown = ", ".join(f"'{a}' ({count[a]} row(s)) beside '{b}' ({count[b]})" for a, b in pairs[:5])
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        out.append(f"{path}: class names that look like another class written differently: {shown}{more}; "
                   "each is a class of its own: write them the same way if they are one")
    return out


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
        raise _unknown_classes(unknown, origin, all_classes)
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
        if names is None:  # one class list for every split: ids up to the largest of any split
            names = _yolo_classes(path, parts, problems, training=classes is None)
            for o in parts.values():
                o.classes = names
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
    tr = splits["train"]
    if classes is None and not opts.largest and len(tr) and not tr.labels.any():
        # COCO's image_info_test2017.json lists images and categories but no annotations: every
        # image all-negative, a run that learns 'nothing is there' and scores an undefined mAP
        what = f"{path}: no annotation describes its images" if kind == "coco" else \
            f"{path}: every label file is empty or missing"
        hint = " (an image-info file such as image_info_test2017.json has no labels)" if kind == "coco" else ""
        of = "the --classes" if opts.subset else "any class"
        raise UserError(f"{what}, so no image has an object of {of}: there is nothing to learn{hint}")
    src = DataSource(name=name, origin=str(path), classes=cls, train=splits["train"], val=splits.get("val"),
                     test=splits.get("test"), task=task, problems=problems)
    return src


def _load_csv(path: Path, opts: Options, classes: list[str] | None, problems: list[str]) -> DataSource:
    from imgclf.data.sources import _data_name

    if opts.label_mode == "largest":  # silently ignored before: the run was multi-label anyway
        raise UserError(f"{path}: --label-mode largest keeps each image's largest object, and a label CSV has no "
                        "object sizes; leave it out (one label per row trains single-label, lists multi-label)")
    paths, labels, columns = read_label_csv(path, problems, opts.images, opts.label_column, opts.task)
    if not paths:
        raise UserError(f"{path}: no rows with an existing image file")
    found = columns if columns is not None else sorted({t for ls in labels for t in ls})
    problems.extend(_name_problems(path, labels, training=classes is None, columns=columns is not None))
    cls = classes if classes is not None else _class_list(found, opts, str(path))
    index = {c: i for i, c in enumerate(cls)}
    # auto: single-label when every labelled row has one label. Rows left blank are then more
    # likely unlabelled than "none of the classes": they are dropped, and the message says how
    # to keep them as negatives. In a one-hot CSV a row of 0s says "none": multi-label.
    if columns is not None:
        single = opts.task == "single" or (opts.task == "auto" and all(len(ls) == 1 for ls in labels))
    else:
        single = opts.task == "single" or (opts.task == "auto" and all(len(ls) <= 1 for ls in labels)
                                           and any(labels))
    if classes is not None and opts.subset is None:
        # val/test data: a label training does not have (a typo: persn, dgo) cannot be scored
        unknown = Counter(t for ls in labels for t in ls if t not in index)
        if unknown:
            emptied = sum(1 for ls in labels if ls and not any(t in index for t in ls))
            names = []
            for t, n in unknown.most_common(5):
                near = _near(t, cls)
                names.append(f"'{t}' ({n} row(s){f'; training has {near!r}' if near else ''})")
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            left = "dropped" if single else "left with no label (all-negative)"
            problems.append(f"{path}: labels the training data does not have are ignored: {', '.join(names)}{more}; "
                            f"{emptied} of {len(labels)} row(s) are {left}")
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


def _unknown_classes(unknown: list[str], origin: str, classes: list[str]) -> UserError:
    """--classes names that the data does not have, each with the class it most likely meant
    (--classes Dog on COCO: 'dog'), else a few of the data's classes."""
    near = {u: _near(u, classes) for u in unknown}
    if all(near.values()):
        return UserError(f"--classes: {', '.join(unknown)} not in {origin}; did you mean "
                         f"{', '.join(near[u] for u in unknown)}?")
    return UserError(f"--classes: {', '.join(unknown)} not in {origin} (its classes: {_few(classes, 8)})")


def select_classes(src: DataSource, subset: list[str] | None) -> DataSource:
    """Keep only ``subset`` classes (idempotent; a multi-label source already applied it)."""
    if not subset or src.classes == subset:
        return src
    unknown = [c for c in subset if c not in src.classes]
    if unknown:
        raise _unknown_classes(unknown, src.origin, src.classes)
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


