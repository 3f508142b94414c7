"""Stage ``crop``: point-of-interest crops, the mislabel blacklist and the cropped dataset.

Every ok image with a split goes through a Ray Data actor pool; each actor holds the whole ensemble as
fully convolutional nets (and the fold models with cross-fitting), on a GPU share when the cluster has
GPUs. Batches are grouped by image size, so that the images of a group share one pyramid. For each image
the actor writes crops (label-driven and label-free, for the method and the baselines), its judgment
(does any member find the label?) and, unless it is blacklisted, the cropped JPEG under
``OUT/cropped/<split>/<class>/<image_id>.jpg``. Results land in part files in the stage's keyed shard
folder as each batch finishes, so a crash resumes with the images that have none.

With ``train.folds`` the train images are judged only by the fold models that never saw them; which
models crop them follows ``train.crop_models``.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import manifests, storage
from pipeline.annotate import verdicts
from pipeline.config import RunConfig
from pipeline.crop import confidence, judge, rank, select
from pipeline.crop.localize import (
    FCNEnsemble,
    LocatedBatch,
    Saliency,
    load_classifier,
    saliency_heats,
    whole_image_probs_batch,
)
from pipeline.evaluation.quality import mean_probabilities
from pipeline.models.data import load_rgb, normalize, training_rows
from pipeline.models.zoo import Classifier
from pipeline.names import UnsafeName, safe_id, safe_label, safe_split
from pipeline.reasons import Reason
from pipeline.resources import Node, PlacementError, Request, alive_nodes, as_nodes, describe_nodes, fit_count
from pipeline.stages.base import Resources, RunContext, Stage, drain
from pipeline.stages.train import fold_of, model_dir
from pipeline.summary import read_metrics, update_metrics

log = logging.getLogger("cropclean")

SIMILARNET_IMAGES = 256  # val images that measure SIMILARnet's filter importances


def cropped_path(split: str, label: str, image_id: str) -> str:
    """Where an image's crop goes, relative to the run's output URI (ImageFolder layout). The names come
    from the images manifest: one that cannot be a path segment under OUT raises UnsafeName."""
    return f"cropped/{safe_split(split)}/{safe_label(label)}/{safe_id(image_id)}.jpg"


@dataclass
class Settings:
    """What an actor needs; plain data, shipped to every actor."""

    out: str
    classes: list[str]
    members: list[str]
    folds: int
    crop_models: str  # full | folds
    method: str
    mode: str
    baselines: list[str]
    step: float
    max_scale: float
    early_stop: bool
    display_aspect: tuple[float, float] | None
    display_min_area: float
    export: bool
    jpeg_quality: int
    threads: int
    parts_dir: str
    similarnet_rows: list[tuple[str, int]] = field(default_factory=list)  # (path, label index) of val images


def _to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) pictures of one size -> normalized (N, 3, H, W) on ``device``: the uint8 pixels
    travel, the float work happens there."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return normalize(x.to(device))


TARGETS = ("label", "predicted")
Found = tuple[select.Box, str | None, dict[str, Any]]  # a box, the class searched for, extra columns


class CropWorker:
    """A Ray Data actor: the ensemble in memory; batches of images in, part files out.

    Per batch, images of one size are one group: each ensemble (the full-data members, and each fold's
    models for the train images they judge) runs once over the group's images it judges or crops, every
    scale a single forward pass per member; selection, judgments, boxes, the whole-image probabilities
    and the saliency baselines (one trunk pass per member for both methods and both targets) are tensor
    ops over the group, on the device the models are on. The host decodes images, turns the results into
    rows and writes the crops."""

    def __init__(self, settings: Settings, models: Mapping[int | None, list[Classifier]] | None = None,
                 similarnet: list[torch.Tensor] | None = None) -> None:  # fmt: skip
        """``models`` (per fold, None for the full data) and ``similarnet`` (the members' filter weights)
        are read from the run (``settings.out``) unless given."""
        self.s = settings
        torch.set_num_threads(max(1, settings.threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if models is None:
            dirs = {None: [model_dir(settings.out, m, None) for m in settings.members]}
            for k in range(settings.folds):
                dirs[k] = [model_dir(settings.out, m, k) for m in settings.members]
            models = {k: [load_classifier(d, self.device) for d in ds] for k, ds in dirs.items()}
        self.models = dict(models)
        self.fcn = {k: FCNEnsemble(ms, settings.step, settings.max_scale, settings.early_stop)
                    for k, ms in self.models.items()}  # fmt: skip
        self.saliency: dict[str, Saliency] = {}
        methods = {settings.method, *settings.baselines}
        # The saliency maps and whole-image probabilities use the FCNs' trunks (batch norms folded, oneDNN
        # convolutions: 2x faster on the CPU than the classifiers' own; the same up to rounding).
        trunks = [f.trunk for f in self.fcn[None].fcns]
        if "gradcam" in methods:
            self.saliency["gradcam"] = Saliency("gradcam", self.models[None], trunks=trunks)
        if "similarnet" in methods:
            weights = similarnet if similarnet is not None else self._similarnet_weights()
            self.saliency["similarnet"] = Saliency("similarnet", self.models[None], weights, trunks)
        # Decoding and JPEG encoding release the GIL: an actor with several CPUs (beside a GPU) uses them.
        self.pool = ThreadPoolExecutor(settings.threads) if settings.threads > 1 else None

    def _similarnet_weights(self) -> list[torch.Tensor]:
        from pipeline.crop.saliency import similarnet_weights

        if not self.s.similarnet_rows:
            raise ValueError("similarnet needs val images to measure its filter importances")
        weights = []
        labels = torch.tensor([lab for _, lab in self.s.similarnet_rows])
        pictures = [load_rgb(storage.join(self.s.out, p)) for p, _ in self.s.similarnet_rows]
        for model in self.models[None]:
            size = (model.input_size, model.input_size)
            x = _to_tensor([np.asarray(im.resize(size)) for im in pictures], self.device)
            weights.append(similarnet_weights(model, x, labels.to(self.device)))
        return weights

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        return list(self.pool.map(fn, items)) if self.pool else [fn(item) for item in items]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        pictures = self.decode(batch)
        crops, judged = self.rows(batch, pictures)
        exports = [(r.pop("_export"), r) for image_rows in crops for r in image_rows if "_export" in r]
        written = self._map(lambda e: self._export(batch.iloc[e[0]], pictures[e[0]], e[1]), exports)
        for (_, r), extra in zip(exports, written, strict=True):
            r.update(extra)
        part = uuid.uuid4().hex
        manifests.write_table_atomic(_table([r for image_rows in crops for r in image_rows]),
                                     storage.join(self.s.parts_dir, f"crops-{part}.parquet"))  # fmt: skip
        # The judged part goes last: an image counts as done only once both files exist.
        manifests.write_table_atomic(_table(judged), storage.join(self.s.parts_dir, f"judged-{part}.parquet"))
        return pd.DataFrame({"image_id": batch["image_id"].to_numpy()})

    def decode(self, batch: pd.DataFrame) -> list[np.ndarray]:
        """The batch's images, (H, W, 3) uint8."""
        return self._map(lambda p: np.asarray(load_rgb(storage.join(self.s.out, p))), list(batch["path"]))

    def rows(self, batch: pd.DataFrame, pictures: list[np.ndarray]) -> tuple[list[list[dict[str, Any]]],
                                                                           list[dict[str, Any]]]:  # fmt: skip
        """Per image its crop rows (the one to export holds ``_export``: the picture's index in the batch)
        and its judgment row, in the order the per-image worker wrote them: images grouped by size and
        fold, then batch order."""
        folds = [None if pd.isna(f) else int(f) for f in batch["fold"]]
        crops: list[list[dict[str, Any]]] = [[] for _ in pictures]
        judged: list[dict[str, Any]] = [{} for _ in pictures]
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, pic in enumerate(pictures):
            sizes.setdefault(pic.shape[:2], []).append(i)
        for idx in sizes.values():
            self._size_group(batch, pictures, folds, idx, crops, judged)
        order: dict[tuple[Any, ...], list[int]] = {}
        for i, pic in enumerate(pictures):
            order.setdefault((*pic.shape[:2], folds[i]), []).append(i)
        ranked = [i for idx in order.values() for i in idx]
        return [crops[i] for i in ranked], [judged[i] for i in ranked]

    # ----------------------------------------------------------------------------------- per size group

    def _size_group(self, batch: pd.DataFrame, pictures: list[np.ndarray], folds: list[int | None],
                    idx: list[int], crops: list[list[dict[str, Any]]],
                    judged: list[dict[str, Any]]) -> None:  # fmt: skip
        """Judge and crop the images ``idx`` of one size, filling ``crops[i]`` and ``judged[i]``."""
        x = _to_tensor([pictures[i] for i in idx], self.device)
        judge_key = [folds[i] for i in idx]
        crop_key = [k if self.s.crop_models == "folds" else None for k in judge_key]
        for key in dict.fromkeys(judge_key + crop_key):  # each ensemble once, over the images it needs
            mine = [n for n in range(len(idx)) if judge_key[n] == key or crop_key[n] == key]
            located = self.fcn[key].locate_batch(x if len(mine) == len(idx) else x[mine])
            judges = [p for p, n in enumerate(mine) if judge_key[n] == key]
            cropped = [p for p, n in enumerate(mine) if crop_key[n] == key]
            rows = [batch.iloc[idx[n]] for n in mine]
            for p, r in zip(judges, self._judge([rows[p] for p in judges], located, judges), strict=True):
                judged[idx[mine[p]]] = r
            if cropped:
                images = x[[mine[p] for p in cropped]] if len(cropped) < len(idx) else x
                found = self._crop_rows([rows[p] for p in cropped], key, located, cropped, images)
                for p, image_rows in zip(cropped, found, strict=True):
                    crops[idx[mine[p]]] = image_rows
                    for r in image_rows:
                        if "_export" in r:
                            r["_export"] = idx[mine[p]]  # the picture the crop is cut from

    def _judge(self, rows: list[pd.Series], located: LocatedBatch | None,
               positions: list[int]) -> list[dict[str, Any]]:  # fmt: skip
        """The FCN's evidence about each image's label; whether it is flagged is decided once every image
        is judged (``pipeline/crop/rank.py``)."""
        if not rows:
            return []
        base = [{"image_id": r["image_id"], "split": r["split"], "label": r["label"], "path": r["path"],
                 "cross_label": bool(r["cross_label"]), "verified": bool(r["verified"])}
                for r in rows]  # fmt: skip
        if located is None:
            return [b | {"reason": Reason.TOO_SMALL_FOR_SCALES} for b in base]
        device = located.findings.votes.device
        at = torch.tensor(positions, device=device)
        labels = torch.tensor([int(r["label_idx"]) for r in rows], device=device)
        f = located.findings.take(at)
        j = judge.judge_batch(f, labels)
        label_scale = located.factors(labels, at)
        suggested_scale = located.factors(j.suggested, at)
        columns = (j.votes, j.label_score, j.suggested, j.suggested_votes, j.suggested_score)
        votes, label_score, suggested, s_votes, s_score = (t.tolist() for t in columns)
        class_votes, class_scores = f.votes.tolist(), f.score.tolist()
        names, out = self.s.classes, []
        for n, r in enumerate(rows):
            one = judge.Judgment(votes[n], label_score[n], suggested[n], s_votes[n], s_score[n], j.members)
            out.append(base[n] | {
                "votes": one.votes, "label_score": one.label_score, "suggested_label": names[one.suggested],
                "suggested_votes": one.suggested_votes, "suggested_score": one.suggested_score,
                "members": one.members,
                # Every class's best votes and probability: the ranking compares the label's evidence with
                # that of the other classes (labels known to be wrong).
                "class_votes": class_votes[n], "class_scores": class_scores[n],
                "evidence": judge.evidence(one, r["label"], names[one.suggested], label_scale[n],
                                           suggested_scale[n]),
            })  # fmt: skip
        return out

    def _crop_rows(self, rows: list[pd.Series], key: int | None, located: LocatedBatch | None,
                   positions: list[int], x: torch.Tensor) -> list[list[dict[str, Any]]]:  # fmt: skip
        """Per image, its crop rows: every method and target, with the display box; the crop to export is
        marked, and written once the batch's rows are known."""
        s = self.s
        methods = ["fcn_ensemble", *[m for m in [s.method, *s.baselines] if m != "fcn_ensemble"]]
        bases = [{"image_id": r["image_id"], "split": r["split"], "label": r["label"], "mode": s.mode}
                 for r in rows]  # fmt: skip
        if located is None:
            return [[b | {"target": t, "method": m, "reason": Reason.TOO_SMALL_FOR_SCALES}
                     for m in methods for t in TARGETS] for b in bases]  # fmt: skip
        height, width = x.shape[-2:]
        found = self._locate_all(methods, rows, key, located, positions, x)
        corners = ("display_x0", "display_y0", "display_x1", "display_y1")
        out = []
        for n, base in enumerate(bases):
            image_rows = []
            for method in methods:
                for t, target in enumerate(TARGETS):
                    box, searched, extra = found[method][t][n]
                    r = base | {"target": target, "method": method, "searched": searched, **extra}
                    r.update(zip(("x0", "y0", "x1", "y1"), box, strict=True))
                    if s.display_aspect:
                        d = select.display_box(box, width, height, s.display_aspect, s.display_min_area)
                        r.update(zip(corners, d, strict=True))
                    if method == s.method and target == "label" and s.export:
                        r["_export"] = n
                    image_rows.append(r)
            out.append(image_rows)
        return out

    def _locate_all(self, methods: list[str], rows: list[pd.Series], key: int | None, located: LocatedBatch,
                    positions: list[int], x: torch.Tensor) -> dict[str, list[list[Found]]]:  # fmt: skip
        """Every method's box for both targets of every image, computed for the whole group at once:
        per method, per target, per image (box, searched class, extra columns)."""
        names, mode = self.s.classes, self.s.mode
        height, width = x.shape[-2:]
        device = located.findings.votes.device
        at = torch.tensor(positions, device=device)
        labels = torch.tensor([int(r["label_idx"]) for r in rows], device=device)
        f = located.findings.take(at)
        fcn_class = torch.stack([labels, f.best_class()])  # (2, n): label-driven, label-free
        boxes = located.boxes(fcn_class.flatten(), mode, at.repeat(2)).view(2, -1, 4).tolist()
        scale = located.factors(fcn_class.flatten(), at.repeat(2)).reshape(2, -1).tolist()
        votes, score = (t.gather(1, fcn_class.T).T.tolist() for t in (f.votes, f.score))
        searched = fcn_class.tolist()
        fcn = [[(tuple(boxes[t][n]), names[searched[t][n]],
                 {"scale": scale[t][n], "votes": votes[t][n], "members": f.members, "score": score[t][n]})
                for n in range(len(rows))] for t in range(2)]  # fmt: skip
        found = {"fcn_ensemble": fcn}
        # The method's crop size, in the middle: zoom without localization.
        found["centre"] = [[(select.centre_box(max(x1 - x0, y1 - y0), width, height), None, {})
                            for (x0, y0, x1, y1), _, _ in per_target] for per_target in fcn]  # fmt: skip
        localizers = [self.saliency[m] for m in methods if m in self.saliency]
        if not localizers:
            return found
        whole = whole_image_probs_batch(self.models[key], x, [e.trunk for e in self.fcn[key].fcns])
        classes = torch.stack([labels, whole.argmax(dim=1).to(device)])  # (2, n)
        searched = classes.tolist()
        sides = [sc.side for sc in located.scales]
        for method, heat in saliency_heats(localizers, x, classes).items():
            if mode == "region":
                b, share = select.heat_regions(heat.flatten(0, 1)).view(2, -1, 4).tolist(), None
            else:
                b, share = select.heat_windows(heat.flatten(0, 1), sides)
                b, share = b.view(2, -1, 4).tolist(), share.view(2, -1).tolist()
            extra = [[{} if share is None else {"score": v} for v in per_target] for per_target in share or b]
            found[method] = [[(tuple(b[t][n]), names[searched[t][n]], extra[t][n]) for n in range(len(rows))]
                             for t in range(2)]  # fmt: skip
        return found

    def _export(self, row: pd.Series, picture: np.ndarray, crop: dict[str, Any]) -> dict[str, Any]:
        """The crop under OUT/cropped/; the stage takes blacklisted images out once the list is known."""
        try:
            path = cropped_path(row["split"], row["label"], row["image_id"])
        except UnsafeName as exc:  # a manifest edited by hand: the row says why, nothing is written
            return {"reason": exc.reason}
        x0, y0, x1, y1 = (crop[c] for c in ("x0", "y0", "x1", "y1"))
        buf = io.BytesIO()
        Image.fromarray(picture[y0:y1, x0:x1]).save(buf, format="JPEG", quality=self.s.jpeg_quality)
        storage.write_bytes_atomic(storage.join(self.s.out, path), buf.getvalue())
        return {"path": path}


def _table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    frame = pd.DataFrame(rows)
    return pa.Table.from_pandas(frame, preserve_index=False)


# ------------------------------------------------------------------------------------------ the stage


def cross_label_ids(ctx: RunContext) -> set[str]:
    """Images whose duplicate group carries more than one label (dedupe's ``cross_label``)."""
    uri = ctx.manifest("duplicates")
    if not storage.exists(uri):
        return set()
    dups = manifests.read_manifest("duplicates", uri, columns=["image_id", "cross_label"])
    return set(dups.loc[dups["cross_label"], "image_id"])


def read_parts(parts_dir: str, kind: str) -> pd.DataFrame:
    frames = [manifests.read_table(u).to_pandas() for u in storage.list_files(parts_dir, ".parquet")
              if u.rsplit("/", 1)[-1].startswith(f"{kind}-")]  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def prepare_export_dir(ctx: RunContext, key: str) -> None:
    """OUT/cropped/ belongs to one stage key: crops of other settings are removed before new ones come."""
    key_file = ctx.uri("cropped", "_KEY")
    previous = storage.read_text(key_file).strip() if storage.exists(key_file) else None
    if previous != key:
        storage.remove(ctx.uri("cropped"))
        storage.write_text_atomic(key_file, key)


def use_gpu(cfg: RunConfig) -> bool:
    import ray

    choice = cfg.crop.use_gpu
    return choice == "yes" or (choice == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def default_actors(cfg: RunConfig, resources: Mapping[str, float] | Sequence[Node], gpu: bool) -> int:
    """As many actors as the nodes hold: on a GPU cluster each node's GPUs over ``gpus_per_actor`` (as far
    as its CPUs hold ``cpus_per_actor`` each), else its CPUs over ``cpus_per_actor``, summed over the
    nodes (an actor lives on one node: 1.5 CPUs on one and 0.5 on another hold one 1-CPU actor, not
    two). The stage runs alone, and its input is in memory: no read tasks. 0 when no node holds one. A
    mapping of totals (``ray.cluster_resources()``) is taken as one node."""
    c = cfg.crop
    return fit_count(as_nodes(resources), c.cpus_per_actor, c.gpus_per_actor if gpu else 0.0)


def crop_actors(cfg: RunConfig, nodes: Sequence[Node], gpu: bool, stage: str = "crop") -> int:
    """The actor pool's size: ``crop.actors``, or as many as the nodes hold; fails at once when no node
    holds one actor, and starts only as many as fit when ``crop.actors`` asks for more (the others would
    wait for a node forever)."""
    c = cfg.crop
    fit = default_actors(cfg, nodes, gpu)
    actor = Request("actor", c.cpus_per_actor, c.gpus_per_actor if gpu else 0.0)
    if fit == 0:
        settings = "crop.cpus_per_actor" + (", crop.gpus_per_actor" if gpu else "")
        raise PlacementError(
            f"{stage}: an actor of {actor.shape()} ({settings}) fits on no node "
            f"({describe_nodes(nodes)}). Lower {settings}, or add a node that large."
        )
    if c.actors and c.actors > fit:
        log.warning("%s: crop.actors is %d but the nodes hold %d of %s (%s); starting %d", stage, c.actors,
                    fit, actor.shape(), describe_nodes(nodes), fit)  # fmt: skip
        return fit
    return c.actors or fit


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
    resources = Resources(cpus=1)
    config_sections: ClassVar[tuple[str, ...]] = ("crop", "blacklist")

    def config_key(self, cfg: RunConfig) -> str:
        key = super().config_key(cfg)
        checked = verdicts.digest(verdicts.read_overrides(cfg.out), ("keep", "relabel"))
        return key if checked is None else f"{key}+verified={checked}"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg, start = ctx.cfg, time.perf_counter()
        classes = json.loads(storage.read_text(ctx.uri("models", "classes.json")))
        images = manifests.read_manifest("images", ctx.manifest("images"))
        verified = verdicts.verified_ids(cfg.out)
        rows = stage_rows(ctx, images, classes, verified)

        key = ctx.keys.get(self.name, "-")
        parts_dir = ctx.shard_dir(self.name)
        prepare_export_dir(ctx, key)
        done = read_parts(parts_dir, "judged")
        todo = rows[~rows["image_id"].isin(set(done.get("image_id", [])))]
        settings = self._settings(ctx, classes, rows, parts_dir)
        if len(todo):
            self._run_actors(cfg, settings, todo)
        crops, judged = read_parts(parts_dir, "crops"), read_parts(parts_dir, "judged")
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
        judgments = storage.join(ctx.stage_dir(self.name), "judgments.parquet")
        manifests.write_table_atomic(_table(scored.to_dict("records")), judgments)
        seconds = time.perf_counter() - start
        stats = crop_stats(crops, blacklist, too_small, cfg.crop.method, len(todo), seconds)
        stats["confidence"] = gate.decision  # crops and blacklist come from the same ensemble
        stats["blacklist"] = summary | {"flagged": len(blacklist), "confidence": gate.as_dict()}
        update_metrics(cfg.out, "crop", stats)
        if gate.decision == confidence.OK:
            log.info("crop: %s", gate.message())
        else:
            log.warning("crop: %s", gate.message())
        if len(blacklist) > summary["allowed"]:
            log.warning("crop: the blacklist holds %d images, more than the %d wrong labels the run "
                        "estimates (%.1f%% of %d); the annotator export sends the first %d unless forced "
                        "(cropclean export OUT --force)", len(blacklist), summary["allowed"],
                        100 * summary["noise_rate"], summary["images"], summary["allowed"])  # fmt: skip
        return stats

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

    def _settings(self, ctx: RunContext, classes: list[str], rows: pd.DataFrame, parts_dir: str) -> Settings:
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
            parts_dir=parts_dir,
            similarnet_rows=list(zip(val["path"], val["label_idx"].astype(int), strict=True)),
        )  # fmt: skip

    def _run_actors(self, cfg: RunConfig, settings: Settings, todo: pd.DataFrame) -> None:
        import ray

        gpu = use_gpu(cfg)
        actors = crop_actors(cfg, alive_nodes(), gpu)
        columns = ["image_id", "split", "label", "label_idx", "path", "fold", "cross_label", "verified"]
        # Rows sorted by size so that batches hold images of one pyramid.
        frame = todo[columns].assign(_size=todo["width"] * 100_000 + todo["height"]).sort_values("_size")
        ds = ray.data.from_pandas(batch_blocks(frame.drop(columns="_size"), cfg.crop.batch_size))
        ds = ds.map_batches(
            CropWorker, fn_constructor_kwargs={"settings": settings}, batch_size=cfg.crop.batch_size,
            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.crop.cpus_per_actor, num_gpus=cfg.crop.gpus_per_actor if gpu else 0,
        )  # fmt: skip
        drain(ds)


def batch_blocks(frame: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """One block per batch: Ray Data hands an actor pool whole blocks, so a single block of every row
    would keep all but one actor idle."""
    frame = frame.reset_index(drop=True)
    blocks = [frame.iloc[i : i + batch_size].reset_index(drop=True) for i in range(0, len(frame), batch_size)]
    return blocks or [frame]


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
