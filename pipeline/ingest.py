"""The ingest pipeline: sources -> normalize -> dedupe -> split."""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from pipeline.faults import FaultPlan
from pipeline.runner import RunReport, run_stages
from pipeline.stages.base import Stage
from pipeline.stages.dedupe import DedupeStage
from pipeline.stages.normalize import NormalizeStage
from pipeline.stages.sources import SourcesStage
from pipeline.stages.split import SplitStage
from pipeline.summary import ingest_summary, update_metrics


def ingest_stages() -> list[Stage]:
    return [SourcesStage(), NormalizeStage(), DedupeStage(), SplitStage()]


def run_ingest(cfg: RunConfig, faults: FaultPlan | None = None) -> tuple[RunReport, dict[str, Any]]:
    report = run_stages(cfg, ingest_stages(), faults)
    summary = ingest_summary(cfg.out)
    summary["stages"] = {
        n: {"skipped": r.skipped, "seconds": round(r.seconds, 2), **r.stats}
        for n, r in report.results.items()
    }
    update_metrics(cfg.out, "ingest", summary)
    return report, summary
