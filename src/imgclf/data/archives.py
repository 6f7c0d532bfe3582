"""``--data photos.zip`` / ``cifar10-jpeg.tar.gz``: an archive is extracted once into the cache
and then read like the folder it contains.

Data sets mostly arrive as archives (Kaggle zips, tarballs), and "extract it first" is one more
step where a half-extracted folder silently trains on part of the data. Here the extraction goes
to a temporary folder that is renamed into place only when complete, keyed by the archive's
path, size and modification time, so a later run (or a changed archive) never sees a partial or
stale copy. Member paths are sanitised by the standard library: tarfile's ``data`` filter
refuses absolute paths, ``..``, links out of the tree and device files; zipfile strips them.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from imgclf import log
from imgclf.errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_JUNK = ("__MACOSX",)  # resource forks that macOS's zip tool adds next to the real top folder


def archive_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def archive_stem(path: Path) -> str:
    suffix = archive_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _content_root(folder: Path) -> Path:
    """An archive that wraps everything in one top folder (``coco128/...``) is read from it."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in _JUNK]
    if len(entries) == 1 and entries[0].is_dir():
        return _content_root(entries[0])
    return folder


def _extract(path: Path, dest: Path) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise UserError(f"--data {path}: the archive is corrupt (bad CRC in {bad})")
            zf.extractall(dest)
        return
    with tarfile.open(path) as tf:
        tf.extractall(dest, filter="data")


def _why(e: BaseException) -> str:
    if isinstance(e, tarfile.ReadError) and "opened successfully" in str(e):
        return "neither zip nor tar, or damaged at its start"
    if isinstance(e, tarfile.FilterError):
        return f"unsafe member refused: {str(e).splitlines()[0]}"
    first = str(e).splitlines()[0].rstrip(":") if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def remove_stale(parent: Path, pattern: str, older_than_s: float = 3600.0) -> None:
    """Temporary files or folders left by a killed extraction (``.extract-*``) or cache build
    (``<key>.<pid>.tmp.npy``, each up to gigabytes): an hour untouched, not one still being
    written, and where the name carries the writer's pid, that process gone. (A cache on a
    shared disk may be built by another machine, whose pids mean nothing here: hence the age.)"""
    import time

    for p in parent.glob(pattern):
        try:
            if time.time() - p.stat().st_mtime <= older_than_s:
                continue
            parts = p.name.split(".")
            if len(parts) >= 4 and parts[1].isdigit() and _alive(int(parts[1])):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def extract_archive(path: Path, cache_dir: Path) -> Path:
    """The folder holding ``path``'s contents, extracting it on first use."""
    target = cache_dir / "archives" / f"{archive_stem(path)}-{_key(path)}"
    if target.is_dir():
        return _content_root(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, ".extract-*")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    log.info(f"extracting {path} into {target} (once; later runs reuse it)")
    try:
        _extract(path, tmp)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions: not the archive's fault
            raise UserError(f"--data {path}: cannot extract into {target.parent}: {e.strerror}") from e
        raise UserError(f"--data {path}: not a readable archive ({_why(e)})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)  # atomic: a killed extraction never looks complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # else another process finished the same archive first
            raise
    return _content_root(target)


def iter_archive_images(path: Path, extensions) -> Iterator[tuple[str, bytes | None, str]]:
    """``(name, data, error)`` for each image member of an archive, read in place (``predict
    photos.zip``: nothing is extracted). ``name`` is ``<archive>/<member>``; a member that cannot
    be read has ``data`` None and the reason in ``error``. An archive damaged part-way yields
    what it could read, then one entry naming the archive and the damage."""

    def wanted(name: str) -> bool:
        parts = Path(name).parts
        return Path(name).suffix.lower() in extensions and not any(
            x in _JUNK or x.startswith(".") for x in parts)

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if info.is_dir() or not wanted(info.filename):
                        continue
                    try:
                        yield f"{path}/{info.filename}", zf.read(info), ""
                    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC: that member only
                        yield f"{path}/{info.filename}", None, f"unreadable archive member ({_why(e)})"
            return
        # stream mode: members in archive order, each read once, even from a .tar.gz
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if m.isfile() and wanted(m.name):
                    f = tf.extractfile(m)
                    data = f.read() if f is not None else b""
                    if len(data) < m.size:  # a plain .tar cut short ends without an error of its own
                        yield f"{path}/{m.name}", None, "cut off: the archive is truncated"
                        return
                    yield f"{path}/{m.name}", data, ""
            # a plain .tar cut between members also ends quietly; a whole one ends in two zero blocks
            if archive_suffix(path) == ".tar" and path.stat().st_size < tf.offset + 2 * tarfile.BLOCKSIZE:
                yield str(path), None, "not a readable archive (truncated: no end-of-archive blocks)"
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as e:
        yield str(path), None, f"not a readable archive ({_why(e)})"
