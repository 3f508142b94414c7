"""Stage ``dedupe``: exact and near duplicates grouped across the whole dataset.

Exact: same SHA-256 of the source bytes, or of the normalized pixels. Near: pHash within the radius,
found by LSH buckets (``pipeline.neardup``) grouped with a Ray Data groupby over bucket partitions;
each finished partition is a file, the unit of resume. Groups are connected components (union-find
over all edges). One image per group is kept; the others are rejected as duplicates, and train or val
copies of a test image leave the dataset as leakage.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import manifests, neardup, storage
from pipeline.config import DedupeConfig
from pipeline.faults import FaultPlan
from pipeline.reasons import Reason, Status
from pipeline.stages.base import Resources, RunContext, Stage, drain, finished_shards, shard_file
from pipeline.stages.normalize import images_uri as normalized_images_uri

DUP_COLUMNS = manifests.load_schema("duplicates").names


def images_uri(ctx: RunContext) -> str:
    return storage.join(ctx.stage_dir(DedupeStage.name), "images.parquet")


def emit_bucket_rows(
    batch: dict[str, np.ndarray], *, positions: np.ndarray, partitions: int, skip: frozenset[int]
) -> dict[str, np.ndarray]:
    """Ray Data map: each hash becomes one row per LSH table (its bucket key and partition)."""
    hashes = batch["hash"].astype(np.uint64)
    keys = neardup.bucket_keys(hashes, positions)
    tables = positions.shape[0]
    uid = np.tile(batch["uid"], tables)
    flat_keys = keys.ravel()
    part = neardup.partition_of(flat_keys, partitions)
    keep = ~np.isin(part, list(skip)) if skip else np.ones(part.size, dtype=bool)
    return {
        "part": part[keep],
        "key": flat_keys[keep],
        "uid": uid[keep],
        "hash": np.tile(hashes, tables)[keep],
    }


def pairs_for_partition(
    group: dict[str, np.ndarray], *, radius: int, shard_dir: str, faults: FaultPlan
) -> dict[str, np.ndarray]:
    """Ray Data map_groups: verified pairs of one bucket partition, written as that partition's file."""
    part = int(group["part"][0])
    faults.check(DedupeStage.name, part)
    pairs = neardup.unique_pairs(
        neardup.pairs_in_buckets(
            group["key"].astype(np.uint64), group["uid"], group["hash"].astype(np.uint64), radius
        )
    )
    table = pa.table({"a": pairs[:, 0], "b": pairs[:, 1]})
    manifests.write_table_atomic(table, shard_file(shard_dir, "pairs", part))
    return {"part": np.array([part]), "pairs": np.array([len(pairs)])}


def near_pairs_on_ray(
    uniq: np.ndarray, cfg: DedupeConfig, shard_dir: str, faults: FaultPlan
) -> tuple[np.ndarray, int]:
    """Pairs of indices into ``uniq`` within the radius, via a Ray Data groupby. Returns (pairs, reused)."""
    import ray

    done = finished_shards(shard_dir, "pairs")
    todo = [p for p in range(cfg.partitions) if p not in done]
    if todo and uniq.size:
        positions = neardup.sample_bits(cfg.lsh_tables, cfg.lsh_bits, cfg.lsh_seed)
        ds = ray.data.from_arrow(pa.table({"hash": uniq.view(np.int64), "uid": np.arange(uniq.size)}))
        ds = ds.map_batches(
            emit_bucket_rows,
            batch_format="numpy",
            fn_kwargs={"positions": positions, "partitions": cfg.partitions, "skip": frozenset(done)},
        )
        ds = ds.groupby("part", num_partitions=min(cfg.partitions, 64)).map_groups(
            pairs_for_partition,
            batch_format="numpy",
            fn_kwargs={"radius": cfg.radius, "shard_dir": shard_dir, "faults": faults},
        )
        drain(ds)
    # A partition that received no bucket rows got no map_groups call: it is complete and empty.
    empty = pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.int64())})
    for p in todo:
        if not storage.exists(shard_file(shard_dir, "pairs", p)):
            manifests.write_table_atomic(empty, shard_file(shard_dir, "pairs", p))
    tables = [manifests.read_table(shard_file(shard_dir, "pairs", p)) for p in range(cfg.partitions)]
    pairs = (
        np.concatenate([np.stack([t["a"].to_numpy(), t["b"].to_numpy()], axis=1) for t in tables])
        if tables
        else np.empty((0, 2), dtype=np.int64)
    )
    return neardup.unique_pairs(pairs.astype(np.int64)), len(done)


def _edges_by_equal(values: pd.Series) -> np.ndarray:
    """Edges linking consecutive rows that share a (non-null) value."""
    s = values.dropna()
    s = s[s.duplicated(keep=False)]
    if s.empty:
        return np.empty((0, 2), dtype=np.int64)
    order = s.sort_values(kind="stable")
    idx, vals = order.index.to_numpy(), order.to_numpy()
    same = vals[1:] == vals[:-1]
    return np.stack([idx[:-1][same], idx[1:][same]], axis=1).astype(np.int64)


