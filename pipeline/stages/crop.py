"""Stage ``crop``: point-of-interest crops, the mislabel blacklist and the cropped dataset.

Every ok image with a split goes through a Ray Data actor pool (``pipeline.crop.worker``); each actor
holds the whole ensemble as fully convolutional nets (and the fold models with cross-fitting), on a GPU
share when the cluster has GPUs. Batches are grouped by image size, so that the images of a group share
one pyramid. For each image the actor writes crops (label-driven and label-free, for the method and the
baselines), its judgment (does any member find the label?) and, unless it is blacklisted, the cropped
JPEG under ``OUT/cropped/<split>/<class>/<image_id>.jpg``. Results land in part files in the stage's
keyed shard folder as each batch finishes, so a crash resumes with the images that have none.

With ``train.folds`` the train images are judged only by the fold models that never saw them; which
models crop them follows ``train.crop_models``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline import manifests, storage
from pipeline.actor_pool import map_with_pool
from pipeline.annotate import verdicts
from pipeline.config import RunConfig
from pipeline.crop import confidence, rank
from pipeline.crop.worker import CropWorker, Settings
from pipeline.evaluation.quality import mean_probabilities
from pipeline.models.data import training_rows
from pipeline.models.jobs import fold_of
from pipeline.reasons import Reason
from pipeline.resume import KeyedFolder
from pipeline.stages.base import RunContext, Stage, StageResult, drain
from pipeline.summary import read_metrics

log = logging.getLogger("cropclean")

SIMILARNET_IMAGES = 256  # val images that measure SIMILARnet's filter importances


def cross_label_ids(ctx: RunContext) -> set[str]:
    """Images whose duplicate group carries more than one label (dedupe's ``cross_label``)."""
    uri = ctx.manifest("duplicates")
    if not storage.exists(uri):
        return set()
    dups = manifests.read_manifest("duplicates", uri, columns=["image_id", "cross_label"])
    return set(dups.loc[dups["cross_label"], "image_id"])


def stage_rows(ctx: RunContext, images: pd.DataFrame, classes: list[str], verified: set[str]) -> pd.DataFrame:
    """The images the stage judges and crops: ok images with a split, with their class index, whether a
    copy carries another label, whether a person verified them, and their fold (train images with
    ``train.folds``; NaN otherwise)."""
    cfg = ctx.cfg
    rows = training_rows(images, classes)
    crossed = cross_label_ids(ctx) - verified
    ids = rows["image_id"]
    rows = rows.assign(cross_label=ids.isin(crossed), verified=ids.isin(verified))
    folds = cfg.train.folds
    fold = pd.Series(np.nan, index=rows.index)
    if folds:
        train = rows["split"] == "train"
        fold[train] = fold_of(rows.loc[train, "image_id"], folds, cfg.train.seed).astype(float)
    return rows.assign(fold=fold)


class CropStage(Stage):
    name = "crop"
    config_sections: ClassVar[tuple[str, ...]] = ("crop", "blacklist")

    def config_key(self, cfg: RunConfig) -> str:
        key = super().config_key(cfg)
        checked = verdicts.digest(verdicts.read_overrides(cfg.out), ("keep", "relabel"))
        return key if checked is None else f"{key}+verified={checked}"

    def run(self, ctx: RunContext) -> StageResult:
        cfg, start = ctx.cfg, time.perf_counter()
        classes = manifests.read_classes(ctx.layout.classes)
        images = manifests.read_manifest("images", ctx.manifest("images"))
        verified = verdicts.verified_ids(cfg.out)
        rows = stage_rows(ctx, images, classes, verified)

        parts = ctx.parts(self.name)
        # OUT/cropped/ belongs to one stage key: crops of other settings go before new ones come.
        KeyedFolder(ctx.layout.cropped, parts.key).claim()
        done = parts.read_parts("judged")
        todo = rows[~rows["image_id"].isin(set(done.get("image_id", [])))]
        settings = self._settings(ctx, classes, rows, parts)
        if len(todo):
            self._run_actors(cfg, settings, todo)
        crops, judged = parts.read_parts("crops"), parts.read_parts("judged")
        crops = crops.drop_duplicates(["image_id", "method", "target"]).reset_index(drop=True)
        judged = judged.drop_duplicates("image_id").reset_index(drop=True)
        judged = judged.assign(verified=judged["image_id"].isin(verified))  # a person checked: never flagged
        too_small = int((judged["reason"] == Reason.TOO_SMALL_FOR_SCALES).sum()) if "reason" in judged else 0
        scored, summary, gate = self._rank(ctx, classes, images, rows, judged)
        blacklist = blacklist_rows(scored, summary["allowed"], gate.decision)
        crops = leave_out(ctx, crops, left_out(blacklist, gate.decision), cfg.crop.method)
        manifests.write_manifest("crops", crops, ctx.manifest("crops"))
        manifests.write_manifest("blacklist", blacklist, ctx.manifest("blacklist"))
        # Per-image judgments (flagged or not) with their scores, for ranking metrics and calibration.
        manifests.write_manifest("judgments", scored, ctx.layout.judgments)
        seconds = time.perf_counter() - start
        stats = crop_stats(crops, blacklist, too_small, cfg.crop.method, len(todo), seconds)
        stats["confidence"] = gate.decision  # crops and blacklist come from the same ensemble
        stats["blacklist"] = summary | {"flagged": len(blacklist), "confidence": gate.as_dict()}
        if gate.decision == confidence.OK:
            log.info("crop: %s", gate.message())
        else:
            log.warning("crop: %s", gate.message())
        if len(blacklist) > summary["allowed"]:
            log.warning("crop: the blacklist holds %d images, more than the %d wrong labels the run "
                        "estimates (%.1f%% of %d); the annotator export sends the first %d unless forced "
                        "(cropclean export OUT --force)", len(blacklist), summary["allowed"],
                        100 * summary["noise_rate"], summary["images"], summary["allowed"])  # fmt: skip
        return StageResult(stats=stats, metrics={"crop": stats})

    def _rank(self, ctx: RunContext, classes: list[str], images: pd.DataFrame, rows: pd.DataFrame,
              judged: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any], confidence.Gate]:  # fmt: skip
        """Score every judged image, pick the operating point, and judge the ensemble's strength."""
        cfg, b = ctx.cfg, ctx.cfg.blacklist
        predictions = None
        if storage.exists(ctx.manifest("predictions")):
            predictions = manifests.read_manifest("predictions", ctx.manifest("predictions"))
        probabilities = mean_probabilities(predictions, classes) if predictions is not None else None
        conflicts = duplicate_labels(ctx, images) if b.cross_label_duplicates else {}
        scored, ranking = rank.score_judgments(judged, classes, probabilities, conflicts)
        mode = b.operating_point
        # Without cross-fitting the train images are judged by models that learned their labels, wrong
        # ones included: those labels look right, and the noise rate comes out near 0 (an empty list).
        # The paper's rule still finds labels no member recognizes anywhere; nothing is cut by the rate.
        in_sample = not cfg.train.folds
        if in_sample and mode != "votes":
            log.warning("crop: no cross-fitting (train.folds 0): the noise rate cannot be estimated from "
                        "in-sample judgments; the blacklist follows the votes rule (blacklist.max_votes), "
                        "not blacklist.operating_point %s", mode)  # fmt: skip
            mode = "votes"
        flagged = rank.flag(scored, mode, ranking.noise_rate, b.target_precision, b.max_votes,
                            b.min_score)  # fmt: skip
        scored = scored.assign(flagged=flagged, reason=reasons(scored, flagged, b.max_votes))
        open_rows = ~scored["verified"].fillna(False).astype(bool)
        p = scored.loc[open_rows, "p_wrong"].to_numpy(float)
        allowed = rank.operating_point(p, "noise_rate", ranking.noise_rate, 1.0)
        summary: dict[str, Any] = {
            "operating_point": mode,
            "target_precision": b.target_precision if mode == "precision" else None,
            "images": int(open_rows.sum()),
            "noise_rate": None if in_sample else round(ranking.noise_rate, 4),
            "noise_rate_method": "in-sample judgments: not estimated" if in_sample else
            "mixture proportion (upper tails of the ranking, counterfactual labels)",
            "allowed": int(flagged.sum()) if in_sample else allowed,
            **rank.expected_quality(p, int(flagged.sum()) if mode != "votes" else 0),
            "models": ranking.models,
        }  # fmt: skip
        if mode == "votes":  # not a head of the ranking: its expected precision directly
            chosen = scored.loc[flagged, "p_wrong"]
            summary["expected_precision"] = round(float(chosen.mean()), 4) if len(chosen) else None
            summary["expected_recall"] = round(float(chosen.sum() / p.sum()), 4) if p.sum() > 0 else None
        thresholds = confidence.Thresholds.of(b)
        splits = dict(zip(rows["image_id"], rows["split"], strict=True))
        gate = confidence.assess(read_metrics(cfg.out).get("training"), predictions, splits, len(classes),
                                 cfg.train.folds, thresholds)  # fmt: skip
        return scored, summary, gate

    def _settings(self, ctx: RunContext, classes: list[str], rows: pd.DataFrame,
                  parts: KeyedFolder) -> Settings:  # fmt: skip
        cfg = ctx.cfg
        c = cfg.crop
        val = rows[rows["split"] == "val"].head(SIMILARNET_IMAGES)
        baselines = [m for m in c.baselines if m != "none"]  # "none" (no crop) is evaluation's row alone
        return Settings(
            out=cfg.out, classes=classes, members=[m.label for m in cfg.train.members], folds=cfg.train.folds,
            crop_models=cfg.train.crop_models, method=c.method, mode=c.mode, baselines=baselines,
            step=c.scale_factor, max_scale=c.max_scale, early_stop=c.early_stop,
            display_aspect=tuple(c.display_aspect) if c.display_aspect else None,
            display_min_area=c.display_min_area,
            export=c.export, jpeg_quality=c.jpeg_quality, threads=max(1, int(c.cpus_per_actor)),
            parts=parts,
            similarnet_rows=list(zip(val["path"], val["label_idx"].astype(int), strict=True)),
        )  # fmt: skip

    def _run_actors(self, cfg: RunConfig, settings: Settings, todo: pd.DataFrame) -> None:
        columns = ["image_id", "split", "label", "label_idx", "path", "fold", "cross_label", "verified"]
        # Rows sorted by size so that batches hold images of one pyramid.
        frame = todo[columns].assign(_size=todo["width"] * 100_000 + todo["height"]).sort_values("_size")
        drain(map_with_pool(frame.drop(columns="_size"), CropWorker, settings, cfg.crop, self.name))


