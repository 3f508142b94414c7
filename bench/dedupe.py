"""Dedupe benchmark: cropclean vs imagededup's PHash, and the hash grouping alone at 10^4..10^6.

Part 1 (images): the same generated dataset (with planted exact and near duplicates, and hard negatives:
other objects on the same background) goes through
  - cropclean: the ingest stages sources -> normalize -> dedupe on a local Ray instance (decode, EXIF,
    resize, re-encode and write blobs, pHash, LSH grouping, verification of every candidate pair on
    the normalized images), then the dedupe stage again with ``dedupe.verify=false`` (pHash alone), and
  - imagededup: PHash().find_duplicates(image_dir, recursive=True, max_distance_threshold=r)
    (decode, pHash, brute-force Cython search),
  timed side by side, with pair precision/recall against the ground truth (and recall per kind of
  copy), on drawn backgrounds and on real photographs (``--backgrounds``).
Part 2 (verification signals): on the candidate pairs of the largest datasets (pHash within r, exact
  search), each candidate second signal at the threshold that makes the fewest errors on the drawn
  backgrounds, applied unchanged to the photographs: how the one the stage uses was chosen. Among them
  the cosine of pooled features of a pretrained network (efficientnet_lite0 with its ImageNet weights),
  with the cost of its forward passes. ``--signals-only`` runs this part alone on the datasets a full
  run generated.
Part 3 (grouping alone): random 64-bit hashes with planted near pairs (distance uniform in 1..r):
  LSH (single process and on Ray Data) vs exact all-pairs search; time, recall against exact search,
  and growth per 10x.

Run: ``make bench-dedupe`` or ``python bench/dedupe.py [--sizes 2000 10000] [--backgrounds synthetic
real] [--hashes 1e4 1e5 1e6] [--signals-only]``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import neardup  # noqa: E402
from pipeline.config import RunConfig, build_config  # noqa: E402
from pipeline.evaluation.duplicates import (  # noqa: E402
    duplicate_pair_scores,
    found_duplicate_pairs,
    pairs_from_groups,
    true_duplicate_pairs,
)

if TYPE_CHECKING:
    import torch

COPY_KINDS = ("exact", "resized", "recompressed", "cropped", "brightness")


def synth(root: Path, n: int, seed: int, backgrounds: str) -> None:
    from pipeline.synth import synthesize

    if not (root / "ground_truth.parquet").exists():
        classes = 20
        per_class = max(1, round(n / classes * 0.85))
        synthesize(
            str(root), classes=classes, per_class=per_class, noise=0.1, seed=seed, backgrounds=backgrounds
        )


def _config(data: Path, out: Path, radius: int, verify: bool) -> RunConfig:
    sets = [f"dedupe.radius={radius}", f"dedupe.verify={'true' if verify else 'false'}"]
    return build_config({"sources": [{"uri": str(data)}], "out": str(out)}, preset="cpu-small", sets=sets)


def _stages() -> list:
    from pipeline.stages.dedupe import DedupeStage
    from pipeline.stages.normalize import NormalizeStage
    from pipeline.stages.sources import SourcesStage

    return [SourcesStage(), NormalizeStage(), DedupeStage()]


def score_run(data: Path, out: Path) -> dict:
    """Pair precision/recall of a finished run against the ground truth, and recall per kind of copy."""
    from pipeline import manifests

    images = manifests.read_manifest("images", str(out / "stages" / "dedupe" / "images.parquet"))
    dups = manifests.read_manifest("duplicates", str(out / "manifests" / "duplicates.parquet"))
    gt = pd.read_parquet(data / "ground_truth.parquet")
    scores = duplicate_pair_scores(images, dups, gt)
    found = found_duplicate_pairs(images, dups)
    # Recall per kind of copy: the pairs that hold a copy of that kind (exact, or a near variant).
    copy = gt.set_index("source_key")
    copy = copy["variant"].where(
        copy["kind"] == "near_duplicate", np.where(copy["kind"] == "exact_duplicate", "exact", None)
    )
    for name in COPY_KINDS:
        truth = {p for p in true_duplicate_pairs(gt) if name in (copy.get(p[0]), copy.get(p[1]))}
        scores[f"recall_{name}"] = len(truth & found) / len(truth) if truth else float("nan")
    hard = gt[gt["kind"] == "hard_negative"]
    sibling_pairs = {tuple(sorted(p)) for p in zip(hard["source_key"], hard["background_of"], strict=True)}
    scores["hard_negative_pairs_grouped"] = len(sibling_pairs & found)
    scores["hard_negative_pairs"] = len(sibling_pairs)
    return scores


def run_ours(data: Path, out: Path, radius: int) -> tuple[float, dict]:
    """Ingest from scratch (verification on): wall seconds, dedupe stage seconds and scores."""
    from pipeline.runner import run_stages

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = run_stages(_config(data, out, radius, verify=True), _stages())
    seconds = time.perf_counter() - start
    return seconds, {"dedupe_s": report.results["dedupe"].seconds, **score_run(data, out)}


def rerun_dedupe(data: Path, out: Path, radius: int, verify: bool) -> dict:
    """The dedupe stage again on the same normalized images (sources and normalize are reused)."""
    from pipeline.runner import run_stages

    report = run_stages(_config(data, out, radius, verify), _stages())
    assert report.ran == ["dedupe"], report.ran
    return {"dedupe_s": report.results["dedupe"].seconds, **score_run(data, out)}


def _normalized_ok(out: Path) -> pd.DataFrame:
    from pipeline import manifests

    images = manifests.read_manifest("images", str(out / "stages" / "normalize" / "images.parquet"))
    images["_order"] = np.arange(len(images))
    return images[images["status"] == "ok"].reset_index(drop=True)


def radius_sweep(data: Path, out: Path, radii: list[int]) -> list[dict]:
    """Pair precision/recall against ground truth when near duplicates are grouped at each radius, with
    and without verification (exact search over the normalized images' hashes, so only the radius
    varies)."""
    from pipeline import manifests
    from pipeline.config import DedupeConfig
    from pipeline.stages.dedupe import group_duplicates, verify_candidates

    images = manifests.read_manifest("images", str(out / "stages" / "normalize" / "images.parquet"))
    ok = _normalized_ok(out)
    gt = pd.read_parquet(data / "ground_truth.parquet")
    uniq, inverse = np.unique(neardup.hex_to_u64(ok["phash"].tolist()), return_inverse=True)
    max_diff = DedupeConfig().verify_max_diff
    rows = []
    for r in radii:
        row: dict = {"radius": r}
        pairs = neardup.exact_pairs(uniq, r)
        for name, where in (("phash", None), ("verified", str(out))):
            checked = verify_candidates(ok, inverse, pairs, where, max_diff)
            dups = group_duplicates(ok, checked.confirmed, "largest", checked.verifier, r, max_diff)
            s = duplicate_pair_scores(images, dups, gt)
            row.update(
                {f"{name}_precision": round(s["precision"], 4), f"{name}_recall": round(s["recall"], 4)}
            )
        rows.append(row)
    return rows


def _signal_pairs(data: Path, out: Path, radius: int) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The candidate pairs of distinct pictures (pHash within ``radius``, exact search) with their truth,
    and the normalized images (blob bytes by row) they need."""
    from pipeline.stages.dedupe import Pictures, candidate_pairs

    ok = _normalized_ok(out)
    uniq, inverse = np.unique(neardup.hex_to_u64(ok["phash"].tolist()), return_inverse=True)
    pictures = Pictures.of(ok, inverse)
    cand = candidate_pairs(pictures, neardup.exact_pairs(uniq, radius))
    rows = pictures.rows[cand]
    keys = ok["source_key"].to_numpy()
    truth = true_duplicate_pairs(pd.read_parquet(data / "ground_truth.parquet"))
    frame = pd.DataFrame({"a": rows[:, 0], "b": rows[:, 1]})
    frame["true"] = [tuple(sorted((keys[a], keys[b]))) in truth for a, b in rows]
    frame["phash"] = neardup.popcount(
        neardup.hex_to_u64(ok["phash"].to_numpy()[rows[:, 0]].tolist())
        ^ neardup.hex_to_u64(ok["phash"].to_numpy()[rows[:, 1]].tolist())
    )
    blobs = {r: (out / ok["path"][r]).read_bytes() for r in np.unique(rows)}
    return frame, blobs


