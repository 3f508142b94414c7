"""Crop selection: from heatmaps to one box per class (seed 000, with the fixes DESIGN.md lists).

At one scale, a cell's votes for class c are the members whose argmax there is c; the best cell
maximizes (votes, summed probability of c). Across scales the best is the lexicographic maximum of
(votes, mean probability); ties go to the coarser scale, and with ``early_stop`` the search for a class
ends at the first scale where every member finds it. Everything is computed for all classes at once:
the given label's finding makes the label-driven crop, the best class's the label-free one, and the
best class other than the label is the suggestion for a mislabelled image.

The work is done in torch on a whole batch at once (``find_classes_batch``, ``cell_boxes``,
``region_boxes``, ``heat_windows``, ``heat_regions``), on whatever device the maps are on; the
one-image functions (``find_classes``, ``cell_box``, ...) are the same code on a batch of one.
Comparisons keep numpy's float semantics: a cell's key is votes * 2 + mean probability in float64, and
ties go to the first cell (``argmax`` returns the first maximum in both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.crop.pyramid import ScaleGrid, ScaleMaps, window_boxes

Box = tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 exclusive


@dataclass(frozen=True)
class Findings:
    """For every class: its best votes, mean probability, and where (scale index, cell row, column)."""

    votes: np.ndarray  # (C,) int
    score: np.ndarray  # (C,) float
    scale: np.ndarray  # (C,) int, index into the image's scales
    row: np.ndarray  # (C,) int
    col: np.ndarray  # (C,) int
    members: int

    def best_class(self, exclude: int | None = None) -> int:
        """The class found most strongly: most votes, then highest mean probability."""
        key = self.votes * 2.0 + self.score
        if exclude is not None:
            key = key.copy()
            key[exclude] = -np.inf
        return int(np.argmax(key))


@dataclass(frozen=True)
class BatchFindings:
    """``Findings`` of a batch of images, as (N, C) tensors on the maps' device."""

    votes: torch.Tensor  # (N, C) int64
    score: torch.Tensor  # (N, C) float64
    scale: torch.Tensor  # (N, C) int64
    row: torch.Tensor  # (N, C) int64
    col: torch.Tensor  # (N, C) int64
    members: int

    def best_class(self, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) the class found most strongly in each image, optionally other than ``exclude`` (N,)."""
        key = self.votes.double() * 2.0 + self.score
        if exclude is not None:
            key = key.scatter(1, exclude.view(-1, 1), -torch.inf)
        return key.argmax(dim=1)

    def take(self, index: torch.Tensor) -> BatchFindings:
        """The findings of images ``index`` only."""
        v, s, k, r, c = (t[index] for t in (self.votes, self.score, self.scale, self.row, self.col))
        return BatchFindings(v, s, k, r, c, self.members)

    def image(self, n: int) -> Findings:
        """Image n's findings, in host memory."""
        v, s, k, r, c = (t[n].cpu().numpy() for t in (self.votes, self.score, self.scale, self.row, self.col))
        return Findings(v, s, k, r, c, self.members)


def votes_and_mean(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, C, h, w) member probabilities -> votes (C, h, w) and mean probability (C, h, w)."""
    votes, mean = batch_votes_and_mean(torch.from_numpy(np.ascontiguousarray(probs))[None])
    return votes[0].numpy(), mean[0].numpy()


def batch_votes_and_mean(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M, C, h, w) member probabilities -> votes (N, C, h, w) int64 and mean probability (N, C, h, w):
    a member votes for the class of its argmax (the first, on a tie)."""
    classes = probs.shape[2]
    votes = F.one_hot(probs.argmax(dim=2), classes).sum(dim=1)  # (N, h, w, C)
    return votes.permute(0, 3, 1, 2), probs.mean(dim=1)


