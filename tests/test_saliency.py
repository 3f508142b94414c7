"""Training-free localizers: Grad-CAM and SIMILARnet find the object of the asked class on images larger
than the training size, beside an object of another class; their maps sit on the trunk's grid and over
the pixels they were computed from; Grad-CAM leaves the model as it found it (but in eval mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.crop.saliency import (
    channel_ablation_losses,
    gradcam,
    similarnet_map,
    similarnet_weights,
    to_image_plane,
)
from pipeline.models.data import normalize
from pipeline.models.zoo import Classifier, build_model

CLASSES = 4
OBJECT = 12  # object side in pixels, the same in training (48 px) and held-out (96 px) images
TOLERANCE = 3  # pixels: a peak this close to the object's box counts as on it


def pattern(cls: int, rng: np.random.Generator) -> np.ndarray:
    """The object of a class: a two-colour texture (stripes, checkerboard, ring, diagonals), noisy."""
    yy, xx = np.mgrid[0:OBJECT, 0:OBJECT]
    radius = np.hypot(yy - (OBJECT - 1) / 2, xx - (OBJECT - 1) / 2)
    mask, first, second = [
        ((yy // 2) % 2 == 0, (220, 30, 30), (240, 220, 40)),
        (((yy // 3) + (xx // 3)) % 2 == 0, (30, 200, 60), (10, 10, 10)),
        ((radius > 2.5) & (radius < 5), (40, 60, 230), (235, 235, 235)),
        (((yy + xx) // 2) % 2 == 0, (230, 40, 220), (40, 220, 230)),
    ][cls]
    img = np.where(mask[..., None], np.array(first), np.array(second)).astype(np.float64)
    return img + rng.normal(0, 12, img.shape)


def scene(rng: np.random.Generator, side: int, cls: int, distractor: bool) -> tuple[np.ndarray, tuple]:
    """Noise and solid coloured rectangles, the class's object on top at a random place, and with
    ``distractor`` an object of another class at least 8 px away. Returns (H, W, 3) uint8 and the box."""
    img = rng.normal(128, 30, (side, side, 3))
    for _ in range(side * side // 600):
        bh, bw = rng.integers(4, 14, 2)
        y, x = rng.integers(0, side - bh), rng.integers(0, side - bw)
        img[y : y + bh, x : x + bw] = rng.integers(0, 256, 3) + rng.normal(0, 10, (bh, bw, 3))
    while True:
        y, x = rng.integers(0, side - OBJECT + 1, 2)
        if not distractor:
            break
        y2, x2 = rng.integers(0, side - OBJECT + 1, 2)
        if abs(y2 - y) > OBJECT + 8 or abs(x2 - x) > OBJECT + 8:
            img[y2 : y2 + OBJECT, x2 : x2 + OBJECT] = pattern((cls + rng.integers(1, CLASSES)) % CLASSES, rng)
            break
    img[y : y + OBJECT, x : x + OBJECT] = pattern(cls, rng)
    return np.clip(img, 0, 255).astype(np.uint8), (y, x, y + OBJECT, x + OBJECT)


def scenes(rng: np.random.Generator, n: int, side: int, distractor: bool = False):
    """n scenes: normalized images (n, 3, side, side), labels (n,), boxes (n, 4) as y0, x0, y1, x1."""
    labels = rng.integers(0, CLASSES, n)
    images, boxes = zip(*[scene(rng, side, int(c), distractor) for c in labels], strict=True)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return normalize(pixels), torch.from_numpy(labels).long(), np.array(boxes)


@pytest.fixture(scope="module")
def trained():
    """A small_cnn trained for about 3 s on one core (40 steps of 32 images at 48 px; val top-1 1.0),
    48 px validation images for SIMILARnet, and 96 px held-out scenes with a distractor."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    x, y, _ = scenes(rng, 640, 48)
    model = build_model("small_cnn", classes=CLASSES, input_size=48)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    yield model, scenes(rng, 60, 48), scenes(rng, 100, 96, distractor=True)
    torch.set_num_threads(threads)


def hit_rate(maps: torch.Tensor, boxes: np.ndarray, side: int) -> float:
    """Share of images whose map peak, in image pixels, falls within TOLERANCE px of the object's box."""
    peak = to_image_plane(maps, side, side).flatten(1).argmax(dim=1).numpy()
    py, px = peak // side, peak % side
    inside = ((py >= boxes[:, 0] - TOLERANCE) & (py < boxes[:, 2] + TOLERANCE)
              & (px >= boxes[:, 1] - TOLERANCE) & (px < boxes[:, 3] + TOLERANCE))  # fmt: skip
    return float(inside.mean())


