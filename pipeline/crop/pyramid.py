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

# Input pixels per forward pass. On the CPU a few images at a time keep a trunk's feature maps in
# cache (efficientnet_lite0's FCN at 221 x 294 on one thread: 74 images/s 4 at a time, 55 at 32 at a
# time); on a GPU a pass takes as many as fit comfortably (the finest scale of a 512-pixel image for a
# 299-pixel member is 1536 x 1536: a batch of 32 of them would need tens of GB for vgg16_bn's first maps).
CPU_PIXELS = 1 << 18
DEVICE_PIXELS = 1 << 24


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


def _resized(images: torch.Tensor, factor: float) -> tuple[torch.Tensor, float, float]:
    """Images resized by ``factor`` (antialiased when shrinking), with the exact per-axis factors."""
    h, w = images.shape[-2:]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    out = nn.functional.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False,
                                    antialias=factor < 1)  # fmt: skip
    return out, nh / h, nw / w


def window_boxes(scale: Scale, cx: np.ndarray, cy: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w, 4) int boxes x0, y0, x1, y1 of the windows centred at (cx, cy), shifted inside the image."""
    side = min(round(scale.side), width, height)
    # Pixel centres are at integers: a window of ``side`` pixels from x0 is centred at x0 + (side-1)/2.
    x0 = np.clip(np.round(cx - (side - 1) / 2), 0, width - side).astype(np.int64)
    y0 = np.clip(np.round(cy - (side - 1) / 2), 0, height - side).astype(np.int64)
    gx, gy = np.meshgrid(x0, y0)
    return np.stack([gx, gy, gx + side, gy + side], axis=-1)


@dataclass
class ScaleMaps:
    """All members' class probabilities at one scale, on the reference grid, for one image."""

    scale: Scale
    cx: np.ndarray  # (w,) window centres along x, image pixels
    cy: np.ndarray  # (h,) window centres along y
    probs: np.ndarray  # (M, C, h, w) float32

    def boxes(self, width: int, height: int) -> np.ndarray:
        """(h, w, 4) int boxes x0, y0, x1, y1 of every cell's window, shifted inside the image (never
        truncated: a window is square, and moves in when it would stick out)."""
        return window_boxes(self.scale, self.cx, self.cy, width, height)


@dataclass
class ScaleGrid:
    """One scale's reference grid for images of one size: window centres and boxes (image pixels)."""

    scale: Scale
    cx: np.ndarray  # (w,) float64
    cy: np.ndarray  # (h,) float64
    boxes: np.ndarray  # (h, w, 4) int64, inside the image

    def reach(self, width: int, height: int) -> np.ndarray:
        """(h, w, 4) how far a region that takes in a cell extends: left, top, right, bottom. The window's
        centre (a window that finds the class centred there says the object reaches it), or the image's
        edge where the window touches it (the object may reach that edge)."""
        b = self.boxes
        cx = np.round(self.cx).astype(np.int64)[None, :]
        cy = np.round(self.cy).astype(np.int64)[:, None]
        return np.stack([np.where(b[..., 0] == 0, 0, cx), np.where(b[..., 1] == 0, 0, cy),
                         np.where(b[..., 2] == width, width, cx + 1),
                         np.where(b[..., 3] == height, height, cy + 1)], axis=-1)  # fmt: skip


@dataclass
class PyramidMaps:
    """Every member's probabilities at every scale for a batch of images of one size, on the device the
    members run on (nothing is copied to the host until a caller asks for one image's maps)."""

    width: int
    height: int
    grids: list[ScaleGrid]
    probs: list[torch.Tensor]  # per scale (N, M, C, h, w) float32, members aligned on the reference grid

    def image(self, n: int) -> list[ScaleMaps]:
        """Image n's maps, in host memory (numpy)."""
        return [ScaleMaps(g.scale, g.cx, g.cy, p[n].cpu().numpy()) for g, p in zip(self.grids, self.probs,
                                                                                   strict=True)]  # fmt: skip


def nearest(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each target centre, the index of the nearest source centre (both sorted ascending)."""
    idx = np.clip(np.searchsorted(source, target), 1, max(len(source) - 1, 1))
    left = np.abs(target - source[idx - 1]) <= np.abs(source[np.minimum(idx, len(source) - 1)] - target)
    return np.where(left, idx - 1, np.minimum(idx, len(source) - 1))


def member_maps(fcn: FCN, images: torch.Tensor, side: float) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One member's probabilities for windows of ``side`` image pixels: (N, C, h, w) float32 on the
    images' device, and the window centres (x, y) in image pixels. ``images``: normalized (N, 3, H, W),
    all of one size."""
    g = fcn.geometry
    resized, fy, fx = _resized(images, g.window / side)
    n, pixels = len(resized), resized.shape[-2] * resized.shape[-1]
    step = max(1, (CPU_PIXELS if resized.device.type == "cpu" else DEVICE_PIXELS) // pixels)
    probs = torch.cat([fcn.heatmap(resized[i : i + step]).float() for i in range(0, n, step)])
    h, w = probs.shape[-2:]
    cx = g.centres(w) / fx + (1 / fx - 1) / 2  # pixel centres: (i + 0.5) / f - 0.5
    cy = g.centres(h) / fy + (1 / fy - 1) / 2
    return probs, cx, cy


def pyramid_maps(fcns: Sequence[FCN], images: torch.Tensor, scales: Sequence[Scale]) -> PyramidMaps:
    """Every member's maps at every scale on the grid of the member with the largest window.

    ``images`` are normalized (N, 3, H, W) of one size, so they share one pyramid: each scale is one
    forward pass per member for the whole batch, and the alignment is one gather on the device.
    """
    height, width = images.shape[-2:]
    ref = max(range(len(fcns)), key=lambda m: fcns[m].geometry.window)
    grids: list[ScaleGrid] = []
    probs: list[torch.Tensor] = []
    with torch.no_grad():
        for scale in scales:
            maps = [member_maps(f, images, scale.side) for f in fcns]
            _, rcx, rcy = maps[ref]
            aligned = []
            for p, cx, cy in maps:
                ix = torch.from_numpy(nearest(cx, rcx)).to(p.device)
                iy = torch.from_numpy(nearest(cy, rcy)).to(p.device)
                aligned.append(p.index_select(2, iy).index_select(3, ix))
            probs.append(torch.stack(aligned, dim=1))  # (N, M, C, h, w)
            grids.append(ScaleGrid(scale, rcx, rcy, window_boxes(scale, rcx, rcy, width, height)))
    return PyramidMaps(width, height, grids, probs)


def ensemble_maps(
    fcns: Sequence[FCN], images: torch.Tensor, scales: Sequence[Scale]
) -> list[list[ScaleMaps]]:
    """Per image, per scale: every member's maps on the grid of the member with the largest window, in
    host memory (``pyramid_maps`` keeps them on the device for the whole batch)."""
    maps = pyramid_maps(fcns, images, scales)
    return [maps.image(n) for n in range(images.shape[0])]