def duplicate_labels(ctx: RunContext, images: pd.DataFrame) -> dict[str, list[str]]:
    """Per image whose duplicate group carries more than one label, the other labels its copies carry."""
    uri = ctx.manifest("duplicates")
    if not storage.exists(uri):
        return {}
    dups = manifests.read_manifest("duplicates", uri, columns=["image_id", "group_id", "cross_label"])
    dups = dups[dups["cross_label"]]
    dups = dups.assign(label=dups["image_id"].map(images.set_index("image_id")["label"])).dropna()
    out: dict[str, list[str]] = {}
    for _, group in dups.groupby("group_id"):
        labels = set(group["label"])
        for image, label in zip(group["image_id"], group["label"], strict=True):
            if labels - {label}:
                out[image] = sorted(labels - {label})
    return out


def reasons(scored: pd.DataFrame, flagged: np.ndarray, max_votes: int) -> pd.Series:
    """Why each flagged image is on the list: no member finds its label (the paper's case), else a copy
    under another label, else the ranking; unflagged rows keep the judging reason (too small, or none)."""
    why = np.where(scored["votes"].fillna(np.inf) <= max_votes, Reason.LABEL_NOT_FOUND.value,
                   np.where(scored["conflict"], Reason.CROSS_LABEL_DUPLICATE.value,
                            Reason.LIKELY_MISLABELED.value))  # fmt: skip
    before = scored["reason"] if "reason" in scored else pd.Series(None, index=scored.index, dtype=object)
    before = before.where(before == Reason.TOO_SMALL_FOR_SCALES.value, None)
    return pd.Series(np.where(flagged, why, before.astype(object)), index=scored.index)


