"""Messages to the user on stderr: short, one line each, never a traceback for user errors."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

_seen: set[str] = set()
_kept = 0  # open said_once() blocks: while one is, reset() keeps what was said
quiet = False  # set on the non-zero ranks of a distributed run: one voice, rank 0's


def _emit(line: str) -> None:
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):  # a live bar: print above it, keeping it intact
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


# seconds between redraws of a progress bar whose output is not a terminal
LOGGED_BAR_INTERVAL = 30.0


def bar_interval() -> float:
    """tqdm's ``mininterval`` for our bars. A terminal redraws a bar in place; a log file (nohup,
    SLURM, CI) keeps every redraw, and a 10-minute training bar at tqdm's 0.1 s wrote ~6000 of
    them (half a megabyte) between the epoch lines. There a bar is redrawn every 30 s. Jupyter's
    stderr is no terminal either, but its bar is a widget updated in place."""
    try:
        if sys.stderr.isatty():
            return 0.1
    except (AttributeError, ValueError):  # replaced or closed stderr
        pass
    return 0.1 if "ipykernel" in sys.modules else LOGGED_BAR_INTERVAL


def info(msg: str, once: bool = False) -> None:
    """``once``: a hint that would repeat on every call of a long-lived process (a sweep's trials)."""
    if quiet or (once and msg in _seen):
        return
    if once:
        _seen.add(msg)
    _emit(f"imgclf: {msg}")


def warn(msg: str, once: bool = True, key: str | None = None) -> None:
    """Each distinct warning is printed once per process: problems are reported, not repeated.
    ``key``: the kind of a warning whose text holds a value that varies from run to run (a fitted
    temperature): one of each kind is said between resets, whatever the values."""
    seen_as = msg if key is None else f"key:{key}"
    if quiet or (once and seen_as in _seen):
        return
    _seen.add(seen_as)
    _emit(f"imgclf: warning: {msg}")


def reset() -> None:
    """Forget what was said (each training run says its warnings anew), except inside said_once()."""
    if not _kept:
        _seen.clear()


@contextlib.contextmanager
def said_once() -> Iterator[None]:
    """Within this block (a sweep's trials, each a training run that resets), each warning, or
    each kind of one (``key``), is said once: not once per trial. It begins with a reset."""
    global _kept
    reset()
    _kept += 1
    try:
        yield
    finally:
        _kept -= 1
