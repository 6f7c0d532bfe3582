"""Image arrays as training data: ``--data mnist.npz`` and ``imgclf.train(data=(x_train, y_train))``.

A notebook already holds its data as arrays (``keras.datasets.cifar10.load_data()``, a torchvision
dataset's ``.data``/``.targets``, a Kaggle ``.npz``). They are read in the layouts those make and
converted once, for the whole array, as files are: N x H x W x C (Keras) or N x C x H x W (torch),
N x H x W grey; uint8, uint16 (by the bit depth it uses), float in 0..1, 0..255 or -1..1 (a
mean/std-normalised array is refused: its statistics are unknown here). Labels are class indices
(0..K-1), N x 1 columns (Keras), one-hot rows (``to_categorical``), multi-hot rows (several
labels per image: a multi-label task), class names, or a list of class names per image
(``[["cat"], ["dog", "pet"]]``: multi-hot rows, the classes sorted unless named).

The API writes arrays it is given to ``<cache>/arrays/arrays-<hash>.npz``, so the run's
config.yaml names a file and ``--resume``, ``evaluate`` and a repeated run read the same data.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from imgclf.data.arrays import DataError, numbered_classes

# the keys read from an .npz, per split; the first present wins (Keras' names first)
SPLIT_KEYS = {
    "train": (("x_train", "y_train"), ("x", "y"), ("images", "labels"), ("train_images", "train_labels")),
    "val": (("x_val", "y_val"), ("x_valid", "y_valid"), ("val_images", "val_labels")),
    "test": (("x_test", "y_test"), ("test_images", "test_labels")),
}
CLASS_KEYS = ("classes", "class_names")
_CHANNELS = (1, 3, 4)


def images_nhwc(x, what: str) -> np.ndarray:
    """An array of images -> N x H x W x 3 uint8 RGB (see the module's docstring)."""
    from imgclf.data.images import BadImage, pixels_to_uint8

    a = _layout(_numpy(x), what)
    try:
        a = pixels_to_uint8(a, what)
    except BadImage as e:  # the rule's message, named for the whole array
        raise DataError(f"{what}: {e.reason}") from None
    if a.shape[3] == 1:
        a = np.repeat(a, 3, axis=3)
    elif a.shape[3] == 4:  # RGBA: on white, as RGBA files are
        alpha = a[..., 3:].astype(np.uint16)
        a = ((a[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _layout(a: np.ndarray, what: str) -> np.ndarray:
    """``a`` as N x H x W x C (a view), or a DataError on a shape no layout reads."""
    if a.ndim == 3:  # N x H x W: grey (MNIST)
        a = a[..., None]
    if a.ndim != 4:
        raise DataError(f"{what}: images must be N x H x W x C, N x C x H x W or N x H x W; got shape {a.shape}")
    if a.shape[3] not in _CHANNELS and a.shape[1] in _CHANNELS:
        a = a.transpose(0, 2, 3, 1)  # channels first (torch): no other reading is possible
    if a.shape[3] not in _CHANNELS:
        raise DataError(f"{what}: images of shape {a.shape} have no channel axis of 1, 3 or 4 (grey, RGB, RGBA)")
    if 0 in a.shape:
        raise DataError(f"{what}: no images (shape {a.shape})")
    return a


def _check_pixels(a: np.ndarray, what: str) -> None:
    """The refusals of pixels_to_uint8 (NaN, mean/std-normalised floats, integers past 255)
    without converting the array: the rule reads only its range, so it runs on [min, max]."""
    from imgclf.data.images import BadImage, pixels_to_uint8

    if a.dtype == np.uint8:
        return
    probe = np.array([a.min(), a.max()], dtype=a.dtype) if a.dtype.kind in "fiu" else a[:0]
    try:
        pixels_to_uint8(probe, what)
    except BadImage as e:
        raise DataError(f"{what}: {e.reason}") from None


def _numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def label_values(y, n: int, what: str) -> np.ndarray:
    """Labels as given, checked: a vector of N class indices or names, or N x K one-/multi-hot rows."""
    a = _numpy(y)
    if a.ndim == 2 and a.shape[1] == 1:  # Keras' cifar10 labels: N x 1
        a = a[:, 0]
    if a.ndim not in (1, 2) or len(a) != n:
        raise DataError(f"{what}: {len(a) if a.ndim else 0} labels (shape {a.shape}) for {n} images; "
                        "pass one label per image, or N x K one-hot / multi-hot rows")
    if a.dtype == object:
        a = a.astype(str)
    if a.ndim == 2:
        if a.dtype.kind not in "biuf" or not np.isin(a, (0, 1)).all():
            raise DataError(f"{what}: N x K labels must be 0/1 (one-hot or multi-hot) rows")
        return a.astype(np.float32)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise DataError(f"{what}: float labels that are not whole numbers: pass class indices 0..K-1")
        a = a.astype(np.int64)
    if a.dtype.kind in "iub":
        a = a.astype(np.int64)
        if len(a) and a.min() < 0:
            raise DataError(f"{what}: negative label {int(a.min())}; labels are class indices 0..K-1 (or names)")
    elif a.dtype.kind != "U":
        raise DataError(f"{what}: unsupported label type {a.dtype}")
    return a


def build_source(splits: dict[str, tuple], classes: list[str] | None, origin: str, name: str,
                 by_number: bool = False):
    """A DataSource from ``{split: (images, labels)}``; ``classes`` names the classes (indices
    label them in this order), or comes from the labels: 0..max for indices, sorted names.
    ``by_number``: integer labels that are all numbers the classes are named by label those
    classes (arrays.numbered_classes), as for val/test data read in the training's classes."""
    from imgclf.data.sources import DataSource, Split

    labels = {k: label_values(y, len(_numpy(x)), f"{origin}: {k} labels") for k, (x, y) in splits.items()}
    out, classes, multi = _class_labels(labels, classes, origin, {k: f"{origin}: {k} labels" for k in labels},
                                        by_number)
    made = {s: Split(labels=out[s], images=images_nhwc(x, f"{origin}: {s} images")) for s, (x, _) in splits.items()}
    return DataSource(name=name, origin=origin, classes=[str(c) for c in classes], train=made["train"],
                      val=made.get("val"), test=made.get("test"), task="multilabel" if multi else "single")


def _class_labels(labels: dict[str, np.ndarray], classes: list[str] | None, origin: str,
                  what: dict[str, str], by_number: bool = False) -> tuple[dict[str, np.ndarray], list, bool]:
    """Checked labels per split (label_values) -> (class indices or multi-hot rows per split,
    the class names, whether multi-label). ``what``: each split's name in messages."""
    hot = {k: v for k, v in labels.items() if v.ndim == 2}
    if hot and len(hot) != len(labels):
        flat = [v for v in labels.values() if v.ndim == 1]
        widths = {v.shape[1] for v in hot.values()}
        if len(widths) == 1 and all((v.sum(1) == 1).all() for v in hot.values()) \
                and all(v.dtype.kind == "i" for v in flat):
            # one-hot rows in one split, indices in another (Keras' to_categorical on y_train
            # only): the same single-label data, read as indices throughout
            k = widths.pop()
            top = max((int(v.max()) for v in flat if len(v)), default=-1)
            if top >= k:
                raise DataError(f"{origin}: label {top} but the one-hot rows have {k} columns; labels are indices "
                                f"0..{k - 1}")
            labels = {s: v.argmax(1).astype(np.int64) if v.ndim == 2 else v for s, v in labels.items()}
            hot = {}
            if classes is None:
                classes = [str(i) for i in range(k)]
        else:
            raise DataError(f"{origin}: some splits have N x K label rows and others one label per image")
    if hot:
        widths = {v.shape[1] for v in hot.values()}
        if len(widths) > 1 or (classes is not None and len(classes) not in widths):
            raise DataError(f"{origin}: label rows of {sorted(widths)} columns for {len(classes or [])} classes")
        k = widths.pop()
        classes = list(classes) if classes is not None else [str(i) for i in range(k)]
        multi = any((v.sum(1) != 1).any() for v in hot.values())
        out = {s: v if multi else v.argmax(1).astype(np.int64) for s, v in hot.items()}
    elif any(v.dtype.kind == "U" for v in labels.values()):
        if not all(v.dtype.kind == "U" for v in labels.values()):
            raise DataError(f"{origin}: some splits are labelled by name and others by index")
        names = sorted(set().union(*(set(v.tolist()) for v in labels.values())))
        classes = list(classes) if classes is not None else names
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in names if c not in index]
        if unknown:
            raise DataError(f"{origin}: labels not among the classes given: {', '.join(unknown[:5])}")
        out = {s: np.array([index[c] for c in v.tolist()], np.int64) for s, v in labels.items()}
        multi = False
    else:
        top = max(int(v.max()) if len(v) else -1 for v in labels.values())
        if classes is None:
            # unnamed indices: val/test ones past the training ones made classes of no training
            # image (val labels 1..K beside train 0..K-1 gave the model an extra, empty class)
            seen = int(labels["train"].max()) if "train" in labels and len(labels["train"]) else top
            past = next(((k, int(v.max())) for k, v in labels.items() if len(v) and v.max() > seen), None)
            if past is not None:
                raise DataError(f"{what[past[0]]}: label {past[1]} but the training labels are 0..{seen} (off by "
                                f"one?): labels are indices of the training classes; pass 0..{seen}, or class names")
            classes = [str(i) for i in range(top + 1)]
        elif by_number and (numbered := numbered_classes(classes)) is not None and all(
                set(v.tolist()) <= numbered.keys() for v in labels.values()):
            labels = {k: np.array([numbered[i] for i in v.tolist()], np.int64) for k, v in labels.items()}
        elif top >= len(classes):
            raise DataError(f"{origin}: label {top} but {len(classes)} classes; labels are indices 0..K-1")
        out, multi = labels, False
    if len(classes) < 2:
        raise DataError(f"{origin}: one class only ({', '.join(map(str, classes))}): a classifier needs two or more")
    return out, classes, multi


def read_npz(path: Path, classes: list[str] | None = None):
    """``--data file.npz``: x_train/y_train (or x/y, images/labels), optional x_val/y_val and
    x_test/y_test, optional class names under 'classes'."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            # X_train/y_train, X/y: scikit-learn's capital X for a matrix is as common as Keras' x
            lower = {k.lower(): k for k in sorted(keys, reverse=True)}  # x over X when both are there
            splits = {}
            for split, options in SPLIT_KEYS.items():
                pair = next(((lower[xk], lower[yk]) for xk, yk in options if xk in lower and yk in lower), None)
                if pair is not None:
                    splits[split] = (_mapped_member(path, z, pair[0]), z[pair[1]])
            stored = next((z[lower[k]] for k in CLASS_KEYS if k in lower), None)
    except ValueError as e:  # object arrays need pickle, which is never loaded from a data file
        raise DataError(f"--data {path}: {str(e).splitlines()[0]} (arrays of Python objects are not read: "
                        "save labels and class names as numbers or strings)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a download cut short
        raise DataError(f"--data {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "train" not in splits and len(splits) == 1:
        # x_test/y_test alone: a test set saved apart, given to evaluate --data or --test-data
        # (both read the data's first split), was refused for having no training arrays
        splits = {"train": next(iter(splits.values()))}
    if "train" not in splits:
        found = ", ".join(sorted(keys)) or "nothing"
        raise DataError(f"--data {path}: no training arrays; expected x_train and y_train (or x and y), found {found}")
    # arrays the API saved (arrays-<hash>.npz in the cache): runs are named arrays-<model>-N
    saved = path.parent.name == "arrays" and path.stem.startswith("arrays-")
    # the training's classes, for val/test data in a file: numbers may name them. Not for arrays
    # the API saved (test_data=(x, y)): those labels are indices, as imgclf.evaluate(run, (x, y))
    # reads them, and image_dataset_from_directory gives indices in the folders' text order
    by_number = classes is not None and not saved
    if classes is None and stored is not None:
        classes = [str(c) for c in np.asarray(stored).tolist()]
    return build_source(splits, classes, str(path), "arrays" if saved else path.stem, by_number=by_number)


def read_images(path: Path) -> np.ndarray:
    """The images of an .npy, or of an .npz (its test images, else its val, else its training
    images, else its only array), as N x H x W x 3 uint8: what ``predict x_test.npy`` classifies."""
    try:
        if path.suffix.lower() == ".npy":
            return images_nhwc(np.load(path, mmap_mode="r", allow_pickle=False), str(path))
        with np.load(path, allow_pickle=False) as z:
            lower = {k.lower(): k for k in sorted(z.files, reverse=True)}
            keys = [xk for split in ("test", "val", "train") for xk, _ in SPLIT_KEYS[split]]
            key = next((lower[k] for k in keys if k in lower), z.files[0] if len(z.files) == 1 else None)
            if key is None:
                raise DataError(f"{path}: which array holds the images? expected x_test (or x_train, x), found "
                                f"{', '.join(sorted(z.files)) or 'nothing'}")
            return images_nhwc(_mapped_member(path, z, key), f"{path}: {key}")
    except ValueError as e:  # object arrays need pickle, which is never loaded from a data file
        raise DataError(f"{path}: {str(e).splitlines()[0]} (arrays of Python objects are not read)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a download cut short
        raise DataError(f"{path}: not a readable {path.suffix} ({type(e).__name__}: {e})") from None


def _mapped_member(path: Path, z, key: str) -> np.ndarray:
    """``z[key]`` of an open .npz, memory-mapped from the file where the member is stored as it is
    (np.savez, and the arrays the API saves; not np.savez_compressed): uint8 images at their
    size then go from the file to the loader without a copy in RAM, so a data set as large as the
    memory trains as files do. Elsewhere the array is read whole, as np.load reads it.

    Written here because numpy has no such reader: np.load ignores mmap_mode for an .npz. The
    member's data starts after its zip local header (30 bytes, then its name and extra field)
    and the .npy header that np.lib.format reads."""
    import struct
    import zipfile

    try:
        info = z.zip.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # deflated, or encrypted
            return z[key]
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)  # the local file header: its name and extra field come before the data
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                return z[key]
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                return z[key]
            shape, fortran, dtype = read[version](f)
            offset = f.tell()
    except (KeyError, OSError, ValueError):
        return z[key]  # np.load's own reading, and its own error if the member is bad
    if dtype.hasobject or not shape or 0 in shape:
        return z[key]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def save_arrays(data, root: Path, *, val=None, test=None, classes: list[str] | None = None,
                check: str | None = None) -> Path:
    """What ``imgclf.train(data=...)`` was given as arrays, saved once as an .npz under
    ``root/arrays`` (named by its content: the same arrays again reuse the file). ``classes``:
    the names of index labels when the data gives none (evaluate: the model's classes).
    ``check``: the option ``data`` came as ('data', 'val_data'): the labels and images are checked
    as training reads them before anything is written, and refusals name the options (a refusal
    from the saved file named a cache file the user never made, and left it behind, 150 MB for
    CIFAR-10 each time)."""
    splits, own = _splits_of(data)
    classes = own if own is not None else classes
    what = check or "data"
    # each split's name in messages: the option it came from
    names = {k: what if k == "train" or not check else f"{what} ({k} arrays)" for k in splits}
    for name, extra in (("val", val), ("test", test)):
        if extra is not None:
            s, _ = _splits_of(extra)
            splits[name] = s["train"]
            names[name] = f"{name}_data" if check else what
    splits = {k: (_images_array(x, names[k]), y) for k, (x, y) in splits.items()}
    splits, classes = _multi_hot(splits, classes, what)
    arrays: dict[str, np.ndarray] = {}
    for split, (x, y) in splits.items():
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, _labels_array(y, names[split])
    if check:
        labels = {k: label_values(arrays[f"y_{k}"], len(arrays[f"x_{k}"]), names[k]) for k in splits}
        _class_labels(labels, classes, what, names)
        for k in splits:
            _check_pixels(_layout(arrays[f"x_{k}"], names[k]), names[k])
    for split in splits:
        if arrays[f"y_{split}"].dtype == object:
            arrays[f"y_{split}"] = arrays[f"y_{split}"].astype(str)
    if classes is not None:
        arrays["classes"] = np.asarray([str(c) for c in classes])
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data if a.dtype.kind != "U" else a.tobytes())
    folder = root / "arrays"
    dest = folder / f"arrays-{h.hexdigest()}.npz"
    if dest.exists():
        os.utime(dest)  # last used now (imgclf cache --older-than)
        return dest
    from imgclf.data.archives import locked_temp

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with locked_temp(folder, dest.stem, ".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, dest)
    except OSError as e:
        from imgclf.data.archives import CACHE_ELSEWHERE

        raise DataError(f"cannot save the arrays into {folder}: {e.strerror or e}; {CACHE_ELSEWHERE}") from None
    return dest


def _images_array(x, what: str) -> np.ndarray:
    """The images of (images, labels) as one array; file paths, and images of several sizes,
    refused in one line before anything is saved (numpy's own error was 'inhomogeneous shape')."""
    first = x[0] if isinstance(x, list | tuple) and len(x) else None
    if isinstance(first, str | os.PathLike) or isinstance(x, str | os.PathLike):
        raise DataError(f"{what}: the images are file paths, not arrays: pass their folder (data='photos/', one "
                        "subfolder per class) or a label CSV of path,label rows (data='labels.csv')")
    try:
        a = _numpy(x)
    except ValueError:
        a = None
    if a is not None and a.dtype.kind in "US":
        raise DataError(f"{what}: the images are file paths, not arrays: pass their folder (data='photos/', one "
                        "subfolder per class) or a label CSV of path,label rows (data='labels.csv')")
    if a is None or a.dtype == object:
        try:
            sizes = list(dict.fromkeys("x".join(map(str, np.shape(i))) for i in x))
        except (TypeError, ValueError):
            sizes = []
        raise DataError(f"{what}: the images are not all one size ({', '.join(sizes[:3]) or 'not one array'}"
                        f"{', ...' if len(sizes) > 3 else ''}): arrays must share one size; resize them to one, "
                        "or pass the files as a folder or a label CSV")
    return a


def _labels_array(y, what: str) -> np.ndarray:
    try:
        a = _numpy(y)
    except ValueError:  # ragged: lists of several lengths (not of class names: _multi_hot took those)
        a = None
    if a is None or (a.dtype == object and any(isinstance(v, list | tuple | set | np.ndarray) for v in a.ravel())):
        raise DataError(f"{what}: labels of several lengths: pass one label per image, N x K 0/1 rows, or a list "
                        "of class names per image for several labels per image ([['cat'], ['dog', 'pet'], ...])")
    return a


def _tag_lists(y) -> list | None:
    """Labels given as a list of class names per image (multi-label: [['cat'], ['dog', 'pet']]),
    as a list; None for any other form."""
    if isinstance(y, np.ndarray) and y.dtype != object:
        return None
    if not (isinstance(y, list | tuple | np.ndarray) or type(y).__module__.startswith("pandas")):
        return None
    seq = list(y)
    if not seq or not all(isinstance(e, list | tuple | set | frozenset) for e in seq):
        return None
    tags = [t for e in seq for t in e]
    # names only: lists of numbers are one-hot / multi-hot rows ([[0, 1, 0], ...])
    return seq if tags and all(isinstance(t, str) for t in tags) else None


def _multi_hot(splits: dict[str, tuple], classes, what: str) -> tuple[dict[str, tuple], list | None]:
    """Lists of class names per image -> multi-hot rows, one column per class: ``classes`` in
    their order, else the names sorted (as named labels are). Other labels pass unchanged."""
    tags = {k: _tag_lists(y) for k, (_, y) in splits.items()}
    if all(t is None for t in tags.values()):
        return splits, classes
    if any(t is None for t in tags.values()):
        raise DataError(f"{what}: some splits have a list of class names per image and others one label per image")
    names = sorted({t for seq in tags.values() for e in seq for t in e})
    classes = [str(c) for c in classes] if classes is not None else names
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in names if c not in index]
    if unknown:
        raise DataError(f"{what}: labels not among the classes given: {', '.join(unknown[:5])}")
    out = {}
    for k, (x, _) in splits.items():
        hot = np.zeros((len(tags[k]), len(classes)), np.uint8)
        for i, e in enumerate(tags[k]):
            hot[i, [index[t] for t in e]] = 1
        out[k] = (x, hot)
    return out, classes


def is_arrays(value) -> bool:
    """Whether a data option holds arrays rather than a path: (x, y), (x, y, classes),
    Keras' ((x_train, y_train), (x_test, y_test)), or a dict of .npz keys."""
    return isinstance(value, (tuple, list, dict)) and not isinstance(value, (str, os.PathLike))


def _ndim(v) -> int:
    """An array's dimensions, or nested lists' by their first items (no array is made)."""
    if hasattr(v, "shape"):
        return len(v.shape)
    return 1 + _ndim(v[0]) if isinstance(v, list | tuple) and v else 0


def _splits_of(data) -> tuple[dict[str, tuple], list | None]:
    if isinstance(data, dict):
        splits = {}
        for split, options in SPLIT_KEYS.items():
            pair = next(((xk, yk) for xk, yk in options if xk in data and yk in data), None)
            if pair is not None:
                splits[split] = (data[pair[0]], data[pair[1]])
        if "train" not in splits:
            raise DataError(f"data: a dict needs x_train and y_train (or x and y); got {', '.join(map(str, data))}")
        classes = next((data[k] for k in CLASS_KEYS if k in data), None)
        return splits, None if classes is None else list(classes)
    items = list(data)
    # Keras' pairs hold arrays of images first: (three images, labels [0, 1]) is not two pairs
    if len(items) == 2 and all(isinstance(p, (tuple, list)) and len(p) == 2 and _ndim(p[0]) >= 3 for p in items):
        return {"train": tuple(items[0]), "test": tuple(items[1])}, None  # keras.datasets.*.load_data()
    if len(items) in (2, 3) and not isinstance(items[0], (str, os.PathLike)):
        return {"train": (items[0], items[1])}, (list(items[2]) if len(items) == 3 else None)
    raise DataError("data: pass a path, (images, labels), (images, labels, class_names), "
                    "((x_train, y_train), (x_test, y_test)) or a dict of arrays")
