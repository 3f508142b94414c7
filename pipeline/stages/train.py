"""Stage ``train``: fine-tune every ensemble member on Ray Train, then predict.

Each member trains on the train split and selects its weights on the val split (never on test). With
``train.folds = K`` each member is also trained K times on K-1 folds of train, so that every train
image gets class probabilities from models that never saw it (out-of-fold). Predictions go to
``manifests/predictions.parquet``; weights, per-epoch history and Ray Train checkpoints to
``OUT/models/<member>[/fold-<k>]/``. The machinery (jobs, datasets, fitting) is ``pipeline.models``.
"""

from __future__ import annotations

from typing import ClassVar

import pandas as pd

from pipeline import manifests
from pipeline.models.data import training_rows
from pipeline.models.fit import fit_all
from pipeline.models.jobs import make_jobs, predicted_probs, prediction_rows
from pipeline.stages.base import RunContext, Stage, StageResult


class TrainStage(Stage):
    name = "train"
    config_sections: ClassVar[tuple[str, ...]] = ("train",)

    def run(self, ctx: RunContext) -> StageResult:
        cfg = ctx.cfg
        images = manifests.read_manifest("images", ctx.manifest("images"))
        ok = images[(images["status"] == "ok") & images["split"].notna()]
        classes = sorted(ok["label"].dropna().unique())
        manifests.write_classes(classes, ctx.layout.classes)
        rows = training_rows(images, classes)
        val_rows = rows[rows["split"] == "val"]
        if val_rows.empty:
            raise ValueError("training needs a val split for checkpoint selection (it never selects on test)")
        jobs = make_jobs(cfg, rows, classes)
        results = fit_all([(job, val_rows) for job in jobs], cfg, ctx.keys.get(self.name, ""), self.name,
                          faults=ctx.faults)  # fmt: skip
        frames = [prediction_rows(job, predicted_probs(job), classes) for job in jobs]
        manifests.write_manifest(
            "predictions", pd.concat(frames, ignore_index=True), ctx.manifest("predictions")
        )
        members = {j.member.label: r for j, r in zip(jobs, results, strict=True) if j.fold is None}
        folds = {
            f"{j.member.label}/fold-{j.fold}": r
            for j, r in zip(jobs, results, strict=True)
            if j.fold is not None
        }
        summary = {m: {"val_top1": r["val_top1"], "val_top5": r["val_top5"]} for m, r in members.items()}
        return StageResult(
            stats={"members": summary, "models": len(jobs), "classes": len(classes)},
            metrics={"training": {"members": members, "folds": folds, "classes": len(classes)}},
        )
