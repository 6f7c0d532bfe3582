"""Data sources whose pixels are already arrays, not image files.

* CIFAR-10 / CIFAR-100 "python version" folders (pickled batches), read through a restricted
  unpickler that can only rebuild numpy arrays, lists, dicts, strings and numbers: a pickle that
  asks for anything else (``os.system``, ``eval``, ...) is refused before that code can run.
* :func:`download_cifar` fetches the official archives (md5-verified, safely extracted), or reuses
  an archive / extracted folder a user placed by hand on a machine without internet.
* :func:`read_pixel_csv` reads CSVs of pixels (``label,pixel0,pixel1,...``), e.g. MNIST- or
  CIFAR-style exports, in planar (R..G..B..), interleaved (RGBRGB..) or grayscale layout.

Everything returns ``uint8 [N, H, W, 3]`` C-contiguous RGB images and ``int64 [N]`` labels.
Problems with the user's files raise :class:`DataError`, whose message is one line naming the
problem and the fix.
"""

from __future__ import annotations

import _compat_pickle
import csv
import hashlib
import http.client
import itertools
import math
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from imgclf import log
from imgclf.errors import UserError

__all__ = [
    "DataError",
    "ArraySplit",
    "ArrayDataset",
    "CifarSource",
    "CIFAR_SOURCES",
    "is_cifar_dir",
    "read_cifar",
    "download_cifar",
    "read_pixel_csv",
]


class DataError(UserError):
    """A user's data problem; str() is one clear line naming the problem and the fix."""


@dataclass
class ArraySplit:
    images: np.ndarray  # uint8 [N, H, W, 3], C-contiguous, RGB
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ArrayDataset:
    classes: list[str]
    train: ArraySplit
    test: ArraySplit | None


# =============================================================================================
# CIFAR pickles

CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")


@dataclass(frozen=True)
class CifarSource:
    """Where an official CIFAR archive lives and what it unpacks to (tests patch ``url``/``md5``)."""

    url: str
    filename: str
    md5: str
    folder: str
    kind: str  # "cifar10" | "cifar100"


CIFAR_SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        kind="cifar10",
    ),
    "cifar100": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        kind="cifar100",
    ),
}


def _numpy_internal(module: str, name: str):
    """numpy moved ``numpy.core`` to ``numpy._core`` in 2.0; import from whichever is real here
    (touching ``numpy.core`` on numpy 2 emits a DeprecationWarning)."""
    import importlib

    major = int(np.__version__.split(".")[0])
    prefix = "numpy._core" if major >= 2 else "numpy.core"
    return getattr(importlib.import_module(f"{prefix}.{module}"), name)


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    # Python 3 writes ``bytes`` in protocol-2 pickles as _codecs.encode(str, 'latin1'); allow
    # exactly that and no other codec.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode used with something other than a latin1 string")
    return obj.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_internal("multiarray", "_reconstruct")
    frombuffer = _numpy_internal("numeric", "_frombuffer")
    return {
        # ndarray pickles (protocol <= 4 and protocol 5 in-band), old and new numpy module names
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # bytes as written by Python 3 at protocol 2
        ("_codecs", "encode"): _latin1_encode,
    }


