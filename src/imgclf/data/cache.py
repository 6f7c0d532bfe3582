"""The decoded-image cache: every image is decoded and resized exactly once into a uint8 array on
disk (``.npy``, memory-mapped), keyed by the source's content and the target size and policy.

RAM stays bounded whatever the data size (workers write straight into the memory map), and later
epochs and later runs cost no decoding at all.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.archives import CACHE_ELSEWHERE, locked_temp, remove_stale, utf8_bytes
from imgclf.data.images import BadImage, load_resized, resize_rgb
from imgclf.data.sources import Split
from imgclf.errors import UserError

CACHE_VERSION = 2  # 2: a draft-decoded JPEG keeps its true aspect ratio (images._decode)
_CHUNK = 256
ARRAYS_IN_RAM = 1 << 30  # in-memory sources (CIFAR, pixel CSVs) resized beyond this go to a disk cache
# Entries are never evicted behind the user's back (a run may be reading one; a rebuild costs
# minutes); past this size a new entry says how to list and free them (imgclf cache).
LARGE_CACHE_BYTES = 20 << 30


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("IMGCLF_CACHE") or Path.home() / ".cache" / "imgclf"
    return Path(root).expanduser()


@dataclass
class CachedSplit:
    """Decoded images of one split. ``images`` may be a memory map; only ``rows`` are usable."""

    images: np.ndarray  # uint8 [N_all, S, S, 3]
    rows: np.ndarray  # int64 indices of the decodable images
    labels: np.ndarray  # labels of ``rows``, in the same order
    problems: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.images.shape[1:]))


def _fingerprint(split: Split, size: int, policy: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(utf8_bytes(f"v{CACHE_VERSION}|{size}|{policy}|"))
    if split.paths is not None:
        for p in split.paths:
            try:
                st = os.stat(p)
            except OSError:  # a dangling link, a file deleted since the scan: decoding reports it
                h.update(utf8_bytes(f"{p}\tmissing\n"))
                continue
            # ctime as well as mtime: an image replaced by one of the same size with its mtime kept
            # (cp -p, rsync -a, tar x) is a new ctime, which nothing can set back. (A moved folder
            # is a new realpath already; a chmod or a new hard link costs one rebuild.)
            h.update(utf8_bytes(f"{os.path.realpath(p)}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n"))
    else:
        h.update(np.ascontiguousarray(split.images).data)
    return h.hexdigest()


def release_pages(images: np.ndarray) -> None:
    """Drop a memory map's pages from this process's resident set (the OS page cache keeps them).

    Pages read or written through a file mapping count toward the process's RSS until unmapped;
    without this, one pass over a 10 GiB cache shows as 10 GiB of RSS and invites the OOM killer's
    attention. MADV_DONTNEED on a shared file mapping loses nothing: a later access faults the page
    back in from the page cache or the file.
    """
    m = getattr(images, "_mmap", None)  # numpy keeps the mmap object of np.load(mmap_mode=...) here
    if m is not None and sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


# -- worker side: each process opens the memory map once and writes its rows in place ----------
_W: dict = {}


def _init_worker(out_path: str, size: int, policy: str, parent: int | None = None) -> None:
    if parent is not None:
        # A pool worker outlived a parent killed with kill -9: re-parented to init, it waited on
        # the task queue forever, holding the temporary file's lock (forked with its descriptor),
        # so neither a later run nor 'imgclf cache --clear' could remove that partial file.
        # SIGKILL, not SIGTERM: a forked worker keeps any Python SIGTERM handler of its parent,
        # and what it was writing is a temporary file nobody will rename into place.
        import signal

        from imgclf.procs import end_with_parent

        end_with_parent(parent, sig=signal.SIGKILL)
    _W["out"] = np.load(out_path, mmap_mode="r+")
    _W["size"], _W["policy"] = size, policy


def _decode_chunk(args: tuple[int, list[str]]) -> list[tuple[int, str]]:
    start, paths = args
    out, size, policy = _W["out"], _W["size"], _W["policy"]
    bad = []
    for i, p in enumerate(paths):
        try:
            out[start + i] = load_resized(p, size, policy)
        except BadImage as e:
            bad.append((start + i, str(e)))
    out.flush()
    release_pages(out)
    return bad


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    from imgclf.log import bar_interval

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=bar_interval())


def build_cache(
    split: Split,
    size: int,
    policy: str,
    root: Path,
    *,
    workers: int = 0,
    progress: bool = True,
    desc: str = "decoding",
) -> CachedSplit:
    """Return the split's decoded images, building the cache on first use."""
    if split.images is not None and split.images.shape[1:3] == (size, size):
        # In-memory arrays already at the target size: nothing to decode or store.
        rows = np.arange(len(split), dtype=np.int64)
        return CachedSplit(np.ascontiguousarray(split.images), rows, split.labels, [])
    if split.images is not None and len(split) * size * size * 3 <= ARRAYS_IN_RAM:
        # Arrays (pickles, CSVs) are already in RAM and resizing them is cheap: no disk cache.
        # Filled in place: np.stack of a list would hold every image twice at the peak.
        out = np.empty((len(split), size, size, 3), np.uint8)
        for i, im in enumerate(split.images):
            out[i] = resize_rgb(im, size, policy)
        return CachedSplit(out, np.arange(len(split), dtype=np.int64), split.labels, [])

    try:
        return _build_on_disk(split, size, policy, root, workers, progress, desc)
    except OSError as e:
        # a read-only disk, someone else's folder, a disk that filled up anyway: one line, not a traceback
        raise UserError(f"cannot use the decoded-image cache folder {root}: {e.strerror or e}; {CACHE_ELSEWHERE}") from None


