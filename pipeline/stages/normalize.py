"""Stage ``normalize``: read, validate, normalize and hash every candidate, in shards on Ray Data.

Every candidate gives exactly one images row. Finished shards are files under the stage's shard folder,
so a re-run after a crash only processes the shards that are missing.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import manifests, storage
from pipeline.faults import FaultPlan
from pipeline.imaging import Normalized, NormalizeParams, normalize_bytes
from pipeline.reasons import Reason, Status
from pipeline.sources import decode_locator
from pipeline.stages.base import Resources, RunContext, Stage, finished_shards, shard_file
from pipeline.stages.sources import candidates_uri


def images_uri(ctx: RunContext) -> str:
    return storage.join(ctx.stage_dir(NormalizeStage.name), "images.parquet")


def blob_path(sha256: str) -> str:
    """Where a normalized image lives, relative to the run's output URI (content-addressed)."""
    return f"blobs/{sha256[:2]}/{sha256}.jpg"


def _read_limited(locator: str, max_bytes: int) -> bytes | None:
    """The file's bytes, or None when it is larger than ``max_bytes`` (never read whole)."""
    fs, path = storage.get_fs(locator)
    with fs.open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def process_candidate(
    cand: dict[str, Any], params: NormalizeParams, max_bytes: int, out: str
) -> dict[str, Any]:
    """One candidate row in, one images row out. Never raises for bad input."""
    row: dict[str, Any] = {k: cand[k] for k in ("image_id", "source", "source_key", "url", "label", "split")}
    locator = decode_locator(cand["locator"])
    if locator.lower().startswith(("http://", "https://")):
        return row | {
            "status": Status.FAILED,
            "reason": Reason.NEEDS_CRAWL,
            "detail": "fetch it with cropclean crawl",
        }
    try:
        data = _read_limited(locator, max_bytes)
    except FileNotFoundError:
        return row | {"status": Status.FAILED, "reason": Reason.MISSING_FILE, "detail": "no such file"}
    except OSError as exc:
        return row | {
            "status": Status.FAILED,
            "reason": Reason.READ_ERROR,
            "detail": f"{type(exc).__name__}: {exc}",
        }
    if data is None:
        return row | {
            "status": Status.REJECTED,
            "reason": Reason.TOO_LARGE,
            "detail": f"over {max_bytes} bytes",
        }

    import hashlib

    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    result = normalize_bytes(data, params)
    if not isinstance(result, Normalized):
        fields = asdict(result)
        return row | {
            "status": Status.REJECTED,
            "reason": result.reason,
            "detail": fields["detail"],
            "format": fields["format"],
            "mode": fields["mode"],
            "orig_width": fields["orig_width"],
            "orig_height": fields["orig_height"],
        }
    path = blob_path(result.jpeg_sha256)
    uri = storage.join(out, path)
    if not storage.exists(uri):
        storage.write_bytes_atomic(uri, result.jpeg)
    return row | {
        "status": Status.OK,
        "reason": None,
        "detail": None,
        "pixel_sha256": result.pixel_sha256,
        "phash": result.phash,
        "format": result.format,
        "mode": result.mode,
        "width": result.width,
        "height": result.height,
        "orig_width": result.orig_width,
        "orig_height": result.orig_height,
        "path": path,
    }


def _table_to_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _table_from_bytes(data: bytes) -> pa.Table:
    return ipc.open_stream(data).read_all()


def run_shard(
    item: dict[str, Any],
    *,
    params: NormalizeParams,
    max_bytes: int,
    out: str,
    shard_dir: str,
    faults: FaultPlan,
) -> dict[str, Any]:
    """Ray Data task: normalize one shard of candidates and write its rows as one Parquet file."""
    shard = int(item["shard"])
    faults.check(NormalizeStage.name, shard)
    cands = _table_from_bytes(item["rows"]).to_pylist()
    rows = [process_candidate(c, params, max_bytes, out) for c in cands]
    uri = shard_file(shard_dir, "shard", shard)
    # An explicit schema: rows differ in which keys they carry (a rejected row has no hashes).
    table = pa.Table.from_pylist(rows, schema=manifests.load_schema("images").arrow_schema())
    manifests.write_manifest("images", table, uri)
    return {"shard": shard, "rows": len(rows)}


class NormalizeStage(Stage):
    name = "normalize"
    resources = Resources(cpus=1)
    config_sections: ClassVar[tuple[str, ...]] = ("normalize",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import ray

        cfg = ctx.cfg.normalize
        params = NormalizeParams(
            min_side=cfg.min_side,
            max_pixels=cfg.max_pixels,
            target_side=cfg.target_side,
            resize_side=cfg.resize_side,
            upscale=cfg.upscale,
            jpeg_quality=cfg.jpeg_quality,
        )
        cands = manifests.read_table(candidates_uri(ctx))
        shard_dir = ctx.shard_dir(self.name)
        n_shards = max(1, -(-cands.num_rows // cfg.shard_size))
        done = finished_shards(shard_dir, "shard")
        todo = [
            {"shard": i, "rows": _table_to_bytes(cands.slice(i * cfg.shard_size, cfg.shard_size))}
            for i in range(n_shards)
            if i not in done
        ]
        if todo:
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            ds.map(
                run_shard,
                fn_kwargs={
                    "params": params,
                    "max_bytes": cfg.max_bytes,
                    "out": ctx.out,
                    "shard_dir": shard_dir,
                    "faults": ctx.faults,
                },
                num_cpus=self.resources.cpus,
            ).materialize()
        parts = [manifests.read_table(shard_file(shard_dir, "shard", i)) for i in range(n_shards)]
        table = pa.concat_tables(parts)
        table = manifests.write_manifest("images", table, images_uri(ctx))
        status = table.column("status").to_pylist()
        return {
            "shards": n_shards,
            "shards_reused": n_shards - len(todo),
            "images": table.num_rows,
            "ok": status.count("ok"),
            "rejected": status.count("rejected"),
            "failed": status.count("failed"),
        }
