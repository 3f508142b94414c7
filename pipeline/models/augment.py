"""Training augmentation as batched tensor ops, on whatever device the batch is on.

A training worker receives decoded uint8 images (N, 3, H, W) and augments the whole batch at once on its
own device (the GPU when it has one): random resized crop, horizontal flip and colour jitter, each with
its own random parameters per image. This replaces torchvision's per-image transforms in Ray Data tasks,
which kept a GPU waiting on the CPU (docs/benchmarks.md, "Training input").

- **Random resized crop and flip**: the boxes are drawn as torchvision's ``RandomResizedCrop`` draws
  them (area share in ``crop_scale``, aspect ratio log-uniform in [3/4, 4/3], ten tries, then the whole
  image), half the images are mirrored, and one ``grid_sample`` call resamples every box to size x size,
  bilinear, mirrored where drawn. Training images are decoded at 8/7 of the input size, so a crop
  shrinks by at most that much, where antialiasing changes next to nothing.
- **Colour jitter**: brightness, contrast and saturation factors uniform in [1 - j, 1 + j] per image,
  applied in that order with the definitions of torchvision's ``adjust_*`` functions (contrast around
  the image's mean grey, saturation around each pixel's grey). The three are linear, so they fold into
  one 3 x 3 matrix and offset per image, applied with scaling and normalization in one pass, clamped
  once at the end (torchvision clamps after each step and shuffles their order per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
TRIES = 10  # as RandomResizedCrop: draws per image before falling back to the whole image
_GREY = (0.2989, 0.587, 0.114)  # luma weights, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class Augment:
    flip: bool = True
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: share of the image area
    color_jitter: float = 0.2


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 with ImageNet mean and std, on the images' device."""
    x = images.float() / 255.0
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """(n, 4) float boxes x0, y0, x1, y1 in pixels (x1, y1 exclusive), drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws one, for n images of one size at once."""
    area = float(height * width)
    u = torch.rand((n, TRIES, 4), generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    # Offsets uniform over the places the box fits (integers, as torch.randint draws them).
    x0 = torch.floor(u[..., 2] * (width - w + 1)).clamp(min=0)
    y0 = torch.floor(u[..., 3] * (height - h + 1)).clamp(min=0)
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    x0, y0, w, h = (v.gather(1, pick) for v in (x0, y0, w, h))
    box = torch.cat([x0, y0, x0 + w, y0 + h], dim=1)
    whole = torch.tensor([0.0, 0.0, width, height], dtype=torch.float64)
    return torch.where((first < 0)[:, None], whole, box).float()


@dataclass(frozen=True)
class Draws:
    """One batch's random parameters: boxes (N, 4) x0, y0, x1, y1 in pixels, flips (N,) bool, and the
    brightness, contrast and saturation factors (3, N) (all 1 without jitter)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    factors: torch.Tensor


def draw(
    n: int, height: int, width: int, augment: Augment, generator: torch.Generator | None = None
) -> Draws:
    """The random parameters of a batch of n images of one size, drawn on the CPU (the same draws
    whatever device the batch is on)."""
    boxes = crop_boxes(n, height, width, augment.crop_scale, generator)
    flips = torch.rand(n, generator=generator) < 0.5 if augment.flip else torch.zeros(n, dtype=torch.bool)
    j = augment.color_jitter
    factors = 1.0 + j * (2.0 * torch.rand((3, n), generator=generator, dtype=torch.float64) - 1.0)
    return Draws(boxes, flips, factors)


def colour_matrices(channel_means: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the 3 x 3 matrix and the offset (float64) of brightness b, contrast c and saturation s
    (``factors`` (3, N)) applied in that order to images whose mean R, G, B are ``channel_means`` (N, 3).

    All three are linear in the pixels: brightness scales them; contrast blends with the image's mean
    grey mu (after brightness: b mu); saturation blends each pixel with its grey, the matrix S = s I +
    (1 - s) 1 w^T (w the luma weights). Composed: out = c b S x + (1 - c) b mu, because S maps a grey
    pixel to itself. torchvision clamps to [0, 1] between the steps; here only the result is clamped,
    which differs only for pixels that saturate halfway."""
    device = channel_means.device
    b, c, s = factors.to(device, torch.float64)
    w = torch.tensor(_GREY, device=device, dtype=torch.float64)
    mu = channel_means.double() @ w
    eye = torch.eye(3, device=device, dtype=torch.float64)
    sat = s[:, None, None] * eye + (1.0 - s)[:, None, None] * w.expand(3, 3)
    return (c * b)[:, None, None] * sat, ((1.0 - c) * b * mu)[:, None].expand(-1, 3)


def crop_grid(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """The sampling grid (N, size, size, 2) that ``grid_sample`` reads each box through, mirrored where
    ``flips`` (``align_corners=False`` geometry: pixel centres at (i + 0.5) / side * 2 - 1). Crops are
    axis-aligned, so x depends on the column only and y on the row only."""
    centres = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    half_w, half_h = (x1 - x0) / width, (y1 - y0) / height  # half the box, in [-1, 1] units
    half_w = torch.where(flips.to(boxes.device), -half_w, half_w)
    gx = ((x0 + x1) / width - 1.0)[:, None] + half_w[:, None] * centres  # (N, size)
    gy = ((y0 + y1) / height - 1.0)[:, None] + half_h[:, None] * centres
    n = boxes.shape[0]
    return torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)


def apply(images: torch.Tensor, size: int, draws: Draws) -> torch.Tensor:
    """uint8 images (N, 3, H, W) on any device -> their augmented, normalized float32 (N, 3, size, size)
    under ``draws``: two passes over the pixels, a bilinear resample (crop, resize and flip at once) and
    one affine colour map that also scales to [0, 1] and normalizes."""
    height, width = images.shape[-2:]
    device = images.device
    grid = crop_grid(draws.boxes.to(device), draws.flips, height, width, size)
    # Crops shrink by at most decoded_size / input_size (8/7): bilinear needs no antialiasing there.
    x = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)  # fmt: skip
    mean = torch.tensor(MEAN, dtype=torch.float64, device=device)
    std = torch.tensor(STD, dtype=torch.float64, device=device)
    matrix, offset = colour_matrices(x.mean(dim=(2, 3)) / 255.0, draws.factors)
    matrix = matrix / 255.0 / std[None, :, None]
    offset = (offset - mean) / std
    out = torch.baddbmm(offset.float()[:, :, None], matrix.float(), x.flatten(2)).view_as(x)
    lo, hi = (-mean / std).tolist(), ((1.0 - mean) / std).tolist()
    for c in range(3):  # scalar bounds per channel: a clamp to tensor bounds costs several times more
        out[:, c].clamp_(lo[c], hi[c])
    return out


def augment_images(images: torch.Tensor, size: int, augment: Augment,
                   generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Decoded uint8 images (N, 3, H, W), on any device -> augmented, normalized float32 (N, 3, size,
    size) on the same device, with fresh draws from ``generator``."""
    n, _, height, width = images.shape
    return apply(images, size, draw(n, height, width, augment, generator))
