"""Stage ``sources``: list every input of every configured source as a candidate row."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, replace
from typing import Any, ClassVar

import pyarrow as pa

from pipeline import manifests, storage
from pipeline.crawl.providers import ProviderError
from pipeline.names import label_problem, split_problem
from pipeline.reasons import Reason
from pipeline.sources import Candidate, iter_candidates
from pipeline.sources.search import SearchStopped
from pipeline.stages.base import RunContext, Stage

log = logging.getLogger("cropclean")

CANDIDATE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("source_key", pa.string()),
        ("locator", pa.binary()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("query", pa.string()),
        ("engine", pa.string()),
        ("rank", pa.int32()),
        ("license", pa.string()),
        ("reason", pa.string()),  # refused at the source (pipeline/sources Candidate.reason)
        ("detail", pa.string()),
    ]
)


def image_id_for(source: str, source_key: str) -> str:
    """Stable id of an input: the same source and key give the same id on every run."""
    return hashlib.sha256(f"{source}\x00{source_key}".encode()).hexdigest()[:16]


def checked(c: Candidate) -> Candidate:
    """``c``, refused with a reason when its label or split cannot name a folder under OUT."""
    if c.reason:
        return c
    if c.label is not None and (problem := label_problem(c.label)):
        return replace(c, label=None, reason=Reason.BAD_LABEL, detail=f"label {c.label!r}: {problem}")
    if c.split is not None and (problem := split_problem(c.split)):
        return replace(c, split=None, reason=Reason.BAD_SPLIT, detail=f"split {c.split!r}: {problem}")
    return c


def candidates_uri(ctx: RunContext) -> str:
    return storage.join(ctx.stage_dir(SourcesStage.name), "candidates.parquet")


class SourcesStage(Stage):
    name = "sources"
    config_sections: ClassVar[tuple[str, ...]] = ("sources",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cols: dict[str, list[Any]] = {f.name: [] for f in CANDIDATE_SCHEMA}
        per_source: dict[str, int] = {}
        errors: list[str] = []
        cache = ctx.uri("cache", "search")
        for src in ctx.cfg.sources:
            try:
                for c in map(checked, iter_candidates(src, cache)):
                    row = asdict(c) | {"image_id": image_id_for(c.source, c.source_key)}
                    for name, values in cols.items():
                        values.append(row[name])
                    per_source[c.source] = per_source.get(c.source, 0) + 1
            except SearchStopped as exc:  # keep what was found; the next run resumes from the cache
                log.warning("%s", exc)
                errors.append(str(exc))
        if errors and not cols["image_id"]:  # nothing at all: fail loudly rather than run on nothing
            raise ProviderError("; ".join(errors))
        # Readers yield in a deterministic order (sorted listings, list order), which is "first seen".
        table = pa.table(cols, schema=CANDIDATE_SCHEMA)
        manifests.write_table_atomic(table, candidates_uri(ctx))
        fingerprint = hashlib.sha256("\n".join(cols["image_id"]).encode()).hexdigest()[:16]
        return {"candidates": table.num_rows, "per_source": per_source, "errors": errors,
                "incomplete": bool(errors), "fingerprint": fingerprint}  # fmt: skip
