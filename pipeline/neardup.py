"""Near-duplicate search over 64-bit perceptual hashes: all pairs within Hamming radius r.

Exact all-pairs search costs a few ns per pair (10^6 hashes: 15 minutes or more). We use bit-sampling
LSH: L tables, each keyed by k distinct sampled bits; a pair at distance d shares a table's key with
probability p = C(64-d, k) / C(64, k) (no flipped bit among the sampled ones), so it is found with
probability 1 - (1 - p)^L. Defaults k = 17, L = 64: every pair at d <= 6 and 89% at d = 10 (98.5% over
distances uniform in 1..10) at about 10 s per 10^6 hashes on one core. Candidates that share a
bucket are verified by popcount, so there are no false positives; the only loss is recall, measured
in ``bench/dedupe.py``. Bucket rows are emitted per hash and grouped by a partition of the bucket
key, so the grouping can run as a distributed groupby; ``pairs_in_buckets`` is the per-partition
kernel.

A pHash within the radius is only a candidate: on photographs of different objects in one scene (the
same table, plate or backdrop) pHash mostly sees the shared background. ``local_difference`` confirms
a candidate on the two normalized images (see docs/dedupe.md for the measurements): both become 48 x 48
colour thumbnails, normalized for brightness and contrast; each pixel of one is compared with the
range of colours within 2 pixels of the same place in the other (so a slight crop or resize, which
moves content by a pixel or two, costs nothing), and the pair's difference is the largest mean over
6 x 6 blocks: a copy differs a little everywhere, another object on the same background differs a lot
in one place.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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


def _byte_tables(positions: np.ndarray) -> np.ndarray:
    """For one table's sampled bit positions: for each of the 8 bytes of a hash and each byte value,
    the bits of the key that byte contributes (shape 8 x 256). Gathering through these replaces one
    shift-and-mask per sampled bit with one lookup per byte."""
    values = np.arange(256, dtype=np.uint64)
    lut = np.zeros((8, 256), dtype=np.uint64)
    for j, pos in enumerate(positions.astype(np.int64)):
        byte, bit = divmod(int(pos), 8)
        lut[byte] |= ((values >> np.uint64(bit)) & np.uint64(1)) << np.uint64(j)
    return lut


def table_keys(hashes: np.ndarray, positions: np.ndarray, table: int) -> np.ndarray:
    """Bucket key of every hash in one table: the sampled bits, with the table id in the high bits."""
    lut = _byte_tables(positions)
    key = np.full(hashes.size, np.uint64(table) << np.uint64(positions.size), dtype=np.uint64)
    for byte in range(8):
        key |= lut[byte][((hashes >> np.uint64(8 * byte)) & np.uint64(0xFF)).astype(np.intp)]
    return key


def bucket_keys(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Bucket key of every hash in every table (shape tables x n)."""
    return np.stack([table_keys(hashes, positions[t], t) for t in range(positions.shape[0])])


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
    order = np.argsort(keys)  # quicksort: order inside a bucket does not matter
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
    ids = np.arange(hashes.size, dtype=np.int64)
    # One table at a time: small sorts that stay in cache, and memory linear in n, not n x tables.
    found = [
        pairs_in_buckets(table_keys(hashes, positions[t], t), ids, hashes, radius) for t in range(tables)
    ]
    return unique_pairs(np.concatenate(found))


def exact_pairs(hashes: np.ndarray, radius: int, block: int = 1024) -> np.ndarray:
    """All pairs within ``radius`` by tiled all-pairs comparison (quadratic; the reference)."""
    n = hashes.size
    found = [np.empty((0, 2), dtype=np.int64)]
    for start in range(0, n, block):
        chunk = hashes[start : start + block, None]
        for other in range(start, n, 16 * block):
            dist = popcount(chunk ^ hashes[None, other : other + 16 * block])
            a, b = np.nonzero(dist <= radius)
            a, b = a + start, b + other
            keep = a < b
            found.append(np.stack([a[keep], b[keep]], axis=1))
    return np.concatenate(found)


