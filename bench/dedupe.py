"""Dedupe benchmark: cropclean vs imagededup's PHash, and the hash grouping alone at 10^4..10^6.

Part 1 (images): the same generated dataset (with planted exact and near duplicates) goes through
  - cropclean: the ingest stages sources -> normalize -> dedupe on a local Ray instance (decode, EXIF,
    resize, re-encode and write blobs, pHash, LSH grouping), and
  - imagededup: PHash().find_duplicates(image_dir, recursive=True, max_distance_threshold=r)
    (decode, pHash, brute-force Cython search),
  timed side by side, with pair precision/recall against the ground truth.
Part 2 (grouping alone): random 64-bit hashes with planted near pairs (distance uniform in 1..r):
  LSH (single process and on Ray Data) vs exact all-pairs search; time, recall against exact search,
  and growth per 10x.

Run: ``make bench-dedupe`` or ``python bench/dedupe.py [--sizes 2000 10000] [--hashes 1e4 1e5 1e6]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import neardup  # noqa: E402
from pipeline.quality import duplicate_pair_scores, pairs_from_groups, true_duplicate_pairs  # noqa: E402


def synth(root: Path, n: int, seed: int) -> None:
    from pipeline.synth import synthesize

    if not (root / "ground_truth.parquet").exists():
        classes = 20
        synthesize(
            str(root), classes=classes, per_class=max(1, round(n / classes * 0.85)), noise=0.1, seed=seed
        )


def run_ours(data: Path, out: Path, radius: int) -> tuple[float, dict]:
    from pipeline.config import build_config
    from pipeline.runner import run_stages
    from pipeline.stages.dedupe import DedupeStage
    from pipeline.stages.normalize import NormalizeStage
    from pipeline.stages.sources import SourcesStage

    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(
        {"sources": [{"uri": str(data)}], "out": str(out)},
        preset="cpu-small",
        sets=[f"dedupe.radius={radius}"],
    )
    start = time.perf_counter()
    run_stages(cfg, [SourcesStage(), NormalizeStage(), DedupeStage()])
    seconds = time.perf_counter() - start
    from pipeline import manifests

    images = manifests.read_manifest("images", str(out / "stages" / "dedupe" / "images.parquet"))
    dups = manifests.read_manifest("duplicates", str(out / "manifests" / "duplicates.parquet"))
    gt = pd.read_parquet(data / "ground_truth.parquet")
    return seconds, duplicate_pair_scores(images, dups, gt)


def radius_sweep(data: Path, out: Path, radii: list[int]) -> list[dict]:
    """Pair precision/recall against ground truth when near duplicates are grouped at each radius
    (exact search over the normalized images' hashes, so only the radius varies)."""
    from pipeline import manifests
    from pipeline.stages.dedupe import group_duplicates

    images = manifests.read_manifest("images", str(out / "stages" / "normalize" / "images.parquet"))
    images["_order"] = np.arange(len(images))
    ok = images[images["status"] == "ok"].reset_index(drop=True)
    gt = pd.read_parquet(data / "ground_truth.parquet")
    uniq, inverse = np.unique(neardup.hex_to_u64(ok["phash"].tolist()), return_inverse=True)
    rows = []
    for r in radii:
        dups = group_duplicates(ok, neardup.exact_pairs(uniq, r), inverse, "largest")
        s = duplicate_pair_scores(images, dups, gt)
        rows.append({"radius": r, "precision": round(s["precision"], 4), "recall": round(s["recall"], 4)})
    return rows


def run_imagededup(data: Path, radius: int) -> tuple[float, dict]:
    import logging

    from imagededup.methods import PHash

    logging.getLogger("imagededup").setLevel(logging.ERROR)
    start = time.perf_counter()
    found = PHash(verbose=False).find_duplicates(
        image_dir=str(data / "images"), recursive=True, max_distance_threshold=radius
    )
    seconds = time.perf_counter() - start
    # Its answer is a neighbour list per file; groups are the connected components, as ours.
    keys = sorted(found)
    index = {k: i for i, k in enumerate(keys)}
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k, neighbours in found.items():
        for nb in neighbours:
            parent[root(index[k])] = root(index[nb])
    groups: dict[int, list[str]] = {}
    for k in keys:
        groups.setdefault(root(index[k]), []).append(f"images/{k}")
    groups = {g: m for g, m in groups.items() if len(m) > 1}
    gt = pd.read_parquet(data / "ground_truth.parquet")
    truth, got = true_duplicate_pairs(gt), pairs_from_groups({str(g): m for g, m in groups.items()})
    hit = len(truth & got)
    return seconds, {
        "true_pairs": len(truth),
        "found_pairs": len(got),
        "precision": hit / len(got) if got else 1.0,
        "recall": hit / len(truth) if truth else 1.0,
    }


def as_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, np.sort(pairs, axis=1).tolist()))


