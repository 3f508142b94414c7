"""Stage ``dedupe``: exact and near duplicates grouped across the whole dataset.

Exact: same SHA-256 of the source bytes, or of the normalized pixels. Near: pHash within the radius,
found by LSH buckets (``pipeline.neardup``) grouped with a Ray Data groupby over bucket partitions;
each finished partition is a file, the unit of resume. A pHash pair is only a candidate: each one is
confirmed on the two normalized images (``neardup.local_difference`` on thumbnails read from the blobs)
before it becomes an edge, because pHash mostly sees the background that photos of different objects
in one scene share. Groups are connected components (union-find over exact and confirmed edges only),
and so are the label and split conflicts. One image per group is kept; the others are rejected as
duplicates, and train or val copies of a test image leave the dataset as leakage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import manifests, neardup, storage
from pipeline.config import DedupeConfig
from pipeline.faults import FaultPlan
from pipeline.reasons import Reason, Status
from pipeline.resume import KeyedFolder
from pipeline.stages.base import RunContext, Stage, StageResult, drain

DUP_COLUMNS = manifests.load_schema("duplicates").names
log = logging.getLogger("cropclean")

# Near candidates between two pHash values compare at most this many distinct pictures of each value,
# and one value's own pictures are compared all with all up to this many (then each with the first and
# the next): a placeholder served in a thousand variants costs a few thousand comparisons, not 10^6.
MAX_PICTURES_PER_HASH = 8
SCORE_CHUNK = 32  # candidate pairs per task at least (a Ray task costs about as much as 30 pairs)
# Up to this many blobs to read, the driver reads and scores them (Ray tasks cost more than they save at
# 10^4 images: about 0.3 s of one core for 700 blobs); beyond, Ray tasks do, about two per CPU.
LOCAL_BLOBS_MAX = 20_000
# Up to this many distinct pHashes, the driver searches the LSH buckets itself, partition by partition,
# writing the same partition files (so resume works alike): a Ray Data groupby costs about 10x the
# kernel on one machine (docs/benchmarks.md), 0.4 s of the stage at 10^4 images, and pays only across
# nodes. Bucket rows take 28 bytes per hash and table: 90 MB at this size.
LOCAL_SEARCH_MAX = 50_000

VERIFIED_BY_BYTES = "bytes"
VERIFIED_BY_PIXELS = "pixels"
VERIFIED_BY_THUMBNAIL = "thumbnail"
VERIFIED_BY_PHASH = "phash"
VERIFIED_BY_CHAIN = "chain"


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
    group: dict[str, np.ndarray], *, radius: int, parts: KeyedFolder, faults: FaultPlan
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
    manifests.write_table_atomic(table, parts.part("pairs", part))
    return {"part": np.array([part]), "pairs": np.array([len(pairs)])}


def near_pairs_on_ray(
    uniq: np.ndarray, cfg: DedupeConfig, parts: KeyedFolder, faults: FaultPlan
) -> tuple[np.ndarray, int]:
    """Pairs of indices into ``uniq`` within the radius, via a Ray Data groupby. Returns (pairs, reused)."""
    import ray

    done = parts.finished("pairs")
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
            fn_kwargs={"radius": cfg.radius, "parts": parts, "faults": faults},
        )
        drain(ds)
    # A partition that received no bucket rows got no map_groups call: it is complete and empty.
    return _collect_partitions(cfg, todo, parts), len(done)


def near_pairs_local(
    uniq: np.ndarray, cfg: DedupeConfig, parts: KeyedFolder, faults: FaultPlan
) -> tuple[np.ndarray, int]:
    """What ``near_pairs_on_ray`` does, on the driver: the same bucket rows, partitions, kernel and
    partition files (each the unit of resume), without the shuffle. Returns (pairs, reused)."""
    done = parts.finished("pairs")
    todo = [p for p in range(cfg.partitions) if p not in done]
    if todo and uniq.size:
        positions = neardup.sample_bits(cfg.lsh_tables, cfg.lsh_bits, cfg.lsh_seed)
        rows = emit_bucket_rows(
            {"hash": uniq.view(np.int64), "uid": np.arange(uniq.size)},
            positions=positions,
            partitions=cfg.partitions,
            skip=frozenset(done),
        )
        order = np.argsort(rows["part"], kind="stable")
        part_of = rows["part"][order]
        for p in todo:
            lo, hi = np.searchsorted(part_of, [p, p + 1])
            take = order[lo:hi]
            group = {k: v[take] for k, v in rows.items()}
            if take.size:
                pairs_for_partition(group, radius=cfg.radius, parts=parts, faults=faults)
    return _collect_partitions(cfg, todo, parts), len(done)


def _collect_partitions(cfg: DedupeConfig, todo: list[int], parts: KeyedFolder) -> np.ndarray:
    """The pairs of every partition file; partitions in ``todo`` without one got no bucket rows and are
    complete and empty (written now)."""
    empty = pa.table({"a": pa.array([], pa.int64()), "b": pa.array([], pa.int64())})
    for p in todo:
        if not storage.exists(parts.part("pairs", p)):
            manifests.write_table_atomic(empty, parts.part("pairs", p))
    tables = [manifests.read_table(parts.part("pairs", p)) for p in range(cfg.partitions)]
    pairs = (
        np.concatenate([np.stack([t["a"].to_numpy(), t["b"].to_numpy()], axis=1) for t in tables])
        if tables
        else np.empty((0, 2), dtype=np.int64)
    )
    return neardup.unique_pairs(pairs.astype(np.int64))


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


def picture_keys(ok: pd.DataFrame) -> pd.Series:
    """One key per distinct picture: the normalized pixels' SHA-256 (the image id where it is missing)."""
    return ok["pixel_sha256"].fillna("id:" + ok["image_id"].astype(str))


