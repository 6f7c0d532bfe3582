"""``--data`` a Hugging Face data set as parquet files.

The Hub serves image data sets as parquet shards (``data/train-00000-of-00001.parquet``,
``plain_text/test-...``; what ``huggingface-cli download --repo-type dataset`` or a snapshot
leaves on disk): each row an encoded image (a struct of ``bytes`` and ``path``) and a label,
a ClassLabel index whose names sit in the schema's ``huggingface`` metadata. They are written
out once into the cache folder, as an archive is extracted (``archives.extract_once``): one
class folder per class under train/, val/ and test/ for single labels, a ``labels.csv`` per
split for lists of labels (multi-label). Every later step then reads files, as for any folder.
Class indices keep the ClassLabel's order (class_order). A row that holds no bytes but a path
(``datasets``' to_parquet of images loaded from files) has its file read (_linked).

Reading needs ``pyarrow`` (``pip install imgclf[parquet]``; the ``datasets`` library brings it).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from imgclf import log
from imgclf.data import archives
from imgclf.data.images import IMAGE_EXTENSIONS
from imgclf.errors import UserError

# a shard's split, from the first word of its name (HF: train-00000-of-00003.parquet, validation-...)
_SPLITS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
           "test": "test", "testing": "test"}
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "category", "target")
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
_MAX_SUBDIRS = 4  # a snapshot holds data/ or a config folder (plain_text/); a class tree holds more


def parquet_files(path: Path) -> list[Path]:
    """The parquet files ``--data`` names: the file itself, or those in the folder or one folder
    down (``data/``, ``plain_text/``). Folders of more than a few subfolders (class trees) are
    not listed below their top: that would read every class folder on every run."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".parquet" else []
    try:
        top = [e for e in os.scandir(path) if not e.name.startswith(".")]
    except OSError:
        return []
    found = [Path(e.path) for e in top if e.name.lower().endswith(".parquet") and e.is_file()]
    dirs = [e for e in top if e.is_dir()]
    if not found and len(dirs) <= _MAX_SUBDIRS:
        for d in dirs:
            try:
                found += [Path(e.path) for e in os.scandir(d.path) if e.name.lower().endswith(".parquet") and e.is_file()]
            except OSError:
                pass
    # beside folders that hold no parquet (class folders, images/) a parquet file is metadata
    holders = {f.parent for f in found}
    if any(Path(d.path) not in holders for d in dirs) or any(
            os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in top):
        return []
    return sorted(found)


def _split_of(file: Path) -> str | None:
    words = re.split(r"[-_.\s]+", file.name.lower())
    return next((_SPLITS[w] for w in words[:2] if w in _SPLITS), None)


def require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet data sets needs pyarrow: pip install 'imgclf[parquet]' "
                        "(or pip install pyarrow)") from None
    return pq


def _features(schema) -> dict:
    """The data set's features from the schema's Hugging Face metadata ({} when none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    feats = meta.get("info", {}).get("features") if isinstance(meta, dict) else None
    return feats if isinstance(feats, dict) else {}


def _names(feature) -> list[str] | None:
    """Class names of a ClassLabel feature, or of a list of them (multi-label)."""
    if not isinstance(feature, dict):
        return None
    if feature.get("_type") == "ClassLabel":
        return [str(n) for n in feature.get("names") or []] or None
    inner = feature.get("feature")
    if feature.get("_type") in ("Sequence", "List", "LargeList") and isinstance(inner, dict):
        return _names(inner)
    return None


def _image_columns(file: Path, schema) -> list[str]:
    """The columns of encoded images (Hugging Face's Image feature, a struct with 'bytes', or
    binary), or a UserError naming the columns there are."""
    import pyarrow as pa

    feats = _features(schema)
    fields = {f.name: f for f in schema}

    def is_image(name: str) -> bool:
        if isinstance(feats.get(name), dict):
            return feats[name].get("_type") == "Image"
        t = fields[name].type
        return (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t)

    images = [n for n in fields if is_image(n)]
    if not images:
        raise UserError(f"{file}: no image column (a column of encoded images: Hugging Face's Image feature, a "
                        f"struct with 'bytes', or binary); columns: {', '.join(fields)}")
    return images


def _columns(file: Path, schema, label_column: str) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names by index or None)."""
    feats = _features(schema)
    fields = {f.name: f for f in schema}
    images = _image_columns(file, schema)
    wanted = label_column.strip()
    if wanted in fields and wanted not in images:
        label = wanted
    elif wanted != "label":  # named on purpose
        raise UserError(f"{file}: --label-column {label_column}: no such column (it has {', '.join(fields)})")
    else:
        label = next((n for n in fields if n not in images and _names(feats.get(n))), None) or next(
            (n for n in _LABEL_NAMES if n in fields), None)
    if label is None:
        raise UserError(f"{file}: no label column (a ClassLabel, or one named {', '.join(_LABEL_NAMES)}; "
                        f"or --label-column NAME); columns: {', '.join(fields)}")
    return images[0], label, _names(feats.get(label))