class _ForbiddenGlobal(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the handful of globals real CIFAR files reference."""

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        # Python-2 names (__builtin__.eval) in the Python-3 spelling, as pickle itself would map them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _safe_globals()
        obj = _RestrictedUnpickler._allowed.get((module, name))
        if obj is None:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise _ForbiddenGlobal("a persistent id")


def _load_pickle(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except _ForbiddenGlobal as e:
        raise DataError(
            f"refusing to load {file}: it contains {e.qualname}, which a CIFAR file never does "
            "(it may be malicious); replace it with the official CIFAR file"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError, ...
        raise DataError(
            f"cannot read {file}: it is not a valid CIFAR python-version pickle "
            f"({type(e).__name__}: {e}); replace it with the official CIFAR file"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{file} holds a {type(obj).__name__}, not the dict a CIFAR file holds; "
            "replace it with the official CIFAR file"
        )
    # Python-2 pickles read with encoding='bytes' have bytes keys; re-pickled ones may have str.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_kind(folder: Path) -> str | None:
    if all((folder / f).is_file() for f in CIFAR10_FILES):
        return "cifar10"
    if all((folder / f).is_file() for f in CIFAR100_FILES):
        return "cifar100"
    return None


def _locate_cifar(path: Path) -> list[tuple[str, Path]]:
    """(kind, folder) for ``path`` itself, else for its extracted official subfolders."""
    if not path.is_dir():
        return []
    kind = _cifar_kind(path)
    if kind:
        return [(kind, path)]
    found = []
    for src in CIFAR_SOURCES.values():
        sub = path / src.folder
        if sub.is_dir() and _cifar_kind(sub) == src.kind:
            found.append((src.kind, sub))
    return found


def is_cifar_dir(path) -> bool:
    """True for a CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test,
    meta) python-version folder, or a folder containing an extracted ``cifar-10-batches-py`` /
    ``cifar-100-python`` folder."""
    return bool(_locate_cifar(Path(path).expanduser()))


def _names(value, file: Path, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{file}: '{key}' is not a list of class names; replace it with the official file")
    out = []
    for v in value:
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if not isinstance(v, str):
            raise DataError(f"{file}: '{key}' holds {type(v).__name__}, not class names; "
                            "replace it with the official file")
        out.append(v)
    return out


def _cifar_split(files: list[Path], label_key: str, n_classes: int) -> ArraySplit:
    images, labels = [], []
    for file in files:
        d = _load_pickle(file)
        for key in ("data", label_key):
            if key not in d:
                keys = ", ".join(repr(k) for k in list(d)[:8])
                raise DataError(f"{file} has no '{key}' entry (found {keys}); "
                                "it is not a CIFAR batch of this kind, replace it with the official file")
        data = d["data"]
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            shape = getattr(data, "shape", type(data).__name__)
            raise DataError(f"{file}: 'data' has shape {shape}, expected [N, 3072] (32x32 RGB rows); "
                            "replace it with the official file")
        if data.dtype != np.uint8:
            if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
                raise DataError(f"{file}: 'data' holds {data.dtype} values, not bytes 0..255; "
                                "replace it with the official file")
            data = data.astype(np.uint8)
        try:
            lab = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{file}: '{label_key}' is not a list of integers; "
                            "replace it with the official file") from None
        if lab.shape[0] != data.shape[0]:
            raise DataError(f"{file}: {data.shape[0]} images but {lab.shape[0]} labels; "
                            "replace it with the official file")
        if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
            raise DataError(f"{file}: label {int(lab.max() if lab.max() >= n_classes else lab.min())} "
                            f"is outside 0..{n_classes - 1}; replace it with the official file")
        # Rows are channel-planar: 1024 R bytes, then 1024 G, then 1024 B, each plane row-major.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    img = np.ascontiguousarray(np.concatenate(images) if len(images) > 1 else images[0])
    return ArraySplit(images=img, labels=np.concatenate(labels).astype(np.int64, copy=False))


def read_cifar(path, *, label: str = "fine") -> ArrayDataset:
    """Read a CIFAR-10 or CIFAR-100 python-version folder (or the folder containing one).

    ``label`` selects CIFAR-100's 100 ``"fine"`` classes or 20 ``"coarse"`` superclasses; CIFAR-10
    has only ``"fine"``. Pickles are read through a restricted unpickler (see module docstring).
    """
    if label not in ("fine", "coarse"):
        raise DataError(f"CIFAR label must be 'fine' or 'coarse', not {label!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a CIFAR python-version folder "
                        "(cifar-10-batches-py/ or cifar-100-python/) or use 'cifar10'/'cifar100' to download")
    found = _locate_cifar(path)
    if not found:
        if path.is_dir():
            have10 = [f for f in CIFAR10_FILES if (path / f).is_file()]
            have100 = [f for f in CIFAR100_FILES if (path / f).is_file()]
            if have10 or have100:
                files, kind = (CIFAR10_FILES, "CIFAR-10") if len(have10) >= len(have100) else (
                    CIFAR100_FILES, "CIFAR-100")
                missing = [f for f in files if not (path / f).is_file()]
                raise DataError(f"{path} looks like an incomplete {kind} folder: missing "
                                f"{', '.join(missing)}; re-extract the official archive there")
        raise DataError(
            f"{path} is not a CIFAR python-version folder: expected data_batch_1..5, test_batch and "
            "batches.meta (CIFAR-10) or train, test and meta (CIFAR-100), or a folder containing "
            "cifar-10-batches-py/ or cifar-100-python/"
        )
    if len(found) > 1:
        raise DataError(f"{path} contains both {found[0][1].name}/ and {found[1][1].name}/; "
                        "pass the one you mean")
    kind, folder = found[0]
    if kind == "cifar10":
        if label != "fine":
            raise DataError(f"{folder} is CIFAR-10, which has no coarse labels; use label='fine'")
        classes = _names(_load_pickle(folder / "batches.meta").get("label_names"),
                         folder / "batches.meta", "label_names")
        n = len(classes)
        train = _cifar_split([folder / f"data_batch_{i}" for i in range(1, 6)], "labels", n)
        test = _cifar_split([folder / "test_batch"], "labels", n)
    else:
        key = f"{label}_label_names"
        classes = _names(_load_pickle(folder / "meta").get(key), folder / "meta", key)
        n = len(classes)
        train = _cifar_split([folder / "train"], f"{label}_labels", n)
        test = _cifar_split([folder / "test"], f"{label}_labels", n)
    return ArrayDataset(classes=classes, train=train, test=test)


# ---------------------------------------------------------------------------------------------
# download


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in blocks (hashlib.file_digest, Python 3.11+)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


def _offline_error(src: CifarSource, root: Path, reason: str) -> DataError:
    return DataError(
        f"could not download {src.url} ({reason}); download it elsewhere and place {src.filename} "
        f"or the extracted {src.folder}/ folder in {root}"
    )


def _download(src: CifarSource, root: Path, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5(usedforsecurity=False)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        tqdm = None
    bar = None
    try:
        req = urllib.request.Request(src.url, headers={"User-Agent": "imgclf"})
        with urllib.request.urlopen(req, timeout=60) as resp, open(part, "wb") as out:
            total = resp.headers.get("Content-Length") if resp.headers else None
            if tqdm is not None:
                bar = tqdm(total=int(total) if total and total.isdigit() else None, unit="B",
                           unit_scale=True, unit_divisor=1024, desc=src.filename)
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
            if total and total.isdigit() and out.tell() != int(total):
                raise http.client.IncompleteRead(b"", int(total) - out.tell())
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise _offline_error(src, root, f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        part.unlink(missing_ok=True)
        raise _offline_error(src, root, str(e.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts are OSError
        part.unlink(missing_ok=True)
        raise _offline_error(src, root, f"{type(e).__name__}: {e}".rstrip(": ")) from None
    finally:
        if bar is not None:
            bar.close()
    got = h.hexdigest()
    if got != src.md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"downloaded {src.url} but its md5 is {got}, not {src.md5} (truncated or altered); run again, "
            f"or download it elsewhere and place {src.filename} or the extracted {src.folder}/ folder in {root}"
        )
    os.replace(part, dest)


def _check_member(m: tarfile.TarInfo, archive: Path, root: Path, folder: str) -> None:
    name = m.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (
        name.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", name)
        or ".." in parts
        or not (root / name).resolve().is_relative_to(root.resolve())
    ):
        raise DataError(f"refusing to extract {archive}: member '{name}' would be written outside {root}; "
                        "delete the archive and use the official file")
    if not (m.isfile() or m.isdir()):
        raise DataError(f"refusing to extract {archive}: member '{name}' is a link or special file, which the "
                        "official archive never contains; delete the archive and use the official file")
    if not parts or parts[0] != folder:
        raise DataError(f"refusing to extract {archive}: member '{name}' is not under {folder}/ as in the "
                        "official archive; delete the archive and use the official file")


def _extract(src: CifarSource, archive: Path, root: Path) -> Path:
    target = root / src.folder
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(m, archive, root, src.folder)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4; members were checked above
                    tf.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"cannot extract {archive} ({type(e).__name__}: {e}); "
                            "delete it and run again, or place the extracted "
                            f"{src.folder}/ folder in {root}") from None
        extracted = tmp / src.folder
        if _cifar_kind(extracted) != src.kind:
            raise DataError(f"{archive} does not contain a complete {src.folder}/ folder; "
                            "delete it and run again")
        if target.exists() and any(target.iterdir()):
            raise DataError(f"{target} exists but is not a complete {src.kind} folder; "
                            "delete it and run again")
        if target.exists():
            target.rmdir()
        os.replace(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_cifar(name: str, root) -> Path:
    """Return the extracted CIFAR folder under ``root``, downloading it first if needed.

    ``name`` is ``"cifar10"`` or ``"cifar100"``. An existing extracted folder
    (``root/cifar-10-batches-py``) or archive (``root/cifar-10-python.tar.gz``) is reused without
    any network access; a downloaded or placed archive must match the official md5. Extraction
    refuses members that would land outside ``root``, links and special files. Without internet
    this raises :class:`DataError` saying which file to place where.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in CIFAR_SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose cifar10 or cifar100")
    src = CIFAR_SOURCES[key]
    root = Path(root).expanduser()
    target = root / src.folder
    if _cifar_kind(target) == src.kind:
        return target
    if root.name == src.folder and _cifar_kind(root) == src.kind:
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {root} to hold {src.kind} ({e.strerror or e}); "
                        "choose a writable cache folder") from None
    archive = root / src.filename
    if archive.is_file():
        got = file_digest(archive, "md5")
        if got != src.md5:
            raise DataError(f"{archive} has md5 {got}, not the official {src.md5} (damaged or not "
                            "the official file); delete it and run again")
    else:
        _download(src, root, archive)
    return _extract(src, archive, root)


