"""Messages to the user on stderr: short, one line each, never a traceback for user errors."""

from __future__ import annotations

import sys

_seen: set[str] = set()
quiet = False  # set on the non-zero ranks of a distributed run: one voice, rank 0's


def _emit(line: str) -> None:
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):  # a live bar: print above it, keeping it intact
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def info(msg: str, once: bool = False) -> None:
    """``once``: a hint that would repeat on every call of a long-lived process (a sweep's trials)."""
    if quiet or (once and msg in _seen):
        return
    if once:
        _seen.add(msg)
    _emit(f"imgclf: {msg}")


def warn(msg: str, once: bool = True) -> None:
    """Each distinct warning is printed once per process: problems are reported, not repeated."""
    if quiet or (once and msg in _seen):
        return
    _seen.add(msg)
    _emit(f"imgclf: warning: {msg}")


def reset() -> None:
    _seen.clear()
