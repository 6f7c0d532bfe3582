"""Messages to the user on stderr: short, one line each, never a traceback for user errors."""

from __future__ import annotations

import sys

_seen: set[str] = set()
quiet = False  # set on the non-zero ranks of a distributed run: one voice, rank 0's


def info(msg: str) -> None:
    if quiet:
        return
    print(f"imgclf: {msg}", file=sys.stderr, flush=True)


def warn(msg: str, once: bool = True) -> None:
    """Each distinct warning is printed once per process: problems are reported, not repeated."""
    if quiet or (once and msg in _seen):
        return
    _seen.add(msg)
    print(f"imgclf: warning: {msg}", file=sys.stderr, flush=True)


def reset() -> None:
    _seen.clear()
