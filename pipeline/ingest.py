"""The ingest pipeline: sources -> normalize -> dedupe -> split (``pipeline.pipelines``)."""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from pipeline.faults import FaultPlan
from pipeline.pipelines import INGEST, run_pipeline, stages
from pipeline.runner import RunReport
from pipeline.stages.base import Stage
from pipeline.summary import read_metrics


def ingest_stages() -> list[Stage]:
    return stages(INGEST)


def run_ingest(cfg: RunConfig, faults: FaultPlan | None = None) -> tuple[RunReport, dict[str, Any]]:
    """Run the ingest stages; returns their report and the ingest summary (``metrics.json``'s ``ingest``,
    written by the split stage)."""
    report = run_pipeline(cfg, "ingest", faults)
    return report, read_metrics(cfg.out)["ingest"]
