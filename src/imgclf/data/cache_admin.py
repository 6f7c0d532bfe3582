"""What the cache folder holds, and freeing it: ``imgclf cache``.

The cache (``~/.cache/imgclf``, ``IMGCLF_CACHE`` or ``--cache-dir``) holds three kinds of entry,
each rebuilt on demand when missing:

* ``decoded``: ``images/<key>.npy`` + ``.json``, one split decoded at one size and resize policy
  (the cache of :mod:`imgclf.data.cache`; a 50k-image set at 224 px is 7.5 GB);
* ``archive``: ``archives/<name>-<key>/``, a ``--data x.zip`` extracted once (or parquet files
  written out, ``<name>-parquet-<key>``);
* ``download``: ``datasets/cifar-10-batches-py`` and the archives it came from, and
  ``datasets/hf/<owner>--<name>/<config>/``, an ``hf:`` data set's parquet files;
* ``arrays``: ``arrays/arrays-<hash>.npz``, arrays given to ``imgclf.train(data=(x, y))`` (the
  runs trained on them read them again to resume or evaluate: kept, like downloads, unless asked).

Only names of these shapes are ever listed or removed: ``--cache-dir`` may point at a folder
that holds other files too. An entry's "last used" is its modification time, which the cache
and the archive reader refresh on every reuse.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from imgclf.data.archives import remove_stale

_DECODED = re.compile(r"^[0-9a-f]{32}\.npy$")
_ARCHIVE = re.compile(r"^.+-[0-9a-f]{16}$")
_ARRAYS = re.compile(r"^arrays-[0-9a-f]{16}\.npz$")
_DOWNLOADS = ("cifar-10-batches-py", "cifar-100-python", "cifar-10-python.tar.gz", "cifar-100-python.tar.gz")


@dataclass
class Entry:
    kind: str  # decoded | archive | download | arrays
    paths: list[Path]  # removed together
    nbytes: int
    used: float  # seconds since the epoch
    what: str

    def in_use(self) -> bool:
        """A decoded entry a live process (a training run, an evaluation) has open."""
        from imgclf.data.cache import in_use

        return self.kind == "decoded" and in_use(self.paths[0])

    def remove(self) -> None:
        for p in self.paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _size(path: Path) -> int:
    """Bytes on disk (allocated blocks where the system says so: a cache file is preallocated)."""
    def one(st) -> int:
        blocks = getattr(st, "st_blocks", None)
        return blocks * 512 if blocks is not None else st.st_size

    try:
        if not path.is_dir() or path.is_symlink():
            return one(path.lstat())
        total = 0
        for dirpath, _, files in os.walk(path):
            for f in files:
                try:
                    total += one(os.lstat(os.path.join(dirpath, f)))
                except OSError:
                    pass
        return total
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def decoded(folder: Path) -> list[Entry]:
    out = []
    for npy in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
        if not _DECODED.match(npy.name):
            continue
        meta_path = npy.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        if meta:
            source = meta.get("source") or "?"
            bad = len(meta.get("bad", []))
            what = (f"{meta.get('n', '?')} images at {meta.get('size', '?')} px {meta.get('policy', '')}"
                    f"{f' ({bad} unreadable)' if bad else ''}, from {source}")
        else:
            what = "decoded images (no description)"
        paths = [npy] + ([meta_path] if meta_path.exists() else [])
        out.append(Entry("decoded", paths, sum(_size(p) for p in paths), max(_mtime(p) for p in paths), what))
    return out


def entries(root: Path) -> list[Entry]:
    """Every entry under ``root``, the oldest-used first."""
    root = Path(root)
    out = decoded(root / "images") + decoded(root)  # the top level: caches of imgclf 0.x
    arch = root / "archives"
    for d in sorted(arch.iterdir()) if arch.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and _ARCHIVE.match(d.name):
            out.append(Entry("archive", [d], _size(d), _mtime(d), f"extracted {d.name.rsplit('-', 1)[0]}"))
    ds = root / "datasets"
    for name in _DOWNLOADS:
        p = ds / name
        if p.exists():
            out.append(Entry("download", [p], _size(p), _mtime(p), f"downloaded {name}"))
    hub = ds / "hf"  # hf:owner/name downloads: datasets/hf/<owner>--<name>/<config>/
    for d in sorted(hub.glob("*/*")) if hub.is_dir() else []:
        if d.is_dir() and not d.name.startswith("."):
            repo = d.parent.name.replace("--", "/", 1)
            out.append(Entry("download", [d], _size(d), _mtime(d), f"downloaded hf:{repo}:{d.name}"))
    arr = root / "arrays"
    for f in sorted(arr.iterdir()) if arr.is_dir() else []:
        if _ARRAYS.match(f.name):
            out.append(Entry("arrays", [f], _size(f), _mtime(f), "arrays saved by imgclf.train(data=(x, y))"))
    return sorted(out, key=lambda e: e.used)


def remove_partial(root: Path) -> None:
    """Temporary files of killed cache builds and extractions: no live process holds them
    (remove_stale's lock and age checks keep a build or extraction in progress)."""
    for folder in (root / "images", root, root / "arrays"):
        if folder.is_dir():
            remove_stale(folder, "*.tmp.*", older_than_s=0)
    for folder in (root / "archives", root / "datasets"):
        if folder.is_dir():
            remove_stale(folder, ".extract-*")  # folders hold no lock: the hour's age guard stays


def age_text(seconds: float) -> str:
    if seconds < 3600:
        return f"{max(0, int(seconds // 60))} min ago"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} days ago"
