"""Sources: turn what is on disk into labelled samples and class names, split into train/val/test.

A source never decodes pixels for training (the cache does that once). It validates the layout
and says clearly what is wrong: missing folders, empty classes, class sets that do not match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data import archives
from imgclf.data.images import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_EXTENSIONS
from imgclf.errors import UserError

# split folders, matched case-insensitively and also as the last part of a name: Training/ +
# Test/ (Fruits-360), Training/ + Testing/ (Kaggle's brain MRI), seg_train/ + seg_test/ (Intel
# scenes). Taken as classes, such folders train a model to tell the splits apart.
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "dev")
TEST_NAMES = ("test", "testing")
_DOC_SUFFIXES = {".txt", ".md", ".pdf", ".html", ".htm", ".rst", ".license"}
_DOC_NAMES = {"LICENSE", "LICENCE", "COPYING", "README", "NOTICE", "AUTHORS", "CITATION"}  # GitHub's, no extension


@dataclass
class Split:
    """Samples of one split. Exactly one of ``paths`` (files) or ``images`` (uint8 NHWC) is set."""

    labels: np.ndarray  # int64 [N] for single-label, float32 [N, C] multi-hot for multi-label
    paths: list[str] | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            images=self.images[idx] if self.images is not None else None,
        )


@dataclass
class DataSource:
    name: str  # short, for naming runs
    origin: str  # what the user pointed at, recorded in the run
    classes: list[str]
    train: Split
    val: Split | None = None
    test: Split | None = None
    task: str = "single"  # "single" | "multilabel"
    problems: list[str] = field(default_factory=list)  # one line each, reported once
    root: str | None = None  # the folder image paths live under when it is not origin (an archive's)

    def splits(self) -> dict[str, Split]:
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}


# ---------------------------------------------------------------------------------------------
# class-folder trees


@dataclass
class Skipped:
    """What a folder scan passed over, reported once per scan (see skip_notes)."""

    unreadable: Counter = field(default_factory=Counter)  # extension -> files of a format not read here
    repeats: list[str] = field(default_factory=list)  # folders reached again through a link
    errors: list[str] = field(default_factory=list)  # folders that could not be listed


def list_images(folder: Path, skipped: Skipped | None = None) -> list[str]:
    skipped = Skipped() if skipped is None else skipped
    out: list[str] = []
    # os.walk follows links (a class folder may gather photos from elsewhere) but, unlike find -L,
    # not loops: a link back up the tree (class/2019/loop -> ..) read every image about 40 times,
    # until the path grew too long. Folders are told apart by (device, inode), whatever the path
    # that reaches them; the class folder's ancestors count as seen, so a link up to the data
    # root does not read the other classes' images under this one.
    # (A file system that reports inode 0 for everything tells nothing apart: not tracked there.)
    seen = set()
    for parent in Path(folder).resolve().parents:
        with contextlib.suppress(OSError):
            st = parent.stat()
            seen.add((st.st_dev, st.st_ino or object()))
    for dirpath, dirnames, filenames in os.walk(
            folder, followlinks=True, onerror=lambda e: skipped.errors.append(f"{e.filename}: {e.strerror}")):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino or object())
        if key in seen:
            dirnames[:] = []
            skipped.repeats.append(dirpath)
            continue
        seen.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not archives.is_junk(d))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            ext = os.path.splitext(f)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                out.append(os.path.join(dirpath, f))
            elif ext in UNREADABLE_IMAGE_EXTENSIONS:
                skipped.unreadable[ext] += 1
    return out


def skip_notes(root: Path, skipped: Skipped) -> list[str]:
    """One line per kind of thing a scan of ``root`` passed over."""
    notes = []
    by_hint: dict[str, list[str]] = {}
    for ext, n in sorted(skipped.unreadable.items()):
        by_hint.setdefault(UNREADABLE_IMAGE_EXTENSIONS[ext], []).append(f"{n} {ext}")
    for hint, counts in by_hint.items():
        notes.append(f"{root}: {', '.join(counts)} file(s) skipped: {hint}")
    if skipped.repeats:
        notes.append(f"{root}: {len(skipped.repeats)} folder link(s) lead back to folders already read "
                     f"(e.g. {skipped.repeats[0]}): each folder is read once")
    if skipped.errors:
        notes.append(f"{root}: {len(skipped.errors)} folder(s) could not be read and were skipped "
                     f"(e.g. {skipped.errors[0]})")
    return notes


def _bare_files(folder: Path, limit: int = 1000) -> list[str]:
    """Names of files without an extension in ``folder`` (a scraper's img0, img1, ...), up to ``limit``."""
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        return sorted(e.name for _, e in zip(range(limit), it)
                      if not e.name.startswith(".") and "." not in e.name and e.is_file())
    return []


def _class_dirs(root: Path) -> list[Path]:
    # Names starting with "_" used to be skipped too, to pass over __MACOSX and __pycache__; that
    # also dropped real classes such as _background or _other without a word (torchvision's
    # ImageFolder and Keras read them as classes). Debris is now skipped by name (is_junk).
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not archives.is_junk(p.name))