def bench_grouping(sizes: list[int], radius: int, tables: int, bits: int, ray_sizes: set[int]) -> list[dict]:
    rows = []
    exact_ns_per_pair = None
    for n in sizes:
        hashes, planted = neardup.planted_hashes(n, radius, seed=n)
        start = time.perf_counter()
        lsh = neardup.lsh_pairs(hashes, radius, tables, bits, seed=0)
        t_lsh = time.perf_counter() - start
        row = {"hashes": n, "lsh_s": round(t_lsh, 3), "lsh_pairs": len(lsh)}
        if n <= 100_000:
            start = time.perf_counter()
            exact = neardup.exact_pairs(hashes, radius)
            t_exact = time.perf_counter() - start
            exact_ns_per_pair = t_exact / (n * (n - 1) / 2) * 1e9
            row.update(
                exact_s=round(t_exact, 2),
                exact_pairs=len(exact),
                recall_vs_exact=round(len(as_set(lsh) & as_set(exact)) / max(1, len(exact)), 4),
            )
        elif exact_ns_per_pair:
            row["exact_s_extrapolated"] = round(exact_ns_per_pair * n * (n - 1) / 2 / 1e9, 0)
        row["recall_planted"] = round(len(as_set(lsh) & as_set(planted)) / len(planted), 4)
        if n in ray_sizes:
            row["ray_s"] = round(bench_ray_grouping(hashes, radius, tables, bits), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_ray_grouping(hashes: np.ndarray, radius: int, tables: int, bits: int) -> float:
    import tempfile

    from pipeline.config import DedupeConfig
    from pipeline.faults import FaultPlan
    from pipeline.stages.dedupe import near_pairs_on_ray

    cfg = DedupeConfig(radius=radius, lsh_tables=tables, lsh_bits=bits, partitions=8)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        near_pairs_on_ray(np.unique(hashes), cfg, tmp, FaultPlan())
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000])
    parser.add_argument("--hashes", type=float, nargs="*", default=[1e4, 1e5, 1e6])
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument(
        "--ray-max", type=float, default=1e5, help="largest hash count also grouped on Ray Data"
    )
    parser.add_argument("--work", default=str(REPO / "bench" / "out" / "dedupe"))
    args = parser.parse_args()
    import ray

    from pipeline.config import DedupeConfig
    from pipeline.runner import configure_ray_data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    configure_ray_data()
    defaults = DedupeConfig()
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, radius {args.radius}, LSH {defaults.lsh_tables} tables x "
        f"{defaults.lsh_bits} bits"
    )
    work = Path(args.work)
    results: dict = {"images": [], "grouping": []}
    for n in args.sizes:
        data = work / f"synth-{n}"
        synth(data, n, seed=n)
        files = len(pd.read_parquet(data / "ground_truth.parquet"))
        t_ours, s_ours = run_ours(data, work / f"ours-{n}", args.radius)
        t_peer, s_peer = run_imagededup(data, args.radius)
        row = {
            "images": files,
            "ours_s": round(t_ours, 1),
            "imagededup_s": round(t_peer, 1),
            "time_ratio_peer_over_ours": round(t_peer / t_ours, 2),
            "ours_precision": round(s_ours["precision"], 4),
            "ours_recall": round(s_ours["recall"], 4),
            "imagededup_precision": round(s_peer["precision"], 4),
            "imagededup_recall": round(s_peer["recall"], 4),
            "true_pairs": s_ours["true_pairs"],
        }
        results["images"].append(row)
        print(json.dumps(row), flush=True)
        if n == max(args.sizes):
            results["radius_sweep"] = radius_sweep(data, work / f"ours-{n}", [2, 4, 6, 8, 10, 12, 14, 16])
            for r in results["radius_sweep"]:
                print(json.dumps({"images": files, **r}), flush=True)
    sizes = [int(h) for h in args.hashes]
    results["grouping"] = bench_grouping(
        sizes,
        args.radius,
        defaults.lsh_tables,
        defaults.lsh_bits,
        ray_sizes={s for s in sizes if s <= args.ray_max},
    )
    g = results["grouping"]
    for a, b in itertools.pairwise(g):
        print(
            f"growth {a['hashes']:.0e} -> {b['hashes']:.0e}: LSH time x{b['lsh_s'] / a['lsh_s']:.1f} "
            f"(all-pairs would be x{(b['hashes'] / a['hashes']) ** 2:.0f})"
        )
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