def find_classes_batch(
    probs: Sequence[torch.Tensor], early_stop: bool = False
) -> tuple[BatchFindings, list[torch.Tensor]]:
    """Each class's best cell over all scales (coarse to fine) in every image, by the rules in the module
    docstring. ``probs``: per scale (N, M, C, h, w). Also returns the votes (N, C, h, w) of every scale
    (int16), which region boxes grow through."""
    n, members, classes = probs[0].shape[:3]
    device = probs[0].device
    best_votes = torch.full((n, classes), -1, dtype=torch.int64, device=device)
    best_score = torch.full((n, classes), -1.0, dtype=torch.float64, device=device)
    where = torch.zeros((3, n, classes), dtype=torch.int64, device=device)
    done = torch.zeros((n, classes), dtype=torch.bool, device=device)
    all_votes = []
    for k, p in enumerate(probs):
        votes, mean = batch_votes_and_mean(p)
        all_votes.append(votes.to(torch.int16))  # kept for region boxes: small (members < 2**15)
        w = votes.shape[3]
        # Within a scale: (votes, probability) lexicographically; probability < 1 < a vote's weight of 2.
        flat = (votes.double() * 2.0 + mean.double()).flatten(2).argmax(dim=2)  # (N, C)
        v = votes.flatten(2).gather(2, flat[..., None])[..., 0]
        s = mean.flatten(2).gather(2, flat[..., None])[..., 0].double()
        better = ~done & ((v > best_votes) | ((v == best_votes) & (s > best_score)))  # ties: coarser stays
        best_votes = torch.where(better, v, best_votes)
        best_score = torch.where(better, s, best_score)
        here = torch.stack([torch.full_like(flat, k), flat // w, flat % w])
        where = torch.where(better[None], here, where)
        if early_stop:
            done |= best_votes == members
    return BatchFindings(best_votes, best_score, where[0], where[1], where[2], members), all_votes


def find_classes(maps: Sequence[ScaleMaps], early_stop: bool = False) -> Findings:
    """Each class's best cell over all scales (coarse to fine), by the rules in the module docstring."""
    probs = [torch.from_numpy(np.ascontiguousarray(m.probs))[None] for m in maps]
    return find_classes_batch(probs, early_stop)[0].image(0)


def _table(grids: Sequence[ScaleGrid], values: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Per-scale (h, w, 4) int tables stacked into one (S, H, W, 4) tensor, padded with zeros."""
    h = max(v.shape[0] for v in values)
    w = max(v.shape[1] for v in values)
    out = np.zeros((len(grids), h, w, 4), dtype=np.int64)
    for k, v in enumerate(values):
        out[k, : v.shape[0], : v.shape[1]] = v
    return torch.from_numpy(out).to(device)


def cell_boxes(grids: Sequence[ScaleGrid], f: BatchFindings, classes: torch.Tensor) -> torch.Tensor:
    """(N, 4) int64: the window of each image's class ``classes[n]``'s best cell, inside the image."""
    table = _table(grids, [g.boxes for g in grids], f.votes.device)
    pick = classes.view(-1, 1)
    k, r, c = (t.gather(1, pick)[:, 0] for t in (f.scale, f.row, f.col))
    return table[k, r, c]


def grow(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The connected parts (8-neighbours) of ``mask`` (N, h, w) that hold ``seed``: the seed spreads one
    cell in every direction per step, inside the mask, until nothing changes."""
    region = (seed & mask).float()
    inside_ = mask.float()
    while True:
        grown = F.max_pool2d(region[:, None], 3, stride=1, padding=1)[:, 0] * inside_
        if torch.equal(grown, region):
            return region.bool()
        region = grown


def region_boxes(grids: Sequence[ScaleGrid], f: BatchFindings, votes: Sequence[torch.Tensor],
                 classes: torch.Tensor, width: int, height: int) -> torch.Tensor:  # fmt: skip
    """(N, 4) int64 ``region_box`` of class ``classes[n]`` in every image (see ``region_box``)."""
    boxes = cell_boxes(grids, f, classes)
    pick = classes.view(-1, 1)
    k, r, c, v = (t.gather(1, pick)[:, 0] for t in (f.scale, f.row, f.col, f.votes))
    out = boxes.clone()
    big = max(width, height) + 1
    for s, grid in enumerate(grids):  # images whose best cell lies at scale s grow on its grid together
        idx = torch.nonzero((k == s) & (v > 0)).flatten()
        if not len(idx):
            continue
        found = votes[s][idx, classes[idx]]  # (n, h, w)
        mask = found >= v[idx, None, None]
        seed = torch.zeros_like(mask)
        seed[torch.arange(len(idx), device=seed.device), r[idx], c[idx]] = True
        region = grow(mask, seed)[..., None]  # (n, h, w, 1)
        reach = torch.from_numpy(grid.reach(width, height)).to(region.device)[None]  # (1, h, w, 4)
        low = torch.where(region, reach[..., :2], big).flatten(1, 2).amin(dim=1)  # left, top
        high = torch.where(region, reach[..., 2:], -big).flatten(1, 2).amax(dim=1)  # right, bottom
        b = boxes[idx]
        out[idx, :2] = torch.minimum(b[:, :2], low).clamp_min(0)
        out[idx, 2] = torch.maximum(b[:, 2], high[:, 0]).clamp(0, width)
        out[idx, 3] = torch.maximum(b[:, 3], high[:, 1]).clamp(0, height)
    return out


def _grids(maps: Sequence[ScaleMaps], width: int, height: int) -> list[ScaleGrid]:
    return [ScaleGrid(m.scale, m.cx, m.cy, window_boxes(m.scale, m.cx, m.cy, width, height)) for m in maps]


def _as_batch(f: Findings) -> BatchFindings:
    v, s, k, r, c = (torch.from_numpy(np.asarray(a))[None] for a in (f.votes, f.score, f.scale, f.row, f.col))
    return BatchFindings(v.long(), s.double(), k.long(), r.long(), c.long(), f.members)


def cell_box(maps: Sequence[ScaleMaps], f: Findings, cls: int, width: int, height: int) -> Box:
    """The window of the class's best cell, inside the image."""
    box = cell_boxes(_grids(maps, width, height), _as_batch(f), torch.tensor([cls]))[0]
    return tuple(int(v) for v in box)  # type: ignore[return-value]


def region_box(maps: Sequence[ScaleMaps], f: Findings, cls: int, width: int, height: int) -> Box:
    """The best cell's window grown to take in the window centres of the connected cells (8-neighbours)
    that find the class as well as it does, at its scale: the object as a whole rather than its most
    telling detail.

    A window that still finds the class when centred at a point says the object reaches there; a window
    on the grid's edge says it may reach the image's edge. The union of the windows would overshoot by
    half a window on every side: on the demo data's test split it covered 0.44 of the image on average
    against 0.25 for this box, which holds >= 0.8 of the object in 79% of crops (the cell alone: 67%).
    """
    votes = [batch_votes_and_mean(torch.from_numpy(np.ascontiguousarray(m.probs))[None])[0] for m in maps]
    grids = _grids(maps, width, height)
    box = region_boxes(grids, _as_batch(f), votes, torch.tensor([cls]), width, height)[0]
    return tuple(int(v) for v in box)  # type: ignore[return-value]


def inside(x0: float, y0: float, w: float, h: float, width: int, height: int) -> Box:
    """A w x h box at (x0, y0), shrunk to fit the image if larger, then shifted in (never truncated)."""
    w, h = min(round(w), width), min(round(h), height)
    x0 = int(np.clip(round(x0), 0, width - w))
    y0 = int(np.clip(round(y0), 0, height - h))
    return x0, y0, x0 + w, y0 + h


def display_box(box: Box, width: int, height: int, aspect: tuple[float, float], min_area: float = 0.0) -> Box:
    """The smallest box around ``box`` whose width / height lies in ``aspect`` and whose area is at least
    ``min_area`` of the image (GAIC, seed 003), centred on the box, inside the image."""
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
    """A square of ``side`` in the middle of the image: the crop that knows nothing of the content."""
    return inside((width - side) / 2, (height - side) / 2, side, side, width, height)


# ------------------------------------------------------------------------------------ dense heatmaps


def heat_window(heat: np.ndarray, sides: Sequence[float], step: float = 1 / 8) -> tuple[Box, float]:
    """The square window that captures the most heat beyond its share of the area, among windows of the
    pyramid's ``sides`` placed every ``step`` of a side: score = heat share - area share. For saliency maps
    (Grad-CAM, SIMILARnet), which give one map over the image instead of per-window probabilities."""
    boxes, scores = heat_windows(torch.from_numpy(np.ascontiguousarray(heat))[None], sides, step)
    return tuple(int(v) for v in boxes[0]), float(scores[0])  # type: ignore[return-value]


def heat_windows(
    heat: torch.Tensor, sides: Sequence[float], step: float = 1 / 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``heat_window`` of every map in ``heat`` (N, H, W): boxes (N, 4) int64 and scores (N,) float64.
    Window sums come from one float64 integral image per map; the first best window wins (sides in the
    order given, then row-major positions)."""
    height, width = heat.shape[-2:]
    device = heat.device
    total = heat.sum(dim=(1, 2)).double()
    integral = F.pad(heat.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
    scores, candidates = [], []
    for s in sides:
        side = min(round(s), width, height)
        stride = max(1, round(side * step))
        xs = np.unique(np.r_[np.arange(0, width - side + 1, stride), width - side])
        ys = np.unique(np.r_[np.arange(0, height - side + 1, stride), height - side])
        gx, gy = (torch.from_numpy(a.ravel()).to(device) for a in np.meshgrid(xs, ys))
        sums = (integral[:, gy + side, gx + side] - integral[:, gy, gx + side]
                - integral[:, gy + side, gx] + integral[:, gy, gx])  # fmt: skip
        scores.append(sums / total[:, None] - side * side / (width * height))
        candidates.append(torch.stack([gx, gy, gx + side, gy + side], dim=1))
    score = torch.cat(scores, dim=1)
    best = score.argmax(dim=1)
    boxes = torch.cat(candidates)[best]
    best_score = score.gather(1, best[:, None])[:, 0]
    # A map without heat: the largest centred square, score 0.
    empty = total <= 0
    centre = torch.tensor(centre_box(min(width, height), width, height), device=device)
    return torch.where(empty[:, None], centre, boxes), torch.where(empty, 0.0, best_score)


def heat_region(heat: np.ndarray, threshold: float = 0.5) -> Box:
    """The bounding box of the connected pixels (8-neighbours) at or above ``threshold`` of the peak
    around the peak: the usual way to turn a saliency map into a box."""
    box = heat_regions(torch.from_numpy(np.ascontiguousarray(heat))[None], threshold)[0]
    return tuple(int(v) for v in box)  # type: ignore[return-value]


def heat_regions(heat: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``heat_region`` of every map in ``heat`` (N, H, W): (N, 4) int64 boxes."""
    height, width = heat.shape[-2:]
    flat = heat.flatten(1)
    peak, at = flat.max(dim=1).values, flat.argmax(dim=1)  # the first peak, as numpy's argmax
    # As numpy compares float32 maps with a Python float: the threshold rounded to float32 once.
    mask = heat >= (threshold * peak.double()).to(heat.dtype)[:, None, None]
    seed = torch.zeros_like(flat, dtype=torch.bool).scatter(1, at[:, None], True).view_as(mask)
    region = grow(mask, seed)
    cols, rows = region.any(dim=1), region.any(dim=2)  # (N, W), (N, H)
    first = lambda a: a.int().argmax(dim=1)  # noqa: E731
    last = lambda a: a.shape[1] - a.flip(1).int().argmax(dim=1)  # noqa: E731
    boxes = torch.stack([first(cols), first(rows), last(cols), last(rows)], dim=1)
    centre = torch.tensor(centre_box(min(width, height), width, height), device=heat.device)
    return torch.where((peak <= 0)[:, None], centre, boxes)