def _class_name(folder: str) -> str:
    """A class folder's name as a class name. A name that is not valid UTF-8 (a Latin-1 or GBK
    folder from an old disk) comes from os.listdir with surrogate escapes, which no UTF-8 file
    (model.json, the confusion matrix CSV, the report) can hold; its bytes are written as \\xNN
    instead. Guessing the legacy encoding would be wrong as often as right.

    Names are compared in Unicode's composed form (NFC): macOS writes "café" decomposed (e +
    combining accent), so a train/ copied from a Mac and a test/ made on Linux would otherwise
    hold two different classes that print alike, and the test split would be refused."""
    try:
        folder.encode("utf-8")
    except UnicodeEncodeError:
        return archives.shown_name(folder)
    return unicodedata.normalize("NFC", folder)


# a file name that names its class: the class, then a number (cat.0.jpg, Abyssinian_12.jpg,
# american_bulldog_100.jpg, dog (3).png, cat0001.jpg): Kaggle's dogs-vs-cats, Oxford-IIIT Pets
_NAMED = re.compile(r"^(.*?[^\W\d_][^\W_]*?)[ ._\-]*\(?\d+\)?$")


def _loose_images(root: Path) -> list[str]:
    """The images directly in ``root``, not in a subfolder."""
    with contextlib.suppress(OSError), os.scandir(root) as it:
        return sorted(e.path for e in it if not e.name.startswith(".") and e.is_file()
                      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    return []


def named_images(root: Path) -> dict[str, list[str]] | None:
    """A folder of images without class folders whose file names name their classes, as
    {class: files}; None unless they make two or more classes of two or more images each (a
    camera's IMG_0001.jpg... is one 'class': not a labelling). A few odd ones out (a preview.jpg,
    a lone bird.0.jpg among cats and dogs: 2, or 2% of the images) are left out, and said so
    by scan_class_folders; more than that and the names are not a labelling."""
    found: dict[str, list[str]] = {}
    images = _loose_images(root)
    for f in images:
        m = _NAMED.match(os.path.splitext(os.path.basename(f))[0])
        found.setdefault(_class_name(m.group(1)) if m else "", []).append(f)
    odd = len(found.pop("", []))
    for c in [c for c, v in found.items() if len(v) < 2]:
        odd += len(found.pop(c))
    if len(found) < 2 or odd > max(2, 0.02 * len(images)):
        return None
    return found


def scan_class_folders(root: Path, classes: list[str] | None = None,
                       skip: set[Path] | None = None) -> tuple[list[str], Split, list[str]]:
    """Read ``root/<class>/**/image``, or a folder of images whose names name their classes
    (named_images). With ``classes`` given, map onto that class list. ``skip``: folders that are
    not classes (a test/ among them)."""
    problems: list[str] = []
    dirs = [d for d in _class_dirs(root) if d not in (skip or ())]
    named = None if dirs else named_images(root)
    if not dirs and named is None:
        loose = _loose_images(root)
        why = (f" (its {len(loose)} images are not in class folders, and their names do not name classes as "
               "cat.1.jpg or cat_1.jpg do)") if loose else ""
        packed = sorted(p.name for p in root.iterdir() if p.is_file() and archives.archive_suffix(p))
        if packed and not loose:  # Kaggle's download unzipped once: train.zip, test.zip, train.csv
            why = (f" (it holds archives: {', '.join(packed[:3])}; give --data the archive it came in, which is "
                   f"extracted with the archives inside, or extract {packed[0]} here)")
        raise UserError(f"{root} holds no class folders: expected {root}/<class name>/<images>{why}")
    if named is not None:
        example = next(iter(named.values()))[0]
        problems.append(f"{root}: no class folders; {len(named)} classes read from the image names "
                        f"(e.g. {os.path.basename(example)} -> {next(iter(named))})")
        used = {f for v in named.values() for f in v}
        odd = [os.path.basename(f) for f in _loose_images(root) if f not in used]
        if odd:
            problems.append(f"{root}: {len(odd)} image(s) left out whose names name no class, or a class of one image "
                            f"({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''})")
        dirs = []
    found: dict[str, list[str]] = dict(named or {})
    skipped = Skipped()
    escaped = []
    for d in dirs:
        files = list_images(d, skipped)
        if not files:
            bare = _bare_files(d)
            problems.append(f"class folder {d} has no images: class skipped" + (
                f" (it holds {len(bare)} file(s) without an extension, e.g. {bare[0]}: images are read by their "
                "extension, .jpg, .png, ...; rename them)" if bare else ""))
            continue
        name = _class_name(d.name)
        if name != unicodedata.normalize("NFC", d.name):  # not UTF-8: shown with \x escapes
            escaped.append(name)
        found.setdefault(name, []).extend(files)  # "café" composed and decomposed: one class
    notes = skip_notes(root, skipped)
    # said of the training folders once (val/test folders read in their classes would repeat it)
    grouped = _grouped_classes([d for d in dirs if _class_name(d.name) in found]) if classes is None else []
    if grouped:  # train/animals/cat, train/vehicles/truck: 2 classes, not 4, and nothing said so
        notes.append(f"{root}: every class folder holds its images in subfolders of its own ({', '.join(grouped[:3])}"
                     f"{', ...' if len(grouped) > 3 else ''}): the {len(found)} top folders are the classes, their "
                     f"subfolders are merged into them; if the subfolders are the classes, give each a folder of "
                     f"its own under {root}")
    loose = [os.path.basename(f) for f in _loose_images(root)] if named is None else []
    if loose:  # a class is its folder: these have none, and were left out without a word
        notes.append(f"{root}: {len(loose)} image(s) outside any class folder (e.g. {loose[0]}) are not used; "
                     "move them into the folder of their class")
    if escaped:
        notes.append(f"{root}: class folder name(s) {', '.join(escaped[:5])} are not UTF-8 and are shown with "
                     "\\x escapes; rename the folders to see the names as written")
    if not found:
        why = f"; {'; '.join(notes)}" if notes else ""
        raise UserError(f"no images found under {root} (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}){why}")
    problems.extend(notes)
    by_case: dict[str, list[str]] = {}
    for c in found:
        by_case.setdefault(c.strip().casefold(), []).append(c)
    twins = [sorted(g) for g in by_case.values() if len(g) > 1]
    if twins:  # Cat/ and cat/ (two downloads merged): two classes of one kind, each half the images
        shown = ", ".join(" and ".join(f"'{c}'" for c in g) for g in twins[:3])
        problems.append(f"{root}: class folders whose names differ only in case or spaces: {shown}; each is a class "
                        "of its own: merge them if they are one")
    if classes is None:
        classes = sorted(found)
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(
                f"{root} has classes the training data does not have: {', '.join(unknown[:10])}; "
                "every class in val/test must also be in train"
            )
        missing = sorted(set(classes) - set(found))
        if missing:
            problems.append(f"{root} has no images of class(es): {', '.join(missing[:10])}")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c, files in found.items():
        paths.extend(files)
        labels.extend([index[c]] * len(files))
    return classes, Split(labels=np.asarray(labels, dtype=np.int64), paths=paths), problems


def _grouped_classes(dirs: list[Path]) -> list[str]:
    """'animals/cat', ... when every class folder holds no image of its own but two or more
    subfolders, named unlike any other class folder's subfolders: a hierarchy whose leaves may be
    the classes meant. Subfolders every class has (cat/2019, dog/2019) are dates or sources."""
    subs: list[str] = []
    for d in dirs:
        try:
            inner = _class_dirs(d)
        except OSError:  # unreadable: said by the scan
            return []
        if _loose_images(d) or len(inner) < 2:
            return []
        subs += [f"{d.name}/{s.name}" for s in inner]
    names = [s.split("/", 1)[1] for s in subs]
    return subs if len(dirs) >= 2 and len(set(names)) == len(names) else []


def _split_key(name: str, names: tuple[str, ...]) -> int | None:
    """Rank of ``names`` that folder ``name`` matches (``Training``, ``seg_train``), else None."""
    low = name.lower()
    for cand in (low, low.rsplit("_", 1)[-1], low.rsplit("-", 1)[-1], low.rsplit(" ", 1)[-1]):
        if cand in names:
            return names.index(cand)
    return None


def _named_subdir(root: Path, names: tuple[str, ...], problems: list[str] | None = None) -> Path | None:
    hits = sorted((k, d.name != d.name.lower(), d.name, d) for d in _class_dirs(root)
                  if (k := _split_key(d.name, names)) is not None)
    if not hits:
        return None
    if problems is not None and len(hits) > 1:
        problems.append(f"{root}: several {names[0]} folders ({', '.join(h[2] for h in hits)}): "
                        f"{hits[0][2]} used, the others ignored")
    return hits[0][3]


def _train_subdir(root: Path) -> Path | None:
    """The train split folder, if ``root`` is split into train/(val/)(test/). A folder named like
    a split that holds images directly, not class folders, is a class (a vehicles set's train/)."""
    d = _named_subdir(root, TRAIN_NAMES)
    if d is None or not (_class_dirs(d) or named_images(d) is not None):
        return None
    return d


# Words that name a split or an image store, never a class: a folder named so beside a label
# CSV is where the CSV's images sit (Kaggle's train/, test/, train_images/).
_STORE_WORDS = frozenset(TRAIN_NAMES + VAL_NAMES + TEST_NAMES) | {"images", "image", "imgs", "img", "data"}


def _store_like(name: str) -> bool:
    return any(w in _STORE_WORDS for w in re.split(r"[_\-\s.]+", name.lower()))


def _flat_store(d: Path, depth: int = 2) -> bool:
    """A folder named as a split or image store holding no class folders (train/, or train/train/
    as a Kaggle zip unpacks)."""
    return _store_like(d.name) and depth > 0 and all(_flat_store(s, depth - 1) for s in _class_dirs(d))


def _label_table(folder: Path, images: str | None) -> Path | None:
    """The one label CSV of a folder (train_labels.csv, _classes.csv): a CSV that names images
    and is not a submission or test list. Several that qualify: the one named train or labels,
    else an error naming them."""
    from imgclf.data import multilabel

    try:
        csvs = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".csv", ".tsv") and p.is_file())
    except OSError:
        return None
    csvs = [p for p in csvs if not any(w in p.stem.lower() for w in ("submission", "sample", "test"))]
    tables = [p for p in csvs if multilabel.has_labels(p, images)]
    if len(tables) > 1:
        tables = [p for p in tables if "train" in p.stem.lower() or "label" in p.stem.lower()] or tables
    if len(tables) > 1:
        raise UserError(f"{folder}: several CSVs name its images ({', '.join(p.name for p in tables)}): "
                        f"give the one that labels them, --data {tables[0]}")
    return tables[0] if tables else None


