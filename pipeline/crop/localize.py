"""Localizers behind one interface: where in an image is a class, and how strongly is it found there.

``FCNEnsemble`` is the method (seed 000): the members convolutionalized, run over the pyramid, their
heatmaps aligned and voted on. ``Saliency`` runs Grad-CAM (seed 004) or SIMILARnet (seed 001) on the
same members and turns the members' mean map into a box with the same pyramid windows (cell mode) or
the connected hot region (region mode). ``centre`` knows nothing of the content: a square of the
method's crop side in the middle. All return boxes in pixels of the image they were given.

Everything works on a batch of images of one size at once, on the device the members are on
(``FCNEnsemble.locate_batch``, ``saliency_heats``, ``whole_image_probs``): one forward pass per member
and scale for the whole batch, one trunk pass per member for both saliency methods and both classes
asked, selection and boxes as tensor ops. ``Located`` is one image's view of a batch, for callers that
want numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from pipeline import storage
from pipeline.crop import select
from pipeline.crop.fcn import FCN, convolutionalize, feature_offset_of
from pipeline.crop.pyramid import PyramidMaps, Scale, ScaleMaps, pyramid, pyramid_maps
from pipeline.models.zoo import ARCHS, Classifier, ModelError, brief_error, build_model, load_checkpoint

# Bounds on a checkpoint's params: the model is built from them before its weights are checked, so a
# crafted "classes" must not make that build allocate gigabytes.
MAX_CLASSES = 100_000
MAX_INPUT = 4096


def load_classifier(model_dir: str, device: torch.device | str = "cpu") -> Classifier:
    """A trained member from ``OUT/models/<member>[/fold-k]/best.pt``, in eval mode. The checkpoint is
    loaded with ``weights_only=True`` (a models folder may be shared or writable: it must not run code);
    one that cannot be used is a ModelError naming the file."""
    uri = storage.join(model_dir, "best.pt")
    saved = load_checkpoint(uri)
    p = saved["params"]
    arch, classes, head, size = (p.get(k) for k in ("arch", "classes", "head", "input_size"))
    if not (isinstance(arch, str) and isinstance(head, str) and _count(classes, MAX_CLASSES)
            and _count(size, MAX_INPUT)):  # fmt: skip
        raise ModelError(f"checkpoint {uri}: params need arch and head (text), classes (1..{MAX_CLASSES}) "
                         f"and input_size (1..{MAX_INPUT})")  # fmt: skip
    try:
        model = build_model(arch, classes, head=head, input_size=size)
    except ModelError as exc:
        raise ModelError(f"checkpoint {uri}: {exc}") from None
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:  # missing or unexpected keys, wrong shapes
        raise ModelError(f"checkpoint {uri} does not fit its own params ({brief_error(exc)})") from None
    return model.to(device).eval()


def _count(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most


@dataclass
class LocatedBatch:
    """The FCN ensemble's findings for a batch of images of one size: every class's best cell over the
    pyramid, per image, as tensors on the members' device."""

    width: int
    height: int
    scales: list[Scale]
    maps: PyramidMaps
    findings: select.BatchFindings
    votes: list[torch.Tensor]  # per scale (N, C, h, w) int16

    def __len__(self) -> int:
        return int(self.findings.votes.shape[0])

    def __getitem__(self, n: int) -> Located:
        return Located(self, n)

    def boxes(self, classes: torch.Tensor, mode: str, index: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 4) int64 crop boxes x0, y0, x1, y1 of class ``classes[n]`` in image n (images ``index``
        only, when given): the best cell's window (``cell``) or the region grown from it (``region``)."""
        f, votes = self.findings, self.votes
        if index is not None:
            f, votes = f.take(index), [v[index] for v in votes]
        grids = self.maps.grids
        if mode == "region":
            return select.region_boxes(grids, f, votes, classes, self.width, self.height)
        return select.cell_boxes(grids, f, classes)

    def factors(self, classes: torch.Tensor, index: torch.Tensor | None = None) -> np.ndarray:
        """(N,) float64 scale factor of class ``classes[n]``'s best cell in image n (images ``index``)."""
        scale = self.findings.scale if index is None else self.findings.scale[index]
        k = scale.gather(1, classes.view(-1, 1))[:, 0].cpu().numpy()
        return np.array([s.factor for s in self.scales], dtype=np.float64)[k]


class Located:
    """One image's findings by the FCN ensemble (a view of its batch): every class's best cell over the
    pyramid."""

    def __init__(self, batch: LocatedBatch, n: int) -> None:
        self.batch, self.n = batch, n
        self.width, self.height, self.scales = batch.width, batch.height, batch.scales

    @cached_property
    def maps(self) -> list[ScaleMaps]:
        return self.batch.maps.image(self.n)

    @cached_property
    def findings(self) -> select.Findings:
        return self.batch.findings.image(self.n)

    def box(self, cls: int, mode: str) -> select.Box:
        device = self.batch.findings.votes.device
        index = torch.tensor([self.n], device=device)
        box = self.batch.boxes(torch.tensor([cls], device=device), mode, index)[0]
        return tuple(int(v) for v in box.cpu())  # type: ignore[return-value]

    def scale_of(self, cls: int) -> Scale:
        return self.scales[int(self.findings.scale[cls])]