# =============================================================================================
# pixel CSVs

_LAYOUTS = ("auto", "planar", "interleaved", "gray")
_CSV_CHUNK_VALUES = 8_000_000  # cells parsed per chunk: bounds memory for 60,000 x 3,072 files
_INT_RE = re.compile(r"^[+-]?\d+$")


def _isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n) if n > 0 else 0
    return r if r > 0 and r * r == n else None


_SHAPE_RE = re.compile(r"\s*(\d+)\s*[x×*,]\s*(\d+)\s*(?:[x×*,]\s*(\d+)\s*)?", re.IGNORECASE)
_SHAPE_HELP = "--csv-shape HxW, e.g. --csv-shape 48x64 (or HxWxC with C 1 or 3: 48x64x3)"


def parse_csv_shape(shape) -> tuple[int, int, int | None] | None:
    """``--csv-shape`` ("48x64", "48x64x3", "48x64x1") or ``image_shape`` ((48, 64), (48, 64, 3))
    -> (height, width, channels or None)."""
    if shape is None:
        return None
    if isinstance(shape, str):
        m = _SHAPE_RE.fullmatch(shape)
        dims = [int(g) for g in m.groups() if g is not None] if m else []
    else:
        try:
            dims = [int(v) for v in shape]
        except (TypeError, ValueError):
            dims = []
    if len(dims) not in (2, 3) or min(dims) <= 0 or (len(dims) == 3 and dims[2] not in (1, 3)):
        raise DataError(f"--csv-shape {shape!r} is not an image shape; expected {_SHAPE_HELP}")
    return dims[0], dims[1], (dims[2] if len(dims) == 3 else None)


