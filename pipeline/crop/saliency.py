"""Training-free heatmap localizers over a zoo classifier: Grad-CAM (seed 004) and SIMILARnet (seed 001).

Both weight the channels of the trunk's last feature map ``F`` (N, K, h, w) and sum them into one map per
image on the trunk's grid, ReLU, divided by its maximum (an all-zero map stays zero). They are baselines
beside the convolutionalized ensemble (``pipeline.crop.fcn``): no window, no scale search, one pass of
the trunk on the whole image. ``to_image_plane`` puts a map over the pixels of the image that was fed.

**Grad-CAM** weights channel k of image n by the spatial mean of d score[n, class] / d F[n, k]. The
gradient is taken with ``torch.autograd.grad`` on ``F`` alone: the trunk runs without a graph, nothing is
accumulated in any parameter's ``.grad`` and ``requires_grad`` flags stay as they were. With our heads
(global average pool, then linear or MLP) the gradient is the same at every cell, so this is CAM's
weighting recovered from whatever head a member has.

**SIMILARnet** weights channel i by how much the classification error grows when channel i is blocked,
measured on labelled images once per model, not per image. Where we depart from the paper:

- *Sign.* The paper writes ``w'_i = E - e_i`` (error with all channels minus error without channel i)
  and a softmax over ``w'``. Taken literally that gives the largest weight to the channels whose removal
  hurts least, against its own text ("the error in classification in absence of each filter as a metric
  of the importance"). We use the increase ``e_i - E``.
- *Smooth error.* ``E`` and ``e_i`` are mean cross-entropy losses, not 0/1 error: with a few dozen
  validation images blocking one channel out of hundreds seldom flips a prediction, so 0/1 error ties
  almost every channel, while the loss still ranks them.
- *Temperature.* Loss increases are small numbers (often 1e-4 to 1e-2 per channel); a softmax of them
  as they are is uniform to a few parts in a thousand, and the map becomes the plain channel sum. Each
  row's increases are divided by their standard deviation over channels before the softmax, so the
  temperature is in units of that spread, independent of the network's width, the loss's scale and the
  number of images: at the default 0.5, a channel two standard deviations above the typical one
  weighs e^4 ~ 55 times as much, so the handful of decisive channels dominate while the rest still
  contribute a little. On the two-object scenes of ``tests/test_saliency.py`` any temperature from
  0.25 to 2 finds the asked object every time; equal weights (the raw softmax) find it half the time.
- *Class-specific rows*, as the paper's conclusion suggests: row c of the (C, K) weights uses only the
  images labelled c, since a crop needs the map of one given class. Classes without images get the
  class-agnostic row, measured on all images.
- *Cheap ablation.* Blocking channel i before the global average pool is zeroing pooled feature i (the
  pool is linear per channel), so the trunk runs once per batch and only the head runs per channel,
  batched over channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.zoo import Classifier

DEFAULT_TEMPERATURE = 0.5
# Head inputs evaluated at once when ablating channels (channels x images x features elements).
_ABLATION_BUDGET = 1 << 22


def _as_model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images on the model's device and in its dtype (a float64 model takes float64 inputs)."""
    param = next(model.parameters(), None)
    if param is None:
        return images
    return images.to(device=param.device, dtype=param.dtype)