def test_gradcam_finds_the_asked_class_beside_a_distractor(trained):
    model, _, (images, labels, boxes) = trained
    maps = gradcam(model, images, labels)
    assert maps.shape == (100, 12, 12)  # 96 px through three 2x2 pools
    # Measured 1.00 (seeds 1 to 5). The classifier alone is near chance on these two-object scenes
    # (top-1 0.42 to 0.54), and a class-agnostic map (the plain channel sum, below) 0.42 to 0.57.
    assert hit_rate(maps, boxes, 96) >= 0.8
    # The other class's map peaks on the distractor, not on the object (measured 0.00).
    other = (labels + 1) % CLASSES
    assert hit_rate(gradcam(model, images, other), boxes, 96) <= 0.3


def test_similarnet_finds_the_asked_class_beside_a_distractor(trained):
    model, (val_images, val_labels, _), (images, labels, boxes) = trained
    weights = similarnet_weights(model, val_images, val_labels)
    assert weights.shape == (CLASSES, 256)
    maps = similarnet_map(model, weights, images, labels)
    assert maps.shape == (100, 12, 12)
    # Measured 1.00 (seeds 1 to 5, and at temperatures 0.25 to 2). The paper's literal sign, softmax of
    # E - e_i, peaks on the distractor (0.00): it favours the channels of the other classes.
    assert hit_rate(maps, boxes, 96) >= 0.8
    # Control: equal weights on every channel find an object, not the class's (measured 0.57 here).
    uniform = torch.full_like(weights, 1 / weights.shape[1])
    assert hit_rate(similarnet_map(model, uniform, images, labels), boxes, 96) <= 0.7


def test_gradcam_is_cam_for_a_linear_head_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model("small_cnn", classes=5, input_size=48)
    for p in model.trunk.parameters():  # a frozen trunk stays frozen, a trainable head trainable
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    x, classes = torch.randn(3, 3, 64, 80), torch.tensor([0, 4, 2])
    with torch.no_grad():  # a caller's no-grad context does not stop it
        maps = gradcam(model, x, classes)
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        features = model.trunk(x)
    assert maps.shape == (3, *features.shape[-2:]) == (3, 8, 10) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.flatten(1).amax(dim=1).tolist() == [1.0, 1.0, 1.0]
    # With pooling then a linear layer, the gradient is the class's weight row at every cell: CAM.
    cam = torch.einsum("nk,nkhw->nhw", model.head[-1].weight[classes], features).clamp_min(0)
    cam = cam / cam.flatten(1).amax(dim=1)[:, None, None]
    assert torch.allclose(maps, cam, atol=1e-5)

    # float64 model and inputs: the same maps.
    maps64 = gradcam(model.double(), x.double(), classes)
    assert maps64.dtype == torch.float32 and torch.allclose(maps64, maps, atol=1e-5)


def test_an_all_zero_map_stays_zero():
    torch.manual_seed(0)
    model = build_model("small_cnn", classes=3, input_size=48)
    with torch.no_grad():
        model.head[-1].weight.zero_()  # no channel carries any evidence: zero gradient, zero map
        weights = torch.zeros(3, 256)
    x, classes = torch.randn(2, 3, 48, 48), torch.tensor([0, 1])
    for maps in (gradcam(model, x, classes), similarnet_map(model, weights, x, classes)):
        assert torch.equal(maps, torch.zeros(2, 6, 6))


@pytest.mark.parametrize(("arch", "head", "side"), [
    ("resnet18", "linear", 96), ("resnet18", "mlp", 128), ("convnext_tiny", "linear", 96),
    ("inception_v3", "linear", 128),
])  # fmt: skip
def test_zoo_architectures_give_maps_on_their_trunk_grid(arch, head, side):
    torch.manual_seed(0)
    model = build_model(arch, classes=3, head=head, input_size=96)
    x, classes = torch.randn(2, 3, side, side + 32), torch.tensor([2, 0])
    with torch.no_grad():
        grid = model.eval().trunk(x).shape[-2:]
    weights = similarnet_weights(model, x, classes)
    assert weights.shape == (3, model.trunk(x[:1]).shape[1])
    for maps in (gradcam(model, x, classes), similarnet_map(model, weights, x, classes)):
        assert maps.shape == (2, *grid) and torch.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def decisive_model() -> Classifier:
    """Six channels: channel c (c < 3) is input channel c and alone carries class c's evidence (logit
    weight 4); channels 3 to 5 are mixtures the head barely reads (weights about 0.1)."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 6, 1, bias=False)
    head = nn.Linear(6, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([torch.eye(3), torch.rand(3, 3, generator=gen)])[:, :, None, None])
        head.weight.copy_(torch.cat([4 * torch.eye(3), 0.1 * torch.randn(3, 3, generator=gen)], dim=1))
        head.bias.zero_()
    return Classifier("decisive", nn.Sequential(conv, nn.ReLU()), nn.Sequential(head), input_size=8)


def decisive_images(labels: torch.Tensor) -> torch.Tensor:
    """Noise in [0, 0.5), with the labelled class's input channel raised by 1 in a random 4x4 patch."""
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(len(labels), 3, 8, 8, generator=gen) / 2
    for n, c in enumerate(labels.tolist()):
        y, x = torch.randint(0, 5, (2,), generator=gen).tolist()
        images[n, c, y : y + 4, x : x + 4] += 1
    return images