class FCNEnsemble:
    """The members as fully convolutional nets over the pyramid (the method)."""

    method = "fcn_ensemble"

    def __init__(self, members: Sequence[Classifier], step: float = 1.2, max_scale: float = 3.0,
                 early_stop: bool = False) -> None:  # fmt: skip
        self.fcns: list[FCN] = [convolutionalize(m) for m in members]
        self.window = max(f.geometry.window for f in self.fcns)
        self.step, self.max_scale, self.early_stop = step, max_scale, early_stop

    def scales(self, width: int, height: int) -> list[Scale]:
        return pyramid(min(width, height), self.window, self.step, self.max_scale)

    def locate_batch(self, images: torch.Tensor) -> LocatedBatch | None:
        """Normalized images (N, 3, H, W) of one size -> their findings, or None when the size is too
        small for a single scale (its short side needs more zoom than max_scale)."""
        height, width = images.shape[-2:]
        scales = self.scales(width, height)
        if not scales:
            return None
        maps = pyramid_maps(self.fcns, images, scales)
        findings, votes = select.find_classes_batch(maps.probs, self.early_stop)
        return LocatedBatch(width, height, scales, maps, findings, votes)

    def locate(self, images: torch.Tensor) -> list[Located | None]:
        """Normalized images (N, 3, H, W) of one size -> per image its findings, or None when the image
        is too small for a single scale."""
        batch = self.locate_batch(images)
        return [None] * images.shape[0] if batch is None else [batch[n] for n in range(len(batch))]


class Saliency:
    """Grad-CAM or SIMILARnet of the members, averaged, turned into boxes by the shared selection."""

    def __init__(self, method: str, members: Sequence[Classifier],
                 similarnet_weights: Sequence[torch.Tensor] | None = None,
                 trunks: Sequence[torch.nn.Module] | None = None) -> None:  # fmt: skip
        """``trunks``: the members' trunks for inference (``FCN.trunk``: batch norms folded, oneDNN
        convolutions), used in place of their own when given."""
        if method not in ("gradcam", "similarnet"):
            raise ValueError(f"unknown saliency method {method!r}; allowed: gradcam, similarnet")
        if method == "similarnet" and similarnet_weights is None:
            raise ValueError("similarnet needs the members' filter weights (similarnet_weights)")
        self.method, self.members, self.weights = method, list(members), similarnet_weights
        self.trunks = list(trunks) if trunks is not None else None

    def heat(self, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
        """(N, H, W) mean over members of their maps for ``classes``, each member at its own input scale
        (the short side resized to its training size), back on the image plane."""
        return saliency_heats([self], images, classes[None])[self.method][0].cpu().numpy()


def saliency_heats(localizers: Sequence[Saliency], images: torch.Tensor,
                   classes: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per localizer (method), the members' mean map (T, N, H, W) of class ``classes[t, n]`` of image n,
    on the image plane, on the images' device. The localizers share their members: each member's trunk
    runs once on the batch, for every method and every class asked."""
    from pipeline.crop import saliency

    members = localizers[0].members
    if any(loc.members != members for loc in localizers):
        raise ValueError("saliency_heats: the localizers must share their members")
    height, width = images.shape[-2:]
    rows = classes.reshape(-1)  # row t * N + n: image n, class classes[t, n]
    total = {loc.method: torch.zeros((len(rows), height, width), device=images.device) for loc in localizers}
    for n, model in enumerate(members):
        factor = model.input_size / min(height, width)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        x = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                            antialias=factor < 1)  # fmt: skip
        features = _features(model, x, localizers[0].trunks, n).repeat(classes.shape[0], 1, 1, 1)
        # Feature cell centres in the resized input, then in this image's pixels.
        fy, fx = size[0] / height, size[1] / width
        offset, stride = feature_offset_of(model), ARCHS[model.arch].stride
        ys = (offset + stride * np.arange(features.shape[-2])) / fy + (1 / fy - 1) / 2
        xs = (offset + stride * np.arange(features.shape[-1])) / fx + (1 / fx - 1) / 2
        for loc in localizers:
            if loc.method == "gradcam":
                maps = saliency.gradcam_of_features(model, features, rows)
            else:
                assert loc.weights is not None
                maps = saliency.similarnet_of_features(loc.weights[n], features, rows)
            plane = saliency.to_image_plane(maps.to(images.device), height, width, centres=(ys, xs))
            total[loc.method] += plane.float()
    return {m: (t / len(members)).view(*classes.shape, height, width) for m, t in total.items()}


def _features(model: Classifier, x: torch.Tensor, trunks: Sequence[torch.nn.Module] | None,
              n: int) -> torch.Tensor:  # fmt: skip
    """The trunk's features of ``x`` without a graph: member n's inference trunk when given, else its own."""
    from pipeline.crop import saliency

    if trunks is None:
        return saliency.trunk_features(model, x)
    with torch.no_grad():
        return trunks[n](x.to(next(model.parameters()).dtype).contiguous(memory_format=torch.channels_last))


def whole_image_probs(members: Sequence[Classifier], images: torch.Tensor) -> np.ndarray:
    """(N, C) the members' mean class probabilities on the whole image squashed to each one's input."""
    return whole_image_probs_batch(members, images).cpu().numpy()


def whole_image_probs_batch(members: Sequence[Classifier], images: torch.Tensor,
                            trunks: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:  # fmt: skip
    """``whole_image_probs`` as a tensor on the members' device; ``trunks`` as for ``Saliency``."""
    probs = []
    with torch.no_grad():
        for n, model in enumerate(members):
            side = (model.input_size, model.input_size)
            x = torch.nn.functional.interpolate(images, size=side, mode="bilinear", antialias=True)
            if trunks is None:
                logits = model(x)
            else:
                pooled = torch.nn.functional.adaptive_avg_pool2d(_features(model, x, trunks, n), 1)
                logits = model.head(torch.flatten(pooled, 1))
            probs.append(torch.softmax(logits.float(), dim=1))
    return torch.stack(probs).mean(dim=0)
