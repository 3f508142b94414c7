"""Stage ``export``: the annotator files under ``OUT/export/`` (``pipeline.annotate.export``), after the
blacklist. Cheap, so its key is the content of what it reads: it runs again whenever that changes. It
never forces: a withheld blacklist is left out (its stats say why), a list longer than the run's
estimated number of wrong labels is cut; images that already have a verdict are left out."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline import storage
from pipeline.annotate.export import DEFAULT_IMAGE_PREFIX, write_blacklist_export
from pipeline.config import RunConfig
from pipeline.stages.base import RunContext, Stage


class ExportStage(Stage):
    name = "export"

    def __init__(self, image_prefix: str = DEFAULT_IMAGE_PREFIX) -> None:
        self.image_prefix = image_prefix

    def config_key(self, cfg: RunConfig) -> str:
        h = hashlib.sha256(self.image_prefix.encode())
        for name in ("manifests/blacklist.parquet", "models/classes.json"):
            uri = storage.join(cfg.out, name)
            h.update(storage.read_bytes(uri) if storage.exists(uri) else b"-")
        verdicts = storage.join(cfg.out, "manifests", "overrides.parquet")
        if storage.exists(verdicts):  # images with a verdict are left out; a run without keeps its key
            h.update(storage.read_bytes(verdicts))
        return h.hexdigest()[:16]

    def run(self, ctx: RunContext) -> dict[str, Any]:
        classes = json.loads(storage.read_text(ctx.uri("models", "classes.json")))
        written = write_blacklist_export(ctx.out, classes, self.image_prefix)
        # A withheld list is not exported here; `cropclean export OUT --force` does it on purpose.
        return {"rows": written["rows"], "files": sorted(written["files"].values()),
                "refused": written["refused"], "withheld": written["withheld"], "message": written["message"],
                "warnings": written["warnings"], "reviewed": written["reviewed"]}  # fmt: skip
