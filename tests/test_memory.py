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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile and MADV_DONTNEED are Linux's")
def test_inference_over_a_memory_map_reads_the_rows_asked_and_keeps_rss_bounded(tmp_path):
    """Calibration, evaluation and the report run logits_for_array over cache rows: the rows given
    are the rows scored (in their order), and a pass over 64 MiB of mapped pixels leaves neither
    the pages nor a copy of the split behind (batches are sized in bytes, pages released)."""
    import torch

    from imgclf.data.augment import Normalize
    from imgclf.engine.trainer import Precision
    from imgclf.evaluate.inference import auto_batch_size, logits_for_array

    path = tmp_path / "cache.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(1365, 128, 128, 3))  # 64 MiB
    arr[:] = np.random.default_rng(0).integers(0, 256, arr.shape[1:], dtype=np.uint8)
    arr[:, 0, 0, 0] = np.arange(len(arr)) % 256  # rows differ
    arr.flush()
    del arr
    images = np.load(path, mmap_mode="r")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    rows = np.array([1300, 3, 700, 701, 5])
    got = logits_for_array(model, images, norm, Precision(None), torch.device("cpu"), rows=rows)
    ref = logits_for_array(model, np.array(images[rows]), norm, Precision(None), torch.device("cpu"))
    torch.testing.assert_close(got, ref)
    # the byte bound (12 MiB of uint8 per batch) holds on every device; a CPU batch is smaller still
    assert auto_batch_size((256, 256, 3), device="cuda") == 64 and auto_batch_size((256, 256, 3)) == 8
    assert auto_batch_size((32, 32, 3)) == 256
    release_pages(images)
    before = _rss_file_bytes()
    out = logits_for_array(model, images, norm, Precision(None), torch.device("cpu"), rows=np.arange(len(images)))
    assert out.shape == (1365, 3)
    assert _rss_file_bytes() - before < 16 << 20


def test_gpu_residency_is_bounded_by_the_gpu_not_the_host(monkeypatch):
    # a 64-GB host and a 16-GB card with 10 GB free: images kept on the card take at most 40% of
    # its free memory; on the CPU the host budget alone counts. (mem_get_info is stubbed: no
    # GPU here, and the rule is arithmetic on what CUDA reports.)
    import torch

    from imgclf.data.loader import resident_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 16 << 30))
    assert resident_budget(torch.device("cuda", 0), 32 << 30) == int(0.4 * (10 << 30))
    assert resident_budget(torch.device("cuda", 0), 1 << 30) == 1 << 30
    assert resident_budget(torch.device("cpu"), 32 << 30) == 32 << 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's")
def test_shuffled_streaming_reads_rows_without_mapping_them(tmp_path):
    """A shuffled streamed epoch over a 200-MiB cache: the rows are read with positional reads
    into the batch, so the pages of the cache file never enter the resident set (reading through
    the memory map, RSS grew by the whole 200 MiB here, release_pages every 64 MiB or not), and
    every batch equals the one gathered from the same images held in RAM."""
    import torch

    import imgclf.data.loader as loader
    from imgclf.data.cache import CachedSplit

    n, s = 17067, 64  # 12 KiB rows, 200 MiB
    path = tmp_path / "cache.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    tile = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
    for i in range(0, n, 2048):
        k = np.arange(i, min(i + 2048, n))
        arr[i : i + 2048] = tile[None] + (k % 256).astype(np.uint8)[:, None, None, None]
        arr[i : i + 2048, 0, 0, 0] = k // 256  # every row differs
    arr.flush()
    del arr
    rows = np.delete(np.arange(n), [0, 5, 6, 7, n - 1])  # undecodable images are skipped
    labels = (rows % 10).astype(np.int64)
    mapped = np.load(path, mmap_mode="r")
    in_ram = np.load(path)  # read(), not mapped
    streamed = loader.BatchLoader(CachedSplit(mapped, rows, labels, []), 64, torch.device("cpu"), shuffle=True,
                                  seed=3, ram_budget=0)
    ref = loader.BatchLoader(CachedSplit(in_ram, rows, labels, []), 64, torch.device("cpu"), shuffle=True,
                             seed=3, ram_budget=0)
    assert not streamed.resident and not ref.resident
    release_pages(mapped)
    before = peak = _rss_file_bytes()
    count = 0
    for (x, y), (xr, yr) in zip(streamed.epoch(1), ref.epoch(1), strict=True):
        peak = max(peak, _rss_file_bytes())
        assert torch.equal(x, xr) and torch.equal(y, yr)
        count += len(x)
    assert count == len(rows)
    assert peak - before < 2 * loader._RELEASE_BYTES + (16 << 20), f"RssFile grew {(peak - before) >> 20} MiB"


