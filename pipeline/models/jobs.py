"""What a training is: a member (and fold) with its settings and rows, and what it predicts.

Used by every stage that trains or reads trained models: ``train`` (the ensemble, out-of-fold models),
``evaluate`` (Table IV's classifiers) and the crop stage (which fold judges which image).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.config import MemberConfig, RunConfig
from pipeline.layout import RunLayout
from pipeline.models.train_loop import TrainParams, predictions_dir
from pipeline.models.zoo import ARCHS

TOPK = 5  # classes kept per prediction ...


FULL_VECTOR_CLASSES = 20  # ... unless there are at most this many: then all of them


@dataclass
class Job:
    member: MemberConfig
    fold: int | None  # None: the full-data model
    params: TrainParams
    train_rows: pd.DataFrame
    predict_rows: pd.DataFrame  # what this model predicts: val+test (full), its held-out fold (fold)


def fold_of(image_ids: pd.Series, folds: int, seed: int) -> pd.Series:
    return image_ids.map(lambda i: int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) % folds)


def member_params(cfg: RunConfig, m: MemberConfig, name: str, classes: int, model_dir: str,
                  **overrides: Any) -> TrainParams:  # fmt: skip
    """A training's settings: member ``m``'s architecture, head, weights and size, its own passes where it
    sets them, everything else from ``train``; ``overrides`` replace any of them (the evaluation's epochs
    and selection rule)."""
    t = cfg.train
    scale = t.batch_size / t.lr_reference_batch if t.lr_reference_batch else 1.0  # linear scaling rule
    settings: dict[str, Any] = dict(
        member=name, arch=m.arch, classes=classes, model_dir=model_dir, head=m.head, weights=m.weights,
        input_size=m.input_size or ARCHS[m.arch].default_size, batch_size=t.batch_size,
        head_epochs=own(m.head_epochs, t.head_epochs),
        finetune_epochs=own(m.finetune_epochs, t.finetune_epochs),
        lr_head=own(m.lr_head, t.lr_head) * scale, lr_finetune=own(m.lr_finetune, t.lr_finetune) * scale,
        weight_decay=t.weight_decay, schedule=t.schedule, unfreeze=t.unfreeze,
        patience=t.patience, select_by=t.select_by, seed=t.seed, threads=max(1, int(t.cpus_per_worker)),
        compile=t.compile,
    )  # fmt: skip
    return TrainParams(**{**settings, **overrides})


def own(member_value: Any, default: Any) -> Any:
    """A member's own setting, or the section's when the member leaves it unset."""
    return default if member_value is None else member_value


def make_jobs(cfg: RunConfig, rows: pd.DataFrame, classes: list[str]) -> list[Job]:
    t = cfg.train
    train = rows[rows["split"] == "train"]
    heldout = rows[rows["split"].isin(["val", "test"])]
    folds = fold_of(train["image_id"], t.folds, t.seed) if t.folds else None
    jobs = []
    for m in t.members:
        for fold in [None, *range(t.folds)]:
            params = member_params(cfg, m, m.label, len(classes), RunLayout(cfg.out).model_dir(m.label, fold))
            if fold is None:
                # Without cross-fitting, the full model also labels train images (in-sample).
                predict = heldout if t.folds else rows
                jobs.append(Job(m, None, params, train, predict))
            else:
                jobs.append(Job(m, fold, params, train[folds != fold], train[folds == fold]))
    return jobs


def prediction_parts(job: Job) -> list[dict[str, np.ndarray]]:
    """The prediction files the job's workers wrote (one per rank)."""
    parts = []
    for uri in storage.list_files(predictions_dir(job.params.model_dir), ".npz"):
        with np.load(io.BytesIO(storage.read_bytes(uri))) as f:
            parts.append({k: f[k] for k in f.files})
    return parts


def predicted_probs(job: Job) -> np.ndarray:
    """Class probabilities of ``job.predict_rows`` (in row order), assembled from the workers' files."""
    probs = np.full((len(job.predict_rows), job.params.classes), np.nan, dtype=np.float32)
    for part in prediction_parts(job):
        probs[part["row"]] = part["probs"]
    missing = int(np.isnan(probs).any(axis=1).sum())
    if missing:
        raise RuntimeError(f"{job.params.model_dir}: {missing} of {len(probs)} rows have no prediction")
    return probs


def prediction_rows(job: Job, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    rows = job.predict_rows
    k = len(classes) if len(classes) <= FULL_VECTOR_CLASSES else TOPK
    order = np.argsort(-probs, axis=1)[:, :k]
    names = np.asarray(classes)
    label_idx = rows["label_idx"].to_numpy()
    return pd.DataFrame({
        "image_id": rows["image_id"].to_numpy(),
        "member": job.member.label,
        "fold": job.fold,
        "predicted": names[order[:, 0]],
        "confidence": probs[np.arange(len(rows)), order[:, 0]],
        "label_prob": probs[np.arange(len(rows)), label_idx],
        "topk_labels": [list(names[o]) for o in order],
        "topk_probs": [list(probs[i, o]) for i, o in enumerate(order)],
    })  # fmt: skip
