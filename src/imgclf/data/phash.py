"""Perceptual and exact hashes of decoded images, and fast near-duplicate search.

Hand-written rather than taken from ``imagehash``: that library hashes one PIL image at a time
(about 10,000 images/s), while these work on whole uint8 batches from the cache with two small
matrix products per batch, so 60,000 images hash in about a second, and the pair search buckets
hashes on bands (multi-index hashing) instead of comparing all N^2 pairs.

The pHash follows the usual definition (as in ``imagehash.phash``): grayscale, 32x32, 2-D DCT-II,
the 8x8 lowest frequencies, one bit per coefficient: above their median or not.

A horizontally mirrored copy hashes ~30 bits away from its original, yet training flips images,
so a mirrored train image in test leaks as surely as a copy. Mirroring an image only negates its
DCT coefficients of odd horizontal frequency, so each image's mirror hash costs a sign flip and a
median, not a second pass over the pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from imgclf.data.cache import release_pages

HASH_SIDE = 32  # the DCT input side
LOW = 8  # 8x8 low frequencies -> 64 bits
_CHUNK_BYTES = 1 << 26  # decoded pixels processed per batch (bounds RAM whatever the image size)

# ITU-R 601-2 luma, the weights PIL's convert("L") uses
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _box_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] area-averaging resampler: row i averages the source pixels under target cell i."""
    edges = np.arange(dst + 1, dtype=np.float64) * src / dst
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(src, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: coefficients = D @ x for a length-n signal x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


@functools.lru_cache(maxsize=8)
def _phash_map(h: int, w: int) -> np.ndarray:
    """[h * w * 3, 64]: luma, area resize to 32x32 and the 8x8 low DCT block are all linear, so
    they fold into one matrix and a whole batch hashes with a single matrix product."""
    d = _dct_matrix(HASH_SIDE)[:LOW]
    rows = d @ _box_matrix(h, HASH_SIDE)  # [8, h]
    cols = d @ _box_matrix(w, HASH_SIDE)  # [8, w]
    m = np.einsum("ay,bx,c->yxcab", rows, cols, _LUMA.astype(np.float64))
    return np.ascontiguousarray(m.reshape(h * w * 3, LOW * LOW), dtype=np.float32)


def _block_factor(side: int) -> int:
    """Largest f that divides side and keeps side / f >= 32 (1 for sides under 64): big images are
    block-averaged first, which is cheap and keeps the matrix of _phash_map small."""
    for f in range(side // HASH_SIDE, 1, -1):
        if side % f == 0:
            return f
    return 1


def iter_chunks(images: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, uint8 [c, H, W, 3]) batches of ``images[rows]``, about _CHUNK_BYTES each."""
    per = int(np.prod(images.shape[1:])) or 1
    step = max(1, _CHUNK_BYTES // per)
    for s in range(0, len(rows), step):
        idx = rows[s : s + step]
        # sorted reads are sequential on a memory map; restore the caller's order afterwards
        order = np.argsort(idx, kind="stable")
        batch = np.empty((len(idx),) + images.shape[1:], dtype=np.uint8)
        batch[order] = images[idx[order]]
        # one pass over a large cache must not leave every page mapped into our RSS
        release_pages(images)
        yield s, batch


# (-1)^b for the coefficient of vertical frequency a and horizontal frequency b (column a*8 + b
# of _phash_map): DCT-II of a reversed row is the same but for the sign of its odd frequencies
_MIRROR_SIGN = np.tile((-1.0) ** np.arange(LOW), LOW).astype(np.float32)


def _low_frequencies(batch: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 64]: the 8x8 lowest DCT coefficients of each image's luma."""
    n, h, w = batch.shape[:3]
    fh, fw = _block_factor(h), _block_factor(w)
    if fh > 1 or fw > 1:
        x = batch.reshape(n, h // fh, fh, w // fw, fw, 3).mean(axis=(2, 4), dtype=np.float32)
        h, w = h // fh, w // fw
    else:
        x = batch.astype(np.float32)
    return x.reshape(n, -1) @ _phash_map(h, w)


def _hash_bits(low: np.ndarray) -> np.ndarray:
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").reshape(len(low)).astype(np.uint64)


def phash_batch(batch: np.ndarray, mirrored: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint64 [N] 64-bit DCT perceptual hashes (of the horizontal mirror
    images when ``mirrored``)."""
    if len(batch) == 0:
        return np.zeros(0, dtype=np.uint64)
    low = _low_frequencies(batch)
    return _hash_bits(low * _MIRROR_SIGN if mirrored else low)


_DIGEST_SEED = 0x1D6C1F


def pixel_digest_batch(batch: np.ndarray) -> np.ndarray:
    """uint8 [N, ...] -> uint64 [N] digests of each image's decoded pixels, for exact duplicates.

    A multilinear hash with random odd 64-bit weights (vectorised; blake2b per image is 5x
    slower): images differing in one 8-byte word never collide, and callers confirm every
    equal-digest group byte for byte, so a rare collision costs a comparison, not a false finding.
    """
    n = len(batch)
    flat = batch.reshape(n, -1)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = np.concatenate([flat, np.zeros((n, pad), np.uint8)], axis=1)
    words = np.ascontiguousarray(flat).view(np.uint64)
    weights = np.random.default_rng(_DIGEST_SEED).integers(0, 2**63, words.shape[1], dtype=np.uint64)
    weights = weights * np.uint64(2) + np.uint64(1)
    h = (words * weights).sum(axis=1, dtype=np.uint64)
    return h ^ (h >> np.uint64(31))


def hash_images(images: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pHash, pixel digest, pHash of the mirror image) of ``images[rows]``, uint64 [len(rows)]
    each, in one pass over the data."""
    ph = np.empty(len(rows), dtype=np.uint64)
    dg = np.empty(len(rows), dtype=np.uint64)
    pm = np.empty(len(rows), dtype=np.uint64)
    for s, batch in iter_chunks(images, rows):
        if len(batch) == 0:
            continue
        low = _low_frequencies(batch)
        ph[s : s + len(batch)] = _hash_bits(low)
        pm[s : s + len(batch)] = _hash_bits(low * _MIRROR_SIGN)
        dg[s : s + len(batch)] = pixel_digest_batch(batch)
    return ph, dg, pm


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def equal_groups(keys: np.ndarray) -> list[np.ndarray]:
    """Index groups (size >= 2) of equal keys, each sorted, in order of first occurrence."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, len(k)])
    groups = [np.sort(order[s : s + n]) for s, n in zip(starts, sizes) if n > 1]
    return sorted(groups, key=lambda g: g[0])


def _bands(bits: int, n_bands: int) -> list[tuple[int, int]]:
    """(shift, width) of n_bands contiguous bit ranges covering a 64-bit word."""
    edges = np.linspace(0, bits, n_bands + 1).round().astype(int)
    return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:])]


_SMALL_GROUP = 64  # band buckets up to this size are paired by the vectorised offset loop
_STAR_GROUP = 1000  # identical hashes beyond this many are reported as a star, not all pairs


def near_pairs(hashes: np.ndarray, threshold: int, max_pairs: int = 1_000_000) -> np.ndarray:
    """All pairs (i < j) with Hamming(hashes[i], hashes[j]) <= threshold, as int64 [P, 3] rows of
    (i, j, distance), sorted; at most ``max_pairs`` of them (the closest first).

    Pigeonhole: split the 64 bits into threshold+1 bands; two hashes within the threshold agree
    exactly on at least one band, so only pairs sharing a band value are compared.
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 3), dtype=np.int64)
    h = hashes.astype(np.uint64)
    # Thousands of images with one hash (a "photo unavailable" placeholder, empty camera-trap
    # frames) would pair k^2/2 ways in every band (5,000: 62M pairs, GBs): such a group is
    # searched through its first member alone and reported as a star (first, other) of k - 1
    # pairs at distance 0. Smaller groups keep every pair.
    uniq, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    if counts.max() > _STAR_GROUP:
        order = np.argsort(inverse, kind="stable")
        firsts = np.r_[0, np.cumsum(counts)[:-1]]
        stars, keep = [], np.ones(n, dtype=bool)
        for g in np.flatnonzero(counts > _STAR_GROUP):
            members = order[firsts[g]: firsts[g] + counts[g]]
            keep[members[1:]] = False
            stars.append(np.stack([np.full(len(members) - 1, members[0]), members[1:],
                                   np.zeros(len(members) - 1, dtype=np.int64)], axis=1))
        idx = np.flatnonzero(keep)
        sub = near_pairs(hashes[idx], threshold, max_pairs)
        sub = np.stack([idx[sub[:, 0]], idx[sub[:, 1]], sub[:, 2]], axis=1) if len(sub) else sub
        pairs = np.concatenate([sub, *stars]).astype(np.int64)
        pairs[:, :2] = np.sort(pairs[:, :2], axis=1)
        if len(pairs) > max_pairs:
            pairs = pairs[np.argsort(pairs[:, 2], kind="stable")[:max_pairs]]
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    found: list[np.ndarray] = []
    n_found = 0
    for shift, width in _bands(64, threshold + 1):
        key = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sizes = np.diff(np.r_[starts, n])
        group_size = np.repeat(sizes, sizes)  # size of each sorted element's bucket
        small = group_size <= _SMALL_GROUP
        # Small buckets: compare each element with the one d places later in sorted order,
        # for d = 1.. while any bucket still has such a partner: O(N) numpy work per step.
        for d in range(1, min(_SMALL_GROUP, int(sizes.max()))):
            same = (k[:-d] == k[d:]) & small[:-d]
            if not same.any():
                break
            a, b = order[:-d][same], order[d:][same]
            found.append(_close(h, a, b, threshold))
        # Big buckets (near-constant images hash alike): blockwise all-pairs inside the bucket.
        for s, size in zip(starts[sizes > _SMALL_GROUP], sizes[sizes > _SMALL_GROUP]):
            members = order[s : s + size]
            for r in range(0, size, 1024):
                if n_found > 4 * max_pairs:  # near-identical frames by the thousand: enough found
                    break
                rows = members[r : r + 1024]
                dist = np.bitwise_count(h[rows, None] ^ h[None, members])
                ii, jj = np.nonzero(dist <= threshold)
                keep = r + ii < jj
                found.append(_close(h, rows[ii[keep]], members[jj[keep]], threshold))
                n_found += len(found[-1])
    pairs = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)
    if len(pairs) == 0:
        return pairs
    pairs = np.unique(pairs, axis=0)  # a pair agreeing on several bands is found several times
    if len(pairs) > max_pairs:
        pairs = pairs[np.argsort(pairs[:, 2], kind="stable")[:max_pairs]]
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs


def mirror_pairs(hashes: np.ndarray, mirrored: np.ndarray, threshold: int, max_pairs: int = 1_000_000) -> np.ndarray:
    """Pairs (i < j) where one image is within ``threshold`` of the other's mirror image, as int64
    [P, 3] rows of (i, j, distance), sorted; ``mirrored`` holds the hashes of the mirror images.

    One band search over the hashes and the mirror hashes together: its pairs that join an
    image to another image's mirror are the answer (the rest repeat the plain search).
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 3), dtype=np.int64)
    p = near_pairs(np.concatenate([hashes, mirrored]).astype(np.uint64), threshold, max_pairs)
    p = p[(p[:, 0] < n) & (p[:, 1] >= n)]
    i, j = p[:, 0], p[:, 1] - n
    keep = i != j  # an image close to its own mirror is symmetric, not a copy
    out = np.stack([np.minimum(i, j), np.maximum(i, j), p[:, 2]], axis=1)[keep]
    if len(out) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    # a pair found both ways (i ~ mirror of j, j ~ mirror of i) keeps its smaller distance
    out = out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]
    first = np.r_[True, (out[1:, 0] != out[:-1, 0]) | (out[1:, 1] != out[:-1, 1])]
    return out[first].astype(np.int64)


def _close(h: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: int) -> np.ndarray:
    dist = hamming(h[a], h[b])
    keep = dist <= threshold
    i, j = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    return np.stack([i, j, dist[keep]], axis=1).astype(np.int64)
