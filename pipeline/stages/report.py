"""Stage ``report``: the HTML report under ``OUT/report/`` (``pipeline.report``), built last.

It reads every manifest and metrics.json, so it runs again whenever any stage before it ran (the
runner chains the stages' keys); thumbnails and overlays already drawn are reused.
"""

from __future__ import annotations

from pipeline.report import build_report
from pipeline.stages.base import RunContext, Stage, StageResult


class ReportStage(Stage):
    name = "report"

    def run(self, ctx: RunContext) -> StageResult:
        result = build_report(ctx.out)
        return StageResult(stats={"index": result.index, "pages": result.pages,
                                  "thumbnails": result.thumbnails, "heatmaps": result.heatmaps})  # fmt: skip