def _build_on_disk(split: Split, size: int, policy: str, root: Path, workers: int, progress: bool,
                   desc: str) -> CachedSplit:
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, "*.tmp.*")
    key = _fingerprint(split, size, policy)
    npy, meta_path = root / f"{key}.npy", root / f"{key}.json"
    rows_all = np.arange(len(split), dtype=np.int64)
    if split.images is not None:
        # CIFAR upscaled for a pretrained net (50k images at 224 px: 7.5 GB): to a memory-mapped
        # file like decoded images, which later runs reuse and the loader pages in as it can
        if _open_entry(npy, None, len(split), size) is not None:
            _touch(meta_path if meta_path.exists() else npy)
        else:
            _check_space(root, len(split), size)
            with locked_temp(root, key, ".npy") as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), size, size, 3)).flush()
                _reserve(tmp)
                out = np.load(tmp, mmap_mode="r+")
                with _progress(len(split), "resizing", progress) as bar:
                    for i, im in enumerate(split.images):
                        out[i] = resize_rgb(im, size, policy)
                        bar.update(1)
                out.flush()
                del out
                os.replace(tmp, npy)
            _write_meta(root, key, {"n": len(split), "size": size, "policy": policy, "bad": [],
                                    "source": f"pixel arrays ({len(split)} images)"})
            _note_size(root)
        hold_entry(npy)
        return CachedSplit(np.load(npy, mmap_mode="r"), rows_all, split.labels, [])
    entry = _open_entry(npy, meta_path, len(split), size)
    if entry is not None:
        images, meta = entry
        _touch(meta_path)
    else:
        meta = _build(split.paths, size, policy, npy, workers, progress, desc)
        _write_meta(root, key, meta)
        _note_size(root)
        images = np.load(npy, mmap_mode="r")
    hold_entry(npy)
    bad = {i for i, _ in meta["bad"]}
    rows = np.asarray([i for i in range(len(split)) if i not in bad], dtype=np.int64)
    return CachedSplit(images, rows, split.labels[rows], [msg for _, msg in meta["bad"]])