FEATURE_ARCH = "efficientnet_lite0"
FEATURE_SIDES = (128, 224)  # 128: the normalized blobs' short side (cpu-small); 224: the trunk's own
FEATURE_BATCH = 64


def _feature_signal(side: int) -> str:
    return f"pooled {FEATURE_ARCH} features, {side} px (cosine)"


@functools.cache
def _feature_trunk() -> torch.nn.Module:
    """The zoo member's trunk (the layers before global pooling and the head) with its installed ImageNet
    weights, in evaluation mode."""
    from pipeline.models.zoo import build_model

    return build_model(FEATURE_ARCH, classes=1000, weights="DEFAULT").trunk.eval()


def pooled_features(blobs: dict[int, bytes], side: int) -> tuple[dict[int, np.ndarray], dict]:
    """Each blob squashed to ``side`` x ``side`` (bilinear, as the pipeline's evaluation decodes them),
    normalized as the zoo's members expect, through the trunk in batches of ``FEATURE_BATCH``, averaged
    over the feature map and scaled to unit length; with the seconds spent decoding and in the trunk."""
    import io

    import torch
    from PIL import Image

    from pipeline.models.data import normalize

    trunk = _feature_trunk()
    rows = list(blobs)
    start = time.perf_counter()
    pixels = np.stack(
        [
            np.asarray(
                Image.open(io.BytesIO(blobs[r]))
                .convert("RGB")
                .resize((side, side), Image.Resampling.BILINEAR)
            )
            for r in rows
        ]
    )
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    vectors = []
    with torch.no_grad():
        for i in range(0, len(rows), FEATURE_BATCH):
            fmap = trunk(normalize(images[i : i + FEATURE_BATCH]))
            vectors.append(torch.nn.functional.normalize(fmap.mean(dim=(2, 3)), dim=1))
    forward_s = time.perf_counter() - start
    feats = torch.cat(vectors).numpy() if vectors else np.zeros((0, 0), np.float32)
    cost = {
        "images": len(rows),
        "decode_s": round(decode_s, 2),
        "forward_s": round(forward_s, 2),
        "images_per_s": round(len(rows) / max(forward_s, 1e-9), 1),
        "threads": torch.get_num_threads(),
    }
    return dict(zip(rows, feats, strict=True)), cost


