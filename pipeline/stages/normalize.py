"""Stage ``normalize``: obtain (read or download), validate, normalize and hash every candidate.

Every candidate gives exactly one images row. Work runs in shards on Ray Data; each shard's rows are a
file in the stage's ledger folder, so progress survives a crash. Resume is per item: a re-run processes
only candidates with no final row yet: untried ones, and those that failed for a retryable reason (a
timeout, a 5xx, a 429) in fewer than ``fetch.max_attempts`` runs. An ok image is never fetched again.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline import manifests, storage
from pipeline.config import FetchConfig
from pipeline.crawl.fetch import Fetcher, FetchOutcome, FetchParams, detail_text
from pipeline.crawl.guard import NetworkGuard
from pipeline.faults import FaultPlan
from pipeline.imaging import Normalized, NormalizeParams, normalize_bytes
from pipeline.layout import blob_path
from pipeline.reasons import RETRYABLE, Reason, Status
from pipeline.resources import alive_nodes, require_task_cpus
from pipeline.resume import KeyedFolder
from pipeline.sources import decode_locator
from pipeline.sources.locators import inside, is_http, source_roots
from pipeline.stages.base import RunContext, Stage, StageResult, drain

_CARRIED = ("image_id", "source", "source_key", "url", "page_url", "query", "engine", "rank", "license",
            "label", "split")  # fmt: skip


def fetcher_for(cfg: FetchConfig) -> Fetcher:
    # FetchParams names a subset of the fetch config's keys: take those, whatever they are.
    params = FetchParams(**{name: getattr(cfg, name) for name in FetchParams.__dataclass_fields__})
    return Fetcher(params, NetworkGuard.from_cidrs(cfg.allow_networks, enabled=cfg.guard))


def _read_limited(locator: str, max_bytes: int) -> bytes | None:
    """The file's bytes, or None when it is larger than ``max_bytes`` (never read whole)."""
    fs, path = storage.get_fs(locator)
    with fs.open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def obtain(
    locator: str, fetcher: Fetcher | None, max_bytes: int, roots: Sequence[str] = (),
    fetched: FetchOutcome | None = None,
) -> tuple[bytes | None, dict[str, Any]]:  # fmt: skip
    """The input's bytes, or None and the row fields saying why not.

    An http(s) URL goes to the guarded fetcher, unless it was fetched already (``fetched``); anything
    else is read only when it lies inside one of ``roots`` (the folders of the candidate's source). The
    sources refuse other locators already; this is the second check, so that no source can hand fsspec a
    chain, a scheme or a path elsewhere."""
    if is_http(locator):
        if fetched is None:
            assert fetcher is not None
            fetched = fetcher.fetch(locator)
        got = fetched
        if got.status != Status.OK:
            return None, {"status": got.status, "reason": got.reason, "detail": got.detail}
        return got.data, {}
    if not any(inside(locator, root) for root in roots):
        return None, {
            "status": Status.REJECTED,
            "reason": Reason.UNSUPPORTED_URL,
            "detail": "not an http(s) URL and not inside a folder of its source",
        }
    try:
        data = _read_limited(locator, max_bytes)
    except FileNotFoundError:
        return None, {"status": Status.FAILED, "reason": Reason.MISSING_FILE, "detail": "no such file"}
    except OSError as exc:
        return None, {
            "status": Status.FAILED,
            "reason": Reason.READ_ERROR,
            "detail": f"{type(exc).__name__}: {exc}",
        }
    if data is None:
        return None, {
            "status": Status.REJECTED,
            "reason": Reason.TOO_LARGE,
            "detail": f"over {max_bytes} bytes",
        }
    return data, {}