@dataclass
class Pictures:
    """The distinct pictures among the ok images: ``keys`` (pixel keys), ``rows`` (the first row of
    ``ok`` showing each) and ``hash_index`` (each picture's unique pHash, the index space of the LSH
    pairs)."""

    keys: np.ndarray
    rows: np.ndarray
    hash_index: np.ndarray

    @classmethod
    def of(cls, ok: pd.DataFrame, inverse: np.ndarray) -> Pictures:
        codes, keys = pd.factorize(picture_keys(ok))
        rows = np.full(len(keys), -1, dtype=np.int64)
        rows[codes[::-1]] = np.arange(len(ok))[::-1]  # first row of each picture
        return cls(np.asarray(keys, dtype=object), rows, np.asarray(inverse)[rows].astype(np.int64))


def _all_pairs(members: np.ndarray) -> np.ndarray:
    """Pairs among ``members``: all of them for a few, else each with the first and with the next."""
    k = len(members)
    if k <= MAX_PICTURES_PER_HASH:
        a, b = np.triu_indices(k, 1)
    else:
        a = np.concatenate([np.zeros(k - 1, dtype=np.int64), np.arange(1, k - 1)])
        b = np.concatenate([np.arange(1, k), np.arange(2, k)])
    return np.stack([members[a], members[b]], axis=1)


def candidate_pairs(pictures: Pictures, near_pairs: np.ndarray) -> np.ndarray:
    """Pairs of distinct pictures (indices into ``pictures``, a < b) whose pHashes are equal or form one
    of ``near_pairs`` (pairs of unique-hash indices): what verification has to confirm."""
    n = len(pictures.rows)
    order = np.argsort(pictures.hash_index, kind="stable")
    hashes = pictures.hash_index[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    counts = np.diff(np.r_[starts, n])
    found = [np.empty((0, 2), dtype=np.int64)]
    # Pictures that share one pHash value.
    for s, c in zip(starts[counts > 1], counts[counts > 1], strict=True):
        found.append(_all_pairs(order[s : s + c]))
    if near_pairs.size:
        # Near pairs of hash values: the (first few) pictures of one against those of the other.
        first = np.full(int(hashes.max()) + 1 if n else 0, -1, dtype=np.int64)
        size = np.zeros_like(first)
        first[hashes[starts]], size[hashes[starts]] = starts, counts
        u, v = near_pairs[:, 0].astype(np.int64), near_pairs[:, 1].astype(np.int64)
        keep = (u < len(first)) & (v < len(first))
        u, v = u[keep], v[keep]
        keep = (first[u] >= 0) & (first[v] >= 0)
        u, v = u[keep], v[keep]
        single = (size[u] == 1) & (size[v] == 1)
        found.append(np.stack([order[first[u[single]]], order[first[v[single]]]], axis=1))
        for x, y in zip(u[~single], v[~single], strict=True):
            xs = order[first[x] : first[x] + min(size[x], MAX_PICTURES_PER_HASH)]
            ys = order[first[y] : first[y] + min(size[y], MAX_PICTURES_PER_HASH)]
            found.append(np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2))
    pairs = np.concatenate(found)
    pairs = np.stack([pairs.min(axis=1), pairs.max(axis=1)], axis=1)
    return neardup.unique_pairs(pairs[pairs[:, 0] != pairs[:, 1]])


