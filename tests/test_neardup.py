"""Near-duplicate search: the LSH kernel against exact search, and the Ray Data groupby path."""

from __future__ import annotations

import numpy as np

from pipeline import neardup
from pipeline.config import DedupeConfig
from pipeline.faults import FaultPlan


def as_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, np.sort(pairs, axis=1).tolist()))


def test_exact_pairs_matches_brute_force():
    hashes, _ = neardup.planted_hashes(600, 10, seed=3)
    dist = neardup.popcount(hashes[:, None] ^ hashes[None, :])
    a, b = np.nonzero(np.triu(dist <= 10, k=1))
    assert as_set(neardup.exact_pairs(hashes, 10, block=64)) == set(zip(a.tolist(), b.tolist(), strict=True))


def test_pairs_in_buckets_finds_all_close_pairs_sharing_a_key():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 20, size=400).astype(np.uint64)
    hashes = rng.integers(0, 2**64, size=400, dtype=np.uint64)
    hashes[200:] = hashes[:200] ^ np.uint64(0b111)  # distance 3 partners
    found = as_set(neardup.pairs_in_buckets(keys, np.arange(400), hashes, radius=3))
    dist = neardup.popcount(hashes[:, None] ^ hashes[None, :])
    same = keys[:, None] == keys[None, :]
    a, b = np.nonzero(np.triu(same & (dist <= 3), k=1))
    assert found == set(zip(a.tolist(), b.tolist(), strict=True))


def test_lsh_recall_against_exact_search_and_no_false_pairs():
    cfg = DedupeConfig()
    hashes, planted = neardup.planted_hashes(20_000, 10, seed=1)
    exact = as_set(neardup.exact_pairs(hashes, 10))
    lsh = neardup.lsh_pairs(hashes, 10, cfg.lsh_tables, cfg.lsh_bits)
    assert (neardup.popcount(hashes[lsh[:, 0]] ^ hashes[lsh[:, 1]]) <= 10).all()
    assert as_set(lsh) <= exact
    assert len(as_set(lsh) & exact) / len(exact) >= 0.95
    assert as_set(planted) <= exact


def test_ray_groupby_path_equals_single_process(ray_local, tmp_path):
    cfg = DedupeConfig(partitions=5)
    hashes, _ = neardup.planted_hashes(5_000, 10, seed=2)
    from pipeline.stages.dedupe import near_pairs_on_ray

    uniq = np.unique(hashes)
    pairs, reused = near_pairs_on_ray(uniq, cfg, str(tmp_path / "shards"), FaultPlan())
    assert reused == 0 and len(list((tmp_path / "shards").glob("pairs-*.parquet"))) == 5
    assert as_set(pairs) == as_set(
        neardup.lsh_pairs(uniq, cfg.radius, cfg.lsh_tables, cfg.lsh_bits, cfg.lsh_seed)
    )
    again, reused = near_pairs_on_ray(uniq, cfg, str(tmp_path / "shards"), FaultPlan())
    assert reused == 5 and as_set(again) == as_set(pairs)