def process_candidate(cand: dict[str, Any], params: NormalizeParams, max_bytes: int, out: str,
                      fetcher: Fetcher | None = None, roots: Sequence[str] = (),
                      fetched: FetchOutcome | None = None) -> dict[str, Any]:  # fmt: skip
    """One candidate row in, one images row out. Never raises for bad input: whatever goes wrong in
    obtaining and validating it is a row with a reason (``roots``, ``fetched``: see ``obtain``)."""
    row: dict[str, Any] = {k: cand.get(k) for k in _CARRIED}
    row["attempts"] = int(cand.get("attempts") or 0) + 1
    if cand.get("reason"):  # refused where it entered: nothing is opened for it
        return row | {"status": Status.REJECTED, "reason": cand["reason"], "detail": cand.get("detail")}
    try:
        data, failure = obtain(decode_locator(cand["locator"]), fetcher, max_bytes, roots, fetched)
        if data is None:
            detail = failure.get("detail")
            return row | failure | {"detail": None if detail is None else detail_text(str(detail))}
        row["bytes"] = len(data)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        result = normalize_bytes(data, params)
    except Exception as exc:  # the last net: a defect met by one input is its row, never a halted shard
        return row | {"status": Status.FAILED, "reason": Reason.INTERNAL_ERROR,
                      "detail": detail_text(f"{type(exc).__name__}: {exc}")}  # fmt: skip
    if not isinstance(result, Normalized):
        fields = asdict(result)
        detail = None if fields["detail"] is None else detail_text(str(fields["detail"]))
        return row | {"status": Status.REJECTED, "reason": result.reason, "detail": detail,
                      "format": fields["format"], "mode": fields["mode"],
                      "orig_width": fields["orig_width"], "orig_height": fields["orig_height"]}  # fmt: skip
    path = blob_path(result.jpeg_sha256)
    uri = storage.join(out, path)
    if not storage.exists(uri):
        storage.write_bytes_atomic(uri, result.jpeg)
    return row | {
        "status": Status.OK, "reason": None, "detail": None,
        "pixel_sha256": result.pixel_sha256, "phash": result.phash,
        "format": result.format, "mode": result.mode, "width": result.width, "height": result.height,
        "orig_width": result.orig_width, "orig_height": result.orig_height, "path": path,
    }  # fmt: skip


def _url_to_fetch(cand: dict[str, Any]) -> str | None:
    """The candidate's http(s) URL, when it is one to download (not refused where it entered)."""
    if cand.get("reason"):
        return None
    try:
        locator = decode_locator(cand["locator"])
    except Exception:  # process_candidate reports it
        return None
    return locator if is_http(locator) else None


def _table_to_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _table_from_bytes(data: bytes) -> pa.Table:
    return ipc.open_stream(data).read_all()


def run_shard(item: dict[str, Any], *, params: NormalizeParams, max_bytes: int, fetch: FetchConfig, out: str,
              ledger_dir: str, run_id: str, faults: FaultPlan,
              roots: dict[str, tuple[str, ...]]) -> dict[str, Any]:  # fmt: skip
    """Ray Data task: process one shard of candidates and write its rows as one ledger file. Files are
    read only inside ``roots[source]``, the folders of the candidate's own source (see ``obtain``)."""
    shard = int(item["shard"])
    faults.check(NormalizeStage.name, shard)
    cands = _table_from_bytes(item["rows"]).to_pylist()
    urls = {i: url for i, c in enumerate(cands) if (url := _url_to_fetch(c)) is not None}
    rows: list[dict[str, Any] | None] = [None] * len(cands)

    def one(i: int, fetched: FetchOutcome | None = None) -> None:
        c = cands[i]
        rows[i] = process_candidate(c, params, max_bytes, out, None, roots.get(c["source"], ()), fetched)

    for i in range(len(cands)):
        if i not in urls:
            one(i)
    if urls:  # downloads wait on the network: many in flight on the fetcher's loop while this thread
        # decodes and writes the ones that have arrived
        fetcher = fetcher_for(fetch)
        order = list(urls)
        try:
            for k, outcome in fetcher.fetch_all([urls[i] for i in order], fetch.concurrency):
                one(order[k], outcome)
        finally:
            fetcher.close()
    table = pa.Table.from_pylist(rows, schema=manifests.load_schema("images").arrow_schema())
    manifests.write_manifest("images", table, storage.join(ledger_dir, f"part-{run_id}-{shard:06d}.parquet"))
    return {"shard": shard, "rows": len(rows)}