def _open_entry(npy: Path, meta_path: Path | None, n: int, size: int) -> tuple[np.ndarray, dict] | None:
    """A finished entry's memory map and description, or None when there is none to trust, so it
    is built (again). A file cut short (a disk that filled while it was copied, a truncated copy)
    or a damaged description was a ValueError or JSONDecodeError traceback on every later run: the
    cache is derived data, so it is decoded again, said in one line."""
    if not npy.exists() or (meta_path is not None and not meta_path.exists()):
        return None
    try:
        images = np.load(npy, mmap_mode="r")
        meta = json.loads(meta_path.read_text()) if meta_path is not None else {}
        ok = (images.dtype == np.uint8 and images.shape == (n, size, size, 3) and isinstance(meta, dict)
              and (meta_path is None or (meta.get("n") == n and isinstance(meta.get("bad"), list))))
    except (OSError, ValueError, EOFError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        ok = False
    if not ok:
        from imgclf import log

        log.warn(f"the decoded-image cache entry {npy} is damaged (cut short, or its description unreadable): "
                 "decoding its images again")
        return None
    return images, meta


def _write_meta(root: Path, key: str, meta: dict) -> None:
    with locked_temp(root, key, ".json") as tmp:  # one per writer: runs may share a cache
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, root / f"{key}.json")


_HELD: dict[str, object] = {}  # entry path -> the open file holding its shared lock


def hold_entry(npy: Path) -> None:
    """Mark a decoded entry as in use by this process until it exits: a shared flock on its file,
    which ``imgclf cache --clear`` tests (:func:`in_use`) so that it does not delete what a running
    training or evaluation has memory-mapped (the space would not be freed while the run lives, and
    its later reads of the entry, a resume or the closing evaluation, would decode it all again).
    The kernel drops the lock when the process ends, killed too. No flock (Windows): nothing held,
    a file open there cannot be deleted anyway."""
    try:
        import fcntl
    except ImportError:
        return
    key = str(npy)
    if key in _HELD:
        return
    try:
        f = open(npy, "rb")
    except OSError:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a clear holding it this instant, or a file system without locks
        f.close()
        return
    _HELD[key] = f


def in_use(npy: Path) -> bool:
    """Whether another live process holds a decoded entry (see :func:`hold_entry`). This process's
    own hold is given up: it asks in order to delete the entry (``cli.main(["cache", "--clear"])``
    from a notebook that trained on it)."""
    from imgclf.paths import locked_elsewhere

    own = _HELD.pop(str(npy), None)
    if own is not None:
        own.close()
    return locked_elsewhere(npy)


def _touch(path: Path) -> None:
    """Mark an entry as used now: ``imgclf cache --older-than`` frees the ones no run reads."""
    try:
        os.utime(path)
    except OSError:  # a read-only shared cache: its entries just look older than they are
        pass


_noted: set[Path] = set()


def _note_size(root: Path) -> None:
    """Once per process, when a new entry takes the decoded images past LARGE_CACHE_BYTES."""
    from imgclf import log

    if root in _noted:
        return
    total = 0
    try:  # sizes alone (one stat per entry, no JSON read): called for every entry built
        for e in os.scandir(root):
            if e.name.endswith(".npy") and ".tmp." not in e.name:
                total += e.stat().st_size
    except OSError:
        return
    if total > LARGE_CACHE_BYTES:
        _noted.add(root)
        log.info(f"the decoded-image cache in {root.parent} holds {_gib(total)}: 'imgclf cache' lists it, "
                 "'imgclf cache --clear --older-than 30d' frees what no run has read for a month")


def _source_of(paths: list[str]) -> str:
    """The folder the images came from (the deepest folder holding them all), for 'imgclf cache'."""
    if not paths:
        return ""
    first, last = min(paths), max(paths)
    try:  # sorted: the two ends share what all share
        common = os.path.dirname(first) if first == last else os.path.commonpath([first, last])
    except ValueError:  # paths on two Windows drives
        return ""
    # absolute: 'imgclf cache' runs from anywhere, and 'from other/test' lost the folder it was relative to
    return common if "://" in common else os.path.abspath(common)


