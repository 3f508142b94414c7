"""The crop stage's actor: the ensemble in memory, batches of images in, part files out.

Per batch, images of one size are one group: each ensemble (the full-data members, and each fold's
models for the train images they judge) runs once over the group's images it judges or crops, every
scale a single forward pass per member; selection, judgments, boxes, the whole-image probabilities and
the saliency baselines are tensor ops over the group, on the device the models are on. The host decodes
images, turns the results into rows and writes the crops. The stage (``pipeline.stages.crop``) decides
which images an actor gets and reads its part files back.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import manifests, storage
from pipeline.crop import judge, select
from pipeline.crop.localize import (
    FCNEnsemble,
    LocatedBatch,
    Saliency,
    load_classifier,
    saliency_heats,
    whole_image_probs_batch,
)
from pipeline.layout import RunLayout, cropped_path
from pipeline.models.data import load_rgb, normalize
from pipeline.models.zoo import Classifier
from pipeline.names import UnsafeName
from pipeline.reasons import Reason
from pipeline.resume import KeyedFolder


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
    parts: KeyedFolder  # where each batch's crops and judgments go (the stage resumes from them)
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
            layout = RunLayout(settings.out)
            dirs = {None: [layout.model_dir(m) for m in settings.members]}
            for k in range(settings.folds):
                dirs[k] = [layout.model_dir(m, k) for m in settings.members]
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
        manifests.write_table_atomic(_table([r for image_rows in crops for r in image_rows]),
                                     self.s.parts.new_part("crops"))  # fmt: skip
        # The judged part goes last: an image counts as done only once both files exist.
        manifests.write_table_atomic(_table(judged), self.s.parts.new_part("judged"))
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
