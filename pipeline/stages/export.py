"""Stage ``export``: the annotator files under ``OUT/export/`` (``pipeline.annotate.export``), after the
blacklist. Cheap, so its key is the content of what it reads: it runs again whenever that changes. It
never forces: a withheld blacklist is left out (its stats say why), a list longer than the run's
estimated number of wrong labels is cut; images that already have a verdict are left out."""

from __future__ import annotations

import hashlib

from pipeline import manifests, storage
from pipeline.annotate.export import DEFAULT_IMAGE_PREFIX, write_blacklist_export
from pipeline.config import RunConfig
from pipeline.layout import RunLayout
from pipeline.stages.base import RunContext, Stage, StageResult


class ExportStage(Stage):
    name = "export"

    def __init__(self, image_prefix: str = DEFAULT_IMAGE_PREFIX) -> None:
        self.image_prefix = image_prefix

    def config_key(self, cfg: RunConfig) -> str:
        h = hashlib.sha256(self.image_prefix.encode())
        layout = RunLayout(cfg.out)
        for uri in (layout.manifest("blacklist"), layout.classes):
            h.update(storage.read_bytes(uri) if storage.exists(uri) else b"-")
        verdicts = layout.manifest("overrides")
        if storage.exists(verdicts):  # images with a verdict are left out; a run without keeps its key
            h.update(storage.read_bytes(verdicts))
        return h.hexdigest()[:16]

    def run(self, ctx: RunContext) -> StageResult:
        classes = manifests.read_classes(ctx.layout.classes)
        written = write_blacklist_export(ctx.out, classes, self.image_prefix)
        # A withheld list is not exported here; `cropclean export OUT --force` does it on purpose.
        stats = {"rows": written["rows"], "files": sorted(written["files"].values()),
                 "refused": written["refused"], "withheld": written["withheld"],
                 "message": written["message"], "reviewed": written["reviewed"]}  # fmt: skip
        return StageResult(stats=stats, errors=list(written["warnings"]))