def _resolve_layout(n_pix: int, layout: str, image_shape, file: Path) -> tuple[str, int, int]:
    opt = "pass layout='planar' or 'interleaved' (CLI: --csv-layout planar|interleaved)"
    shape = parse_csv_shape(image_shape)
    if shape is not None:
        h, w, c = shape
        given = f"--csv-shape {h}x{w}" + (f"x{c}" if c else "")
        if n_pix == h * w and c in (None, 1):
            if layout in ("auto", "gray"):
                return "gray", h, w
            raise DataError(f"{file} has {n_pix} = {h}x{w} pixel columns, one channel, but layout is "
                            f"{layout!r}; use layout='gray' or 'auto'")
        if n_pix == 3 * h * w and c in (None, 3):
            if layout == "auto":
                raise DataError(f"{file} has {n_pix} = 3x{h}x{w} pixel columns and their channel order "
                                f"cannot be guessed; {opt}")
            if layout == "gray":
                raise DataError(f"{file} has {n_pix} = 3x{h}x{w} pixel columns (RGB), not {h}x{w} gray; {opt}")
            return layout, h, w
        needs = {None: f"{h * w} (gray) or {3 * h * w} (RGB)", 1: f"{h * w}", 3: f"{3 * h * w}"}[c]
        raise DataError(f"{file} has {n_pix} pixel columns but {given} needs {needs}; fix {given}")
    side = _isqrt_exact(n_pix)
    side3 = _isqrt_exact(n_pix // 3) if n_pix % 3 == 0 else None
    if layout in ("auto", "gray") and side:
        return "gray", side, side
    if layout == "auto" and side3:
        raise DataError(f"{file} has {n_pix} = 3x{side3}x{side3} pixel columns and their channel order "
                        f"cannot be guessed; {opt}; if the images are not {side3}x{side3} RGB, give their "
                        f"shape with --csv-shape HxW")
    if layout in ("planar", "interleaved") and side3:
        return layout, side3, side3
    want = "HxW" if layout in ("auto", "gray") else "3xHxW"
    raise DataError(f"{file} has {n_pix} pixel columns, which is not {want} for a square image "
                    f"(layout {layout!r}); give the image shape with {_SHAPE_HELP}")


# A row index is not a pixel: pandas' df.to_csv() writes one first, headed "" (or "Unnamed: 0"
# once the file has been read and written again), and Kaggle files carry an id column. Counted
# as pixels they break the pixel count (785 columns, not 784) or shift every image by one.
_INDEX_NAMES = ("", "unnamed: 0")


def _index_columns(header: list[str], label_idx: int) -> list[int]:
    return [i for i, h in enumerate(header)
            if i != label_idx and ((i == 0 and h.lower() in _INDEX_NAMES) or h.lower() == "id")]


def _label_index(header: list[str], label_column, file: Path) -> int:
    n = len(header)
    if isinstance(label_column, (int, np.integer)) and not isinstance(label_column, bool):
        i = int(label_column)
        if -n <= i < n:
            return i % n
        raise DataError(f"label column index {i} is out of range: {file} has {n} columns")
    name = str(label_column).strip()
    if name in header:
        return header.index(name)
    ci = [i for i, h in enumerate(header) if h.lower() == name.lower()]
    if len(ci) == 1:
        return ci[0]
    if _INT_RE.match(name) and -n <= int(name) < n:
        return int(name) % n
    shown = ", ".join(repr(h) for h in header[:6]) + (f", ... ({n} columns)" if n > 6 else "")
    raise DataError(f"{file} has no label column {name!r} (columns found: {shown}); "
                    "pass the label column's name or index (CLI: --label-column NAME)")


def _column_desc(header: list[str], i: int) -> str:
    return f"column {i + 1} ({header[i]!r})" if header[i] else f"column {i + 1}"


def sniff_delimiter(line: str) -> str:
    """',' unless ';' (Excel's CSVs where the decimal mark is a comma) or a tab (.tsv) splits the
    header line into more columns."""
    return max((",", ";", "\t"), key=lambda d: len(next(csv.reader([line], delimiter=d), [])))


def _label_of(line: str, idx: int, ncols: int, sep: str) -> str:
    if idx == 0:
        return line.split(sep, 1)[0]
    if idx == ncols - 1:
        return line.rsplit(sep, 1)[-1]
    return line.split(sep, idx + 1)[idx]


class _PixelReader:
    """Chunked conversion of CSV rows to uint8 pixels with precise, line-numbered errors."""

    def __init__(self, file: Path, header: list[str], label_idx: int | None, skip: tuple[int, ...] = (),
                 sep: str = ","):
        self.file = file
        self.sep = sep
        self.header = header
        self.ncols = len(header)
        self.label_idx = label_idx
        self.pix_cols = [i for i in range(self.ncols) if i != label_idx and i not in skip]
        self.float_mode = False
        self.int_max = 0  # largest value seen while in integer mode
        self.chunks: list[np.ndarray] = []
        self.labels: list[str] = []
        self.first_float_line: int | None = None

    def _err_at(self, lines: list[str], linenos: list[int], r: int, j: int, what: str) -> DataError:
        col = self.pix_cols[j]
        cells = next(csv.reader([lines[r]], delimiter=self.sep))
        return DataError(f"{self.file} line {linenos[r]}, {_column_desc(self.header, col)}: "
                         f"{cells[col].strip()!r} {what}")

    def _parse_slow(self, lines: list[str], linenos: list[int]) -> np.ndarray:
        """Cell-by-cell parse, only reached when the fast parser failed: finds the bad cell."""
        out = np.empty((len(lines), len(self.pix_cols)), dtype=np.float64)
        for r, cells in enumerate(csv.reader(lines, delimiter=self.sep)):
            for j, c in enumerate(self.pix_cols):
                try:
                    out[r, j] = float(cells[c])
                except ValueError:
                    raise DataError(
                        f"{self.file} line {linenos[r]}, {_column_desc(self.header, c)}: {cells[c].strip()!r} "
                        "is not a number; pixel values must be integers 0..255 or floats 0..1"
                    ) from None
        return out

    def add(self, lines: list[str], linenos: list[int]) -> None:
        ncols, idx = self.ncols, self.label_idx
        # column count and labels (csv module only for the rare quoted lines)
        for r, line in enumerate(lines):
            if '"' in line:
                cells = next(csv.reader([line], delimiter=self.sep))
                n, label = len(cells), (cells[idx] if len(cells) == ncols and idx is not None else "")
            else:
                n = line.count(self.sep) + 1
                label = _label_of(line, idx, ncols, self.sep) if n == ncols and idx is not None else ""
            if n != ncols:
                raise DataError(f"{self.file} line {linenos[r]} has {n} columns but the header has {ncols}; "
                                "every row needs " + ("one label and " if idx is not None else "")
                                + "the same number of pixels")
            if idx is None:  # pixels to predict: no label column
                continue
            label = label.strip()
            if not label:
                raise DataError(f"{self.file} line {linenos[r]} has an empty label "
                                f"({_column_desc(self.header, idx)}); give every row a label")
            self.labels.append(label)
        kw = dict(delimiter=self.sep, quotechar='"', comments=None, usecols=self.pix_cols, ndmin=2)
        try:
            vals = np.loadtxt(lines, dtype=np.int16, **kw)
            integral = True
        except ValueError:
            try:
                vals = np.loadtxt(lines, dtype=np.float64, **kw)
            except ValueError:
                vals = self._parse_slow(lines, linenos)
            integral = False
        if not integral:
            finite = np.isfinite(vals)
            if not finite.all():
                r, j = np.argwhere(~finite)[0]
                raise self._err_at(lines, linenos, r, j, "is not a pixel value; use integers 0..255 or floats 0..1")
            integral = bool(np.all(vals == np.rint(vals)))
        if not integral and not self.float_mode:
            # floats 0..1: every earlier (integral) value must have been 0 or 1
            if self.int_max > 1:
                r, j = np.argwhere(vals != np.rint(vals))[0]
                raise self._err_at(
                    lines, linenos, r, j,
                    "is a fraction but earlier rows hold integer pixels above 1; use integers 0..255 "
                    "or floats 0..1 throughout",
                )
            self.float_mode = True
            self.first_float_line = linenos[int(np.argwhere(vals != np.rint(vals))[0][0])]
            self.chunks = [c * np.uint8(255) for c in self.chunks]
        if self.float_mode:
            bad = ~((vals >= 0) & (vals <= 1))
            if bad.any():
                r, j = np.argwhere(bad)[0]
                raise self._err_at(lines, linenos, r, j,
                                   f"is outside 0..1, but line {self.first_float_line} holds a fraction so "
                                   "pixels are read as floats 0..1; use integers 0..255 or floats 0..1 throughout")
            self.chunks.append(np.rint(vals * 255.0).astype(np.uint8))
        else:
            bad = (vals < 0) | (vals > 255)
            if bad.any():
                r, j = np.argwhere(bad)[0]
                raise self._err_at(lines, linenos, r, j, "is outside 0..255; pixel values must be 0..255")
            if vals.size:
                self.int_max = max(self.int_max, int(vals.max()))
            self.chunks.append(vals.astype(np.uint8))


def numbered_classes(classes: list[str] | None) -> dict[int, int] | None:
    """{number: class index} for class names that are all plain whole numbers ("0", "7", "42")
    but not 0..K-1 in order, else None. A class-folder tree named by number (GTSRB's Train/0 ..
    Train/42, star ratings 1..5) has its classes sorted as text, 0, 1, 10, 11, ..., 19, 2, 20:
    there an integer label 2 in a val/test CSV or .npz is the class named "2", as evaluate reads
    the same file, not the third class ("10"), which silently mislabelled most of the rows."""
    if not classes or not all(re.fullmatch(r"0|[1-9]\d*", str(c)) for c in classes):
        return None
    numbers = [int(c) for c in classes]
    return None if numbers == list(range(len(numbers))) else {n: i for i, n in enumerate(numbers)}


def _labels_to_ints(labels: list[str], classes: list[str] | None, file: Path) -> tuple[np.ndarray, list[str]]:
    if all(_INT_RE.match(s) for s in labels):
        lab = np.array([int(s) for s in labels], dtype=np.int64)
        if lab.min() < 0:
            raise DataError(f"{file} has negative label {int(lab.min())}; integer labels must be class "
                            "indices 0..K-1 (or use class names)")
        numbered = numbered_classes(classes)
        if classes is None:
            classes = [str(i) for i in range(int(lab.max()) + 1)]
        elif numbered is not None and set(lab.tolist()) <= numbered.keys():
            lab = np.array([numbered[v] for v in lab.tolist()], dtype=np.int64)  # the numbers name the classes
        elif lab.max() >= len(classes):
            raise DataError(f"{file} has label {int(lab.max())} but there are only {len(classes)} classes "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); "
                            "labels must be indices 0..K-1")
        return lab, list(classes)
    if classes is None:
        classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({s for s in labels if s not in index})
    if unknown:
        raise DataError(f"{file} has labels not among the {len(classes)} known classes: "
                        f"{', '.join(map(repr, unknown[:5]))}{', ...' if len(unknown) > 5 else ''} "
                        f"(classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); "
                        "use the same class names as the training data")
    return np.array([index[s] for s in labels], dtype=np.int64), list(classes)


