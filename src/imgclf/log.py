"""Messages to the user on stderr: short, one line each, never a traceback for user errors."""

from __future__ import annotations

import sys

_seen: set[str] = set()


def info(msg: str) -> None:
    print(f"imgclf: {msg}", file=sys.stderr, flush=True)


def warn(msg: str, once: bool = True) -> None:
    """Each distinct warning is printed once per process: problems are reported, not repeated."""
    if once and msg in _seen:
        return
    _seen.add(msg)
    print(f"imgclf: warning: {msg}", file=sys.stderr, flush=True)


def reset() -> None:
    _seen.clear()