def label_tables(root: Path, images: str | None = None) -> dict[str, Path] | None:
    """The label CSVs of a folder whose labels are in a table, not in class folders.

    * Kaggle's competition layout: train_labels.csv (id,label) beside flat train/ and test/
      folders of images. Read as class folders those made two classes named 'train' and 'test'.
      The CSV is used when every folder beside it is named as a split or an image store.
    * Roboflow's classification export: train/_classes.csv (filename + a 0/1 column per class)
      beside train/'s images, and the same in valid/ and test/: {split: csv}.
    """
    if all(_flat_store(d) for d in _class_dirs(root)):  # not train/<class>/ beside a metadata CSV
        top = _label_table(root, images)
        if top is not None:
            return {"train": top}
    train = _named_subdir(root, TRAIN_NAMES)
    if train is None or any(_class_dirs(train)):
        return None
    found = {"train": _label_table(train, images)}
    if found["train"] is None:
        return None
    for attr, names in (("val", VAL_NAMES), ("test", TEST_NAMES)):
        d = _named_subdir(root, names)
        t = _label_table(d, images) if d is not None and not _class_dirs(d) else None
        if t is not None:
            found[attr] = t
    return found


def _unwrap(root: Path) -> Path:
    """A folder holding one folder and at most a README or a licence (Kaggle's PetImages/ next to
    a pdf and a txt) is read from that folder, if it holds folders in turn."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".") and not archives.is_junk(p.name)]
    dirs = [p for p in entries if p.is_dir()]
    if (len(dirs) == 1 and all(p.suffix.lower() in _DOC_SUFFIXES or p.name.upper() in _DOC_NAMES
                               for p in entries if not p.is_dir())
            and _class_dirs(dirs[0])):
        from imgclf import log

        log.info(f"{root} holds only {dirs[0].name}/: reading the data from {dirs[0]}")
        return _unwrap(dirs[0])
    return root


def split_keys(split: Split) -> list[str]:
    """What names each sample for the validation hold-out: its path below the folder all the
    training images share (so moving or re-extracting the data keeps the split), or its row."""
    if split.paths is None:
        return [str(i) for i in range(len(split))]
    try:
        root = os.path.commonpath(split.paths) if len(split.paths) > 1 else os.path.dirname(split.paths[0])
    except ValueError:  # paths on different drives (Windows): no common folder
        return list(split.paths)
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in split.paths]


def membership(src: DataSource) -> dict:
    """Which images are in train and val (names and labels, not pixels), as counts and a digest:
    --resume compares it with the run's checkpoint to say when the data changed underneath."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    out: dict = {}
    for name in ("train", "val"):
        split = getattr(src, name)
        out[name] = len(split) if split is not None else 0
        if split is not None:
            h.update(archives.utf8_bytes(f"{name}\0" + "\0".join(split_keys(split))))
            h.update(np.ascontiguousarray(split.labels).tobytes())
    out["digest"] = h.hexdigest()
    out["classes"] = list(src.classes)  # --resume names what changed when a class was added or removed
    return out