def planted_hashes(n: int, radius: int, seed: int = 0, share: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Test data: ``n`` random hashes, a ``share`` of them near copies of others at a distance drawn
    uniformly from 1..radius. Returns the hashes and the planted pairs (source, copy)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    m = int(n * share)
    src = rng.choice(n - m, size=m, replace=False)
    dist = rng.integers(1, radius + 1, size=m)
    flips = np.zeros(m, dtype=np.uint64)
    for d in range(1, radius + 1):
        rows = np.flatnonzero(dist == d)
        bits = np.argsort(rng.random((rows.size, 64)), axis=1)[:, :d].astype(np.uint64)  # d distinct bits
        flips[rows] = np.bitwise_or.reduce(np.uint64(1) << bits, axis=1)
    hashes[n - m :] = hashes[src] ^ flips
    return hashes, np.stack([src, np.arange(n - m, n)], axis=1)


# ---------------------------------------------------------------------------------------------------
# Verification of candidate pairs on the images themselves

THUMB_SIDE = 48
# At 48 px a crop of 2-4% per edge moves content by at most 2 px (0.04 * 48): the alignment tolerance.
TOLERANCE = 2
BLOCK = 6  # 1/8 of the side: an object of a fifth of the short side fills one block
BORDER = 2  # pixels that a crop removes on one side only: left out of the comparison
VERIFY_CHUNK = 256  # pairs per vectorized step (memory: about 0.2 MB per pair)


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> np.ndarray:
    """The ``side`` x ``side`` RGB thumbnail (uint8) of an encoded image, aspect ratio not kept.

    JPEG decodes at reduced scale (``draft``), then a triangle filter resizes: a box filter aliases
    fine textures differently in a copy resized twice (measured: a copy at 0.52x scored 0.42 with BOX,
    0.05 with BILINEAR). Raises what Pillow raises on a bad file; the caller turns that into a reason."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (side, side))
        rgb = im.convert("RGB")
        return np.asarray(rgb.resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)


def _envelope(x: np.ndarray, tolerance: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and channel, the least and greatest value within ``tolerance`` pixels: separable
    running minima and maxima as shifted in-place operations (numpy reduces short windows slowly)."""
    n, w = x.shape[1], 2 * tolerance + 1

    def run(a: np.ndarray, axis: int, op: np.ufunc) -> np.ndarray:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (tolerance, tolerance)
        p = np.pad(a, pad, mode="edge")
        take = [slice(None)] * a.ndim
        take[axis] = slice(0, n)
        out = p[tuple(take)].copy()
        for k in range(1, w):
            take[axis] = slice(k, k + n)
            op(out, p[tuple(take)], out=out)
        return out

    return run(run(x, 1, np.minimum), 2, np.minimum), run(run(x, 1, np.maximum), 2, np.maximum)


def _block_max(d: np.ndarray, block: int) -> np.ndarray:
    """Largest mean of ``d`` (pairs x side x side) over block x block windows at a stride of half a block
    (the last row and column of windows flush with the far edges)."""
    n = d.shape[1]
    block = min(block, n)
    c = np.pad(d, ((0, 0), (1, 0), (1, 0))).cumsum(axis=1).cumsum(axis=2)
    at = np.arange(0, n - block + 1, max(1, block // 2))
    if at[-1] != n - block:
        at = np.append(at, n - block)
    y, x = at[:, None], at[None, :]
    sums = c[:, y + block, x + block] - c[:, y, x + block] - c[:, y + block, x] + c[:, y, x]
    return sums.reshape(len(d), -1).max(axis=1) / (block * block)


def local_difference(
    thumbs: np.ndarray,
    pairs: np.ndarray,
    tolerance: int = TOLERANCE,
    block: int = BLOCK,
    border: int = BORDER,
) -> np.ndarray:
    """For each pair (i, j) of rows of ``thumbs`` (n x side x side x 3, uint8), how much the two images
    differ where they differ most; 0 for identical pictures. Measured on the candidates of generated
    data with photo and drawn backgrounds (docs/dedupe.md): copies (resized, recompressed, cropped 2-4%
    per edge, brightness +-10%) stay under 0.21, another object on the same background lies above 0.57.

    Each image is normalized (less its mean grey, over its contrast: one standard deviation over all
    pixels and channels, so brightness and contrast changes cancel and colour changes do not). Each
    pixel of one image counts by how far it lies outside the other's range of values within
    ``tolerance`` pixels (Euclidean over the channels), in both directions, the larger counting; the
    result is the largest mean of that over ``block`` x ``block`` windows, ``border`` pixels in from
    the edges (what a crop removes on one side only)."""
    out = np.empty(len(pairs), dtype=np.float32)
    inner = slice(border, thumbs.shape[1] - border)
    for start in range(0, len(pairs), VERIFY_CHUNK):
        chunk = pairs[start : start + VERIFY_CHUNK]
        used, local = np.unique(chunk, return_inverse=True)
        a, b = local.reshape(chunk.shape).T
        raw = thumbs[used]
        flat = raw.reshape(len(raw), -1).astype(np.float32)
        mean = flat.mean(axis=1)[:, None, None, None]
        scale = 1 / (flat.std(axis=1) + 1.0)[:, None, None, None]  # + 1 grey level: flat images stay finite
        # Running min and max commute with the per-image affine normalization: take them on uint8.
        x, lo, hi = (
            np.multiply(np.subtract(v[:, inner, inner], mean, dtype=np.float32), scale, dtype=np.float32)
            for v in (raw, *_envelope(raw, tolerance))
        )
        d = None
        for p, q in ((a, b), (b, a)):
            # How far each pixel of p lies outside q's range [lo, hi] (at most one side is positive).
            e = x[p] - hi[q]
            np.maximum(e, lo[q] - x[p], out=e)
            np.maximum(e, 0, out=e)
            sq = np.einsum("...c,...c->...", e, e)
            d = sq if d is None else np.maximum(d, sq, out=d)
        out[start : start + len(chunk)] = _block_max(np.sqrt(d), block)
    return out