def test_positional_reads_match_indexing_with_runs_repeats_and_any_order(tmp_path):
    from imgclf.data.loader import _IOV_MAX, _open_for_pread, _pread_rows

    path = tmp_path / "c.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(3000, 4, 4, 3))
    arr[:] = np.random.default_rng(1).integers(0, 256, arr.shape, dtype=np.uint8)
    arr.flush()
    del arr
    images = np.load(path, mmap_mode="r")
    fd = _open_for_pread(images)
    assert fd is not None and _open_for_pread(images[1:]) is None and _open_for_pread(np.array(images)) is None
    try:
        rng = np.random.default_rng(2)
        for rows in (np.arange(2500)[::-1].copy(), rng.permutation(3000), np.array([7, 7, 8, 2999, 0, 8]),
                     np.arange(_IOV_MAX + 10), np.array([], np.int64)):
            order = np.argsort(rows, kind="stable")
            x = np.empty((len(rows), 4, 4, 3), np.uint8)
            _pread_rows(fd, images.offset, x, rows, order)
            np.testing.assert_array_equal(x, images[rows])
    finally:
        import os

        os.close(fd)


def test_loader_says_once_whether_a_large_split_is_held_or_streamed(monkeypatch, capsys):
    import torch

    import imgclf.data.loader as loader
    from imgclf.data.cache import CachedSplit

    monkeypatch.setattr(loader, "_LOG_ABOVE", 1 << 10)  # "large": over 1 KiB here, 256 MiB for real
    data = CachedSplit(np.zeros((100, 8, 8, 3), np.uint8), np.arange(100), np.zeros(100, np.int64), [])
    loader.BatchLoader(data, 10, torch.device("cpu"), shuffle=True, ram_budget=0)
    loader.BatchLoader(data, 10, torch.device("cpu"), shuffle=False, ram_budget=1 << 20)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["imgclf: 100 training images (19 KiB) streamed from the cache file: the budget is 0 KiB "
                     "(--ram-budget sets it)",
                     "imgclf: 100 evaluation images (19 KiB) held in RAM: the budget is 1 MiB"]
    monkeypatch.setattr(loader, "_LOG_ABOVE", 256 << 20)
    loader.BatchLoader(data, 10, torch.device("cpu"), shuffle=True, ram_budget=0)
    assert capsys.readouterr().err == ""  # small splits say nothing


@pytest.mark.parametrize("ram_budget", [0, 1 << 30])  # streamed from the cache file, held in RAM
def test_an_epoch_resumed_at_a_batch_yields_the_rest_of_that_epoch(tmp_path, ram_budget):
    """What a run resumed within an epoch reads: the same batches an uninterrupted epoch goes on
    with, in the same order, and none of those before."""
    import torch

    from imgclf.data.cache import CachedSplit
    from imgclf.data.loader import BatchLoader

    path = tmp_path / "c.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(203, 4, 4, 3))
    arr[:] = np.arange(203, dtype=np.uint8)[:, None, None, None]
    arr.flush()
    del arr
    rows = np.delete(np.arange(203), [3, 50])
    data = CachedSplit(np.load(path, mmap_mode="r"), rows, (rows % 7).astype(np.int64), [])
    for drop_last in (False, True):
        loader = BatchLoader(data, 16, torch.device("cpu"), shuffle=True, seed=5, ram_budget=ram_budget,
                             drop_last=drop_last)
        assert loader.resident == bool(ram_budget)
        whole = [(x.clone(), y.clone()) for x, y in loader.epoch(2)]
        rest = [(x.clone(), y.clone(), loader.last_indices.clone()) for x, y in loader.epoch(2, start=5)]
        assert len(rest) == len(whole) - 5 == len(loader) - 5
        for (x, y), (xr, yr, idx) in zip(whole[5:], rest, strict=True):
            assert torch.equal(x, xr) and torch.equal(y, yr)
            assert torch.equal(xr[:, 0, 0, 0], torch.from_numpy(rows)[idx].to(torch.uint8))
        assert list(loader.epoch(2, start=len(loader))) == []
