"""The loader: shuffled index batches of uint8 images, either from a tensor resident on the
training device (small data: no host round trip per step) or streamed from the cache's memory
map by a background thread (data larger than the RAM budget).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from imgclf.data.cache import CachedSplit, release_pages

# Streamed bytes after which the memory map's pages are dropped from the resident set: RSS stays
# bounded by this, not by the data size (see release_pages).
_RELEASE_BYTES = 64 << 20


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
        self.resident = data.nbytes <= resident_budget(device, ram_budget)
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

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.order(epoch)
        bs, n = self.batch_size, len(idx)
        stop = n - n % bs if self.drop_last else n
        batches = [idx[i : min(i + bs, stop)] for i in range(0, stop, bs)]
        if self.resident:
            dev_idx = idx.to(self.device)
            for i in range(0, stop, bs):
                b = dev_idx[i : min(i + bs, stop)]
                self.last_indices = b
                yield self.images[b], self.labels[b]
            return
        yield from self._stream(batches)

    def __iter__(self):
        return self.epoch(0)

    def _gather(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.data.rows[b.numpy()]
        order = np.argsort(rows, kind="stable")
        # Sorted reads from the memory map are far faster than random ones; restore the
        # shuffled order afterwards so batches stay random.
        x = np.empty((len(rows),) + self.data.images.shape[1:], np.uint8)
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
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    q.put(self._gather(b))
            except BaseException as e:  # surface worker errors in the consumer
                q.put(e)
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
