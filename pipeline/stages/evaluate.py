"""Stage ``evaluate``: the method paper's Table IV, with a classifier outside the ensemble.

The outside classifier (``evaluate.member``: an architecture no member has) trains on the train split's
original images with the ensemble's training machinery and settings (Ray Train, the same augmentation),
selects its weights on the val originals (by val loss unless ``evaluate.select_by`` says top-1), and in
the same run predicts every evaluation set of the test split at once: the originals and, per localizer
in ``crops.parquet`` (the configured method and the baselines), the label-free and the label-driven
crops, all squashed to the same input size. With ``evaluate.retrain`` the same architecture trains again
on the cleaned dataset, the method's label-driven crops of train without the blacklisted images
(selected on val's crops, also without them), and is scored on the label-free crops of test. The test
split never chooses anything.

Models go to ``OUT/models/_evaluate/<name>/`` and ``<name>-retrained/``, apart from the ensemble's, and
are marked finished with this stage's key. Numbers go to the ``evaluation`` section of metrics.json,
beside the quality numbers against ground truth (``pipeline.evaluation.quality``) when the source has it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline import manifests, storage
from pipeline.config import RunConfig
from pipeline.evaluation.classify import (
    BOX_COLUMNS,
    ORIGINAL,
    SECTION,
    TARGETS,
    accuracy,
    evaluation_sets,
    read_evaluation_metrics,
    set_name,
    table_metrics,
    with_boxes,
)
from pipeline.evaluation.quality import quality_metrics
from pipeline.layout import RunLayout
from pipeline.models.data import training_rows
from pipeline.models.fit import augmentation, fit_all
from pipeline.models.jobs import Job, member_params, predicted_probs
from pipeline.models.train_loop import TrainParams
from pipeline.stages.base import RunContext, Stage, StageResult

log = logging.getLogger("cropclean")

STAGE = "evaluate"


@dataclass
class EvalModel:
    """One model of the evaluation: its training job, the rows it selects on, and which of its predicted
    rows belong to which evaluation set."""

    job: Job
    val_rows: pd.DataFrame
    sets: dict[str, slice] = field(default_factory=dict)


def outside_params(cfg: RunConfig, name: str, classes: int) -> TrainParams:
    """The outside classifier's training settings: its own architecture and selection rule
    (``evaluate.select_by``), everything else as the ensemble trains (epochs: ``evaluate.epochs``,
    default ``train.finetune_epochs``)."""
    e = cfg.evaluate
    folder = RunLayout(cfg.out).evaluation_model_dir(name)
    return member_params(cfg, e.member, name, classes, folder, select_by=e.select_by,
                         finetune_epochs=e.epochs or cfg.train.finetune_epochs)  # fmt: skip


def stacked(sets: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, slice]]:
    """The sets one under the other (one predict dataset: one start-up), and where each one lies."""
    frames, slices, start = [], {}, 0
    for name, frame in sets.items():
        whole = {c: np.nan for c in BOX_COLUMNS if c not in frame.columns}  # originals: no box
        frames.append(frame.assign(eval_set=name, **whole))
        slices[name] = slice(start, start + len(frame))
        start += len(frame)
    return pd.concat(frames, ignore_index=True), slices


@dataclass
class EvaluationPlan:
    models: list[EvalModel]
    test_images: int
    fallback: dict[str, int]  # rows read whole for want of a box, per set
    retrain: dict[str, Any]  # what the retrained model was given


def evaluation_plan(
    cfg: RunConfig, images: pd.DataFrame, crops: pd.DataFrame, blacklisted: set[str], classes: list[str]
) -> EvaluationPlan:
    """What each evaluation model trains on, selects on and predicts. Train rows come from the train
    split, selection rows from val, predicted rows from test, whatever the manifests hold."""
    method = cfg.crop.method
    if not (crops["method"] == method).any():
        raise ValueError(
            f"evaluate: crops.parquet holds no crops of crop.method {method!r}; run the crop stage"
        )
    rows = training_rows(images, classes)
    train, val, test = (rows[rows["split"] == s].reset_index(drop=True) for s in ("train", "val", "test"))
    if val.empty:
        raise ValueError(
            "evaluate needs a val split to select the outside classifier (it never selects on test)"
        )
    name = cfg.evaluate.member.label
    sets, fallback = evaluation_sets(test, crops, method)
    predict, slices = stacked(sets)
    outside = Job(cfg.evaluate.member, None, outside_params(cfg, name, len(classes)), train, predict)
    models = [EvalModel(outside, val, slices)]
    retrain: dict[str, Any] = {}
    if cfg.evaluate.retrain:
        # The cleaned dataset: label-driven crops of the method, without the images sent to annotators.
        clean_train = train[~train["image_id"].isin(blacklisted)]
        clean_val = val[~val["image_id"].isin(blacklisted)]
        crop_train, fb_train = with_boxes(clean_train, crops, method, "label")
        crop_val, fb_val = with_boxes(clean_val, crops, method, "label")
        label_free = set_name(method, "predicted")
        target, target_slices = stacked({label_free: sets[label_free]})
        params = outside_params(cfg, f"{name}-retrained", len(classes))
        models.append(
            EvalModel(Job(cfg.evaluate.member, None, params, crop_train, target), crop_val, target_slices)
        )
        excluded = {"train": len(train) - len(clean_train), "val": len(val) - len(clean_val)}
        retrain = {
            "train_images": len(crop_train), "val_images": len(crop_val), "blacklisted_excluded": excluded,
            "fallback_whole_image": {"train": fb_train, "val": fb_val},
        }  # fmt: skip
    return EvaluationPlan(models, len(test), fallback, retrain)


def read_blacklisted(ctx: RunContext) -> set[str]:
    """Image ids in blacklist.parquet; none when there is no blacklist (nothing was flagged or run)."""
    uri = ctx.manifest("blacklist")
    if not storage.exists(uri):
        log.warning("evaluate: no %s; the retrained classifier trains on every train crop", uri)
        return set()
    return set(manifests.read_manifest("blacklist", uri, columns=["image_id"])["image_id"])


class EvaluateStage(Stage):
    name = STAGE
    # train: the outside classifier trains with the ensemble's settings; crop and blacklist: the data.
    config_sections: ClassVar[tuple[str, ...]] = ("evaluate", "train", "crop", "blacklist")

    def run(self, ctx: RunContext) -> StageResult:
        cfg = ctx.cfg
        crops_uri = ctx.manifest("crops")
        if not storage.exists(crops_uri):
            raise FileNotFoundError(f"evaluate: no {crops_uri}; run the crop stage first")
        images = manifests.read_manifest("images", ctx.manifest("images"))
        crops = manifests.read_manifest(
            "crops", crops_uri, columns=["image_id", "target", "method", *BOX_COLUMNS]
        )
        ok = images[(images["status"] == "ok") & images["split"].notna()]
        classes = sorted(ok["label"].dropna().unique())  # as the train stage orders them
        plan = evaluation_plan(cfg, images, crops, read_blacklisted(ctx) if cfg.evaluate.retrain else set(),
                               classes)  # fmt: skip

        augment = augmentation(cfg, cfg.evaluate.augment_crop_min)
        results = fit_all([(m.job, m.val_rows) for m in plan.models], cfg, ctx.keys.get(STAGE, ""), STAGE,
                          augment, ctx.faults)  # fmt: skip

        scores: list[dict[str, dict[str, float]]] = []
        for model in plan.models:
            probs, labels = predicted_probs(model.job), model.job.predict_rows["label_idx"].to_numpy()
            scores.append({s: accuracy(probs[sl], labels[sl]) for s, sl in model.sets.items()})
        retrained = scores[1][set_name(cfg.crop.method, "predicted")] if len(scores) > 1 else None
        member = cfg.evaluate.member
        values: dict[str, Any] = {
            **table_metrics(scores[0], cfg.crop.method, retrained),
            "outside_arch": member.arch,
            "outside_name": member.label,
            "select_by": cfg.evaluate.select_by,
            "input_size": plan.models[0].job.params.input_size,
            "method": cfg.crop.method,
            "test_images": plan.test_images,
            "fallback_whole_image": plan.fallback,
            "retrain": plan.retrain or None,
            "models": {
                m.job.params.member: {
                    **r,
                    "train_images": len(m.job.train_rows),
                    "val_images": len(m.val_rows),
                }
                for m, r in zip(plan.models, results, strict=True)
            },
        }
        quality = quality_metrics(ctx)
        if quality:
            values["quality"] = quality
        # Other parts keep keys of their own in the section (cropclean verdicts' review numbers).
        section = {**read_evaluation_metrics(cfg.out), **values}
        keys = [
            f"top1_{s}"
            for s in ("original", *(f"cropped_{t}" for t in TARGETS.values()), "cropped_retrained")
        ]
        stats = {"test_images": plan.test_images, **{k: values[k] for k in keys},
                 "sets": [ORIGINAL, *plan.fallback]}  # fmt: skip
        return StageResult(stats=stats, metrics={SECTION: section})