def read_pixel_csv(
    path,
    *,
    label_column: str | int = "label",
    layout: str = "auto",
    image_shape: tuple[int, ...] | str | None = None,
    classes: list[str] | None = None,
) -> ArrayDataset:
    """Read a CSV of pixels: a header row, one label column, the rest pixel values. A file with no
    header row (its first line is numbers) is read when ``label_column`` is a position (0, -1).

    * ``label_column``: the label column's header name (exact, else case-insensitive) or index
      (negative counts from the end). Labels are integer class indices (class names become
      ``"0".."K-1"``) or class-name strings (classes are the sorted unique names). When
      ``classes`` is given, integer labels index into it and names must belong to it.
    * Pixel values are integers 0..255, or floats in 0..1: if any pixel is not a whole number the
      file is taken as floats 0..1, every value must lie in 0..1, and values are scaled by 255 and
      rounded. (Whole numbers written as ``12.0`` count as integers; a file holding only 0.0 and
      1.0 is read as integers 0 and 1.)
    * ``layout``: ``"planar"`` (all R, then all G, then all B, as in CIFAR rows), ``"interleaved"``
      (RGBRGB..., what ``img.reshape(-1)`` of an HxWx3 array writes), ``"gray"`` (one channel,
      replicated to RGB), or ``"auto"``: gray when the pixel count is a perfect square; for 3xHxW
      columns ``auto`` refuses to guess and raises :class:`DataError` asking for planar or
      interleaved, since reading one as the other silently scrambles every image.
    * ``image_shape``: ``(H, W)`` or ``"HxW"`` (CLI: ``--csv-shape 48x64``) replaces the
      square-image assumption; ``(H, W, C)`` / ``"HxWxC"`` also fixes the channel count (1 or 3).
    * A leading unnamed column (pandas' index: header ``""`` or ``"Unnamed: 0"``) and an ``id``
      column hold row ids, not pixels, and are not read.

    Returns an :class:`ArrayDataset` with ``test=None``. Rows are parsed in chunks with
    ``numpy.loadtxt`` (a 10,000 x 3,072 CSV reads in about a second per core).
    """
    file = Path(path).expanduser()
    images, labels = _read_pixels(file, label_column, layout, image_shape)
    labels, names = _labels_to_ints(labels, classes, file)
    return ArrayDataset(classes=names, train=ArraySplit(images=images, labels=labels), test=None)


