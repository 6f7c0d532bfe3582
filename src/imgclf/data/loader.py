"""The loader: shuffled index batches of uint8 images, either from a tensor resident on the
training device (small data: no host round trip per step) or streamed from the cache's memory
map by a background thread (data larger than the RAM budget).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from imgclf.data.cache import CachedSplit, release_pages

# Streamed bytes after which the memory map's pages are dropped from the resident set: RSS stays
# bounded by this, not by the data size (see release_pages).
_RELEASE_BYTES = 64 << 20
_LOG_ABOVE = 256 << 20  # splits larger than this say where they are kept


def free_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_ram_budget() -> int:
    return free_ram_bytes() // 2


def resident_budget(device: torch.device, ram_budget: int | None) -> int:
    """Bytes of images a loader may hold on ``device``: half the free RAM (or --ram-budget), and
    on a GPU at most 40% of its free memory, leaving the rest to the model's activations (100k
    images at 224 px are 15 GB: resident on a 64-GB host, out of memory on a 16-GB card). The
    train loader takes its share first, so the val loader sees what is left."""
    budget = default_ram_budget() if ram_budget is None else ram_budget
    if device.type == "cuda":
        budget = min(budget, int(0.4 * torch.cuda.mem_get_info(device)[0]))
    return budget


class BatchLoader:
    """Yields ``(uint8 NHWC images, labels)`` on ``device``.

    ``resident`` data is copied once to the device; otherwise each batch is gathered from the
    memory map with sorted indices (sequential-ish reads) and prefetched in a thread.
    Shuffling uses a generator seeded by (seed, epoch), so epoch k is the same whether or not
    the run was interrupted before it. With ``world > 1`` each rank takes its own shard.
    """

    def __init__(
        self,
        data: CachedSplit,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        ram_budget: int | None = None,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 4,
        sampler=None,
    ):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world, self.prefetch = rank, world, prefetch
        self.sampler = sampler  # e.g. data.sampler.BalancedSampler: order(epoch) -> indices
        budget = resident_budget(device, ram_budget)
        self.resident = data.nbytes <= budget
        if data.nbytes > _LOG_ABOVE:
            from imgclf import log
            from imgclf.data.cache import _gib

            what = "training" if shuffle or sampler is not None else "evaluation"
            where = (f"held in {'RAM' if device.type == 'cpu' else device.type + ' memory'}" if self.resident
                     else "streamed from the cache file")
            log.info(f"{len(data)} {what} images ({_gib(data.nbytes)}) {where}: the budget is {_gib(budget)}"
                     + ("" if self.resident else " (--ram-budget sets it)"))
        labels = torch.from_numpy(np.ascontiguousarray(data.labels))
        self.labels = labels.to(device)
        self.images: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None  # dataset indices of the batch just yielded
        if self.resident:
            # a real copy in RAM, not the page cache: np.array of the whole map, or the fancy
            # index of its usable rows, which copies already (np.array of it would copy twice)
            imgs = np.array(data.images) if _is_all(data.rows, len(data.images)) else data.images[data.rows]
            self.images = torch.from_numpy(imgs).to(device)

    @property
    def _equal_shards(self) -> bool:
        # training: every rank takes the same number of steps (a rank with one more would wait in
        # an all-reduce the others never join); evaluation: every image once, shards may differ by one
        return self.shuffle or self.sampler is not None or self.drop_last

    @property
    def num_samples(self) -> int:
        if self.world == 1:
            return len(self.data)
        return len(self.data) // self.world if self._equal_shards else len(range(self.rank, len(self.data), self.world))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.data)
        if self.sampler is not None:
            idx = self.sampler.order(epoch)
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world > 1:
            if self._equal_shards:
                per = n // self.world
                idx = idx[: per * self.world]
            idx = idx[self.rank :: self.world]
        return idx

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from its ``start``-th on (a run resumed within an epoch): those
        before it are skipped unread."""
        idx = self.order(epoch)
        bs, n = self.batch_size, len(idx)
        stop = n - n % bs if self.drop_last else n
        batches = [idx[i : min(i + bs, stop)] for i in range(start * bs, stop, bs)]
        if self.resident:
            dev_idx = idx.to(self.device)
            for i in range(start * bs, stop, bs):
                b = dev_idx[i : min(i + bs, stop)]
                self.last_indices = b
                yield self.images[b], self.labels[b]
            return
        yield from self._stream(batches)

    def __iter__(self):
        return self.epoch(0)

    def _gather(self, b: torch.Tensor, fd: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.data.rows[b.numpy()]
        order = np.argsort(rows, kind="stable")
        # Sorted reads are far faster than random ones; restore the shuffled order afterwards so
        # batches stay random.
        x = np.empty((len(rows),) + self.data.images.shape[1:], np.uint8)
        if fd is not None:
            # positional reads straight into x: nothing is mapped, so RSS holds the batch only
            # (reading through the map, the kernel maps whole chunks around each touched row and
            # the resident set grows towards the size of the cache file)
            _pread_rows(fd, self.data.images.offset, x, rows, order)
        else:
            x[order] = self.data.images[rows[order]]
            self._streamed = getattr(self, "_streamed", 0) + x.nbytes
            if self._streamed >= _RELEASE_BYTES:
                release_pages(self.data.images)
                self._streamed = 0
        xt = torch.from_numpy(x)
        if self.device.type == "cuda":
            xt = xt.pin_memory()
        return xt.to(self.device, non_blocking=True), self.labels[b.to(self.labels.device)], b

    def _stream(self, batches: list[torch.Tensor]):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            fd = None
            try:
                fd = _open_for_pread(self.data.images)
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(self._gather(b, fd))
            except BaseException as e:  # surface worker errors in the consumer
                q.put(e)
            finally:
                if fd is not None:
                    os.close(fd)
            q.put(None)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                x, y, self.last_indices = item
                yield x, y
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)


