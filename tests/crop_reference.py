"""The crop stage's per-image path as it was before it was batched (7bbd85d), frozen: the reference that
``tests/test_crop_batched.py`` and ``bench/crop.py`` compare the batched implementation with.

Copied, not imported: the pyramid (member maps one at a time, aligned in numpy), the selection and the
boxes (numpy and scipy, one image at a time), Grad-CAM and SIMILARnet (one image and one class per
call), the whole-image probabilities, and the worker's rows (``reference_rows``: what ``CropWorker``
wrote per image). The FCNs are rebuilt as they were (``ReferenceFCN``: batch norms folded by torch.fx, plain
convolutions); only the classifiers' weights are shared. Not for production use; do not edit except to
follow a deliberate change of the crop stage's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from pipeline.crop.fcn import Geometry, _convolutional, feature_offset
from pipeline.crop.pyramid import Scale, pyramid
from pipeline.models.zoo import ARCHS, Classifier
from pipeline.reasons import Reason

Box = tuple[int, int, int, int]


# -------------------------------------------------------------------------------------------- FCNs


class ReferenceFCN(nn.Module):
    """``pipeline.crop.fcn.FCN`` of 7bbd85d: trunk with batch norms folded (torch.fx), average pool of
    kernel D, the head's per-location twin, channels-last."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        from torch.fx.experimental.optimization import fuse

        window = model.input_size
        self.head = nn.Sequential(*[_convolutional(layer) for layer in model.head])
        with torch.no_grad():
            probe = next(model.parameters())
            pool = model.trunk(torch.zeros(1, 3, window, window, dtype=probe.dtype, device=probe.device))
        self.geometry = Geometry(window=window, stride=ARCHS[model.arch].stride, pool=int(pool.shape[-1]))
        self.pool = nn.AvgPool2d(self.geometry.pool, stride=1)
        import copy

        try:
            self.trunk = fuse(copy.deepcopy(model.trunk).eval())
        except Exception:
            self.trunk = model.trunk
        self.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.trunk(x.contiguous(memory_format=torch.channels_last))))


FCN = ReferenceFCN


# ------------------------------------------------------------------------------------------ pyramid


@dataclass
class ScaleMaps:
    scale: Scale
    cx: np.ndarray
    cy: np.ndarray
    probs: np.ndarray  # (M, C, h, w) float32

    def boxes(self, width: int, height: int) -> np.ndarray:
        side = min(round(self.scale.side), width, height)
        x0 = np.clip(np.round(self.cx - (side - 1) / 2), 0, width - side).astype(np.int64)
        y0 = np.clip(np.round(self.cy - (side - 1) / 2), 0, height - side).astype(np.int64)
        gx, gy = np.meshgrid(x0, y0)
        return np.stack([gx, gy, gx + side, gy + side], axis=-1)


def nearest(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(source, target), 1, max(len(source) - 1, 1))
    left = np.abs(target - source[idx - 1]) <= np.abs(source[np.minimum(idx, len(source) - 1)] - target)
    return np.where(left, idx - 1, np.minimum(idx, len(source) - 1))


def member_maps(fcn: FCN, images: torch.Tensor, side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = fcn.geometry
    factor = g.window / side
    h, w = images.shape[-2:]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    resized = nn.functional.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False,
                                        antialias=factor < 1)  # fmt: skip
    fy, fx = nh / h, nw / w
    logits = fcn(resized)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1).float()
    ph, pw = probs.shape[-2:]
    cx = g.centres(pw) / fx + (1 / fx - 1) / 2
    cy = g.centres(ph) / fy + (1 / fy - 1) / 2
    return probs.cpu().numpy(), cx, cy


def ensemble_maps(
    fcns: Sequence[FCN], images: torch.Tensor, scales: Sequence[Scale]
) -> list[list[ScaleMaps]]:
    ref = max(range(len(fcns)), key=lambda m: fcns[m].geometry.window)
    out: list[list[ScaleMaps]] = [[] for _ in range(images.shape[0])]
    with torch.no_grad():
        for scale in scales:
            maps = [member_maps(f, images, scale.side) for f in fcns]
            _, rcx, rcy = maps[ref]
            aligned = []
            for probs, cx, cy in maps:
                ix, iy = nearest(cx, rcx), nearest(cy, rcy)
                aligned.append(probs[:, :, iy][:, :, :, ix])
            stacked = np.stack(aligned, axis=1)
            for n in range(images.shape[0]):
                out[n].append(ScaleMaps(scale, rcx, rcy, stacked[n]))
    return out