def _column_position(label_column) -> int | None:
    """--label-column as a column index (0, -1, "3"), else None (a name)."""
    if isinstance(label_column, (int, np.integer)) and not isinstance(label_column, bool):
        return int(label_column)
    text = str(label_column).strip() if label_column is not None else ""
    return int(text) if _INT_RE.match(text) else None


def read_pixel_images(path, *, label_column: str | int = "label", layout: str = "auto",
                      image_shape: tuple[int, ...] | str | None = None) -> np.ndarray:
    """The images of a pixel CSV (N x H x W x 3 uint8), read as :func:`read_pixel_csv` reads them,
    to predict: a Kaggle test file has no label column, so ``label_column`` is left out of the
    pixels where the header has it and every other column is a pixel where it has not."""
    file = Path(path).expanduser()
    return _read_pixels(file, label_column, layout, image_shape, label_optional=True)[0]


def _read_pixels(file: Path, label_column, layout: str, image_shape, label_optional: bool = False):
    """-> (N x H x W x 3 uint8 images, the label cells as written, or None without a label column)."""
    if layout not in _LAYOUTS:
        raise DataError(f"unknown CSV layout {layout!r}; choose one of {', '.join(_LAYOUTS)}")
    try:
        f = open(file, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror or e}") from None
    with f:
        try:
            first = f.readline()
            while first and not first.strip():
                first = f.readline()
            if not first:
                raise DataError(f"{file} is empty; expected a header row and one row per image")
            sep = sniff_delimiter(first.rstrip("\r\n"))  # ',' or, from Excel or a .tsv, ';' or a tab
            header = [h.strip() for h in next(csv.reader([first.rstrip("\r\n")], delimiter=sep))]
            # a header of column numbers (pandas' to_csv of an unnamed frame: 0,1,...,n-1) is a header
            counting = all(_INT_RE.match(h) for h in header) and [int(h) for h in header] in (
                list(range(len(header))), list(range(1, len(header) + 1)))
            headerless = all(is_number(h) for h in header) and not counting
            if headerless:
                # pjreddie's mnist_train.csv and many exports have no header row: the labels' column
                # is then said by position, and the first line is a row like the others
                label_column = _column_position(label_column)
                if label_column is None and not label_optional:
                    raise DataError(f"{file} has no header row (its first line is numbers): say which column holds "
                                    "the labels, --label-column 0 for the first or -1 for the last (or add a header "
                                    "row, e.g. label,pixel0,pixel1,...)")
                header = [f"#{i + 1}" for i in range(len(header))]
            try:
                label_idx = None if label_column is None else _label_index(header, label_column, file)
            except DataError:
                if not label_optional:
                    raise
                label_idx = None
            # a header of column numbers names no column: '0' there is a position, as in a file
            # without a header (pandas' to_csv of the test pixels alone heads them 0..783 too)
            named = not headerless and not counting and label_idx is not None and \
                header[label_idx].lower() == str(label_column).strip().lower()
            if label_optional and label_idx is not None and not named:
                # to predict: a file of pixels only (a test set, with a header row or not) where the
                # run said its label column by position (--label-column 0): that column is a label
                # only if the other columns make an image
                drop = 1 + (0 if headerless else len(_index_columns(header, label_idx)))
                try:
                    _resolve_layout(len(header) - drop, layout, image_shape, file)
                except DataError:
                    label_idx = None
            index_cols = [] if headerless else _index_columns(header, label_idx)
            if index_cols:
                log.info(f"{file}: {' and '.join(_column_desc(header, i) for i in index_cols)} "
                         f"{'holds' if len(index_cols) == 1 else 'hold'} row ids, not pixels: not read")
            n_pix = len(header) - (label_idx is not None) - len(index_cols)
            if n_pix < 1:
                ids = f" (its {_column_desc(header, index_cols[0])} names no image file in its folder or two " \
                    "levels below: if it lists images by id, pass their folder with --images FOLDER)" if index_cols else ""
                what = "only a label column" if label_idx is not None else "only row ids"
                raise DataError(f"{file} has {what} and no pixel columns{ids}")
            kind, h, w = _resolve_layout(n_pix, layout, image_shape, file)
            reader = _PixelReader(file, header, label_idx, tuple(index_cols), sep)
            rows_per_chunk = max(1, _CSV_CHUNK_VALUES // len(header))
            lines: list[str] = []
            linenos: list[int] = []
            for lineno, line in enumerate(itertools.chain([first] if headerless else [], f),
                                          start=1 if headerless else 2):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                lines.append(line)
                linenos.append(lineno)
                if len(lines) >= rows_per_chunk:
                    reader.add(lines, linenos)
                    lines, linenos = [], []
            if lines:
                reader.add(lines, linenos)
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not a UTF-8 text CSV ({e.reason}); save it as UTF-8 CSV") from None
    if not reader.chunks:
        raise DataError(f"{file} has a header but no data rows")
    pix = reader.chunks[0] if len(reader.chunks) == 1 else np.concatenate(reader.chunks)
    reader.chunks = []
    n = pix.shape[0]
    if kind == "planar":
        images = pix.reshape(n, 3, h, w).transpose(0, 2, 3, 1)
    elif kind == "interleaved":
        images = pix.reshape(n, h, w, 3)
    else:
        images = np.repeat(pix.reshape(n, h, w, 1), 3, axis=3)
    return np.ascontiguousarray(images), (reader.labels if label_idx is not None else None)


def is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True

