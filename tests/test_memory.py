"""Bounded memory: with --ram-budget 0 training streams from the cache's memory map, gives the
same model as resident mode, and pages read through the map do not stay in the resident set.
(The full-size check, 8+ GiB of pixels, is benchmarks/memory.py.)"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import imgclf
from imgclf.data.cache import release_pages
from imgclf.engine.callbacks import Callback


class LoaderModes(Callback):
    def on_train_start(self, t):
        self.train_resident = t.train_loader.resident
        self.val_resident = t.val_loader.resident
        self.memmap = isinstance(t.train_loader.data.images, np.memmap)


def _train(small_sample, tmp_path, name, budget):
    modes = LoaderModes()
    res = imgclf.train(data=str(small_sample), model="plaincnn", image_size=32, epochs=1, batch_size=32,
                       model_args={"channels": [8, 16], "dense": []}, precision="fp32", ram_budget=budget,
                       tensorboard=False, progress=False, project=str(tmp_path), name=name, callbacks=[modes])
    return res, modes


def test_streaming_matches_resident(small_sample, tmp_path):
    streamed, s_modes = _train(small_sample, tmp_path, "streamed", 0)
    resident, r_modes = _train(small_sample, tmp_path, "resident", 1.0)
    assert s_modes.memmap and not s_modes.train_resident and not s_modes.val_resident
    assert r_modes.train_resident and r_modes.val_resident
    a, b = load_file(str(streamed.run_dir / "model.safetensors")), load_file(str(resident.run_dir / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert streamed.test["top1"] == resident.test["top1"]
    assert streamed.history[0]["train_loss"] == pytest.approx(resident.history[0]["train_loss"], rel=1e-6)


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile and MADV_DONTNEED are Linux's")
def test_release_pages_drops_mapped_cache(tmp_path):
    path = tmp_path / "cache.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(1024, 64, 64, 16))  # 64 MiB
    arr[:] = 7
    arr.flush()
    del arr
    images = np.load(path, mmap_mode="r")
    before = _rss_file_bytes()
    assert int(images[::2].sum(dtype=np.int64)) > 0  # touches every page of every other row
    touched = _rss_file_bytes()
    release_pages(images)
    released = _rss_file_bytes()
    assert touched - before > 24 << 20  # reading through the map put its pages in our RSS...
    assert released - before < 8 << 20  # ...and releasing took them out again
    assert images[5, 0, 0, 0] == 7  # the data is still there