def test_similarnet_weights_favour_the_decisive_channel_of_each_class():
    model = decisive_model()
    labels = torch.arange(30) % 3
    weights = similarnet_weights(model, decisive_images(labels), labels)
    assert weights.shape == (3, 6) and weights.dtype == torch.float32
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))
    assert weights.argmax(dim=1).tolist() == [0, 1, 2]

    # Class 2 without images: its row is the class-agnostic one, led by the channels of classes 0 and 1.
    seen = labels[labels < 2]
    weights = similarnet_weights(model, decisive_images(seen), seen, batch_size=7)
    assert weights.argmax(dim=1).tolist()[:2] == [0, 1]
    assert set(weights[2].topk(2).indices.tolist()) == {0, 1}
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))


def test_ablation_blocks_a_channel_before_pooling_whatever_the_batching():
    torch.manual_seed(0)
    model = build_model("small_cnn", classes=4, head="mlp", input_size=48).eval()
    x, labels = torch.randn(5, 3, 56, 48), torch.tensor([0, 3, 1, 1, 2])
    base, ablated = channel_ablation_losses(model, x, labels, batch_size=2)
    assert base.shape == (5,) and ablated.shape == (5, 256)
    with torch.no_grad():
        features = model.trunk(x)
        assert torch.allclose(base, F.cross_entropy(model(x), labels, reduction="none").double(), atol=1e-5)
        for channel in (0, 77, 255):  # the full model with one channel of the feature map zeroed
            blocked = features.clone()
            blocked[:, channel] = 0
            logits = model.head(torch.flatten(F.adaptive_avg_pool2d(blocked, 1), 1))
            expected = F.cross_entropy(logits, labels, reduction="none").double()
            assert torch.allclose(ablated[:, channel], expected, atol=1e-5)
    w_small = similarnet_weights(model, x, labels, batch_size=2)
    assert torch.allclose(w_small, similarnet_weights(model, x, labels, batch_size=64), atol=1e-6)
    # float64 model and inputs: the same weights and maps, returned as float32.
    w64 = similarnet_weights(model.double(), x.double(), labels)
    assert w64.dtype == torch.float32 and torch.allclose(w64, w_small, atol=1e-4)
    maps64 = similarnet_map(model, w64, x.double(), labels)
    maps32 = similarnet_map(model.float(), w64, x, labels)
    assert maps64.dtype == torch.float32 and torch.allclose(maps64, maps32, atol=1e-5)


def test_to_image_plane_puts_a_cell_over_the_pixels_it_came_from():
    maps = torch.zeros(1, 12, 10)
    maps[0, 4, 7] = 1  # stride 8: cell (4, 7) was computed from rows 32..39, columns 56..63
    up = to_image_plane(maps, 96, 80)
    assert up.shape == (1, 96, 80)
    rows, cols = torch.nonzero(up[0] == up.max(), as_tuple=True)
    assert set(rows.tolist()) == {35, 36} and set(cols.tolist()) == {59, 60}  # the block's centre
    assert torch.allclose(to_image_plane(torch.full((2, 3, 4), 0.5), 30, 41), torch.full((2, 30, 41), 0.5))


def test_to_image_plane_can_place_cells_at_the_trunks_own_centres():
    maps = torch.rand(2, 3, 4, dtype=torch.float64)
    # The default's centres, given explicitly: the same values.
    ys, xs = ((np.arange(n) + 0.5) * side / n - 0.5 for n, side in ((3, 96), (4, 128)))
    default = to_image_plane(maps, 96, 128)
    assert torch.allclose(to_image_plane(maps, 96, 128, centres=(ys, xs)), default, atol=1e-9)
    # A ResNet-like grid (cell j centred on pixel 32 j): each cell's value lies on its centre pixel,
    # and beyond the last centre the last value holds.
    placed = to_image_plane(maps, 96, 128, centres=(32 * np.arange(3), 32 * np.arange(4)))
    assert placed.dtype == torch.float64
    assert torch.allclose(placed[:, ::32, ::32], maps, atol=1e-9)
    assert torch.allclose(placed[:, 64:, 96:], maps[:, -1:, -1:].expand(2, 32, 32), atol=1e-9)
    assert torch.allclose(
        to_image_plane(maps[:, :1, :1], 5, 7, centres=([2.0], [3.0])), maps[:, :1, :1].expand(2, 5, 7)
    )