_SPACE_MARGIN = 64 << 20  # the .json beside it, and the disk's own reserve: full is full before 0


def _check_space(root: Path, n: int, size: int) -> None:
    """The cache file is sparse: creating it takes no space, and the disk fills while workers write
    into the memory map, where a full disk is a SIGBUS ("Bus error"), not an exception: the process
    dies (or a pool worker does, and the pool waits forever for its result). So: ask first (and
    then reserve the space, see _reserve: two runs may both pass this check)."""
    import shutil

    need = n * size * size * 3 + _SPACE_MARGIN
    free = shutil.disk_usage(root).free
    if free < need:
        raise _no_space(root, need, free)


def _no_space(root: Path, need: int, free: int) -> UserError:
    return UserError(f"the decoded-image cache needs {_gib(need)} in {root} but the disk has {_gib(free)} free: "
                     f"free some space, or {CACHE_ELSEWHERE}")


def _reserve(tmp: Path) -> None:
    """Allocate the whole (sparse) memory-map file now, so that a disk filled by another run or
    another cache is an error here rather than a SIGBUS in a worker writing into the map later.
    Raises the disk-space UserError (the caller's locked_temp removes the file)."""
    import errno
    import shutil

    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the free-space check alone
        return
    fd = os.open(tmp, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # a file system that cannot preallocate: the free-space check alone
            raise
        try:
            free = shutil.disk_usage(tmp.parent).free
        except OSError:
            free = 0
        raise _no_space(tmp.parent, size + _SPACE_MARGIN, free) from None
    finally:
        os.close(fd)


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _build(paths: list[str], size: int, policy: str, npy: Path, workers: int, progress: bool, desc: str) -> dict:
    n = len(paths)
    _check_space(npy.parent, n, size)
    with locked_temp(npy.parent, npy.stem, ".npy") as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        _reserve(tmp)
        chunks = [(s, paths[s : s + _CHUNK]) for s in range(0, n, _CHUNK)]
        workers = workers or os.cpu_count() or 1
        bad: list[tuple[int, str]] = []
        with _progress(n, desc, progress) as bar:
            if workers == 1 or n <= 2 * _CHUNK:
                _init_worker(str(tmp), size, policy)
                try:
                    for c in chunks:
                        bad += _decode_chunk(c)
                        bar.update(len(c[1]))
                finally:
                    _W.clear()
            else:
                bad += _decode_in_pool(chunks, min(workers, len(chunks)), str(tmp), size, policy, bar)
        os.replace(tmp, npy)  # atomic: a killed build never leaves a half-written cache behind
    return {"n": n, "size": size, "policy": policy, "bad": sorted(bad), "source": _source_of(paths)}


def _decode_in_pool(chunks, workers: int, out_path: str, size: int, policy: str, bar) -> list[tuple[int, str]]:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    bad: list[tuple[int, str]] = []
    # fork: children only run PIL/numpy, and it avoids re-importing torch in each worker.
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (the OOM killer, a SIGBUS
    # from a disk that filled after all) Pool silently replaces it and waits forever for the lost
    # chunk; the executor raises BrokenProcessPool.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                               initargs=(out_path, size, policy, os.getpid()))
    try:
        for (_, c), b in zip(chunks, pool.map(_decode_chunk, chunks)):
            bad += b
            bar.update(len(c))
    except BrokenProcessPool:
        raise UserError(f"a process decoding images into {Path(out_path).parent} died (out of memory, or the "
                        f"disk filled up); try --workers 1, or {CACHE_ELSEWHERE}") from None
    finally:
        # on Ctrl-C or an error, drop the chunks not started rather than decode them all first
        pool.shutdown(wait=True, cancel_futures=True)
    return bad
