"""Near-duplicate search over 64-bit perceptual hashes: all pairs within Hamming radius r.

Exact all-pairs search costs ~2 ns per pair (10^6 hashes: 15 minutes). We use bit-sampling LSH:
L tables, each keyed by k sampled bits; a pair at distance d shares a table's key with probability
(1 - d/64)^k, so it is found with probability 1 - (1 - (1 - d/64)^k)^L. Candidates that share a
bucket are verified by popcount, so there are no false positives; the only loss is recall, measured
in ``bench/dedupe.py``. Bucket rows are emitted per hash and grouped by a partition of the bucket
key, so the grouping can run as a distributed groupby; ``pairs_in_buckets`` is the per-partition
kernel.
"""

from __future__ import annotations

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def hex_to_u64(hashes: list[str] | np.ndarray) -> np.ndarray:
    """16-hex-digit hashes (imagehash's ``str(hash)``) to uint64."""
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x.astype(np.uint64, copy=False))


def sample_bits(tables: int, bits: int, seed: int) -> np.ndarray:
    """For each table, ``bits`` distinct bit positions out of 64 (shape tables x bits)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(64, size=bits, replace=False) for _ in range(tables)]).astype(np.uint64)


def bucket_keys(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Bucket key of every hash in every table (shape tables x n): table id in the high bits."""
    tables, bits = positions.shape
    keys = np.empty((tables, hashes.size), dtype=np.uint64)
    for t in range(tables):
        key = np.zeros(hashes.size, dtype=np.uint64)
        for j, pos in enumerate(positions[t]):
            key |= ((hashes >> pos) & np.uint64(1)) << np.uint64(j)
        keys[t] = key | (np.uint64(t) << np.uint64(bits))
    return keys


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """A well-mixed partition number for each bucket key."""
    mixed = (keys * _MIX) >> np.uint64(40)
    return (mixed % np.uint64(partitions)).astype(np.int32)


def pairs_in_buckets(keys: np.ndarray, ids: np.ndarray, hashes: np.ndarray, radius: int) -> np.ndarray:
    """All pairs (a < b) of ``ids`` that share a bucket key and lie within ``radius``; shape (m, 2).

    Sort by key; then compare each row with the row ``o`` places further for o = 1, 2, ... while any
    bucket is longer than o. The work is the sum of squared bucket sizes, vectorized.
    """
    if keys.size < 2:
        return np.empty((0, 2), dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    k, i, h = keys[order], ids[order].astype(np.int64), hashes[order]
    # End (exclusive) of the run of equal keys that each position belongs to.
    boundaries = np.flatnonzero(k[1:] != k[:-1]) + 1
    ends = np.repeat(np.append(boundaries, k.size), np.diff(np.concatenate(([0], boundaries, [k.size]))))
    active = np.flatnonzero(ends - np.arange(k.size) > 1)
    found = []
    offset = 1
    while active.size:
        partner = active + offset
        close = popcount(h[active] ^ h[partner]) <= radius
        if close.any():
            a, b = i[active[close]], i[partner[close]]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
        offset += 1
        active = active[ends[active] - active > offset]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    if pairs.size == 0:
        return pairs.reshape(0, 2)
    return np.unique(pairs, axis=0)


def lsh_pairs(hashes: np.ndarray, radius: int, tables: int, bits: int, seed: int = 0) -> np.ndarray:
    """Single-process LSH search: unique pairs of indices into ``hashes`` within ``radius``."""
    positions = sample_bits(tables, bits, seed)
    keys = bucket_keys(hashes, positions).ravel()
    ids = np.tile(np.arange(hashes.size, dtype=np.int64), tables)
    return unique_pairs(pairs_in_buckets(keys, ids, np.tile(hashes, tables), radius))


def exact_pairs(hashes: np.ndarray, radius: int, block: int = 2048) -> np.ndarray:
    """All pairs within ``radius`` by blocked all-pairs comparison (quadratic; the reference)."""
    n = hashes.size
    found = []
    for start in range(0, n, block):
        chunk = hashes[start : start + block]
        dist = popcount(chunk[:, None] ^ hashes[None, start:])
        a, b = np.nonzero(dist <= radius)
        a, b = a + start, b + start
        keep = a < b
        found.append(np.stack([a[keep], b[keep]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