# ---------------------------------------------------------------------------------------------------
# Verification on the normalized blobs

Failure = tuple[str, str, str]  # (status, reason, detail) of an image whose blob cannot be used


def blob_reader(out: str) -> Callable[[str], bytes]:
    """A function reading a blob by its path relative to ``out`` (which ``storage.join`` confines). On a
    local disk a plain ``open``: fsspec's local ``cat_file`` costs ten times as much per small file."""
    fs, root = storage.get_fs(out)
    if isinstance(fs, LocalFileSystem):

        def read_local(path: str) -> bytes:
            with open(storage.join(root, path), "rb") as f:
                return f.read()

        return read_local
    return lambda path: fs.cat_file(storage.join(root, path))


def read_thumbnail(read: Callable[[str], bytes], path: Any) -> tuple[np.ndarray | None, Failure | None]:
    """One blob's thumbnail, or why there is none; never raises."""
    try:
        if not isinstance(path, str) or not path:
            raise OSError("no normalized image path")
        data = read(path)
    except (OSError, ValueError) as exc:  # missing, unreadable, or a path that would leave the run
        return None, (Status.FAILED.value, Reason.READ_ERROR.value, f"dedupe: normalized image: {exc}"[:300])
    try:
        return neardup.thumbnail(data), None
    # Any decoder error on a tampered blob (Pillow raises many kinds) is a reason, never a crash.
    except Exception as exc:
        detail = f"dedupe: normalized image does not decode: {type(exc).__name__}: {exc}"[:300]
        return None, (Status.REJECTED.value, Reason.DECODE_ERROR.value, detail)


def score_chunk(out: str, paths: list[Any], pairs: np.ndarray) -> tuple[np.ndarray, list[Failure | None]]:
    """Read the blobs at ``paths`` (relative to ``out``) and score ``pairs`` (indices into ``paths``)
    with ``neardup.local_difference``: the scores (NaN where a blob could not be used) and, per path,
    why not (or None). Runs as a Ray task."""
    read = blob_reader(out)
    side = neardup.THUMB_SIDE
    thumbs = np.zeros((len(paths), side, side, 3), dtype=np.uint8)
    failed: list[Failure | None] = []
    for i, path in enumerate(paths):
        thumb, why = read_thumbnail(read, path)
        if thumb is not None:
            thumbs[i] = thumb
        failed.append(why)
    scores = neardup.local_difference(thumbs, pairs) if len(pairs) else np.empty(0, np.float32)
    bad = np.array([w is not None for w in failed], dtype=bool)
    scores[bad[pairs[:, 0]] | bad[pairs[:, 1]]] = np.nan
    return scores, failed


def _chunks(pairs: np.ndarray, n: int) -> list[np.ndarray]:
    """Row indices of ``pairs`` cut into chunks of about ``n``, each connected set of pairs kept together
    as far as the size allows, so that few blobs are read by two tasks."""
    nodes, inv = np.unique(pairs, return_inverse=True)
    inv = inv.reshape(pairs.shape)
    graph = coo_matrix((np.ones(len(pairs)), (inv[:, 0], inv[:, 1])), shape=(len(nodes), len(nodes)))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp[inv[:, 0]], kind="stable")
    return [order[i : i + n] for i in range(0, len(order), n)]


