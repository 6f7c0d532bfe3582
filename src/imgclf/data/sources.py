"""Sources: turn what is on disk into labelled samples and class names, split into train/val/test.

A source never decodes pixels for training (the cache does that once). It validates the layout
and says clearly what is wrong: missing folders, empty classes, class sets that do not match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data import archives
from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.errors import UserError

VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test",)


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


def _list_images(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return out


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def scan_class_folders(root: Path, classes: list[str] | None = None) -> tuple[list[str], Split, list[str]]:
    """Read ``root/<class>/**/image``. With ``classes`` given, map onto that class list."""
    problems: list[str] = []
    dirs = _class_dirs(root)
    if not dirs:
        raise UserError(f"{root} holds no class folders: expected {root}/<class name>/<images>")
    found: dict[str, list[str]] = {}
    for d in dirs:
        files = _list_images(d)
        if not files:
            problems.append(f"class folder {d} has no images: class skipped")
            continue
        found[d.name] = files
    if not found:
        raise UserError(f"no images found under {root} (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
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


def _named_subdir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class (at least one image of classes with 2+ images)."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
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


def _load_one(spec: str, *, csv_layout: str, label_column: str, cache_dir: Path, classes=None, ml=None) -> DataSource:
    from imgclf.data import arrays, multilabel

    if spec.lower() in ("cifar10", "cifar-10", "cifar100", "cifar-100"):
        which = "cifar100" if "100" in spec else "cifar10"
        folder = arrays.download_cifar(which, cache_dir / "datasets")
        return _from_arrays(arrays.read_cifar(folder), f"{which} ({folder})", which)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--data {spec}: no such file or folder")
    if path.is_file() and archives.archive_suffix(path):
        src = _load_one(str(archives.extract_archive(path, cache_dir)), csv_layout=csv_layout,
                        label_column=label_column, cache_dir=cache_dir, classes=classes, ml=ml)
        src.name, src.origin, src.root = _data_name(path), str(path), src.origin
        return src
    kind = multilabel.detect(path)  # COCO JSON, YOLO images/+labels/, CSV of path,label1|label2
    if kind is not None:
        return multilabel.load(path, kind, ml or multilabel.Options(), classes)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            ds = arrays.read_pixel_csv(path, label_column=label_column, layout=csv_layout, classes=classes)
            return _from_arrays(ds, str(path), _data_name(path))
        raise UserError(f"--data {spec}: unsupported file type '{path.suffix}' (expected a folder, a .csv, an archive (.zip, .tar.gz, ...), or cifar10)")
    if arrays.is_cifar_dir(path):
        return _from_arrays(arrays.read_cifar(path), str(path), _data_name(path))
    train_dir = path / "train" if (path / "train").is_dir() else None
    if train_dir is None:
        cls, split, problems = scan_class_folders(path, classes)
        return DataSource(name=_data_name(path), origin=str(path), classes=cls, train=split, problems=problems)
    cls, train, problems = scan_class_folders(train_dir, classes)
    src = DataSource(name=_data_name(path), origin=str(path), classes=cls, train=train, problems=problems)
    for attr, names in (("val", VAL_NAMES), ("test", TEST_NAMES)):
        d = _named_subdir(path, names)
        if d is not None:
            _, split, probs = scan_class_folders(d, cls)
            setattr(src, attr, split)
            src.problems.extend(probs)
    return src


def load_source(
    data: str,
    *,
    val_data: str | None = None,
    test_data: str | None = None,
    val_split: float = 0.1,
    split_seed: int = 0,
    csv_layout: str = "auto",
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

    subset = multilabel.parse_classes(classes) if isinstance(classes, str) else classes
    if task == "multilabel" and label_mode == "largest":
        raise UserError("--label-mode largest gives one label per image: use it without --task multilabel")
    ml = multilabel.Options(task=task, label_mode=label_mode, subset=subset, images=images, keep_empty=keep_empty)
    kw = dict(csv_layout=csv_layout, label_column=label_column, cache_dir=cache_dir, ml=ml)
    src = multilabel.select_classes(_load_one(data, **kw), subset)
    for attr, spec in (("val", val_data), ("test", test_data)):
        if spec:
            other = _load_one(spec, classes=src.classes, **kw)
            if other.classes != src.classes:
                raise UserError(f"{spec}: its classes {other.classes[:5]}... differ from the training data's")
            setattr(src, attr, other.train)
            src.problems.extend(other.problems)
    if task == "multilabel" and src.task == "single":
        src = multilabel.to_multilabel(src)
    elif task == "single" and src.task == "multilabel":
        raise UserError(f"--data {data} has several labels per image: drop --task single (or use --label-mode largest)")
    if src.val is None and val_split > 0:
        split_fn = multilabel.random_split if src.train.labels.ndim == 2 else None
        tr, va = (split_fn(len(src.train), val_split, split_seed) if split_fn
                  else stratified_split(src.train.labels, val_split, split_seed))
        if len(va) == 0:
            src.problems.append("too few images to hold out a validation split: training without one")
        else:
            src.train, src.val = src.train.subset(tr), src.train.subset(va)
    if len(src.train) == 0:
        raise UserError(f"--data {data}: no training images")
    return src