def _hash_order(keys: list[str], seed: int) -> np.ndarray:
    # Each sample's place comes from a hash of (seed, its own name), not from one shuffle of the
    # whole list: adding, removing or renaming images moves at most the images concerned across
    # the train/val boundary, where a seeded permutation reshuffles every later class (cf. the
    # hash-of-identifier split in Geron's Hands-On ML, ch. 2). blake2b: stable across
    # processes and Python versions, unlike hash().
    import hashlib

    digests = [int.from_bytes(hashlib.blake2b(archives.utf8_bytes(f"{seed}\0{k}"), digest_size=8).digest(), "little")
               for k in keys]
    return np.argsort(np.array(digests, dtype=np.uint64), kind="stable")


def _held_out(n: int, fraction: float) -> int:
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)  # at least one image of a class with 2+, never all of it
    return k


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     keys: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class (at least one image of classes with 2+ images), or of
    all samples for multi-hot labels (no single class to stratify by). Which samples: see
    _hash_order (``keys`` name them; row numbers by default)."""
    keys = [str(i) for i in range(len(labels))] if keys is None else keys
    groups = [np.arange(len(labels))] if labels.ndim == 2 else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train_idx, val_idx = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for idx in groups:
        idx = idx[_hash_order([keys[i] for i in idx], seed)]
        k = _held_out(len(idx), fraction)
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


# ---------------------------------------------------------------------------------------------
# dispatch


def _data_name(path: Path) -> str:
    name = archives.archive_stem(path) if path.is_file() else path.name
    if name in ("train", "data", "images", "") and path.parent.name:
        name = path.parent.name
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name) or "data"


def _from_arrays(ds, origin: str, name: str) -> DataSource:
    train = Split(labels=ds.train.labels.astype(np.int64), images=ds.train.images)
    test = None
    if ds.test is not None:
        test = Split(labels=ds.test.labels.astype(np.int64), images=ds.test.images)
    return DataSource(name=name, origin=origin, classes=list(ds.classes), train=train, test=test)


DATA_NAMES = ("cifar10", "cifar-10", "cifar100", "cifar-100")


def check_spec(flag: str, spec: str | None) -> None:
    """Refuse, before reading a byte, a data spec no loader can read: empty ("$DATA" unset: not the
    working directory), a path that is not there, or not a file or folder. Shared by train and by
    sweep, which checks before any trial is made."""
    from imgclf.data import hub

    if spec is None or spec.lower() in DATA_NAMES or hub.is_hub(spec):
        return
    if not spec.strip():
        raise UserError(f"{flag} is empty: name a folder, file or archive")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {spec}: no such file or folder (give a folder, a file, an archive, cifar10, "
                        f"cifar100 or hf:OWNER/NAME)")
    if not path.is_dir() and not path.is_file():  # /dev/null, a pipe such as <(cat labels.csv)
        raise UserError(f"{flag} {spec}: not a file or folder (a device, pipe or socket): save the data to a file")


def _load_one(spec: str, *, csv_layout: str, label_column: str, cache_dir: Path, classes=None, ml=None,
              csv_shape: str | None = None) -> DataSource:
    from imgclf.data import arrays, hub, multilabel, parquet

    if spec.lower() in DATA_NAMES:
        which = "cifar100" if "100" in spec else "cifar10"
        folder = arrays.download_cifar(which, cache_dir / "datasets")
        return _from_arrays(arrays.read_cifar(folder), f"{which} ({folder})", which)
    if hub.is_hub(spec):  # hf:owner/name: downloaded once, then read as its parquet folder
        src = _load_one(str(hub.download(spec, cache_dir)), csv_layout=csv_layout, label_column=label_column,
                        cache_dir=cache_dir, classes=classes, ml=ml, csv_shape=csv_shape)
        src.name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in hub.parse(spec)[0].split("/")[-1])
        src.origin = spec
        return src
    check_spec("--data", spec)
    path = Path(spec).expanduser()
    if path.is_file() and archives.archive_suffix(path):
        src = _load_one(str(archives.extract_archive(path, cache_dir)), csv_layout=csv_layout,
                        label_column=label_column, cache_dir=cache_dir, classes=classes, ml=ml, csv_shape=csv_shape)
        src.name, src.origin, src.root = _data_name(path), str(path), src.origin
        return src
    shards = parquet.parquet_files(path)
    if shards:  # a Hugging Face data set: written out once as folders, then read as any folder
        inner = dataclasses.replace(ml, label_column="label") if ml else None  # its labels.csv's column
        folder = parquet.extract(shards, cache_dir, label_column)
        src = _load_one(str(folder), csv_layout=csv_layout,
                        label_column="label", cache_dir=cache_dir, classes=classes, ml=inner, csv_shape=csv_shape)
        order = parquet.class_order(folder)
        if classes is None and order:  # class i is the data set's ClassLabel i, not the i-th name A-Z
            src = _reorder(src, order)
        src.name, src.origin, src.root = _data_name(path), str(path), src.origin
        return src
    if path.is_dir():
        _not_a_run(path, spec)
        path = _unwrap(path)
        tables = label_tables(path, ml.images if ml else None)
        if tables is not None:
            return _from_label_tables(path, tables, classes, ml)
    # COCO JSON, YOLO images/+labels/ (or train/images/+labels/), label CSV
    kind = multilabel.detect(path, ml.images if ml else None)
    if kind is not None:
        return multilabel.load(path, kind, ml or multilabel.Options(), classes)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            from imgclf.data.npz import read_npz

            return read_npz(path, classes)
        if path.suffix.lower() in (".csv", ".tsv"):
            ds = arrays.read_pixel_csv(path, label_column=label_column, layout=csv_layout, image_shape=csv_shape,
                                       classes=classes)
            return _from_arrays(ds, str(path), _data_name(path))
        raise UserError(f"--data {spec}: unsupported file type '{path.suffix}' (expected a folder, a .csv or .tsv, an .npz of arrays, a .parquet, an archive (.zip, .tar.gz, ...), or cifar10)")
    if arrays.is_cifar_dir(path):
        return _from_arrays(arrays.read_cifar(path), str(path), _data_name(path))
    train_dir = _train_subdir(path)
    if train_dir is None:
        return _classes_beside_splits(path, classes)
    cls, train, problems = scan_class_folders(train_dir, classes)
    src = DataSource(name=_data_name(path), origin=str(path), classes=cls, train=train, problems=problems)
    used = {train_dir}
    for attr, names in (("val", VAL_NAMES), ("test", TEST_NAMES)):
        d = _named_subdir(path, names, src.problems)
        if d is not None and not _class_dirs(d) and named_images(d) is None:
            # Kaggle's train/<class>/ + test/*.png: the test images are the ones to predict, with no
            # labels to score against. Stopping the run over them helps nobody; saying so does.
            n = len(list_images(d))
            src.problems.append(f"{d}: {n} unlabelled images and no class folders; ignored as a {attr} split"
                                + (f" (to label them: imgclf predict RUN {d})" if n else ""))
            used.add(d)
        elif d is not None:
            _, split, probs = scan_class_folders(d, cls)
            setattr(src, attr, split)
            src.problems.extend(probs)
            used.add(d)
    other = [d.name for d in _class_dirs(path) if d not in used and _split_key(d.name, TRAIN_NAMES) is None
             and _split_key(d.name, VAL_NAMES) is None and _split_key(d.name, TEST_NAMES) is None]
    if other:  # seg_pred/ (unlabelled), extras/: beside the splits they are not classes
        src.problems.append(f"{path}: folder(s) {', '.join(other[:5])} ignored (not a train/val/test split)")
    return src


def _not_a_run(path: Path, spec: str) -> None:
    """--data RUN (or the runs/ folder) read as data: its eval-*/ folders became classes and its
    charts the images."""
    from imgclf.runs import is_run

    if is_run(path):
        raise UserError(f"--data {spec} is an imgclf run folder, not data: pass the data it was trained on (its "
                        f"config.yaml says which), or the run as the first argument of evaluate/predict")
    dirs = _class_dirs(path)
    if dirs and all(is_run(d) for d in dirs[:50]):
        raise UserError(f"--data {spec} holds imgclf run folders ({dirs[0].name}, ...), not data")


def _classes_beside_splits(path: Path, classes) -> DataSource:
    """Class folders, among which a val/ or test/ folder (cat/ dog/ test/) is not a class: the
    split of that name when it holds the same class folders, else unlabelled images, left out.
    A class named 'test' beside real classes is far rarer than a Kaggle test/ unpacked there."""
    splits = {}
    dirs = _class_dirs(path)
    for attr, names in (("val", VAL_NAMES), ("test", TEST_NAMES)):
        hits = [d for d in dirs if d.name.lower() in names]
        if hits and len(dirs) - len(hits) >= 2:
            splits[attr] = hits[0]
    if not splits:
        cls, split, problems = scan_class_folders(path, classes)
        return DataSource(name=_data_name(path), origin=str(path), classes=cls, train=split, problems=problems)
    cls, train, problems = scan_class_folders(path, classes, skip=set(splits.values()))
    src = DataSource(name=_data_name(path), origin=str(path), classes=cls, train=train, problems=problems)
    for attr, d in splits.items():
        if _class_dirs(d) or named_images(d) is not None:
            _, split, probs = scan_class_folders(d, cls)
            setattr(src, attr, split)
            src.problems.extend(probs)
            src.problems.append(f"{path}: {d.name}/ is read as the {attr} split, not as a class")
        else:
            n = len(list_images(d))
            src.problems.append(f"{d}: {n} images without class folders, beside the class folders: not a class, and "
                                f"ignored as unlabelled {attr} images" + (f" (to label them: imgclf predict RUN {d})"
                                                                          if n else ""))
    return src


def _from_label_tables(root: Path, tables: dict[str, Path], classes, ml) -> DataSource:
    """A folder whose labels are in CSVs (label_tables): the train table's classes, and val/test
    tables read in that class order."""
    from imgclf import log
    from imgclf.data import multilabel

    ml = ml or multilabel.Options()
    log.info(f"{root}: labels read from {', '.join(str(t.relative_to(root)) for t in tables.values())}"
             " (no class folders)")
    src = multilabel.load(tables["train"], "csv", ml, classes)
    for attr in ("val", "test"):
        if attr in tables:
            other = multilabel.load(tables[attr], "csv", ml, src.classes)
            if other.task == "single" and src.task == "multilabel":
                other = multilabel.to_multilabel(other)
            setattr(src, attr, other.train)
            src.problems.extend(other.problems)
    src.name, src.origin = _data_name(root), str(root)
    return src


def _reorder(src: DataSource, order: list[str]) -> DataSource:
    """``src`` with its classes in ``order`` (those it has; any others after them, as they were),
    every split re-indexed."""
    classes = [c for c in order if c in src.classes] + [c for c in src.classes if c not in order]
    if classes == src.classes:
        return src
    to = np.asarray([classes.index(c) for c in src.classes], dtype=np.int64)  # old index -> new
    for s in (src.train, src.val, src.test):
        if s is None:
            continue
        if s.labels.ndim == 2:
            cols = np.empty_like(s.labels)
            cols[:, to] = s.labels
            s.labels = cols
        else:
            s.labels = to[s.labels]
    src.classes = classes
    return src


def _align(other: DataSource, classes: list[str]) -> DataSource:
    """Val/test data read with its own class list, restricted to ``classes`` (the training data's
    --classes subset) and re-indexed to their order."""
    from imgclf.data import multilabel

    present = [c for c in classes if c in other.classes]
    missing = [c for c in classes if c not in other.classes]
    if not present:
        raise UserError(f"{other.origin}: none of the classes {', '.join(classes[:5])} are in it")
    other = multilabel.select_classes(other, present)
    to = np.asarray([classes.index(c) for c in present], dtype=np.int64)
    s = other.train
    if s.labels.ndim == 2:
        full = np.zeros((len(s), len(classes)), dtype=np.float32)
        full[:, to] = s.labels
        s.labels = full
    else:
        s.labels = to[s.labels]
    other.classes = list(classes)
    if missing:
        other.problems.append(f"{other.origin} has no images of class(es): {', '.join(missing[:10])}")
    return other


def one_class_advice(src: DataSource) -> str:
    """What to do about single-label data of one class (train refuses it, check reports it)."""
    if os.path.isfile(src.origin):  # a label CSV, .npz or parquet: its labels, not a folder level
        return "its labels name one class (rows of the others may lack a label or an image: see the lines above)"
    return "point --data at the folder that holds the class folders"


DEFAULT_VAL_SPLIT = 0.1  # config.py's default too


def load_source(
    data: str,
    *,
    val_data: str | None = None,
    test_data: str | None = None,
    val_split: float = DEFAULT_VAL_SPLIT,
    split_seed: int = 0,
    csv_layout: str = "auto",
    csv_shape: str | None = None,
    label_column: str = "label",
    cache_dir: Path,
    task: str = "auto",
    label_mode: str = "multilabel",
    classes: str | list[str] | None = None,
    images: str | None = None,
    keep_empty: bool = True,
) -> DataSource:
    """Resolve ``--data`` (plus optional separate val/test data) into a :class:`DataSource`."""
    from imgclf.data import multilabel

    for flag, spec in (("--data", data), ("--val-data", val_data), ("--test-data", test_data)):
        if spec is not None and not str(spec).strip():  # "$DATA" unset: not the working directory
            check_spec(flag, str(spec))
    subset = multilabel.parse_classes(classes) if isinstance(classes, str) else classes
    if task == "multilabel" and label_mode == "largest":
        raise UserError("--label-mode largest gives one label per image: use it without --task multilabel")
    if images and not Path(images).expanduser().is_dir():
        raise UserError(f"--images {images}: no such folder")
    ml = multilabel.Options(task=task, label_mode=label_mode, subset=subset, images=images, keep_empty=keep_empty,
                            label_column=label_column)
    kw = dict(csv_layout=csv_layout, csv_shape=csv_shape, label_column=label_column, cache_dir=cache_dir, ml=ml)
    src = multilabel.select_classes(_load_one(data, **kw), subset)
    for attr, spec in (("val", val_data), ("test", test_data)):
        if spec:
            # with --classes, the other data keeps its own class list and is cut down to the subset
            other = (_align(_load_one(spec, **kw), src.classes) if subset
                     else _load_one(spec, classes=src.classes, **kw))
            if other.classes != src.classes:
                raise UserError(f"{spec}: its classes {other.classes[:5]}... differ from the training data's")
            # a label CSV decides single/multi-label from its own rows: a val CSV with one label
            # per row beside multi-label training data is still multi-label (its labels were
            # integer class ids beside the training's multi-hot rows)
            if other.task == "single" and src.task == "multilabel":
                other = multilabel.to_multilabel(other)
            elif other.task == "multilabel" and src.task == "single" and task != "multilabel":
                raise UserError(f"{spec} has several labels per image, but --data {data} has one per image")
            setattr(src, attr, other.train)
            src.problems.extend(other.problems)
    if task == "multilabel" and src.task == "single":
        src = multilabel.to_multilabel(src)
    elif task == "single" and src.task == "multilabel":
        raise UserError(f"--data {data} has several labels per image: drop --task single (or use --label-mode largest)")
    if src.val is not None and val_split not in (0, DEFAULT_VAL_SPLIT):
        where = f"--val-data {val_data}" if val_data else "its val folder"
        src.problems.append(f"--val-split {val_split:g} is not used: the data has validation images ({where})")
    if src.val is None and val_split > 0:
        tr, va = stratified_split(src.train.labels, val_split, split_seed, split_keys(src.train))
        if len(va) == 0:
            src.problems.append("too few images to hold out a validation split: training without one")
        else:
            src.train, src.val = src.train.subset(tr), src.train.subset(va)
    if len(src.train) == 0:
        raise UserError(f"--data {data}: no training images")
    return src