def _pool(features: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then each map divided by its maximum; an all-zero map stays zero. Returned as float32."""
    maps = maps.clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps / peak[:, None, None]).float()


def trunk_features(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The trunk's last feature map (N, K, h, w) of ``images``, without a graph: what both localizers
    weight. The model is put in eval mode and left there."""
    model.eval()
    with torch.no_grad():
        return model.trunk(_as_model_input(model, images))


def gradcam(model: Classifier, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, h, w), float32 in [0, 1], on the trunk's feature grid, of ``classes`` (N,).

    ``images`` are normalized (N, 3, H, W), any side >= the model's input size. The model is put in
    eval mode (batch-norm statistics, no dropout) and left there.
    """
    return gradcam_of_features(model, trunk_features(model, images), classes).to(images.device)


def gradcam_of_features(model: Classifier, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, h, w) from the trunk's features (N, K, h, w) (``trunk_features``): one trunk
    pass serves every class asked of an image (repeat the features, one row per class)."""
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(_pool(features))
        # Images are independent in eval mode, so one backward of the summed scores gives every image's.
        score = logits.gather(1, classes.to(logits.device).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, features)
    weights = grad.mean(dim=(2, 3))
    with torch.no_grad():
        maps = torch.einsum("nk,nkhw->nhw", weights, features)
    return _normalized(maps)


def channel_ablation_losses(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image cross-entropy with all channels (N,) and with each channel of the trunk's last feature
    map blocked (N, K), both float64 on the CPU.

    The trunk runs once per batch of ``batch_size`` images; a blocked channel is a zeroed pooled
    feature, so only the head runs again, on many channels at once. The model is left in eval mode.
    """
    model.eval()
    base_parts: list[torch.Tensor] = []
    ablated_parts: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = _as_model_input(model, images[start : start + batch_size])
            y = labels[start : start + batch_size].to(x.device)
            pooled = _pool(model.trunk(x))  # (B, K)
            b, k = pooled.shape
            base_parts.append(F.cross_entropy(model.head(pooled).double(), y, reduction="none").cpu())
            step = max(1, _ABLATION_BUDGET // (b * k))
            columns = []
            for first in range(0, k, step):
                channels = torch.arange(first, min(first + step, k), device=x.device)
                m = len(channels)
                # (m, B, K): copy j of the pooled features with channel first + j zeroed
                blocked = pooled.unsqueeze(0).repeat(m, 1, 1)
                blocked[torch.arange(m, device=x.device), :, channels] = 0
                logits = model.head(blocked.reshape(m * b, k))
                loss = F.cross_entropy(logits.double(), y.repeat(m), reduction="none").view(m, b)
                columns.append(loss.cpu())
            ablated_parts.append(torch.cat(columns).T)
    return torch.cat(base_parts), torch.cat(ablated_parts)


def _num_classes(model: Classifier, images: torch.Tensor) -> int:
    with torch.no_grad():
        return model(_as_model_input(model, images[:1])).shape[1]


def similarnet_weights(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """SIMILARnet channel weights (C, K), float32, each row a softmax over the K channels.

    Row c: softmax of (e_i - E) / std_i(e_i - E) / temperature, with E and e_i the mean cross-entropy
    of the images labelled c with all channels and with channel i blocked (see the module docstring for
    why not the paper's E - e_i on 0/1 error). Classes without images get the row measured on all
    images. ``images``: labelled, normalized (N, 3, H, W) images the model was not trained on.
    """
    if len(images) == 0:
        raise ValueError("similarnet_weights needs at least one labelled image")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    classes = _num_classes(model, images)
    base, ablated = channel_ablation_losses(model, images, labels, batch_size)
    increase = ablated - base[:, None]  # (N, K)
    labels = labels.cpu().long()
    counts = torch.bincount(labels, minlength=classes).double()
    sums = torch.zeros(classes, increase.shape[1], dtype=torch.float64).index_add_(0, labels, increase)
    rows = torch.where(
        counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], increase.mean(dim=0, keepdim=True)
    )
    spread = rows.std(dim=1, keepdim=True).clamp_min(1e-12)  # equal increases: uniform weights
    weights = torch.softmax((rows - rows.mean(dim=1, keepdim=True)) / spread / temperature, dim=1)
    return weights.float()


def similarnet_map(
    model: Classifier, weights: torch.Tensor, images: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """SIMILARnet maps (N, h, w), float32 in [0, 1]: sum_i weights[class, i] * F_i, ReLU, max-normalized."""
    return similarnet_of_features(weights, trunk_features(model, images), classes).to(images.device)


def similarnet_of_features(
    weights: torch.Tensor, features: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """SIMILARnet maps (N, h, w) from the trunk's features (N, K, h, w) (``trunk_features``)."""
    with torch.no_grad():
        per_image = weights.to(device=features.device, dtype=features.dtype)[classes.to(features.device)]
        maps = torch.einsum("nk,nkhw->nhw", per_image, features)
    return _normalized(maps)


def to_image_plane(
    maps: torch.Tensor,
    height: int,
    width: int,
    *,
    centres: tuple[Sequence[float], Sequence[float]] | None = None,
) -> torch.Tensor:
    """Maps on the feature grid (N, h, w) -> (N, height, width) over the image that was fed.

    By default bilinear with ``align_corners=False``, which puts cell j's value at pixel
    (j + 0.5) * height / h - 0.5: for a trunk of stride s whose cell j is centred on the s pixels
    s * j .. s * j + s - 1 (height = s * h), the pixels it was computed from. That holds for small_cnn
    and ConvNeXt, not for every trunk: ResNet's cell j is centred on pixel 32 j (half a stride earlier),
    Inception's on 37 + 32 j (``pipeline.crop.fcn.feature_offset`` measures it). ``centres`` (the
    cells' centres in output pixels along y, then x) places each cell there instead; values between
    centres are interpolated linearly, and beyond the first and last centre held constant, as the
    default does beyond its own.
    """
    if centres is None:
        up = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)
        return up[:, 0]
    ys, xs = (np.asarray(c, dtype=np.float64) for c in centres)
    if (len(ys), len(xs)) != tuple(maps.shape[-2:]):
        raise ValueError(f"centres give a {len(ys)} x {len(xs)} grid, the maps are {tuple(maps.shape[-2:])}")
    # Each output pixel's position in cell units, then grid_sample with align_corners=True (cell k at
    # normalized coordinate 2 k / (cells - 1) - 1; a single cell at 0).
    fy = np.interp(np.arange(height), ys, np.arange(len(ys))) / max(len(ys) - 1, 1) * 2 - 1
    fx = np.interp(np.arange(width), xs, np.arange(len(xs))) / max(len(xs) - 1, 1) * 2 - 1
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1)).to(device=maps.device, dtype=maps.dtype)
    up = F.grid_sample(maps[:, None], grid.expand(len(maps), -1, -1, -1), mode="bilinear", align_corners=True)
    return up[:, 0]
