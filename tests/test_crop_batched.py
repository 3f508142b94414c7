"""The batched crop worker against the per-image path it replaced (``tests/crop_reference.py``), on fixed
weights: the same rows (boxes, votes, classes and reasons equal; probabilities and scores within 1e-5),
in both crop modes, with full-data and fold models, and for every baseline. Then the batched selection
and box functions against the per-image ones on maps made to tie."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.crop import select
from pipeline.crop.fcn import convolutionalize
from pipeline.crop.pyramid import Scale, ScaleGrid, ScaleMaps, window_boxes
from pipeline.crop.worker import CropWorker, Settings
from pipeline.models.data import normalize
from pipeline.models.zoo import Classifier, build_model
from pipeline.resume import KeyedFolder
from tests import crop_reference as ref

CLASSES = ["apple", "bread", "curry", "dumpling"]
# (height, width) of the pictures, two or three of each: square, wide, tall, very wide, and too small for
# one scale (short side 30: the 64-pixel window would need 2.13x, above max_scale 2).
SIZES = [(96, 96), (96, 96), (90, 130), (90, 130), (90, 130), (140, 100), (70, 200), (70, 200), (30, 50)]
ATOL = 1e-5


def member(arch: str, side: int, seed: int) -> Classifier:
    """A zoo member with fixed random weights that look trained: batch-norm statistics and affine terms
    away from their defaults, and a head that spreads the classes' logits (random init is near uniform)."""
    torch.manual_seed(seed)
    model = build_model(arch, classes=len(CLASSES), input_size=side)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(1 + torch.randn(m.num_features, generator=gen) * 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
        model.head[-1].weight.mul_(40)
    return model.eval()


@pytest.fixture(scope="module")
def ensemble() -> dict:
    """Full-data members (small_cnn at 48 and 64: two windows, grids aligned by centre) and two folds'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = {k: [member("small_cnn", 48, 10 * i + s), member("small_cnn", 64, 10 * i + s + 1)]
              for i, (k, s) in enumerate([(None, 1), (0, 2), (1, 3)])}  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    # SIMILARnet's filter weights per member (C, K): any fixed rows of softmax weights serve the comparison.
    similarnet = [torch.softmax(torch.randn(len(CLASSES), 256, generator=gen) * 2, dim=1) for _ in range(2)]
    rng = np.random.default_rng(0)
    pictures = [scene(rng, h, w) for h, w in SIZES]
    split = ["train", "val", "train", "train", "test", "train", "train", "val", "train"]
    n = len(SIZES)
    batch = pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n)], "split": split, "label_idx": rng.integers(0, 4, n),
        "path": [f"{i}.jpg" for i in range(n)], "cross_label": [i == 3 for i in range(n)], "verified": False,
        "fold": [float(i % 2) if s == "train" else np.nan for i, s in enumerate(split)],
    })  # fmt: skip
    batch["label"] = [CLASSES[i] for i in batch["label_idx"]]
    yield {"models": models, "similarnet": similarnet, "pictures": pictures, "batch": batch}
    torch.set_num_threads(threads)


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth noise with a few coloured rectangles: maps with structure, not only noise."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float64)
    img = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width] + rng.normal(0, 20, (height, width, 3))
    for _ in range(3):
        s = int(rng.integers(8, max(9, min(height, width) // 2)))
        y, x = int(rng.integers(0, height - s)), int(rng.integers(0, width - s))
        img[y : y + s, x : x + s] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_tensor(pictures: list[np.ndarray]) -> torch.Tensor:
    return normalize(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous())


def settings(mode: str, crop_models: str, **changes) -> Settings:
    s = Settings(
        out="-", classes=CLASSES, members=["a", "b"], folds=2, crop_models=crop_models, method="fcn_ensemble",
        mode=mode, baselines=["centre", "gradcam", "similarnet"], step=1.2, max_scale=2.0, early_stop=False,
        display_aspect=(0.5, 2.0), display_min_area=0.1, export=True, jpeg_quality=90, threads=1,
        parts=KeyedFolder("-", "-"),
    )  # fmt: skip
    for k, v in changes.items():
        setattr(s, k, v)
    return s


def assert_same_rows(old: list[dict], new: list[dict]) -> None:
    """The same rows in the same order: equal keys, exact values, floats within ATOL."""
    assert len(old) == len(new)
    for a, b in zip(old, new, strict=True):
        assert a.keys() == b.keys(), (a, b)
        for k in a:
            u, v = a[k], b[k]
            if isinstance(u, float) or (isinstance(u, list) and u and isinstance(u[0], float)):
                assert np.allclose(u, v, rtol=0, atol=ATOL), (k, u, v, a)
            else:
                assert u == v, (k, u, v, a)


CASES = [
    ("cell", "full", False),
    ("region", "full", False),
    ("cell", "folds", True),
    ("region", "folds", False),
]


@pytest.mark.parametrize(("mode", "crop_models", "early_stop"), CASES)
def test_batched_worker_writes_the_per_image_workers_rows(ensemble, mode, crop_models, early_stop):
    s = settings(mode, crop_models, early_stop=early_stop)
    worker = CropWorker(s, ensemble["models"], ensemble["similarnet"])
    reference = ref.Reference(
        fcns={k: [ref.ReferenceFCN(m) for m in ms] for k, ms in ensemble["models"].items()},
        models=ensemble["models"], classes=CLASSES, crop_models=crop_models, method=s.method, mode=mode,
        baselines=s.baselines, step=s.step, max_scale=s.max_scale, early_stop=early_stop,
        display_aspect=s.display_aspect, display_min_area=s.display_min_area,
        similarnet=ensemble["similarnet"],
    )  # fmt: skip
    batch, pictures = ensemble["batch"], ensemble["pictures"]
    old_crops, old_judged = ref.reference_rows(reference, batch, pictures, to_tensor)
    new_crops, new_judged = worker.rows(batch, pictures)
    flat = [r for rows in new_crops for r in rows]
    exported = [r.pop("_export") for r in flat if "_export" in r]
    assert_same_rows(old_judged, new_judged)
    assert_same_rows(old_crops, flat)
    # The crop to write is the method's label-driven one, of every image the pyramid could judge.
    assert len(exported) == len(SIZES) - 1 and sorted(exported) == sorted(set(exported))
    # Not vacuous: every method found boxes, votes vary, and region crops grow beyond the window.
    boxed = pd.DataFrame(flat).dropna(subset=["x0"])
    assert set(boxed["method"]) == {"fcn_ensemble", "centre", "gradcam", "similarnet"}
    assert pd.DataFrame(new_judged)["votes"].nunique() > 1
    fcn = boxed[boxed["method"] == "fcn_ensemble"]
    square = (fcn["x1"] - fcn["x0"]) == (fcn["y1"] - fcn["y0"])
    assert square.all() if mode == "cell" else not square.all()


# ------------------------------------------------------------------------------ selection and boxes


def tied_maps(rng: np.random.Generator, members: int, classes: int, shapes: list[tuple[int, int]],
              width: int, height: int) -> list[ScaleMaps]:  # fmt: skip
    """Per-scale maps whose cells are drawn from a pool of four (members, classes) probability columns:
    equal votes and equal mean probabilities occur within and across scales, so the tie rules (first
    cell, coarser scale) decide."""
    pool = torch.softmax(torch.from_numpy(rng.integers(0, 3, (4, members, classes)).astype(np.float32)), 2)
    out = []
    for k, (h, w) in enumerate(shapes):
        probs = pool.numpy()[rng.integers(0, 4, (h, w))].transpose(2, 3, 0, 1).copy()  # (M, C, h, w)
        side = min(width, height) / 1.2**k
        cx = (side - 1) / 2 + np.arange(w) * (width - side) / max(w - 1, 1)
        cy = (side - 1) / 2 + np.arange(h) * (height - side) / max(h - 1, 1)
        out.append(ScaleMaps(Scale(k, 1.2**k, side), cx, cy, probs))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_batched_selection_equals_the_per_image_one_on_ties(seed):
    rng = np.random.default_rng(seed)
    width, height = 120, 90
    shapes = [(1, 2), (2, 3), (4, 5), (5, 7)]
    images = [tied_maps(rng, 3, 5, shapes, width, height) for _ in range(4)]
    probs = [torch.from_numpy(np.stack([im[k].probs for im in images])) for k in range(len(shapes))]
    grids = [
        ScaleGrid(m.scale, m.cx, m.cy, window_boxes(m.scale, m.cx, m.cy, width, height)) for m in images[0]
    ]
    for early_stop in (False, True):
        found, votes = select.find_classes_batch(probs, early_stop)
        for n, maps in enumerate(images):
            old = ref.find_classes([ref.ScaleMaps(m.scale, m.cx, m.cy, m.probs) for m in maps], early_stop)
            new = found.image(n)
            for field in ("votes", "scale", "row", "col"):
                assert np.array_equal(getattr(old, field), getattr(new, field)), field
            assert np.allclose(old.score, new.score, rtol=0, atol=0)
            assert old.best_class() == int(found.best_class()[n])
            assert old.best_class(exclude=2) == int(found.best_class(torch.full((4,), 2))[n])
        for cls in range(5):
            classes = torch.full((4,), cls)
            cells = select.cell_boxes(grids, found, classes).tolist()
            regions = select.region_boxes(grids, found, votes, classes, width, height).tolist()
            for n, maps in enumerate(images):
                old_maps = [ref.ScaleMaps(m.scale, m.cx, m.cy, m.probs) for m in maps]
                old = ref.find_classes(old_maps, early_stop)
                assert tuple(cells[n]) == ref.cell_box(old_maps, old, cls, width, height)
                assert tuple(regions[n]) == ref.region_box(old_maps, old, cls, width, height)


def test_batched_heat_boxes_equal_the_per_image_ones():
    rng = np.random.default_rng(1)
    height, width = 60, 84
    maps = []
    for _ in range(10):  # plateaus (quantized blobs: many equal windows), two peaks, noise, nothing
        blobs = np.zeros((height, width), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            y, x, s = int(rng.integers(0, 50)), int(rng.integers(0, 70)), int(rng.integers(4, 20))
            blobs[y : y + s, x : x + s] += float(rng.integers(1, 3))
        maps.append(blobs / blobs.max())
    maps += [rng.random((height, width), dtype=np.float32), np.zeros((height, width), np.float32)]
    heat = torch.from_numpy(np.stack(maps))
    sides = [60, 50, 41.7, 34.7, 28.9]
    boxes, scores = select.heat_windows(heat, sides)
    regions = select.heat_regions(heat)
    for n, m in enumerate(maps):
        box, score = ref.heat_window(m, sides)
        # The score's total heat is a float32 sum, added up in another order than numpy's.
        assert tuple(boxes[n].tolist()) == box and float(scores[n]) == pytest.approx(score, abs=1e-6)
        assert tuple(regions[n].tolist()) == ref.heat_region(m)


def test_onednn_convolutions_keep_the_fcn_of_a_mobile_trunk():
    """efficientnet_lite0's FCN (ReLU6 after each convolution, taken into it) against the plain one."""
    torch.manual_seed(0)
    model = member("efficientnet_lite0", 64, 3)
    x = torch.randn(3, 3, 80, 100)
    with torch.no_grad():
        new, old = convolutionalize(model).heatmap(x), torch.softmax(ref.ReferenceFCN(model)(x), dim=1)
    assert new.shape == old.shape and (new - old).abs().max() < 1e-5
