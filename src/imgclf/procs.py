"""Child processes that end with their parent: the processes of ``train --devices N`` and of
``sweep --workers N``. Left running after the parent dies (kill -9, a crash), re-parented to
init, they would go on training and writing into folders a restarted command also uses."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def end_with_parent(parent: int, *, poll_s: float = 1.0, grace_s: float | None = None,
                    sig: int = signal.SIGTERM) -> bool:
    """SIGTERM (or ``sig``) to this process when ``parent`` (a pid) dies: Linux sends it at once
    (PR_SET_PDEATHSIG); a thread watching the parent pid every ``poll_s`` covers other systems and
    the case where that call fails. With ``grace_s``, a process still alive that long after the
    signal (stuck in native code) exits outright. What SIGTERM does is the caller's handler.
    Returns False when the parent was already gone when this was called."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)
        if grace_s is not None:
            time.sleep(grace_s)
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="imgclf-parent-watch", daemon=True).start()
    return os.getppid() == parent