def blacklist_rows(scored: pd.DataFrame, allowed: int, decision: str) -> pd.DataFrame:
    """The flagged images, most likely wrong first, marked with the run's confidence and whether each lies
    within the estimated number of wrong labels (``allowed``)."""
    names = manifests.load_schema("blacklist").names
    flagged = scored[scored["flagged"]].sort_values("rank").reset_index(drop=True)
    if flagged.empty:
        return pd.DataFrame(columns=names)
    # The FCN could not judge an image too small for the pyramid: the whole-image runner-up is the suggestion.
    fallback = flagged["suggested_label"].isna() & flagged["other_label"].notna()
    columns = [flagged[c] for c in ("label", "label_prob", "other_label", "other_prob", "p_wrong")]
    extra = [f"whole image: {label} p={p:.2f}, {other} p={q:.2f}; P(wrong label)={w:.2f}"
             if not pd.isna(p) else f"P(wrong label)={w:.2f}"
             for label, p, other, q, w in zip(*columns, strict=True)]  # fmt: skip
    evidence = [f"{e}; {x}" if isinstance(e, str) and e else x
                for e, x in zip(flagged["evidence"], extra, strict=True)]  # fmt: skip
    flagged = flagged.assign(
        score=flagged["p_wrong"], evidence=evidence, confidence=decision,
        within_noise_rate=np.arange(len(flagged)) < allowed,
        suggested_label=flagged["suggested_label"].where(~fallback, flagged["other_label"]),
        suggested_score=flagged["suggested_score"].where(~fallback, flagged["other_prob"]),
    )  # fmt: skip
    return flagged.reindex(columns=names)