def _signals(frame: pd.DataFrame, blobs: dict[int, bytes]) -> pd.DataFrame:
    """Candidate second signals per pair on the normalized blobs, each oriented so that larger means more
    alike; ``attrs["cost"]`` holds the seconds of the network's signals and of the stage's check."""
    import io

    import imagehash
    from PIL import Image
    from skimage.metrics import structural_similarity

    def grey(im: Image.Image, side: int) -> np.ndarray:
        return np.asarray(im.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.float64)

    def ncc(x: np.ndarray, y: np.ndarray) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-9))

    images = {r: Image.open(io.BytesIO(data)).convert("RGB") for r, data in blobs.items()}
    hashes = {
        r: (imagehash.dhash(im), imagehash.whash(im), imagehash.colorhash(im)) for r, im in images.items()
    }
    start = time.perf_counter()
    thumbs = {r: neardup.thumbnail(data) for r, data in blobs.items()}
    thumbnails_s = time.perf_counter() - start
    out = frame.copy()
    out["pHash alone"] = 0.0
    out["dHash + wHash + colour hash"] = [
        -max(hashes[a][0] - hashes[b][0], hashes[a][1] - hashes[b][1], 4 * (hashes[a][2] - hashes[b][2]))
        for a, b in zip(frame["a"], frame["b"], strict=True)
    ]
    out["NCC, grey 16 px"] = [
        ncc(grey(images[a], 16), grey(images[b], 16)) for a, b in zip(frame["a"], frame["b"], strict=True)
    ]
    out["SSIM, grey 32 px"] = [
        structural_similarity(grey(images[a], 32), grey(images[b], 32), data_range=255)
        for a, b in zip(frame["a"], frame["b"], strict=True)
    ]
    index = {r: i for i, r in enumerate(thumbs)}
    stack = np.stack(list(thumbs.values()))
    pairs = np.array([(index[a], index[b]) for a, b in zip(frame["a"], frame["b"], strict=True)]).reshape(
        -1, 2
    )
    start = time.perf_counter()
    out["local difference (the stage's)"] = -neardup.local_difference(stack, pairs)
    cost = {
        "local difference (the stage's)": {
            "images": len(blobs),
            "thumbnails_s": round(thumbnails_s, 3),
            "pairs_s": round(time.perf_counter() - start, 3),
        }
    }
    for side in FEATURE_SIDES:
        feats, cost[_feature_signal(side)] = pooled_features(blobs, side)
        out[_feature_signal(side)] = [
            float(feats[a] @ feats[b]) for a, b in zip(frame["a"], frame["b"], strict=True)
        ]
    out.attrs["cost"] = cost
    return out