# ---------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Findings:
    votes: np.ndarray
    score: np.ndarray
    scale: np.ndarray
    row: np.ndarray
    col: np.ndarray
    members: int

    def best_class(self, exclude: int | None = None) -> int:
        key = self.votes * 2.0 + self.score
        if exclude is not None:
            key = key.copy()
            key[exclude] = -np.inf
        return int(np.argmax(key))


def votes_and_mean(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = probs.shape[1]
    winners = probs.argmax(axis=1)
    votes = (winners[:, None] == np.arange(classes)[None, :, None, None]).sum(axis=0)
    return votes, probs.mean(axis=0)


def find_classes(maps: Sequence[ScaleMaps], early_stop: bool = False) -> Findings:
    members, classes = maps[0].probs.shape[:2]
    best_votes = np.full(classes, -1, dtype=np.int64)
    best_score = np.full(classes, -1.0)
    where = np.zeros((3, classes), dtype=np.int64)
    done = np.zeros(classes, dtype=bool)
    for k, m in enumerate(maps):
        votes, mean = votes_and_mean(m.probs)
        w = votes.shape[2]
        flat = (votes * 2.0 + mean).reshape(classes, -1).argmax(axis=1)
        v, s = (
            votes.reshape(classes, -1)[np.arange(classes), flat],
            mean.reshape(classes, -1)[np.arange(classes), flat],
        )
        better = ~done & ((v > best_votes) | ((v == best_votes) & (s > best_score)))
        best_votes[better], best_score[better] = v[better], s[better]
        where[:, better] = np.stack([np.full(classes, k), flat // w, flat % w])[:, better]
        if early_stop:
            done |= best_votes == members
    return Findings(best_votes, best_score, where[0], where[1], where[2], members)


def cell_box(maps: Sequence[ScaleMaps], f: Findings, cls: int, width: int, height: int) -> Box:
    m = maps[int(f.scale[cls])]
    return tuple(int(v) for v in m.boxes(width, height)[f.row[cls], f.col[cls]])  # type: ignore[return-value]


def region_box(maps: Sequence[ScaleMaps], f: Findings, cls: int, width: int, height: int) -> Box:
    x0, y0, x1, y1 = cell_box(maps, f, cls, width, height)
    if f.votes[cls] <= 0:
        return x0, y0, x1, y1
    m = maps[int(f.scale[cls])]
    votes, _ = votes_and_mean(m.probs)
    labels, _ = ndimage.label(votes[cls] >= f.votes[cls], structure=np.ones((3, 3), dtype=bool))
    rows, cols = np.nonzero(labels == labels[f.row[cls], f.col[cls]])
    b = m.boxes(width, height)[rows, cols]
    cx, cy = np.round(m.cx[cols]).astype(np.int64), np.round(m.cy[rows]).astype(np.int64)
    left, top = np.where(b[:, 0] == 0, 0, cx), np.where(b[:, 1] == 0, 0, cy)
    right, bottom = np.where(b[:, 2] == width, width, cx + 1), np.where(b[:, 3] == height, height, cy + 1)
    return (
        int(np.clip(min(x0, left.min()), 0, width)),
        int(np.clip(min(y0, top.min()), 0, height)),
        int(np.clip(max(x1, right.max()), 0, width)),
        int(np.clip(max(y1, bottom.max()), 0, height)),
    )


def inside(x0: float, y0: float, w: float, h: float, width: int, height: int) -> Box:
    w, h = min(round(w), width), min(round(h), height)
    x0 = int(np.clip(round(x0), 0, width - w))
    y0 = int(np.clip(round(y0), 0, height - h))
    return x0, y0, x0 + w, y0 + h


def display_box(box: Box, width: int, height: int, aspect: tuple[float, float], min_area: float = 0.0) -> Box:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    lo, hi = aspect
    if w < lo * h:
        w = lo * h
    elif w > hi * h:
        h = w / hi
    need = min_area * width * height
    if w * h < need:
        grow = (need / (w * h)) ** 0.5
        w, h = w * grow, h * grow
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return inside(cx - w / 2, cy - h / 2, w, h, width, height)


def centre_box(side: float, width: int, height: int) -> Box:
    return inside((width - side) / 2, (height - side) / 2, side, side, width, height)


def heat_window(heat: np.ndarray, sides: Sequence[float], step: float = 1 / 8) -> tuple[Box, float]:
    height, width = heat.shape
    total = float(heat.sum())
    if total <= 0:
        side = min(width, height)
        return centre_box(side, width, height), 0.0
    integral = np.pad(heat.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best: tuple[float, Box] = (-np.inf, (0, 0, width, height))
    for s in sides:
        side = min(round(s), width, height)
        stride = max(1, round(side * step))
        xs = np.unique(np.r_[np.arange(0, width - side + 1, stride), width - side])
        ys = np.unique(np.r_[np.arange(0, height - side + 1, stride), height - side])
        gx, gy = np.meshgrid(xs, ys)
        sums = (
            integral[gy + side, gx + side]
            - integral[gy, gx + side]
            - integral[gy + side, gx]
            + integral[gy, gx]
        )
        score = sums / total - side * side / (width * height)
        i = np.unravel_index(int(score.argmax()), score.shape)
        if score[i] > best[0]:
            x, y = int(gx[i]), int(gy[i])
            best = (float(score[i]), (x, y, x + side, y + side))
    return best[1], best[0]


def heat_region(heat: np.ndarray, threshold: float = 0.5) -> Box:
    height, width = heat.shape
    peak = float(heat.max())
    if peak <= 0:
        return centre_box(min(width, height), width, height)
    labels, _ = ndimage.label(heat >= threshold * peak, structure=np.ones((3, 3), dtype=bool))
    py, px = np.unravel_index(int(heat.argmax()), heat.shape)
    ys, xs = np.nonzero(labels == labels[py, px])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ------------------------------------------------------------------------------------------ localizers


@dataclass
class Located:
    width: int
    height: int
    scales: list[Scale]
    maps: list[ScaleMaps]
    findings: Findings

    def box(self, cls: int, mode: str) -> Box:
        pick = region_box if mode == "region" else cell_box
        return pick(self.maps, self.findings, cls, self.width, self.height)

    def scale_of(self, cls: int) -> Scale:
        return self.scales[int(self.findings.scale[cls])]


def locate(fcns: Sequence[FCN], images: torch.Tensor, step: float = 1.2, max_scale: float = 3.0,
           early_stop: bool = False) -> list[Located | None]:  # fmt: skip
    """FCNEnsemble.locate: normalized images of one size -> per image its findings, or None."""
    height, width = images.shape[-2:]
    window = max(f.geometry.window for f in fcns)
    scales = pyramid(min(width, height), window, step, max_scale)
    if not scales:
        return [None] * images.shape[0]
    per_image = ensemble_maps(fcns, images, scales)
    return [Located(width, height, scales, maps, find_classes(maps, early_stop)) for maps in per_image]


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    maps = maps.clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps / peak[:, None, None]).float()


def _as_model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters(), None)
    return images if param is None else images.to(device=param.device, dtype=param.dtype)


def gradcam(model: Classifier, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    model.eval()
    x = _as_model_input(model, images)
    with torch.no_grad():
        features = model.trunk(x)
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        score = logits.gather(1, classes.to(logits.device).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, features)
    weights = grad.mean(dim=(2, 3))
    with torch.no_grad():
        maps = torch.einsum("nk,nkhw->nhw", weights, features)
    return _normalized(maps).to(images.device)


def similarnet_map(model: Classifier, weights: torch.Tensor, images: torch.Tensor,
                   classes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    model.eval()
    x = _as_model_input(model, images)
    with torch.no_grad():
        features = model.trunk(x)
        per_image = weights.to(device=features.device, dtype=features.dtype)[classes.to(features.device)]
        maps = torch.einsum("nk,nkhw->nhw", per_image, features)
    return _normalized(maps).to(images.device)


def to_image_plane(
    maps: torch.Tensor, height: int, width: int, centres: tuple[np.ndarray, np.ndarray]
) -> torch.Tensor:
    ys, xs = (np.asarray(c, dtype=np.float64) for c in centres)
    fy = np.interp(np.arange(height), ys, np.arange(len(ys))) / max(len(ys) - 1, 1) * 2 - 1
    fx = np.interp(np.arange(width), xs, np.arange(len(xs))) / max(len(xs) - 1, 1) * 2 - 1
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1)).to(device=maps.device, dtype=maps.dtype)
    up = F.grid_sample(maps[:, None], grid.expand(len(maps), -1, -1, -1), mode="bilinear", align_corners=True)
    return up[:, 0]


_OFFSETS: dict[tuple[str, int], float] = {}


def feature_centres(model: Classifier, cells: int) -> np.ndarray:
    key = (model.arch, hash(repr(model.trunk)))
    if key not in _OFFSETS:
        stride = ARCHS[model.arch].stride
        try:
            _OFFSETS[key] = feature_offset(model.trunk, stride, ARCHS[model.arch].min_size)
        except RuntimeError:
            _OFFSETS[key] = feature_offset(model.trunk, stride, model.input_size)
    return _OFFSETS[key] + ARCHS[model.arch].stride * np.arange(cells, dtype=np.float64)


def saliency_heat(method: str, members: Sequence[Classifier], weights: Sequence[torch.Tensor] | None,
                  images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:  # fmt: skip
    """Saliency.heat: (N, H, W) mean over members of their maps, each at its own input scale."""
    height, width = images.shape[-2:]
    total = np.zeros((images.shape[0], height, width), dtype=np.float32)
    for n, model in enumerate(members):
        factor = model.input_size / min(height, width)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
        if method == "gradcam":
            maps = gradcam(model, x, classes)
        else:
            assert weights is not None
            maps = similarnet_map(model, weights[n], x, classes)
        fy, fx = size[0] / height, size[1] / width
        ys = feature_centres(model, maps.shape[-2]) / fy + (1 / fy - 1) / 2
        xs = feature_centres(model, maps.shape[-1]) / fx + (1 / fx - 1) / 2
        total += to_image_plane(maps, height, width, centres=(ys, xs)).float().cpu().numpy()
    return total / len(members)


def whole_image_probs(members: Sequence[Classifier], images: torch.Tensor) -> np.ndarray:
    probs = []
    with torch.no_grad():
        for model in members:
            side = (model.input_size, model.input_size)
            x = F.interpolate(images, size=side, mode="bilinear", antialias=True)
            probs.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.mean(probs, axis=0)


# ---------------------------------------------------------------------------------------- the worker


@dataclass
class Reference:
    """What the old worker held: per model key (None: full data; k: fold k) the FCNs and classifiers."""

    fcns: dict[int | None, list[FCN]]
    models: dict[int | None, list[Classifier]]
    classes: list[str]
    crop_models: str  # full | folds
    method: str
    mode: str
    baselines: list[str]
    step: float = 1.2
    max_scale: float = 3.0
    early_stop: bool = False
    display_aspect: tuple[float, float] | None = None
    display_min_area: float = 0.0
    similarnet: list[torch.Tensor] | None = None


def reference_rows(ref: Reference, batch: pd.DataFrame, pictures: list[np.ndarray],
                   to_tensor) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """CropWorker.__call__ of 7bbd85d without the export: (crop rows, judged rows) for one batch.
    ``to_tensor`` turns a list of (H, W, 3) uint8 pictures into normalized (N, 3, H, W)."""
    crops: list[dict[str, Any]] = []
    judged: list[dict[str, Any]] = []
    folds = batch["fold"].to_numpy()
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, pic in enumerate(pictures):
        fold = None if pd.isna(folds[i]) else int(folds[i])
        groups.setdefault((pic.shape[0], pic.shape[1], fold), []).append(i)
    for (_, _, fold), idx in groups.items():
        x = to_tensor([pictures[i] for i in idx])
        judge_located = locate(ref.fcns[fold], x, ref.step, ref.max_scale, ref.early_stop)
        crop_key = fold if ref.crop_models == "folds" else None
        crop_located = judge_located
        if crop_key != fold:
            crop_located = locate(ref.fcns[crop_key], x, ref.step, ref.max_scale, ref.early_stop)
        methods = {ref.method, *ref.baselines}
        whole = whole_image_probs(ref.models[crop_key], x) if methods & {"gradcam", "similarnet"} else None
        for n, i in enumerate(idx):
            row = batch.iloc[i]
            judged.append(_judge(ref, row, judge_located[n]))
            crops += _crop_rows(ref, row, pictures[i], crop_located[n], x[n : n + 1],
                                None if whole is None else whole[n])  # fmt: skip
    return crops, judged


def _judge(ref: Reference, row: pd.Series, located: Located | None) -> dict[str, Any]:
    base = {"image_id": row["image_id"], "split": row["split"], "label": row["label"], "path": row["path"],
            "cross_label": bool(row["cross_label"]), "verified": bool(row["verified"])}  # fmt: skip
    if located is None:
        return base | {"reason": Reason.TOO_SMALL_FOR_SCALES}
    f = located.findings
    label = int(row["label_idx"])
    other = f.best_class(exclude=label)
    names = ref.classes
    votes, label_score = int(f.votes[label]), float(f.score[label])
    s_votes, s_score = int(f.votes[other]), float(f.score[other])
    evidence = (
        f"{row['label']}: best {votes}/{f.members} votes, p={label_score:.2f} "
        f"(scale {located.scale_of(label).factor:.2f}); {names[other]}: {s_votes}/{f.members} votes, "
        f"p={s_score:.2f} (scale {located.scale_of(other).factor:.2f})"
    )
    return base | {
        "votes": votes, "label_score": label_score, "suggested_label": names[other],
        "suggested_votes": s_votes, "suggested_score": s_score, "members": f.members,
        "class_votes": [int(v) for v in f.votes], "class_scores": [float(v) for v in f.score],
        "evidence": evidence,
    }  # fmt: skip


def _crop_rows(ref: Reference, row: pd.Series, picture: np.ndarray, located: Located | None, x: torch.Tensor,
               whole: np.ndarray | None) -> list[dict[str, Any]]:  # fmt: skip
    base = {"image_id": row["image_id"], "split": row["split"], "label": row["label"], "mode": ref.mode}
    methods = ["fcn_ensemble", *[m for m in [ref.method, *ref.baselines] if m != "fcn_ensemble"]]
    if located is None:
        return [base | {"target": t, "method": m, "reason": Reason.TOO_SMALL_FOR_SCALES}
                for m in methods for t in ("label", "predicted")]  # fmt: skip
    height, width = picture.shape[:2]
    label = int(row["label_idx"])
    fcn_class = {"label": label, "predicted": located.findings.best_class()}
    fcn_box = {t: located.box(c, ref.mode) for t, c in fcn_class.items()}
    rows = []
    for method in methods:
        for target in ("label", "predicted"):
            box, searched, extra = _locate(ref, method, target, located, fcn_class, fcn_box, label, x, whole)
            r = base | {"target": target, "method": method, "searched": searched, **extra}
            r.update(zip(("x0", "y0", "x1", "y1"), box, strict=True))
            if ref.display_aspect:
                d = display_box(box, width, height, ref.display_aspect, ref.display_min_area)
                r.update(zip(("display_x0", "display_y0", "display_x1", "display_y1"), d, strict=True))
            rows.append(r)
    return rows


def _locate(ref: Reference, method: str, target: str, located: Located, fcn_class: dict[str, int],
            fcn_box: dict[str, Box], label: int, x: torch.Tensor,
            whole: np.ndarray | None) -> tuple[Box, str | None, dict[str, Any]]:  # fmt: skip
    names, f = ref.classes, located.findings
    height, width = x.shape[-2:]
    if method == "fcn_ensemble":
        c = fcn_class[target]
        extra = {"scale": located.scale_of(c).factor, "votes": int(f.votes[c]), "members": f.members,
                 "score": float(f.score[c])}  # fmt: skip
        return fcn_box[target], names[c], extra
    if method == "centre":
        x0, y0, x1, y1 = fcn_box[target]
        return centre_box(max(x1 - x0, y1 - y0), width, height), None, {}
    assert whole is not None
    c = label if target == "label" else int(np.argmax(whole))
    heat = saliency_heat(method, ref.models[None], ref.similarnet, x, torch.tensor([c], device=x.device))[0]
    if ref.mode == "region":
        return heat_region(heat), names[c], {}
    box, share = heat_window(heat, [sc.side for sc in located.scales])
    return box, names[c], {"score": share}