def _suffix(data: bytes, path) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    ext = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
    return ext if ext in IMAGE_EXTENSIONS else ".png"  # PIL reads by content; a wrong guess is only a name


def _folder_name(name: str) -> str:
    clean = name.replace("/", "_").replace("\\", "_").replace("\0", "").strip()
    return clean if clean not in ("", ".", "..") else f"_{clean}"


class _Writer:
    """Writes the rows of one data set's shards out as files, counting what it skips."""

    def __init__(self, dest: Path, split_folders: bool):
        self.dest, self.split_folders = dest, split_folders
        self.unlabelled = 0
        self.no_bytes = 0
        self.linked = 0  # rows whose image is a file the row names (no bytes stored)
        self.order: list[str] | None = None  # the ClassLabel's names, in index order
        self.multi: dict[str, list[tuple[str, list[str]]]] = {}  # split -> (file, labels) rows
        self.counts: Counter = Counter()

    def shard(self, pq, file: Path, index: int, label_column: str) -> None:
        pf = pq.ParquetFile(file)
        img, lab, names = _columns(file, pf.schema_arrow, label_column)
        split = (_split_of(file) or "train") if self.split_folders else ""
        log.info(f"{file.name}: {pf.metadata.num_rows} rows, images in '{img}', labels in '{lab}'"
                 + (f" ({len(names)} class names from its Hugging Face metadata)" if names else ""))
        if names and self.order is None:
            self.order = names
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=[img, lab]):
            for cell, y in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                self._row(cell, y, names, split, f"{index:03d}-{row:07d}", file.parent)
                row += 1

    def _label(self, y, names: list[str] | None) -> str | None:
        if y is None or (isinstance(y, int) and y < 0):  # HF marks an unlabelled test row -1
            return None
        if isinstance(y, int) and names is not None:
            return names[y] if y < len(names) else str(y)
        return str(y)

    def _row(self, cell, y, names, split: str, stem: str, base: Path) -> None:
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        if not data and path:
            data = _linked(path, base)
            self.linked += bool(data)
        if not data:
            self.no_bytes += 1
            return
        name = stem + _suffix(data, path)
        if isinstance(y, list):  # a list of labels: multi-label, written with a labels.csv
            labels = [t for t in (self._label(v, names) for v in y) if t is not None]
            folder = self.dest / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            self.multi.setdefault(split, []).append((name, labels))
            self.counts[split] += 1
            return
        label = self._label(y, names)
        if label is None:
            self.unlabelled += 1
            return
        folder = self.dest / split / _folder_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        self.counts[split] += 1

    def finish(self, files: list[Path]) -> None:
        import csv

        if self.multi and len(self.multi) != len(self.counts):
            raise UserError(f"{files[0].parent}: some shards hold one label per row and others lists of labels")
        for split, rows in self.multi.items():
            with open(self.dest / split / "labels.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["path", "labels"])
                w.writerows((name, "|".join(labels)) for name, labels in rows)
        if not sum(self.counts.values()):
            raise UserError(f"{files[0] if len(files) == 1 else files[0].parent}: no labelled images in "
                            f"{len(files)} parquet file(s)"
                            + (f" ({self.unlabelled} rows without a label)" if self.unlabelled else ""))
        skipped = []
        if self.unlabelled:
            skipped.append(f"{self.unlabelled} row(s) without a label (-1 or empty: a test split's)")
        if self.no_bytes:
            skipped.append(f"{self.no_bytes} row(s) without image bytes or an image file at the path they name")
        if skipped:
            log.warn(f"parquet: skipped {' and '.join(skipped)}")
        if self.linked:
            log.info(f"parquet: {self.linked} image(s) read from the files their rows name (rows without bytes)")
        if self.order:  # read back by class_order: the class indices stay the data set's own
            (self.dest / ORDER_FILE).write_text(json.dumps(self.order), encoding="utf-8")


ORDER_FILE = ".class-order.json"  # hidden: no folder reader takes it for images or labels


def class_order(folder: Path) -> list[str] | None:
    """The ClassLabel names, in index order, of the parquet data set written out to ``folder``."""
    try:
        names = json.loads((folder / ORDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _linked(path: str, base: Path) -> bytes | None:
    """The image a row names by path and does not hold (``datasets``' to_parquet of images loaded
    from files keeps only their paths): the path as written, else below the parquet file's folder
    (a relative path, or an absolute one from the machine that wrote it, by its last parts). Only
    image files: a downloaded data set's row naming ~/.ssh/id_rsa copies nothing."""
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        return None
    parts = [p for p in re.split(r"[\\/]+", path) if p not in ("", ".")]
    candidates = [Path(path)] if os.path.isabs(path) else []
    candidates += [base.joinpath(*parts[-k:]) for k in range(len(parts), 0, -1)]
    for c in candidates:
        try:
            return c.read_bytes()
        except OSError:
            continue
    return None


def extract(files: list[Path], cache_dir: Path, label_column: str = "label") -> Path:
    """The folder the parquet files are written out to (once; keyed by their paths, sizes and
    modification times, and the label column read)."""
    pq = require_pyarrow()
    first = files[0]
    name = first.stem if len(files) == 1 else (first.parent.parent.name if first.parent.name in ("data",) else
                                                first.parent.name)
    key = archives._key(*files) + ("" if label_column == "label" else f"-{_folder_name(label_column)}")
    target = cache_dir / "archives" / f"{_folder_name(name)}-parquet-{key}"
    # split folders when the shards name their splits and one is train (a lone test shard, as
    # for evaluate --data test.parquet, is read whole)
    splits = {_split_of(f) for f in files}

    def fill(dest: Path) -> None:
        w = _Writer(dest, split_folders="train" in splits)
        for i, f in enumerate(files):
            w.shard(pq, f, i, label_column)
        w.finish(files)

    return archives.extract_once(first if len(files) == 1 else first.parent, target, fill, what="parquet file")


def iter_images(file: Path):
    """``(name, data, error)`` for each row's image (``predict test.parquet``), read in place:
    ``name`` is ``<file>#<row>`` (rows from 0). A file that cannot be read is one error entry."""
    try:
        pq = require_pyarrow()
        pf = pq.ParquetFile(file)
        column = _image_columns(file, pf.schema_arrow)[0]
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=[column]):
            for cell in batch.column(0).to_pylist():
                data = cell.get("bytes") if isinstance(cell, dict) else cell
                if not data and isinstance(cell, dict) and cell.get("path"):
                    data = _linked(cell["path"], file.parent)
                yield f"{file}#{row}", data or None, "" if data else "no image bytes in this row, nor a file at its path"
                row += 1
    except UserError as e:
        yield str(file), None, str(e).removeprefix(f"{file}: ")
    except (OSError, ValueError) as e:  # pyarrow's errors: ArrowInvalid is a ValueError, ArrowIOError an OSError
        yield str(file), None, f"not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
