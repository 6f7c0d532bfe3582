"""Damaged cache entries, decode workers orphaned by kill -9, and a full disk under torch.save."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.errors import UserError


def _images(folder: Path, n: int = 6) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(p)
        out.append(str(p))
    return out


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad_json"])
def test_a_damaged_cache_entry_is_decoded_again_not_a_traceback(tmp_path, damage):
    # a cache file cut short (a full disk while it was copied) was 'ValueError: mmap length is
    # greater than file size' on every later run; an unreadable .json a JSONDecodeError
    from imgclf.data.cache import build_cache
    from imgclf.data.sources import Split

    split = Split(labels=np.arange(6, dtype=np.int64), paths=_images(tmp_path / "img"))
    root = tmp_path / "cache"
    first = build_cache(split, 16, "stretch", root, workers=1, progress=False)
    want = np.array(first.images)
    del first
    npy = next(root.glob("*.npy"))
    if damage == "truncated":
        os.truncate(npy, npy.stat().st_size - 100)
    elif damage == "empty":
        os.truncate(npy, 0)
    else:
        npy.with_suffix(".json").write_text("")
    again = build_cache(split, 16, "stretch", root, workers=1, progress=False)
    assert np.array_equal(np.array(again.images), want) and list(again.rows) == list(range(6))
    assert sorted(p.name for p in root.iterdir()) == sorted([npy.name, npy.with_suffix(".json").name])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers")
def test_decode_workers_end_when_their_parent_is_killed(tmp_path):
    # kill -9 of a run while its pool decoded: the workers lived on (re-parented to init) holding
    # the temporary file's lock, so the partial file could never be cleared
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import numpy as np
        from imgclf.data import cache
        from imgclf.data.sources import Split

        def slow(path, size, policy):
            time.sleep(0.2)
            return np.zeros((size, size, 3), np.uint8)

        cache.load_resized = slow  # forked workers inherit it
        n = 3 * cache._CHUNK  # past the in-process size: a pool of 2
        split = Split(labels=np.zeros(n, np.int64), paths=[f"/none/{{i}}.png" for i in range(n)])
        cache.build_cache(split, 8, "stretch", Path({str(tmp_path / 'cache')!r}), workers=2, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])

    def children() -> list[int]:
        out = []
        for e in os.listdir("/proc"):
            try:
                if e.isdigit() and int(open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    out.append(int(e))
            except (OSError, IndexError, ValueError):
                pass
        return out

    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            workers = children()
        assert len(workers) >= 2, "the pool did not start"
        time.sleep(0.5)  # the workers are decoding
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [w for w in workers if os.path.exists(f"/proc/{w}") and
                     open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert alive == [], f"decode workers {alive} outlived their parent"
    finally:
        proc.kill()
        for w in workers:  # the processes this test started, by pid
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


def test_a_full_disk_inside_torch_save_is_one_line(tmp_path, monkeypatch):
    # torch.save's zip writer raises the ENOSPC, then RuntimeError('unexpected pos ...') while
    # closing: the disk was never named, and a full disk came out as a traceback
    from imgclf.engine import trainer as tr

    def full(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 813568 vs 813464")

    monkeypatch.setattr(torch, "save", full)
    last = tmp_path / "last.pt"
    with pytest.raises(UserError, match="^no space left on device writing .*last.pt"):
        tr.atomic_save({"epoch": 1}, last)
    assert list(tmp_path.iterdir()) == []
    # an error that merely happened while another was handled is not a full disk
    def other(obj, f):
        try:
            raise KeyError("x")
        finally:
            raise RuntimeError("unexpected pos")

    monkeypatch.setattr(torch, "save", other)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        tr.atomic_save({"epoch": 1}, last)


def test_a_full_disk_at_the_first_checkpoint_does_not_promise_a_kept_epoch(tmp_path, monkeypatch):
    # 'last.pt keeps the last good epoch' was said when the first save failed, with no last.pt at all
    from imgclf.engine import trainer as tr

    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    last = tmp_path / "last.pt"
    with pytest.raises(UserError) as ei:
        tr.atomic_save({"epoch": 1}, last)
    assert str(ei.value) == f"no space left on device writing {last}: free some space"
    assert list(tmp_path.iterdir()) == []