SIGNALS = (
    "pHash alone",
    "dHash + wHash + colour hash",
    "NCC, grey 16 px",
    "SSIM, grey 32 px",
    "local difference (the stage's)",
    *(_feature_signal(side) for side in FEATURE_SIDES),
)


def signal_table(tune: tuple[Path, Path], test: list[tuple[str, Path, Path]], radius: int) -> list[dict]:
    """Each second signal at the middle of the thresholds with the fewest errors on ``tune``'s candidate
    pairs, and its precision/recall there and on each dataset of ``test`` (threshold unchanged)."""
    tuned = _signals(*_signal_pairs(tune[0], tune[1], radius))
    tests = [(name, _signals(*_signal_pairs(data, out, radius))) for name, data, out in test]
    rows = []
    for sig in SIGNALS:
        v, t = tuned[sig].to_numpy(), tuned["true"].to_numpy()
        cands = np.unique(v)
        errors = np.array([((v >= c) & ~t).sum() + ((v < c) & t).sum() for c in cands])
        # Every threshold in (cands[i - 1], cands[j]] makes the fewest errors, for the first run i..j of
        # minima: take the middle, as one would pick an operating point.
        i = int(np.argmin(errors))
        j = i
        while j + 1 < len(cands) and errors[j + 1] == errors[i]:
            j += 1
        thr = (cands[i - 1] + cands[j]) / 2 if i > 0 else cands[j]
        row: dict = {
            "signal": sig,
            "threshold": round(float(-thr if "difference" in sig or "Hash +" in sig else thr), 3),
        }
        for name, frame in [("tuned", tuned), *tests]:
            keep = frame[sig].to_numpy() >= thr
            true = frame["true"].to_numpy()
            row[f"{name}_precision"] = round(float((keep & true).sum() / max(1, keep.sum())), 4)
            row[f"{name}_recall"] = round(float((keep & true).sum() / max(1, true.sum())), 4)
            row[f"{name}_pairs"] = f"{int(true.sum())} true of {len(true)}"
            if sig in frame.attrs.get("cost", {}):
                row[f"{name}_cost"] = frame.attrs["cost"][sig]
        rows.append(row)
        print(json.dumps(row), flush=True)
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