def _is_all(rows: np.ndarray, n: int) -> bool:
    return len(rows) == n and (n == 0 or (rows[0] == 0 and rows[-1] == n - 1))


def _open_for_pread(images: np.ndarray) -> int | None:
    """A read-only descriptor of the file behind ``images`` when it is a whole ``np.memmap`` of a
    C-ordered uint8 file (the cache's ``np.load(mmap_mode="r")``) and the OS has ``preadv``;
    else None (in-memory arrays, views of a map): the caller indexes the array instead."""
    if not (isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap) and hasattr(os, "preadv")
            and images.filename and images.dtype == np.uint8 and images.flags.c_contiguous):
        return None
    try:
        return os.open(images.filename, os.O_RDONLY)
    except OSError:
        return None


_IOV_MAX = 1024  # Linux's limit on buffers per preadv


def _pread_rows(fd: int, data_offset: int, x: np.ndarray, rows: np.ndarray, order: np.ndarray) -> None:
    """``x[order] = images[rows[order]]`` with positional reads: the sorted rows are coalesced into
    runs of consecutive rows, each run read by one ``preadv`` scattering into its rows of ``x``."""
    if len(rows) == 0:
        return
    rowbytes = x[0].nbytes
    srows = rows[order]
    dest = [memoryview(x[j]).cast("B") for j in order]
    starts = np.flatnonzero(np.diff(srows) != 1) + 1
    bounds = np.concatenate(([0], starts, [len(srows)]))
    for i, j in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        for k in range(i, j, _IOV_MAX):
            e = min(k + _IOV_MAX, j)
            pos = data_offset + int(srows[k]) * rowbytes
            bufs = dest[k:e]
            got = os.preadv(fd, bufs, pos)
            if got < (e - k) * rowbytes:  # a short read (signals, huge runs): finish row by row
                for r, mv in enumerate(bufs):
                    have = got - r * rowbytes
                    if have < rowbytes:
                        _pread_fully(fd, mv[max(have, 0):], pos + r * rowbytes + max(have, 0))


def _pread_fully(fd: int, mv: memoryview, pos: int) -> None:
    while len(mv):
        n = os.preadv(fd, [mv], pos)
        if n == 0:
            raise OSError(f"the decoded-image cache file ended early (at byte {pos}): delete it to rebuild it")
        mv, pos = mv[n:], pos + n
