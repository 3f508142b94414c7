"""Stage ``predict``: pre-labelling. A trained run's ensemble (``OUT/models/``) labels unlabelled images.

Every usable image of this run goes through a Ray Data actor pool, like the crop stage's: each actor holds
the members as fully convolutional nets and runs them over the image's pyramid. The class found most
strongly (most votes at its best cell, then the highest mean probability: the crop stage's label-free
rule) is the predicted label, and its crop is the label-free crop. ``confidence`` is the members' mean
probability of that class on the whole image; below the threshold, or when the members disagree at the
crop's cell, the image is ``unsure``. Results go to ``manifests/prelabels.parquet`` and, with the
predictions pre-filled, to a Label Studio file under ``export/`` (``pipeline.annotate``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import manifests, storage
from pipeline.actor_pool import map_with_pool
from pipeline.annotate import labelstudio
from pipeline.annotate.export import DEFAULT_IMAGE_PREFIX, export_dir, write_csv, write_json
from pipeline.config import RunConfig
from pipeline.crop.localize import FCNEnsemble, load_classifier, whole_image_probs
from pipeline.layout import DONE_FILE, RunLayout
from pipeline.models.data import load_rgb, normalize
from pipeline.reasons import Reason, Status
from pipeline.resume import KeyedFolder
from pipeline.stages.base import RunContext, Stage, StageResult, drain

PRELABEL_TASKS = "prelabels-labelstudio.json"
PRELABEL_CSV = "prelabels.csv"
PRELABEL_CONFIG = "labelstudio-config.xml"


@dataclass
class PredictSettings:
    """What an actor needs; plain data, shipped to every actor."""

    out: str  # this run: the images
    parts: KeyedFolder  # where each batch's rows go (the stage resumes from them)
    model_dirs: list[str]  # the trained run's full-data members
    classes: list[str]
    step: float
    max_scale: float
    early_stop: bool
    mode: str
    threshold: float
    threads: int


class PredictWorker:
    """A Ray Data actor: the ensemble in memory; batches of images in, prelabel rows out."""

    def __init__(self, settings: PredictSettings) -> None:
        self.s = settings
        torch.set_num_threads(max(1, settings.threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = [load_classifier(d, self.device) for d in settings.model_dirs]
        self.fcn = FCNEnsemble(self.models, settings.step, settings.max_scale, settings.early_stop)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Pre-label the batch and write its rows as one part file; returns the rows' ids."""
        rows = self.prelabel(batch)
        manifests.write_manifest("prelabels", rows, self.s.parts.new_part("prelabels"))
        return rows[["image_id"]]

    def prelabel(self, batch: pd.DataFrame) -> pd.DataFrame:
        pictures = [np.asarray(load_rgb(storage.join(self.s.out, p))) for p in batch["path"]]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, pic in enumerate(pictures):
            groups.setdefault(pic.shape[:2], []).append(i)
        rows: list[dict[str, Any]] = [{} for _ in pictures]
        for idx in groups.values():
            x = torch.from_numpy(np.stack([pictures[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
            x = normalize(x).to(self.device)
            located = self.fcn.locate(x)
            whole = whole_image_probs(self.models, x)
            for n, i in enumerate(idx):
                rows[i] = self._row(batch.iloc[i], located[n], whole[n])
        return pd.DataFrame(rows)

    def _row(self, image: pd.Series, located: Any, probs: np.ndarray) -> dict[str, Any]:
        names, members = self.s.classes, len(self.models)
        base = {"image_id": image["image_id"], "source_key": image["source_key"], "path": image["path"],
                "width": int(image["width"]), "height": int(image["height"]), "members": members,
                "threshold": self.s.threshold}  # fmt: skip
        if located is None:  # too small for one scale: the whole image still has a best class
            first, second = np.argsort(-probs)[:2]
            return base | {
                "predicted_label": names[first], "confidence": float(probs[first]),
                "second_label": names[second], "second_confidence": float(probs[second]),
                "unsure": bool(probs[first] < self.s.threshold), "reason": Reason.TOO_SMALL_FOR_SCALES.value,
            }  # fmt: skip
        f = located.findings
        first = f.best_class()
        second = f.best_class(exclude=first)
        x0, y0, x1, y1 = located.box(first, self.s.mode)
        votes = int(f.votes[first])
        return base | {
            "predicted_label": names[first], "confidence": float(probs[first]),
            "second_label": names[second], "second_confidence": float(probs[second]),
            "votes": votes, "cell_score": float(f.score[first]),
            "unsure": bool(probs[first] < self.s.threshold or votes < members),
            "x0": x0, "y0": y0, "x1": x1, "y1": y1, "scale": located.scale_of(first).factor,
        }  # fmt: skip


class PredictStage(Stage):
    """Pre-label this run's images with the ensemble of another, trained run (``models``: its OUT).
    Batches land in part files as they finish: an interrupted run resumes with the images that have none."""

    name = "predict"

    def __init__(
        self, models: str, threshold: float = 0.99, image_prefix: str = DEFAULT_IMAGE_PREFIX
    ) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.models, self.threshold, self.image_prefix = models, threshold, image_prefix

    def model_dirs(self, cfg: RunConfig) -> list[str]:
        trained = RunLayout(self.models)
        return [trained.model_dir(m.label) for m in cfg.train.members]

    def config_key(self, cfg: RunConfig) -> str:
        """The crop settings, the threshold and the trained models themselves (their completion records)."""
        h = hashlib.sha256(f"{cfg.section_hash('crop')}|{self.threshold}|{self.image_prefix}".encode())
        for uri in [RunLayout(self.models).classes,
                    *(storage.join(d, DONE_FILE) for d in self.model_dirs(cfg))]:  # fmt: skip
            h.update(storage.read_bytes(uri) if storage.exists(uri) else b"-")
        return h.hexdigest()[:16]

    def run(self, ctx: RunContext) -> StageResult:
        cfg = ctx.cfg
        classes = manifests.read_classes(RunLayout(self.models).classes)
        images = manifests.read_manifest("images", ctx.layout.deduped_images)
        manifests.write_manifest("images", images, ctx.manifest("images"))
        ok = images[images["status"] == Status.OK]
        parts = ctx.parts(self.name)
        settings = PredictSettings(
            out=ctx.out, parts=parts, model_dirs=self.model_dirs(cfg), classes=classes,
            step=cfg.crop.scale_factor, max_scale=cfg.crop.max_scale, early_stop=cfg.crop.early_stop,
            mode=cfg.crop.mode, threshold=self.threshold, threads=max(1, int(cfg.crop.cpus_per_actor)),
        )  # fmt: skip
        done = set(parts.read_parts("prelabels").get("image_id", []))
        columns = ["image_id", "source_key", "path", "width", "height"]
        todo = ok.loc[~ok["image_id"].isin(done), columns]
        frame = todo.sort_values(["width", "height"]).reset_index(drop=True)  # batches of one size
        if len(frame):
            for member_dir in settings.model_dirs:  # another run's folder: a bad checkpoint is one line
                load_classifier(member_dir)  # naming it, here, not in an actor (Ray reports no cause)
            drain(map_with_pool(frame, PredictWorker, settings, cfg.crop, self.name))
        rows = parts.read_parts("prelabels")
        if rows.empty:
            rows = pd.DataFrame(columns=manifests.load_schema("prelabels").names)
        rows = rows[rows["image_id"].isin(ok["image_id"])].drop_duplicates("image_id")
        rows = rows.sort_values(["unsure", "confidence"], ascending=[True, False]).reset_index(drop=True)
        manifests.write_manifest("prelabels", rows, ctx.manifest("prelabels"))
        self.write_export(ctx.out, rows, classes)
        counts = rows["predicted_label"].value_counts().sort_index()
        stats = {"images": len(rows), "processed": len(frame), "reused": len(rows) - len(frame),
                 "unsure": int(rows["unsure"].sum()), "threshold": self.threshold,
                 "predicted": {str(k): int(v) for k, v in counts.items()}}  # fmt: skip
        return StageResult(stats=stats)

    def write_export(self, out: str, rows: pd.DataFrame, classes: list[str]) -> None:
        """The prelabels for annotators: Label Studio tasks with label and crop pre-filled, and a CSV."""
        folder = export_dir(out)
        header = "Predicted: $predicted_label (confidence $confidence, unsure: $unsure)"
        storage.write_text_atomic(storage.join(folder, PRELABEL_CONFIG),
                                  labelstudio.labeling_config(classes, header, boxes=True))  # fmt: skip
        tasks = []
        for r in rows.to_dict("records"):
            data = {"image": labelstudio.image_url(r["path"], self.image_prefix), "image_id": r["image_id"],
                    "source_key": r["source_key"], "predicted_label": r["predicted_label"],
                    "confidence": round(float(r["confidence"]), 4), "unsure": bool(r["unsure"]),
                    "path": r["path"]}  # fmt: skip
            results = [labelstudio.choice_result(r["predicted_label"])]
            if not pd.isna(r.get("x0")):
                box = [int(r[c]) for c in ("x0", "y0", "x1", "y1")]
                results.append(labelstudio.box_result(r["predicted_label"], box, r["width"], r["height"]))
            tasks.append(labelstudio.task(data, "cropclean-ensemble", data["confidence"], results))
        write_json(storage.join(folder, PRELABEL_TASKS), tasks)
        write_csv(storage.join(folder, PRELABEL_CSV), rows.assign(
            image=[labelstudio.image_url(p, self.image_prefix) for p in rows["path"]]))  # fmt: skip
