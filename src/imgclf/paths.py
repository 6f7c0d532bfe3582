"""Where a command will write, checked before any work: a long decode or a folder of
predictions that ends in 'cannot write there' wastes it."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_problem(folder: Path, *, create: bool) -> str | None:
    """Why files cannot be written in ``folder``; None when they can. ``create`` makes a missing
    folder; otherwise the nearest existing parent (which would hold it) is tried. A real file is
    written and removed: access() passes root everywhere, and read-only mounts and /proc keep
    permission bits that say writable."""
    where = Path(os.path.abspath(folder))
    try:
        if create:
            where.mkdir(parents=True, exist_ok=True)
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            return f"{where} is not a folder"
        probe = where / f".imgclf-{os.getpid()}.probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            # /proc answers 'No such file or directory' for a new file or folder in a folder that exists
            while not where.exists() and where != where.parent:
                where = where.parent
            if where.is_dir():
                return f"{where} does not take new files"
        return exc.strerror or type(exc).__name__
    return None


def locked_elsewhere(path: str | os.PathLike) -> bool:
    """Whether another process holds a flock on ``path`` (a run folder training, a cache entry a
    run reads): an exclusive non-blocking try, let go at once. False without flock (Windows), for
    an unreadable path, or on a file system without locks."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing the only descriptor that took the lock lets it go
    return False
