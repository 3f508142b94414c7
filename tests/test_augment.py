"""Batched training augmentation (pipeline/models/augment.py) against torchvision's per-image transforms."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.models import augment as A


def reference(images: torch.Tensor, size: int, d: A.Draws) -> torch.Tensor:
    """torchvision, one image at a time, under the same draws: resized crop (bilinear), flip, brightness,
    contrast, saturation, then ImageNet normalization."""
    out = []
    for i, img in enumerate(images.float() / 255.0):
        x0, y0, x1, y1 = (int(v) for v in d.boxes[i])
        x = F.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=False)
        if d.flips[i]:
            x = F.horizontal_flip(x)
        b, c, s = (float(f) for f in d.factors[:, i])
        x = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, b), c), s)
        out.append(F.normalize(x, list(A.MEAN), list(A.STD)))
    return torch.stack(out)


def mid_grey_scenes(n: int, side: int, seed: int) -> torch.Tensor:
    """Smooth coloured images in mid range, so that no jitter step saturates (torchvision clamps after each
    step, the batched path once at the end)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 2 * math.pi, 3)
        waves = [np.sin(4 * xx + a), np.cos(3 * yy + b), np.sin(5 * (xx + yy) + c)]
        images.append(128 + 30 * np.stack(waves))
    return torch.from_numpy(np.round(np.stack(images))).to(torch.uint8)


def test_boxes_are_drawn_as_torchvision_draws_them():
    g = torch.Generator().manual_seed(0)
    boxes = A.crop_boxes(20_000, 146, 146, (0.3, 1.0), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 146).all() and (boxes[:, 3] <= 146).all()
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision's crop
    area = w * h / 146**2
    assert area.min() >= 0.3 - 0.02 and area.max() <= 1.0
    assert ((w / h) >= 3 / 4 - 0.02).all() and ((w / h) <= 4 / 3 + 0.02).all()
    # torchvision's own draws on the same image size and scale: the distribution to match.
    torch.manual_seed(1)
    blank = torch.zeros(3, 146, 146)
    params = [v2.RandomResizedCrop.get_params(blank, [0.3, 1.0], [3 / 4, 4 / 3]) for _ in range(20_000)]
    tv = torch.tensor([[hh * ww / 146**2, j + ww / 2] for _, j, hh, ww in params], dtype=torch.float32)
    assert abs(area.mean() - tv[:, 0].mean()) < 0.01  # same mean area share
    assert abs(((boxes[:, 0] + boxes[:, 2]) / 2).mean() - tv[:, 1].mean()) < 1.0  # same mean centre


def test_a_batch_matches_torchvision_image_by_image_under_the_same_draws():
    images = mid_grey_scenes(12, 146, seed=3)
    aug = A.Augment(flip=True, crop_scale=(0.3, 1.0), color_jitter=0.2)
    d = A.draw(len(images), 146, 146, aug, torch.Generator().manual_seed(7))
    assert d.flips.any() and not d.flips.all()  # both kinds present
    got, want = A.apply(images, 128, d), reference(images, 128, d)
    assert got.shape == (12, 3, 128, 128) and got.dtype == torch.float32
    # Inside the crops the two agree to float precision; at the crop's edge torchvision's resize clamps
    # to the crop, grid_sample reads the neighbouring pixel of the image (a half-pixel difference).
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (got[inner] - want[inner]).abs().max() < 1e-3
    assert (got - want).abs().mean() < 5e-3


def test_no_jitter_and_no_flip_is_a_plain_resized_crop_and_outputs_stay_in_range():
    images = torch.randint(0, 256, (6, 3, 64, 80), dtype=torch.uint8)
    aug = A.Augment(flip=False, crop_scale=(1.0, 1.0), color_jitter=0.0)
    d = A.draw(6, 64, 80, aug, torch.Generator().manual_seed(0))
    assert not d.flips.any() and torch.equal(d.factors, torch.ones_like(d.factors))
    got = A.apply(images, 32, d)
    assert torch.allclose(got, reference(images, 32, d), atol=0.05)
    saturated = A.augment_images(torch.full((4, 3, 40, 40), 255, dtype=torch.uint8), 32,
                                 A.Augment(color_jitter=0.5), torch.Generator().manual_seed(1))  # fmt: skip
    top = (1.0 - torch.tensor(A.MEAN)) / torch.tensor(A.STD)
    assert torch.allclose(saturated.amax(dim=(0, 2, 3)), top, atol=1e-5)  # clamped to white, not beyond


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    images = torch.randint(0, 256, (8, 3, 73, 73), dtype=torch.uint8)
    aug = A.Augment(crop_scale=(0.3, 1.0))
    one = A.augment_images(images, 64, aug, torch.Generator().manual_seed(5))
    again = A.augment_images(images, 64, aug, torch.Generator().manual_seed(5))
    other = A.augment_images(images, 64, aug, torch.Generator().manual_seed(6))
    assert torch.equal(one, again) and not torch.equal(one, other)