def left_out(blacklist: pd.DataFrame, decision: str) -> set[str]:
    """The images the cropped dataset leaves out: the blacklist's, unless the gate withheld the list (not
    trusted: the dataset keeps them; Table IV's retraining still leaves them out, as it measures the list)."""
    return set() if decision == confidence.WITHHELD else set(blacklist["image_id"])


def leave_out(ctx: RunContext, crops: pd.DataFrame, blacklisted: set[str], method: str) -> pd.DataFrame:
    """The cropped dataset leaves the blacklist out: its crop files go, its rows say why."""
    main = (crops["method"] == method) & (crops["target"] == "label") & crops["image_id"].isin(blacklisted)
    for path in crops.loc[main, "path"].dropna() if "path" in crops else ():
        storage.remove(storage.join(ctx.out, path))
    crops = crops.copy()
    if "path" in crops:
        crops.loc[main, "path"] = None
    crops.loc[main, "reason"] = Reason.BLACKLISTED.value
    return crops


def crop_stats(crops: pd.DataFrame, blacklist: pd.DataFrame, too_small: int, method: str, processed: int,
               seconds: float) -> dict[str, Any]:  # fmt: skip
    main = crops[(crops["method"] == method) & (crops["target"] == "label")]
    boxed = main.dropna(subset=["x0"])
    return {
        "images": int(main["image_id"].nunique()),
        "processed": processed,
        "seconds": round(seconds, 2),
        "too_small": too_small,
        "blacklisted": {str(k): int(v) for k, v in blacklist["reason"].value_counts().items()},
        "exported": int(main["path"].notna().sum()) if "path" in main else 0,
        "mean_side": round(float((boxed["x1"] - boxed["x0"]).mean()), 1) if len(boxed) else None,
    }
