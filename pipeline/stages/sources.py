"""Stage ``sources``: list every input of every configured source as a candidate row."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import pyarrow as pa

from pipeline import manifests, storage
from pipeline.sources import iter_candidates
from pipeline.stages.base import RunContext, Stage

CANDIDATE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("source_key", pa.string()),
        ("locator", pa.binary()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("url", pa.string()),
    ]
)


def image_id_for(source: str, source_key: str) -> str:
    """Stable id of an input: the same source and key give the same id on every run."""
    return hashlib.sha256(f"{source}\x00{source_key}".encode()).hexdigest()[:16]


def candidates_uri(ctx: RunContext) -> str:
    return storage.join(ctx.stage_dir(SourcesStage.name), "candidates.parquet")


class SourcesStage(Stage):
    name = "sources"
    config_sections: ClassVar[tuple[str, ...]] = ("sources",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cols: dict[str, list[Any]] = {f.name: [] for f in CANDIDATE_SCHEMA}
        per_source: dict[str, int] = {}
        for src in ctx.cfg.sources:
            for c in iter_candidates(src):
                cols["image_id"].append(image_id_for(c.source, c.source_key))
                cols["source"].append(c.source)
                cols["source_key"].append(c.source_key)
                cols["locator"].append(c.locator)
                cols["label"].append(c.label)
                cols["split"].append(c.split)
                cols["url"].append(c.url)
                per_source[c.source] = per_source.get(c.source, 0) + 1
        # Readers yield in a deterministic order (sorted listings, list order), which is "first seen".
        table = pa.table(cols, schema=CANDIDATE_SCHEMA)
        manifests.write_table_atomic(table, candidates_uri(ctx))
        return {"candidates": table.num_rows, "per_source": per_source}