@dataclass
class Verifier:
    """Scores pairs of pictures (by picture key) on their blobs, each pair once: here up to
    LOCAL_BLOBS_MAX blobs or when Ray is not running, else in Ray tasks of at least SCORE_CHUNK pairs,
    about two per CPU of the cluster, each reading the blobs its pairs need (plain tasks: a Ray Data pass
    costs a second to start). ``failed``: picture key -> why its blob could not be used."""

    out: str
    paths: dict[str, Any]
    known: dict[tuple[str, str], float] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)

    def difference(self, a: Iterable[str], b: Iterable[str]) -> np.ndarray:
        """``neardup.local_difference`` between the pictures ``a[i]`` and ``b[i]``; NaN where one of the
        two blobs cannot be used."""
        wanted = [(x, y) if x <= y else (y, x) for x, y in zip(a, b, strict=True)]
        todo = sorted({p for p in wanted if p not in self.known})
        if todo:
            self._score(todo)
        return np.array([self.known[p] for p in wanted], dtype=np.float32)

    def _score(self, todo: list[tuple[str, str]]) -> None:
        keys = sorted({k for pair in todo for k in pair})
        index = {k: i for i, k in enumerate(keys)}
        pairs = np.array([(index[x], index[y]) for x, y in todo], dtype=np.int64).reshape(-1, 2)
        import ray

        def submit(rows: np.ndarray) -> tuple[np.ndarray, list[Any], np.ndarray]:
            used, inv = np.unique(pairs[rows], return_inverse=True)
            return used, [self.paths[keys[u]] for u in used], inv.reshape(-1, 2)

        if ray.is_initialized() and len(keys) > LOCAL_BLOBS_MAX:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            parts = _chunks(pairs, max(SCORE_CHUNK, -(-len(pairs) // (2 * cpus))))
            task = ray.remote(num_cpus=1)(score_chunk)
            jobs = [submit(rows) for rows in parts]
            done = ray.get([task.remote(self.out, paths, p) for _, paths, p in jobs])
        else:
            parts = [np.arange(len(pairs))]
            jobs = [submit(parts[0])]
            done = [score_chunk(self.out, jobs[0][1], jobs[0][2])]
        results = zip(parts, [u for u, _, _ in jobs], done, strict=True)
        scores = np.full(len(pairs), np.nan, dtype=np.float32)
        for rows, used, (got, why) in results:
            scores[rows] = got
            self.failed.update({keys[u]: w for u, w in zip(used, why, strict=True) if w is not None})
        self.known.update(zip(todo, scores.tolist(), strict=True))


@dataclass
class Verification:
    """The confirmed candidate pairs (as picture-key pairs), the verifier for later pairs, and counts."""

    confirmed: list[tuple[str, str]]
    verifier: Verifier | None
    stats: dict[str, int]


def verify_candidates(
    ok: pd.DataFrame, inverse: np.ndarray, near_pairs: np.ndarray, out: str | None, max_diff: float
) -> Verification:
    """Candidate pairs of distinct pictures (equal or near pHash), confirmed by ``local_difference`` at
    most ``max_diff`` on the blobs under ``out``; with ``out`` None every candidate stands (pHash
    alone)."""
    pictures = Pictures.of(ok, inverse)
    cand = candidate_pairs(pictures, near_pairs)
    stats = {"candidate_pairs": len(cand)}
    a_keys, b_keys = pictures.keys[cand[:, 0]], pictures.keys[cand[:, 1]]
    if out is None:
        return Verification(
            list(zip(a_keys, b_keys, strict=True)), None, {**stats, "confirmed_pairs": len(cand)}
        )
    paths = dict(zip(pictures.keys, ok["path"].to_numpy()[pictures.rows], strict=True))
    verifier = Verifier(out, paths)
    scores = verifier.difference(a_keys, b_keys)
    good = scores <= max_diff  # NaN (a blob that cannot be used) is never confirmed
    stats.update(
        blobs_checked=len(np.unique(cand)),
        confirmed_pairs=int(good.sum()),
        refuted_pairs=int((scores > max_diff).sum()),
        unreadable=len(verifier.failed),
    )
    return Verification(list(zip(a_keys[good], b_keys[good], strict=True)), verifier, stats)


def group_duplicates(
    ok: pd.DataFrame,
    confirmed: Iterable[tuple[str, str]],
    keep: str,
    verifier: Verifier | None = None,
    radius: int = 10,
    max_diff: float = float("inf"),
) -> pd.DataFrame:
    """Rows of the duplicates manifest (plus each row's ``split``) for the ok images in ``ok``.

    ``ok`` is indexed 0..n-1. Edges: same source bytes, same normalized pixels, and the ``confirmed``
    pairs of picture keys (``picture_keys``). ``verifier`` (None: verification off) gives each
    member's ``verify_score`` against the kept image."""
    n = len(ok)
    keys = picture_keys(ok)
    first_row = pd.Series(np.arange(n), index=keys.to_numpy()).groupby(level=0).first()
    pairs = list(confirmed)
    edges = [_edges_by_equal(ok["sha256"]), _edges_by_equal(keys)]
    if pairs:
        ends = first_row.reindex([k for pair in pairs for k in pair]).to_numpy()
        e = ends.reshape(-1, 2)
        edges.append(e[~np.isnan(e).any(axis=1)].astype(np.int64))
    e = np.concatenate(edges)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    ok = ok.assign(_comp=comp, _key=keys)
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
    same_bytes = dup["sha256"].notna() & (dup["sha256"] == dup["_comp"].map(kept["sha256"]))
    kept_key = dup["_comp"].map(kept["_key"])
    same_pixels = dup["_key"] == kept_key
    dup["kind"] = np.where(same_bytes | same_pixels, "exact", "near")
    kept_hash = neardup.hex_to_u64(dup["_comp"].map(kept["phash"]).tolist())
    dup["distance"] = neardup.popcount(neardup.hex_to_u64(dup["phash"].tolist()) ^ kept_hash).astype(np.int32)
    dup["cross_label"] = dup["_comp"].map(dup.groupby("_comp")["label"].nunique(dropna=False) > 1)
    dup["cross_split"] = dup["_comp"].map(dup.groupby("_comp")["_is_test"].nunique() > 1)

    # Why each member belongs with the kept image, as a reviewer would check it.
    is_kept = dup["image_id"] == dup["kept_id"]
    near = ~(same_pixels | is_kept)
    score = np.where(same_pixels, 0.0, np.nan).astype(np.float32)
    if verifier is not None and near.any():
        score[near.to_numpy()] = verifier.difference(dup.loc[near, "_key"], kept_key[near])
    within = dup["distance"].to_numpy() <= radius
    direct = within & (score <= max_diff) if verifier is not None else within
    by = np.where(
        same_bytes,
        VERIFIED_BY_BYTES,
        np.where(
            same_pixels,
            VERIFIED_BY_PIXELS,
            np.where(
                direct,
                VERIFIED_BY_THUMBNAIL if verifier is not None else VERIFIED_BY_PHASH,
                VERIFIED_BY_CHAIN,
            ),
        ),
    ).astype(object)
    by[is_kept.to_numpy()] = None
    dup["verified_by"] = by
    dup["verify_score"] = pd.array(
        np.where(is_kept | (verifier is None) & ~same_pixels, np.nan, score), dtype="Float32"
    )
    return dup.sort_values(["group_id", "image_id"])[[*DUP_COLUMNS, "split"]]


class DedupeStage(Stage):
    name = "dedupe"
    config_sections: ClassVar[tuple[str, ...]] = ("dedupe",)

    def run(self, ctx: RunContext) -> StageResult:
        cfg = ctx.cfg.dedupe
        images = manifests.read_manifest("images", ctx.layout.normalized_images)
        images["_order"] = np.arange(len(images))
        ok = images[images["status"] == Status.OK].reset_index(drop=True)
        stats: dict[str, Any] = {"searched": len(ok), "method": cfg.method, "verify": cfg.verify}
        failed: dict[str, tuple[str, str, str]] = {}
        if not cfg.enabled or ok.empty:
            dups = group_duplicates(ok.iloc[:0], [], cfg.keep)
            stats["partitions_reused"] = 0
        else:
            uniq, inverse = np.unique(neardup.hex_to_u64(ok["phash"].tolist()), return_inverse=True)
            if cfg.method == "exact":
                pairs, reused = neardup.exact_pairs(uniq, cfg.radius), 0
            else:
                search = near_pairs_local if uniq.size <= LOCAL_SEARCH_MAX else near_pairs_on_ray
                pairs, reused = search(uniq, cfg, ctx.parts(self.name), ctx.faults)
            checked = verify_candidates(
                ok, inverse, pairs, ctx.out if cfg.verify else None, cfg.verify_max_diff
            )
            stats.update(checked.stats)
            if checked.verifier is not None and checked.verifier.failed:
                # A blob that no longer reads or decodes: its image leaves with a reason, never a crash.
                failed = dict(checked.verifier.failed)
                bad = picture_keys(ok).isin(list(failed))
                log.warning("dedupe: %d normalized images could not be read back", int(bad.sum()))
                ok = ok[~bad].reset_index(drop=True)
            dups = group_duplicates(
                ok, checked.confirmed, cfg.keep, checked.verifier, cfg.radius, cfg.verify_max_diff
            )
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
            {"status": Status.REJECTED.value, "reason": reason, "detail": detail.to_numpy()},
            index=removed["image_id"].to_numpy(),
        )
        if failed:
            ok_keys = picture_keys(images[images["status"] == Status.OK])
            gone = ok_keys[ok_keys.isin(list(failed))]
            why = pd.DataFrame(
                [failed[k] for k in gone],
                columns=["status", "reason", "detail"],
                index=images.loc[gone.index, "image_id"],
            )
            upd = pd.concat([upd, why])
        hit = images["image_id"].isin(upd.index)
        for col in ("status", "reason", "detail"):
            images.loc[hit, col] = images.loc[hit, "image_id"].map(upd[col]).astype(str)
        manifests.write_manifest("images", images.drop(columns=["_order"]), ctx.layout.deduped_images)
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
                "unreadable_removed": int(hit.sum() - len(removed)),
            }
        )
        return StageResult(stats=stats)
