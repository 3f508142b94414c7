"""The one registry of pipelines: which stages make up each command, in order.

Stages are named once, here (``STAGES``); a pipeline is a tuple of their names (``PIPELINES``). The CLI,
the Ray job entry points and ``cropclean run CONFIG`` all build their stage lists from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, RunConfig
from pipeline.faults import FaultPlan

if TYPE_CHECKING:
    from pipeline.runner import RunReport
    from pipeline.stages.base import Stage

# Name -> "module:class"; imported when a pipeline is built (the CLI starts without torch).
STAGES: dict[str, str] = {
    "sources": "pipeline.stages.sources:SourcesStage",
    "normalize": "pipeline.stages.normalize:NormalizeStage",
    "dedupe": "pipeline.stages.dedupe:DedupeStage",
    "split": "pipeline.stages.split:SplitStage",
    "train": "pipeline.stages.train:TrainStage",
    "crop": "pipeline.stages.crop:CropStage",
    "evaluate": "pipeline.stages.evaluate:EvaluateStage",
    "export": "pipeline.stages.export:ExportStage",
    "report": "pipeline.stages.report:ReportStage",
}

INGEST = ("sources", "normalize", "dedupe", "split")
# The annotator files (export) follow the blacklist, last but the report, so that no other stage's key
# depends on them; the report reads everything, so it comes last.
PIPELINES: dict[str, tuple[str, ...]] = {
    "ingest": INGEST,
    "train": (*INGEST, "train"),
    "crop": (*INGEST, "train", "crop", "export"),
    "evaluate": (*INGEST, "train", "crop", "evaluate", "export"),
    "clean": (*INGEST, "train", "crop", "evaluate", "export", "report"),
}
# Pre-labelling with another run's models: this run's images, no split (it has no labels to split by).
PREDICT = ("sources", "normalize", "dedupe")


def stage_class(name: str) -> type[Stage]:
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def stages(names: Sequence[str]) -> list[Stage]:
    return [stage_class(name)() for name in names]


def predict_stages(models: str, threshold: float, image_prefix: str) -> list[Stage]:
    from pipeline.stages.predict import PredictStage

    return [*stages(PREDICT), PredictStage(models, threshold, image_prefix)]


def pipeline_for(doc: Mapping[str, Any]) -> str:
    """The pipeline a config document asks for, by the sections it sets itself (a preset's do not
    count): ``evaluate`` -> everything (``clean``, with the report), ``crop`` or ``blacklist`` -> through
    the blacklist, ``train`` -> through training, none of them -> ingest."""
    if "evaluate" in doc:
        return "clean"
    if "crop" in doc or "blacklist" in doc:
        return "crop"
    if "train" in doc:
        return "train"
    return "ingest"


def run_pipeline(cfg: RunConfig, name: str, faults: FaultPlan | None = None) -> RunReport:
    from pipeline.runner import run_stages

    return run_stages(cfg, stages(PIPELINES[name]), faults)


def run_one_stage(cfg: RunConfig, name: str, faults: FaultPlan | None = None) -> RunReport:
    """Run stage ``name`` alone on a run whose earlier stages are complete under ``cfg``, even when it
    is complete itself; later stages do not run. The earlier stages are those of the shortest pipeline
    that holds the stage and whose stages before it are all complete (``cropclean crop`` writes the
    export after crop, ``clean`` after evaluate: the stage's key follows the run's own history)."""
    from pipeline.runner import IncompleteInputs, first_incomplete, run_stages

    if name not in STAGES:
        raise ConfigError(f"no stage named {name!r}; stages: {', '.join(STAGES)}")
    missing = []
    for order in sorted((p for p in PIPELINES.values() if name in p), key=len):
        chosen = stages(order[: order.index(name) + 1])
        gap = first_incomplete(cfg, chosen, name)
        if gap is None:
            return run_stages(cfg, chosen, faults, only=name)
        missing.append(gap)
    raise IncompleteInputs(
        f"stage {name}: stage {missing[0]} before it is not complete for this config in {cfg.out}; run the "
        f"pipeline first (cropclean clean, or cropclean run CONFIG)"
    )