def signals_only(work: Path, n: int, backgrounds: list[str], radius: int) -> int:
    """Part 2 alone on the generated data and normalized images of an earlier full run (no Ray: only the
    normalize manifests and blobs are read); its rows replace ``signals`` in ``results.json``."""
    largest: dict[str, tuple[Path, Path]] = {}
    for b in backgrounds:
        tag = f"{n}" if b == "synthetic" else f"{n}-{b}"
        data, out = work / f"synth-{tag}", work / f"ours-{tag}"
        missing = [
            p
            for p in (data / "ground_truth.parquet", out / "stages" / "normalize" / "images.parquet")
            if not p.exists()
        ]
        if missing:
            print(
                f"--signals-only: {missing[0]} is missing; run the benchmark without it first",
                file=sys.stderr,
            )
            return 2
        largest[b] = (data, out)
    if "synthetic" not in largest:
        print(
            "--signals-only: thresholds are tuned on the drawn backgrounds; include synthetic",
            file=sys.stderr,
        )
        return 2
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, radius {radius}, signals on {n} images"
    )
    test = [(b, *largest[b]) for b in largest if b != "synthetic"]
    rows = signal_table(largest["synthetic"], test, radius)
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["signals"] = rows
    path.write_text(json.dumps(results, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000])
    parser.add_argument(
        "--backgrounds", nargs="*", default=["synthetic", "real"], choices=["synthetic", "real"]
    )
    parser.add_argument("--hashes", type=float, nargs="*", default=[1e4, 1e5, 1e6])
    parser.add_argument("--radius", type=int, default=10)
    parser.add_argument(
        "--ray-max", type=float, default=1e5, help="largest hash count also grouped on Ray Data"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip imagededup")
    parser.add_argument("--work", default=str(REPO / "bench" / "out" / "dedupe"))
    parser.add_argument(
        "--signals-only",
        action="store_true",
        help="only part 2 (verification signals), on the largest datasets a full run left in --work",
    )
    args = parser.parse_args()
    if args.signals_only:
        return signals_only(Path(args.work), max(args.sizes), args.backgrounds, args.radius)
    import ray

    from pipeline.config import DedupeConfig
    from pipeline.runner import configure_ray_data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    configure_ray_data()
    defaults = DedupeConfig()
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}, radius {args.radius}, LSH {defaults.lsh_tables} tables x "
        f"{defaults.lsh_bits} bits, verify_max_diff {defaults.verify_max_diff}"
    )
    work = Path(args.work)
    results: dict = {"images": [], "grouping": []}
    largest: dict[str, tuple[Path, Path]] = {}
    for backgrounds, n in itertools.product(args.backgrounds, args.sizes):
        tag = f"{n}" if backgrounds == "synthetic" else f"{n}-{backgrounds}"
        data = work / f"synth-{tag}"
        synth(data, n, seed=n, backgrounds=backgrounds)
        gt = pd.read_parquet(data / "ground_truth.parquet")
        out = work / f"ours-{tag}"
        t_ours, s_ours = run_ours(data, out, args.radius)
        s_phash = rerun_dedupe(data, out, args.radius, verify=False)
        t_peer, s_peer = run_imagededup(data, args.radius) if not args.no_peer else (float("nan"), {})
        row = {
            "backgrounds": backgrounds,
            "images": len(gt),
            "true_pairs": s_ours["true_pairs"],
            "hard_negative_pairs": s_ours["hard_negative_pairs"],
            "ours_s": round(t_ours, 1),
            "imagededup_s": round(t_peer, 1),
            "time_ratio_peer_over_ours": round(t_peer / t_ours, 2),
            "dedupe_stage_s": round(s_ours["dedupe_s"], 2),
            "dedupe_stage_phash_only_s": round(s_phash["dedupe_s"], 2),
        }
        for name, s in (("ours", s_ours), ("phash_only", s_phash), ("imagededup", s_peer)):
            row[f"{name}_precision"] = round(s.get("precision", float("nan")), 4)
            row[f"{name}_recall"] = round(s.get("recall", float("nan")), 4)
        for name, s in (("ours", s_ours), ("phash_only", s_phash)):
            row[f"{name}_hard_negatives_grouped"] = s["hard_negative_pairs_grouped"]
            row[f"{name}_recall_by_kind"] = {k: round(s[f"recall_{k}"], 4) for k in COPY_KINDS}
        results["images"].append(row)
        print(json.dumps(row), flush=True)
        if n == max(args.sizes):
            largest[backgrounds] = (data, out)
            sweep = radius_sweep(data, out, [2, 4, 6, 8, 10, 12, 14, 16])
            results.setdefault("radius_sweep", {})[backgrounds] = sweep
            for r in sweep:
                print(json.dumps({"backgrounds": backgrounds, "images": len(gt), **r}), flush=True)
    if "synthetic" in largest:
        test = [(b, *largest[b]) for b in largest if b != "synthetic"]
        results["signals"] = signal_table(largest["synthetic"], test, args.radius)
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
