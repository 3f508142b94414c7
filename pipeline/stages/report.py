"""Stage ``report``: the HTML report under ``OUT/report/`` (``pipeline.report``), built last.

It reads every manifest and metrics.json, so it runs again whenever any stage before it ran (the
runner chains the stages' keys); thumbnails and overlays already drawn are reused.
"""

from __future__ import annotations

from typing import Any

from pipeline.report import build_report
from pipeline.stages.base import Resources, RunContext, Stage


class ReportStage(Stage):
    name = "report"
    resources = Resources(cpus=1)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        result = build_report(ctx.out)
        return {"index": result.index, "pages": result.pages, "thumbnails": result.thumbnails,
                "heatmaps": result.heatmaps}  # fmt: skip
