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

from imgclf.data.archives import remove_stale
from imgclf.data.images import BadImage, load_resized, resize_rgb
from imgclf.data.sources import Split

CACHE_VERSION = 1
_CHUNK = 256
ARRAYS_IN_RAM = 1 << 30  # in-memory sources (CIFAR, pixel CSVs) resized beyond this go to a disk cache


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
    h.update(f"v{CACHE_VERSION}|{size}|{policy}|".encode())
    if split.paths is not None:
        for p in split.paths:
            try:
                st = os.stat(p)
            except OSError:  # a dangling link, a file deleted since the scan: decoding reports it
                h.update(f"{p}\tmissing\n".encode())
                continue
            h.update(f"{os.path.realpath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
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


def _init_worker(out_path: str, size: int, policy: str) -> None:
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

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


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
    rows_all = np.arange(len(split), dtype=np.int64)
    if split.images is not None and len(split) * size * size * 3 <= ARRAYS_IN_RAM:
        # Arrays (pickles, CSVs) are already in RAM and resizing them is cheap: no disk cache.
        # Filled in place: np.stack of a list would hold every image twice at the peak.
        out = np.empty((len(split), size, size, 3), np.uint8)
        for i, im in enumerate(split.images):
            out[i] = resize_rgb(im, size, policy)
        return CachedSplit(out, rows_all, split.labels, [])

    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, "*.tmp.*")
    key = _fingerprint(split, size, policy)
    npy, meta_path = root / f"{key}.npy", root / f"{key}.json"
    if split.images is not None:
        # CIFAR upscaled for a pretrained net (50k images at 224 px: 7.5 GB): to a memory-mapped
        # file like decoded images, which later runs reuse and the loader pages in as it can
        if not npy.exists():
            tmp = npy.with_name(npy.stem + f".{os.getpid()}.tmp.npy")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), size, size, 3))
            with _progress(len(split), "resizing", progress) as bar:
                for i, im in enumerate(split.images):
                    out[i] = resize_rgb(im, size, policy)
                    bar.update(1)
            out.flush()
            del out
            os.replace(tmp, npy)
        return CachedSplit(np.load(npy, mmap_mode="r"), rows_all, split.labels, [])
    if npy.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        meta = _build(split.paths, size, policy, npy, workers, progress, desc)
        tmp = meta_path.with_name(f"{key}.{os.getpid()}.tmp.json")  # one per process: runs may share a cache
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    images = np.load(npy, mmap_mode="r")
    bad = {i for i, _ in meta["bad"]}
    rows = np.asarray([i for i in range(len(split)) if i not in bad], dtype=np.int64)
    return CachedSplit(images, rows, split.labels[rows], [msg for _, msg in meta["bad"]])


def _build(paths: list[str], size: int, policy: str, npy: Path, workers: int, progress: bool, desc: str) -> dict:
    n = len(paths)
    tmp = npy.with_name(npy.stem + f".{os.getpid()}.tmp.npy")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
    chunks = [(s, paths[s : s + _CHUNK]) for s in range(0, n, _CHUNK)]
    workers = workers or os.cpu_count() or 1
    bad: list[tuple[int, str]] = []
    with _progress(n, desc, progress) as bar:
        if workers == 1 or n <= 2 * _CHUNK:
            _init_worker(str(tmp), size, policy)
            for c in chunks:
                bad += _decode_chunk(c)
                bar.update(len(c[1]))
            _W.clear()
        else:
            # fork: children only run PIL/numpy, and it avoids re-importing torch in each worker.
            ctx = mp.get_context("fork")
            with ctx.Pool(min(workers, len(chunks)), _init_worker, (str(tmp), size, policy)) as pool:
                for (_, c), b in zip(chunks, pool.imap(_decode_chunk, chunks)):
                    bad += b
                    bar.update(len(c))
    os.replace(tmp, npy)  # atomic: a killed build never leaves a half-written cache behind
    return {"n": n, "size": size, "policy": policy, "bad": sorted(bad)}
