"""The multi-scale pyramid of the method (seed 000): every member's heatmaps on one grid per scale.

Scale k looks for the class in square windows of side ``S_k = short_side / step**k`` image pixels: the
first window is the whole short side, and the windows shrink by ``step`` (1.2) until the scale factor
``f_k = W / S_k`` passes ``max_scale`` (W, the reference window, is the largest member window). Each
member m sees windows of side S_k by resizing the image (isotropically) by ``W_m / S_k``, so members
with different windows still judge the same piece of the image. Their cells are mapped back to image
pixels through their window centres (``Geometry.centres``), and each member's map is resampled onto the
reference member's centres by nearest centre: grids are aligned by where their windows look, never by
cell index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.crop.fcn import FCN


@dataclass(frozen=True)
class Scale:
    index: int
    factor: float  # f = W / side: how much a window of the reference member is zoomed
    side: float  # window side in image pixels


def pyramid(short_side: int, window: int, step: float = 1.2, max_scale: float = 3.0) -> list[Scale]:
    """The scales for an image whose short side is ``short_side``; empty when even the whole short side
    would need more zoom than ``max_scale`` (the image is too small for the reference window)."""
    f0 = window / short_side
    scales: list[Scale] = []
    while True:
        f = f0 * step ** len(scales)
        if f > max_scale * (1 + 1e-9):
            return scales
        scales.append(Scale(len(scales), f, window / f))


@dataclass
class ScaleMaps:
    """All members' class probabilities at one scale, on the reference grid."""

    scale: Scale
    cx: np.ndarray  # (w,) window centres along x, image pixels
    cy: np.ndarray  # (h,) window centres along y
    probs: np.ndarray  # (M, C, h, w) float32

    def boxes(self, width: int, height: int) -> np.ndarray:
        """(h, w, 4) int boxes x0, y0, x1, y1 of every cell's window, shifted inside the image (never
        truncated: a window is square, and moves in when it would stick out)."""
        side = min(round(self.scale.side), width, height)
        # Pixel centres are at integers: a window of ``side`` pixels from x0 is centred at x0 + (side-1)/2.
        x0 = np.clip(np.round(self.cx - (side - 1) / 2), 0, width - side).astype(np.int64)
        y0 = np.clip(np.round(self.cy - (side - 1) / 2), 0, height - side).astype(np.int64)
        gx, gy = np.meshgrid(x0, y0)
        return np.stack([gx, gy, gx + side, gy + side], axis=-1)


def nearest(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each target centre, the index of the nearest source centre (both sorted ascending)."""
    idx = np.clip(np.searchsorted(source, target), 1, max(len(source) - 1, 1))
    left = np.abs(target - source[idx - 1]) <= np.abs(source[np.minimum(idx, len(source) - 1)] - target)
    return np.where(left, idx - 1, np.minimum(idx, len(source) - 1))


def _resized(images: torch.Tensor, factor: float) -> tuple[torch.Tensor, float, float]:
    """Images resized by ``factor`` (antialiased when shrinking), with the exact per-axis factors."""
    h, w = images.shape[-2:]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    out = nn.functional.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False,
                                    antialias=factor < 1)  # fmt: skip
    return out, nh / h, nw / w


def member_maps(fcn: FCN, images: torch.Tensor, side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One member's probabilities for windows of ``side`` image pixels: (N, C, h, w) and the window
    centres (x, y) in image pixels. ``images``: normalized (N, 3, H, W), all of one size."""
    g = fcn.geometry
    resized, fy, fx = _resized(images, g.window / side)
    probs = fcn.heatmap(resized).float()
    h, w = probs.shape[-2:]
    cx = g.centres(w) / fx + (1 / fx - 1) / 2  # pixel centres: (i + 0.5) / f - 0.5
    cy = g.centres(h) / fy + (1 / fy - 1) / 2
    return probs.cpu().numpy(), cx, cy


def ensemble_maps(
    fcns: Sequence[FCN], images: torch.Tensor, scales: Sequence[Scale]
) -> list[list[ScaleMaps]]:
    """Per image, per scale: every member's maps on the grid of the member with the largest window.

    ``images`` are normalized (N, 3, H, W) of one size, so they share one pyramid (batched by shape).
    """
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
            stacked = np.stack(aligned, axis=1)  # (N, M, C, h, w)
            for n in range(images.shape[0]):
                out[n].append(ScaleMaps(scale, rcx, rcy, stacked[n]))
    return out