def read_ledger(ledger_dir: str) -> pd.DataFrame:
    """The latest row per image from every earlier run and shard (most attempts wins)."""
    files = storage.list_files(ledger_dir, ".parquet")
    if not files:
        return pd.DataFrame(columns=manifests.load_schema("images").names)
    rows = pd.concat([manifests.read_manifest("images", f) for f in files], ignore_index=True)
    rows["_seq"] = range(len(rows))
    rows = rows.sort_values(["attempts", "_seq"]).drop_duplicates("image_id", keep="last")
    return rows.drop(columns="_seq")


def is_final(rows: pd.DataFrame, max_attempts: int) -> pd.Series:
    retry = (rows["status"] == Status.FAILED) & rows["reason"].isin(RETRYABLE)
    return ~retry | (rows["attempts"].fillna(0) >= max_attempts)


class NormalizeStage(Stage):
    name = "normalize"
    config_sections: ClassVar[tuple[str, ...]] = ("normalize", "fetch")

    def run(self, ctx: RunContext) -> StageResult:
        import ray

        cfg, fetch = ctx.cfg.normalize, ctx.cfg.fetch
        params = NormalizeParams(
            min_side=cfg.min_side, max_pixels=cfg.max_pixels, target_side=cfg.target_side,
            resize_side=cfg.resize_side, upscale=cfg.upscale, jpeg_quality=cfg.jpeg_quality,
            resample=cfg.resample,
        )  # fmt: skip
        cands = manifests.read_table(ctx.layout.candidates)
        # Keyed by the normalize settings only: rows stay valid when the candidate list grows (a search
        # that resumes) or when fetch settings change (more attempts allowed).
        ledger = KeyedFolder.named(ctx.stage_dir(self.name), "ledger", ctx.cfg.section_hash("normalize"))
        ledger_dir = ledger.uri
        before = read_ledger(ledger_dir)
        done = set(before.loc[is_final(before, fetch.max_attempts), "image_id"])
        tried = before.set_index("image_id")["attempts"]
        ids = cands.column("image_id").to_pylist()
        todo_idx = [i for i, image_id in enumerate(ids) if image_id not in done]
        attempts = pa.array([int(tried.get(ids[i], 0) or 0) for i in todo_idx], pa.int32())
        todo = cands.take(pa.array(todo_idx, pa.int64())).append_column("attempts", attempts)
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        shards = [
            {"shard": n, "rows": _table_to_bytes(todo.slice(start, cfg.shard_size))}
            for n, start in enumerate(range(0, todo.num_rows, cfg.shard_size))
        ]
        if shards:
            task_share = require_task_cpus(self.name, alive_nodes(), cfg.task_cpus, "normalize.task_cpus")
            drain(
                ray.data.from_items(shards, override_num_blocks=len(shards)).map(
                    run_shard,
                    fn_kwargs={
                        "params": params,
                        "max_bytes": cfg.max_bytes,
                        "fetch": fetch,
                        "out": ctx.out,
                        "ledger_dir": ledger_dir,
                        "run_id": run_id,
                        "faults": ctx.faults,
                        "roots": source_roots(ctx.cfg.sources),
                    },
                    # normalize.task_cpus each, or what the largest node has; none at all: one line.
                    num_cpus=task_share,
                )
            )

        latest = read_ledger(ledger_dir).set_index("image_id")
        images = latest.loc[ids].reset_index()  # candidate order
        table = manifests.write_manifest("images", images, ctx.layout.normalized_images)
        final = is_final(images, fetch.max_attempts)
        status = images["status"].value_counts()
        fingerprint = hashlib.sha256(
            pd.util.hash_pandas_object(
                images[["image_id", "status", "reason", "sha256", "attempts"]], index=False
            ).values
        ).hexdigest()[:16]
        stats = {
            "images": table.num_rows, "processed": len(todo_idx), "reused": len(ids) - len(todo_idx),
            "shards": len(shards), "ok": int(status.get("ok", 0)), "rejected": int(status.get("rejected", 0)),
            "failed": int(status.get("failed", 0)),
        }  # fmt: skip
        return StageResult(stats=stats, fingerprint=fingerprint, incomplete=bool((~final).any()),
                           retry_later=int((~final).sum()))  # fmt: skip
