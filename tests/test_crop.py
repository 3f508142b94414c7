"""Heatmap geometry, alignment across members, crop selection and boxes (no Ray here)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.crop import select
from pipeline.crop.localize import FCNEnsemble
from pipeline.crop.pyramid import nearest, pyramid
from pipeline.models.data import normalize
from pipeline.models.zoo import Classifier

BACKGROUND = (128, 128, 128)


def red_detector(window: int, padding: int) -> Classifier:
    """A two-class member that says 'red' (class 1) where a window holds red pixels: a 3x3 redness filter,
    three 2x2 max pools (stride 8, the small_cnn geometry), a linear head. ``padding`` 0 or 1 gives two
    members whose grids sit differently on the same input."""
    conv = nn.Conv2d(3, 1, 3, padding=padding, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 1, 1] = torch.tensor([1.0, -0.5, -0.5])  # redness of the normalized centre pixel
        conv.bias.fill_(-1.0)  # grey and other colours stay below zero
    trunk = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2))
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-8.0], [8.0]]))
        head.bias.copy_(torch.tensor([0.5, -0.5]))
    return Classifier("small_cnn", trunk, nn.Sequential(head), window).eval()


def picture(width: int, height: int, square: tuple[int, int, int]) -> torch.Tensor:
    """A grey image with a red square (x, y, side); normalized (1, 3, H, W)."""
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    x, y, s = square
    img[y : y + s, x : x + s] = (230, 20, 20)
    return normalize(torch.from_numpy(img).permute(2, 0, 1)[None])


def test_pyramid_starts_at_the_short_side_and_stops_at_max_scale():
    scales = pyramid(128, 64, 1.2, 3.0)
    assert scales[0].side == pytest.approx(128) and scales[0].factor == pytest.approx(0.5)
    assert all(b.side == pytest.approx(a.side / 1.2) for a, b in itertools.pairwise(scales))
    assert scales[-1].factor <= 3.0 < scales[-1].factor * 1.2
    assert pyramid(20, 64, 1.2, 3.0) == []  # 64 / 20 > 3: too small for a single scale
    assert len(pyramid(22, 64, 1.2, 3.0)) == 1


def test_nearest_centre():
    src = np.array([3.5, 11.5, 19.5, 27.5])
    assert nearest(src, np.array([0.0, 7.4, 7.6, 20.0, 99.0])).tolist() == [0, 0, 1, 2, 3]
    assert nearest(np.array([5.0]), np.array([1.0, 9.0])).tolist() == [0, 0]


@pytest.mark.parametrize("square", [(20, 30, 24), (130, 80, 30), (70, 50, 16), (0, 0, 20), (150, 98, 30)])
def test_planted_object_lights_the_cells_over_it_in_both_members_after_alignment(square):
    """Two members with different windows (48, 64) and paddings (the unpadded one sees only the top-left
    58 pixels of its window): after alignment by window centre, both members' red evidence is centred on
    the square at every scale where it fits in the window, and the crops cover it."""
    ensemble = FCNEnsemble([red_detector(48, padding=1), red_detector(64, padding=0)])
    x = picture(180, 128, square)
    located = ensemble.locate(x)[0]
    assert located is not None
    sx, sy, s = square
    centre = np.array([sx + (s - 1) / 2, sy + (s - 1) / 2])
    for maps in located.maps:
        if maps.scale.side < s:
            continue
        step = maps.cx[1] - maps.cx[0] if len(maps.cx) > 1 else maps.scale.side
        gx, gy = np.meshgrid(maps.cx, maps.cy)
        for m in range(2):
            heat = maps.probs[m, 1] - maps.probs[m, 1].min()  # evidence above the background's level
            if heat.sum() == 0:  # a small square in a large window: too little red to move any cell
                assert s * s < maps.scale.side**2 / 16
                continue
            at = np.array([(heat * gx).sum(), (heat * gy).sum()]) / heat.sum()
            # Every window holding the whole square fires alike: their centres spread (side - s) / 2 around
            # the square's.
            # At the border that spread is one-sided; the overlap checks below cover those squares.
            slack = 1.5 * step + (maps.scale.side - s) / 2
            if sx > 0 and sx + s < 180 and sy > 0 and sy + s < 128:
                assert np.abs(at - centre).max() <= slack, (maps.scale, m, at, centre)
        # The most confident cell's window overlaps the square, for both members.
        boxes = maps.boxes(180, 128)
        for m in range(2):
            i, j = np.unravel_index(maps.probs[m, 1].argmax(), maps.probs[m, 1].shape)
            x0, y0, x1, y1 = boxes[i, j]
            assert x0 < sx + s and sx < x1 and y0 < sy + s and sy < y1
    box = located.box(1, "region")
    assert box[0] <= sx and box[1] <= sy and box[2] >= sx + s and box[3] >= sy + s  # the whole square
    assert located.findings.votes[1] == 2 and located.findings.best_class() == 1


def test_crops_always_lie_inside_the_image():
    rng = np.random.default_rng(0)
    ensemble = FCNEnsemble([red_detector(48, padding=1), red_detector(64, padding=0)])
    for _ in range(12):
        w, h = int(rng.integers(64, 260)), int(rng.integers(64, 260))
        s = int(rng.integers(8, min(w, h) // 2))
        x = picture(w, h, (int(rng.integers(0, w - s)), int(rng.integers(0, h - s)), s))
        located = ensemble.locate(x)[0]
        assert located is not None
        for cls in (0, 1):
            for mode in ("cell", "region"):
                x0, y0, x1, y1 = located.box(cls, mode)
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
                if mode == "cell":
                    assert x1 - x0 == y1 - y0  # a window is square: shifted in, never truncated
        for maps in located.maps:
            b = maps.boxes(w, h)
            assert (b[..., 0] >= 0).all() and (b[..., 2] <= w).all() and (b[..., 3] <= h).all()


def test_an_image_too_small_for_any_scale_has_no_findings():
    ensemble = FCNEnsemble([red_detector(48, padding=1), red_detector(64, padding=0)], max_scale=2.0)
    assert ensemble.locate(picture(40, 30, (5, 5, 10))) == [None]  # 64 / 30 > 2


def test_selection_rules_votes_first_then_probability_ties_to_the_coarser_scale():
    from pipeline.crop.pyramid import Scale, ScaleMaps

    def maps(k: int, probs: np.ndarray) -> ScaleMaps:
        h, w = probs.shape[-2:]
        return ScaleMaps(Scale(k, 1.0 + k, 64 / (1 + k)), np.arange(w) * 8.0 + 32, np.arange(h) * 8.0 + 32,
                         probs.astype(np.float32))  # fmt: skip

    # Two members, two classes, 1 x 2 cells. Scale 0: one member votes class 1 with p=0.9 at cell 0;
    # scale 1: both vote class 1 (p=0.6): more votes beat a higher probability.
    s0 = np.array([[[[0.1, 0.5]], [[0.9, 0.5]]], [[[0.7, 0.6]], [[0.3, 0.4]]]])
    s1 = np.array([[[[0.4, 0.6]], [[0.6, 0.4]]], [[[0.4, 0.6]], [[0.6, 0.4]]]])
    f = select.find_classes([maps(0, s0), maps(1, s1)])
    assert f.votes[1] == 2 and f.scale[1] == 1 and f.col[1] == 0
    assert f.score[1] == pytest.approx(0.6)
    # An exact tie in votes and probability stays at the coarser scale.
    g = select.find_classes([maps(0, s1), maps(1, s1)])
    assert g.scale[1] == 0
    # early stop: once all members agree at a scale, finer scales are not considered.
    s2 = np.array([[[[0.05, 0.5]], [[0.95, 0.5]]], [[[0.05, 0.5]], [[0.95, 0.5]]]])
    assert select.find_classes([maps(0, s1), maps(1, s2)]).scale[1] == 1
    assert select.find_classes([maps(0, s1), maps(1, s2)], early_stop=True).scale[1] == 0


def test_display_box_meets_aspect_and_area_and_contains_the_crop():
    box = (50, 10, 70, 110)  # 20 x 100: too tall
    d = select.display_box(box, 200, 150, (0.5, 2.0), min_area=0.2)
    w, h = d[2] - d[0], d[3] - d[1]
    assert 0.5 <= w / h <= 2.0 + 1e-9 and w * h >= 0.2 * 200 * 150 - 200
    assert d[0] <= 50 and d[1] <= 10 and d[2] >= 70 and d[3] >= 110
    assert d[0] >= 0 and d[2] <= 200 and d[1] >= 0 and d[3] <= 150


def test_heat_window_and_region_find_a_hot_square():
    heat = np.zeros((120, 160), dtype=np.float32)
    heat[40:70, 90:120] = 1.0
    box, share = select.heat_window(heat, [120, 100, 80, 60, 40, 30])
    assert box[0] <= 90 and box[1] <= 40 and box[2] >= 120 and box[3] >= 70 and share > 0.8
    assert select.heat_region(heat) == (90, 40, 120, 70)
