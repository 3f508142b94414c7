"""Stage ``sources``: list every input of every configured source as a candidate row."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, replace
from typing import Any, ClassVar

import pyarrow as pa

from pipeline import manifests
from pipeline.crawl.providers import ProviderError
from pipeline.names import label_problem, split_problem
from pipeline.reasons import Reason
from pipeline.sources import Candidate, iter_candidates
from pipeline.sources.search import SearchStopped
from pipeline.stages.base import RunContext, Stage, StageResult

log = logging.getLogger("cropclean")

CANDIDATE_SCHEMA = manifests.load_schema("candidates").arrow_schema()


def image_id_for(source: str, source_key: str) -> str:
    """Stable id of an input: the same source and key give the same id on every run."""
    return hashlib.sha256(f"{source}\x00{source_key}".encode()).hexdigest()[:16]


def checked(c: Candidate) -> Candidate:
    """``c``, refused with a reason when its label or split cannot name a folder under OUT.

    A bad label or split is never kept, not even on a candidate refused already for its locator: the
    images manifest holds no name that a path builder would refuse. The original is in ``detail``."""
    label_bad = label_problem(c.label) if c.label is not None else None
    split_bad = split_problem(c.split) if c.split is not None else None
    if not label_bad and not split_bad:
        return c
    found = [f"label {c.label!r}: {label_bad}"] if label_bad else []
    found += [f"split {c.split!r}: {split_bad}"] if split_bad else []
    cleared = replace(c, label=None if label_bad else c.label, split=None if split_bad else c.split)
    if c.reason:  # refused already: that reason stands, the bad names are noted after its detail
        return replace(cleared, detail="; ".join([*([c.detail] if c.detail else []), *found]))
    reason = Reason.BAD_LABEL if label_bad else Reason.BAD_SPLIT
    return replace(cleared, reason=reason, detail="; ".join(found))


class SourcesStage(Stage):
    name = "sources"
    config_sections: ClassVar[tuple[str, ...]] = ("sources",)

    def run(self, ctx: RunContext) -> StageResult:
        cols: dict[str, list[Any]] = {f.name: [] for f in CANDIDATE_SCHEMA}
        per_source: dict[str, int] = {}
        errors: list[str] = []
        cache = ctx.layout.search_cache
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
        manifests.write_manifest("candidates", table, ctx.layout.candidates)
        fingerprint = hashlib.sha256("\n".join(cols["image_id"]).encode()).hexdigest()[:16]
        return StageResult(stats={"candidates": table.num_rows, "per_source": per_source},
                           fingerprint=fingerprint, incomplete=bool(errors), errors=errors)  # fmt: skip