def group_duplicates(
    ok: pd.DataFrame, near_pairs: np.ndarray, inverse: np.ndarray, keep: str
) -> pd.DataFrame:
    """Rows of the duplicates manifest (plus each row's ``split``) for the ok images in ``ok``.

    ``ok`` is indexed 0..n-1; ``inverse`` maps each row to its unique pHash, the index space of
    ``near_pairs``."""
    n = len(ok)
    # Map near pairs between unique hashes to one representative row each; equal hashes link by value.
    rep = np.full(inverse.max() + 1 if n else 0, -1, dtype=np.int64)
    rep[inverse[::-1]] = np.arange(n)[::-1]
    edges = [_edges_by_equal(ok["sha256"]), _edges_by_equal(ok["pixel_sha256"]), _edges_by_equal(ok["phash"])]
    if near_pairs.size:
        edges.append(np.stack([rep[near_pairs[:, 0]], rep[near_pairs[:, 1]]], axis=1))
    e = np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.int64)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    ok = ok.assign(_comp=comp)
    sizes = ok["_comp"].map(ok["_comp"].value_counts())
    dup = ok[sizes > 1].copy()
    if dup.empty:
        return pd.DataFrame(columns=[*DUP_COLUMNS, "split"])
    dup["_area"] = dup["orig_width"].astype("int64") * dup["orig_height"].astype("int64")
    dup["_is_test"] = dup["split"].eq("test")
    sort_cols = (
        ["_comp", "_is_test", "_area", "_order"] if keep == "largest" else ["_comp", "_is_test", "_order"]
    )
    ascending = [True, False, False, True] if keep == "largest" else [True, False, True]
    dup = dup.sort_values(sort_cols, ascending=ascending, kind="stable")
    kept = dup.groupby("_comp").head(1).set_index("_comp")
    dup["kept_id"] = dup["_comp"].map(kept["image_id"])
    dup["group_id"] = dup["_comp"].map(dup.groupby("_comp")["image_id"].min())
    kept_sha = dup["_comp"].map(kept["sha256"])
    kept_pix = dup["_comp"].map(kept["pixel_sha256"])
    dup["kind"] = np.where((dup["sha256"] == kept_sha) | (dup["pixel_sha256"] == kept_pix), "exact", "near")
    kept_hash = neardup.hex_to_u64(dup["_comp"].map(kept["phash"]).tolist())
    dup["distance"] = neardup.popcount(neardup.hex_to_u64(dup["phash"].tolist()) ^ kept_hash).astype(np.int32)
    dup["cross_label"] = dup["_comp"].map(dup.groupby("_comp")["label"].nunique(dropna=False) > 1)
    dup["cross_split"] = dup["_comp"].map(dup.groupby("_comp")["_is_test"].nunique() > 1)
    return dup.sort_values(["group_id", "image_id"])[[*DUP_COLUMNS, "split"]]


class DedupeStage(Stage):
    name = "dedupe"
    resources = Resources(cpus=1)
    config_sections: ClassVar[tuple[str, ...]] = ("dedupe",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg.dedupe
        images = manifests.read_manifest("images", normalized_images_uri(ctx))
        images["_order"] = np.arange(len(images))
        ok = images[images["status"] == Status.OK].reset_index(drop=True)
        stats: dict[str, Any] = {"searched": len(ok), "method": cfg.method}
        if not cfg.enabled or ok.empty:
            dups = group_duplicates(
                ok.iloc[:0], np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.int64), cfg.keep
            )
            stats["partitions_reused"] = 0
        else:
            uniq, inverse = np.unique(neardup.hex_to_u64(ok["phash"].tolist()), return_inverse=True)
            if cfg.method == "exact":
                pairs, reused = neardup.exact_pairs(uniq, cfg.radius), 0
            else:
                pairs, reused = near_pairs_on_ray(uniq, cfg, ctx.shard_dir(self.name), ctx.faults)
            dups = group_duplicates(ok, pairs, inverse, cfg.keep)
            stats["partitions_reused"] = reused
        manifests.write_manifest("duplicates", dups.drop(columns=["split"]), ctx.manifest("duplicates"))

        removed = dups[dups["image_id"] != dups["kept_id"]]
        leak = removed["cross_split"] & ~removed["split"].eq("test")
        reason = np.where(
            leak,
            Reason.DUPLICATE_OF_TEST,
            np.where(removed["kind"] == "exact", Reason.DUPLICATE_EXACT, Reason.DUPLICATE_NEAR),
        )
        detail = "duplicate of " + removed["kept_id"]
        upd = pd.DataFrame(
            {"reason": reason, "detail": detail.to_numpy()}, index=removed["image_id"].to_numpy()
        )
        hit = images["image_id"].isin(upd.index)
        images.loc[hit, "status"] = Status.REJECTED.value
        images.loc[hit, "reason"] = images.loc[hit, "image_id"].map(upd["reason"]).astype(str)
        images.loc[hit, "detail"] = images.loc[hit, "image_id"].map(upd["detail"])
        manifests.write_manifest("images", images.drop(columns=["_order"]), images_uri(ctx))
        stats.update(
            {
                "groups": int(dups["group_id"].nunique()) if len(dups) else 0,
                "in_groups": len(dups),
                "removed": len(removed),
                "exact_removed": int((removed["kind"] == "exact").sum()),
                "near_removed": int((removed["kind"] == "near").sum()),
                "cross_label_groups": int(dups.loc[dups["cross_label"], "group_id"].nunique())
                if len(dups)
                else 0,
                "cross_split_groups": int(dups.loc[dups["cross_split"], "group_id"].nunique())
                if len(dups)
                else 0,
                "test_leaks_removed": int(leak.sum()),
            }
        )
        return stats
