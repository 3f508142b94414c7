"""Near-duplicate search: the LSH kernel against exact search, and the Ray Data groupby path."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import neardup
from pipeline.config import DedupeConfig
from pipeline.faults import FaultPlan
from pipeline.resume import KeyedFolder


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
    pairs, reused = near_pairs_on_ray(uniq, cfg, KeyedFolder(str(tmp_path / "shards"), "k"), FaultPlan())
    assert reused == 0 and len(list((tmp_path / "shards").glob("pairs-*.parquet"))) == 5
    assert as_set(pairs) == as_set(
        neardup.lsh_pairs(uniq, cfg.radius, cfg.lsh_tables, cfg.lsh_bits, cfg.lsh_seed)
    )
    again, reused = near_pairs_on_ray(uniq, cfg, KeyedFolder(str(tmp_path / "shards"), "k"), FaultPlan())
    assert reused == 5 and as_set(again) == as_set(pairs)


def test_local_search_writes_the_partitions_the_ray_search_writes(ray_local, tmp_path):
    from pipeline.stages.dedupe import near_pairs_local, near_pairs_on_ray

    cfg = DedupeConfig(partitions=5)
    uniq = np.unique(neardup.planted_hashes(5_000, 10, seed=4)[0])
    on_ray, _ = near_pairs_on_ray(uniq, cfg, KeyedFolder(str(tmp_path / "ray"), "k"), FaultPlan())
    local, reused = near_pairs_local(uniq, cfg, KeyedFolder(str(tmp_path / "local"), "k"), FaultPlan())
    assert reused == 0 and as_set(local) == as_set(on_ray)
    for part in range(5):
        name = f"pairs-{part:06d}.parquet"
        assert as_set(
            np.array(pq.read_table(tmp_path / "local" / name).to_pandas()).reshape(-1, 2)
        ) == as_set(np.array(pq.read_table(tmp_path / "ray" / name).to_pandas()).reshape(-1, 2))
    (tmp_path / "local" / "pairs-000003.parquet").unlink()
    again, reused = near_pairs_local(uniq, cfg, KeyedFolder(str(tmp_path / "local"), "k"), FaultPlan())
    assert reused == 4 and as_set(again) == as_set(local)


# ---------------------------------------------------------------------------------------------------
# Verification of candidate pairs on the images


def _thumb(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return neardup.thumbnail(buf.getvalue())


def test_local_difference_ignores_brightness_and_a_pixel_of_shift_not_a_patch():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
        (160, 128), Image.BICUBIC
    )
    brighter = Image.eval(base, lambda v: min(255, int(v * 1.1)))
    shifted = base.crop((3, 0, 160, 128)).resize((160, 128), Image.LANCZOS)  # 2% off one edge
    patched = base.copy()
    patched.paste((250, 20, 200), (60, 50, 90, 80))  # an object a fifth of the short side
    thumbs = np.stack([_thumb(im) for im in (base, brighter, shifted, patched)])
    d = neardup.local_difference(thumbs, np.array([[0, 0], [0, 1], [1, 0], [0, 2], [0, 3], [3, 0]]))
    assert d[0] == 0 and d[1] == d[2]  # the same picture; symmetric
    assert d[1] < 0.2 and d[3] < 0.2 and min(d[4], d[5]) > 1.0
    flat = np.stack([np.full((48, 48, 3), c, np.uint8) for c in ((200, 40, 40), (40, 40, 200))])
    assert neardup.local_difference(flat, np.array([[0, 1]]))[0] > 1.0  # colour counts, not only grey


@pytest.mark.parametrize("backgrounds", ["real", "synthetic"])
def test_verification_keeps_every_kind_of_copy_and_refutes_another_object(tmp_path, backgrounds):
    """Copies made at the far end of each of the generator's ranges stay within the threshold on the
    normalized images; another object on the same background (or an overlapping crop of it) does not."""
    from pipeline.imaging import NormalizeParams, normalize_bytes
    from pipeline.synth import synthesize

    synthesize(str(tmp_path), classes=4, per_class=10, seed=5, backgrounds=backgrounds, hard_negatives=0.5)
    truth = pq.read_table(tmp_path / "ground_truth.parquet").to_pandas()
    params = NormalizeParams(min_side=64, target_side=128)  # the cpu-small preset's blobs

    def blob(img: Image.Image, quality: int = 90) -> np.ndarray:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=quality)
        return neardup.thumbnail(normalize_bytes(buf.getvalue(), params).jpeg)

    def copies(img: Image.Image) -> list[np.ndarray]:
        w, h = img.size
        return [
            blob(img.resize((w // 2, h // 2), Image.LANCZOS)),
            blob(img, quality=30),
            blob(img.crop((round(0.04 * w), round(0.04 * h), w - round(0.04 * w), h - round(0.04 * h)))),
            blob(Image.eval(img, lambda v: min(255, round(v * 1.1)))),
            blob(Image.eval(img, lambda v: round(v * 0.9))),
            blob(img.crop((round(0.04 * w), 0, w, h - round(0.04 * h)))),  # a crop on two sides only
        ]

    clean = truth.loc[truth["kind"] == "clean", "source_key"].head(8)
    same, other = [], []
    for key in clean:
        img = Image.open(tmp_path / key)
        same += [np.stack([blob(img), c]) for c in copies(img)]
    hard = truth[truth["kind"] == "hard_negative"]
    assert set(hard["variant"]) == {"same_background", "overlapping_crop"} and len(hard) >= 8
    for key, orig in zip(hard["source_key"], hard["background_of"], strict=True):
        other.append(np.stack([blob(Image.open(tmp_path / orig)), blob(Image.open(tmp_path / key))]))
    max_diff = DedupeConfig().verify_max_diff
    for pairs, keep in ((same, True), (other, False)):
        thumbs = np.concatenate(pairs)
        d = neardup.local_difference(thumbs, np.arange(len(thumbs)).reshape(-1, 2))
        assert ((d <= max_diff) == keep).all(), (keep, np.round(d, 3))
