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

import contextlib
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
# Folders that hold nobody's data, matched case-insensitively wherever they appear: resource forks
# that macOS's zip tool adds (__MACOSX), Python's __pycache__, and NAS debris. Synology puts an
# @eaDir beside every photo, holding real JPEG thumbnails of it (a.jpg/SYNOPHOTO_THUMB_M.jpg):
# read as data, each photo would train several times over. #recycle/@Recycle are the NAS
# recycle bins (deleted images), #snapshot/@Recently-Snapshot read-only snapshots (copies),
# .@__thumb QNAP's thumbnails; $RECYCLE.BIN, System Volume Information and lost+found are what
# Windows and ext4 leave at the top of a disk a data set may sit on.
JUNK_DIRS = frozenset({
    "__macosx", "__pycache__", "@eadir", "#recycle", "#snapshot", ".@__thumb", "@recycle",
    "@recently-snapshot", "$recycle.bin", "system volume information", "lost+found",
})


def is_junk(name: str) -> bool:
    return name.lower() in JUNK_DIRS


def utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8 for hashing, whatever it holds. A file name that is not valid UTF-8
    (Latin-1 or GBK names copied from an old disk or a Windows zip) reaches Python with lone
    surrogates in it (os.listdir's surrogateescape), which str.encode() refuses; surrogatepass
    writes them as bytes instead, and every other name hashes exactly as it always did."""
    return text.encode("utf-8", "surrogatepass")


def shown_name(text: str) -> str:
    """``text`` with the bytes of a name that is not UTF-8 (os.listdir's lone surrogates, which no
    UTF-8 file can hold) written as \\xNN; every other character as it is."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {9: "\\t", 10: "\\n", 13: "\\r", 127: "\\x7f"}


def row_name(text: str) -> str:
    """``shown_name`` for one row of terminal output: a newline, tab or escape code in a file name
    (all legal on Linux) is written as \\n, \\t, \\x1b, so one input stays one line and one column."""
    return shown_name(text).translate(_CONTROL)


# How to move the cache (see cache.cache_root), for messages about a cache folder that cannot be written.
CACHE_ELSEWHERE = "point the cache at another folder with IMGCLF_CACHE=DIR or --cache-dir DIR"


def archive_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def archive_stem(path: Path) -> str:
    suffix = archive_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _key(*paths: Path) -> str:
    """Names one version of the files: their paths, sizes and modification times."""
    ident = "\0".join(f"{p.resolve()}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}" for p in paths)
    return hashlib.sha256(utf8_bytes(ident)).hexdigest()[:16]


def _content_root(folder: Path) -> Path:
    """An archive that wraps everything in one top folder (``coco128/...``) is read from it."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and not is_junk(p.name)]
    if len(entries) == 1 and entries[0].is_dir():
        return _content_root(entries[0])
    return folder


class _CutZip(zipfile.BadZipFile):
    pass


def _zip_or_cut(path: Path) -> bool:
    """A readable zip; a zip whose end (the central directory that lists its members) is missing,
    a download cut short, raises _CutZip: read as a tar, it was a bewildering 'ReadError: bad
    checksum'."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise _CutZip("a zip cut short: the list of its members at its end is missing; download it again")
    return False


def _extract(path: Path, dest: Path) -> None:
    if _zip_or_cut(path):
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise UserError(f"--data {path}: the archive is corrupt (bad CRC in {bad})")
            members = zf.infolist()
            for info in members:  # class folders named as written ('café', not 'caf├⌐')
                info.filename = zip_member_name(info)
            zf.extractall(dest, members)
        return
    with tarfile.open(path) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python before 3.11.4 (Debian 12's 3.11.2) has no extraction filters: the same refusals by hand
            members = tf.getmembers()
            for m in members:
                _check_member(m, dest)
            tf.extractall(dest, members=members)


class _Unsafe(ValueError):
    pass


# what reading a damaged or foreign archive raises (pyarrow's ArrowInvalid is a ValueError too)
_DAMAGED = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, ValueError)


def _check_member(m: tarfile.TarInfo, dest: Path) -> None:
    """What tarfile's "data" filter refuses, for Pythons without it: a member written outside
    ``dest`` (an absolute name, '..'), and links or device files, which a folder of images does
    not need."""
    name = m.name
    if os.path.isabs(name) or ".." in Path(name).parts or \
            not (dest / name).resolve().is_relative_to(dest.resolve()):
        raise _Unsafe(f"unsafe member refused: '{name}' would be written outside the extraction folder")
    if not (m.isfile() or m.isdir()):
        raise _Unsafe(f"unsafe member refused: '{name}' is a link or a special file")


def _why(e: BaseException) -> str:
    if isinstance(e, tarfile.ReadError) and "opened successfully" in str(e):
        return "neither zip nor tar, or damaged at its start"
    if isinstance(e, _Unsafe | _CutZip):
        return str(e)
    if isinstance(e, getattr(tarfile, "FilterError", ())):  # Python >= 3.11.4
        return f"unsafe member refused: {str(e).splitlines()[0]}"
    first = str(e).splitlines()[0].rstrip(":") if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def remove_stale(parent: Path, pattern: str, older_than_s: float = 3600.0) -> None:
    """Temporary files or folders left by a killed extraction (``.extract-*``) or cache build
    (``<key>.<pid>.<random>.tmp.npy``, each up to gigabytes): an hour untouched, and no process
    provably still writing it. A cache build holds an flock on its temporary file (locked_temp),
    which the kernel drops when the process dies, so a file nobody has locked is dead on this
    host and, on a shared disk whose locks reach every client (local disks, NFSv4), on any host.
    A pid alone proves nothing there: two containers sharing a cache volume both run as pid 1,
    which is alive in each forever. The age is for disks whose locks do not travel (SMB)."""
    import time

    for p in parent.glob(pattern):
        try:
            if time.time() - p.stat().st_mtime <= older_than_s:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                continue
            if _locked(p):
                continue
            parts = p.name.split(".")
            # <key>.<pid>.tmp.npy: written by an older imgclf, which took no lock; its pid is all there is
            if len(parts) == 4 and parts[1].isdigit() and _alive(int(parts[1])):
                continue
            p.unlink()
        except OSError:
            pass


def _locked(path: Path) -> bool:
    """Whether a live process holds an flock on ``path`` (see remove_stale)."""
    try:
        import fcntl
    except ImportError:  # Windows: a file still open there cannot be deleted anyway
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to learn from it
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def locked_temp(folder: Path, stem: str, suffix: str) -> Iterator[Path]:
    """A new, empty, uniquely named ``<stem>.<pid>.<random>.tmp<suffix>`` in ``folder``, locked
    (flock) until the block ends, and removed if the block fails; the block renames it into place.
    The random part keeps two writers of one key apart even when both are pid 1 in containers
    sharing the folder; the lock tells remove_stale the file is still being written."""
    import uuid

    path = folder / f"{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    # os.open, not mkstemp: mkstemp's 0600 would leave the finished cache unreadable to the other
    # users (or containers) of a shared cache; here the umask decides, as for any file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError):  # Windows, or a file system without locks: the age guard remains
            pass
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        os.close(fd)  # forked decode workers hold the lock too, until they exit


def extract_archive(path: Path, cache_dir: Path) -> Path:
    """The folder holding ``path``'s contents, extracting it on first use."""
    target = cache_dir / "archives" / f"{archive_stem(path)}-{_key(path)}"

    def fill(dest: Path) -> None:
        _extract(path, dest)
        _extract_inner(path, dest)

    if target.is_dir():  # extracted before inner archives were: they are extracted now, in place
        _extract_inner(path, target)
    return _content_root(extract_once(path, target, fill))


def _extract_inner(path: Path, dest: Path) -> None:
    """Kaggle's competition downloads hold archives in the archive: dogs-vs-cats.zip is train.zip,
    test1.zip and a CSV; aerial-cactus.zip is train.zip, test.zip and train.csv. Each archive in
    the top two levels is extracted once into a folder of its name beside it (its own single
    top folder of that name looked through: train.zip holds train/) and removed from this copy.
    One level only: archives inside those stay files."""
    inner = [p for p in sorted(dest.glob("*")) + sorted(dest.glob("*/*")) if p.is_file() and archive_suffix(p)
             and not any(is_junk(x) or x.startswith(".") for x in p.relative_to(dest).parts)]
    for arc in inner:
        folder = arc.with_name(archive_stem(arc))
        if folder.exists():  # train.zip beside a train/ folder: both kept as they are
            continue
        log.info(f"{path}: extracting {arc.relative_to(dest)} in it")
        tmp = arc.with_name(f".inner-{arc.name}")
        try:
            _extract(arc, tmp)
        except (UserError, *_DAMAGED) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = str(e) if isinstance(e, UserError) else _why(e)
            raise UserError(f"--data {path}: {arc.relative_to(dest)} in it is not a readable archive ({reason})") from e
        entries = [p for p in tmp.iterdir() if not p.name.startswith(".") and not is_junk(p.name)]
        only = entries[0] if len(entries) == 1 and entries[0].is_dir() and entries[0].name == folder.name else None
        try:
            os.replace(only if only is not None else tmp, folder)
        except OSError:
            if not folder.is_dir():  # else another process extracted the same one first
                raise
        shutil.rmtree(tmp, ignore_errors=True)
        arc.unlink(missing_ok=True)


def extract_once(path: Path, target: Path, fill, what: str = "archive") -> Path:
    """``target``, filled by ``fill(folder)`` on first use: into a temporary folder renamed into
    place only when complete, so a killed extraction never looks done. ``path`` (the source) and
    ``what`` word the errors."""
    if target.is_dir():
        with contextlib.suppress(OSError):  # last used now, for 'imgclf cache --older-than'
            os.utime(target)
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent, ".extract-*")
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    except OSError as e:  # read-only disk, someone else's folder, a file where the folder should be
        raise UserError(f"--data {path}: cannot extract into {target.parent}: {e.strerror or e}; "
                        f"{CACHE_ELSEWHERE}") from None
    log.info(f"extracting {path} into {target} (once; later runs reuse it)")
    try:
        fill(tmp)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (*_DAMAGED, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions: not the archive's fault
            raise UserError(f"--data {path}: cannot extract into {target.parent}: {e.strerror}; "
                            f"{CACHE_ELSEWHERE}") from e
        raise UserError(f"--data {path}: not a readable {what} ({_why(e)})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)  # atomic: a killed extraction never looks complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # else another process finished the same archive first
            raise
    return target


def zip_member_name(info: zipfile.ZipInfo) -> str:
    """A zip member's name as it was written. Info-ZIP's ``zip`` (Linux) and macOS write UTF-8
    names without setting the flag that says so, and zipfile then reads them as the old DOS code
    page: 'café.jpg' came out 'caf├⌐.jpg'. A flagless name whose bytes are valid UTF-8 is read as
    UTF-8 (what unzip, 7-Zip and the browsers do); any other stays as zipfile read it."""
    name = info.filename
    if info.flag_bits & 0x800 or name.isascii():
        return name
    try:
        return name.encode("cp437").decode("utf-8")
    except UnicodeError:
        return name


def iter_archive_images(path: Path, extensions) -> Iterator[tuple[str, bytes | None, str]]:
    """``(name, data, error)`` for each image member of an archive, read in place (``predict
    photos.zip``: nothing is extracted). ``name`` is ``<archive>/<member>``; a member that cannot
    be read has ``data`` None and the reason in ``error``. An archive damaged part-way yields
    what it could read, then one entry naming the archive and the damage."""

    def wanted(name: str) -> bool:
        parts = Path(name).parts
        return Path(name).suffix.lower() in extensions and not any(
            is_junk(x) or x.startswith(".") for x in parts)

    try:
        if _zip_or_cut(path):
            with zipfile.ZipFile(path) as zf:
                for name, info in sorted(((zip_member_name(i), i) for i in zf.infolist()), key=lambda t: t[0]):
                    if info.is_dir() or not wanted(name):
                        continue
                    try:
                        yield f"{path}/{name}", zf.read(info), ""
                    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC: that member only
                        yield f"{path}/{name}", None, f"unreadable archive member ({_why(e)})"
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
