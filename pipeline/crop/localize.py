"""Localizers behind one interface: where in an image is a class, and how strongly is it found there.

``FCNEnsemble`` is the method (seed 000): the members convolutionalized, run over the pyramid, their
heatmaps aligned and voted on. ``Saliency`` runs Grad-CAM (seed 004) or SIMILARnet (seed 001) on the
same members and turns the members' mean map into a box with the same pyramid windows (cell mode) or
the connected hot region (region mode). ``centre`` knows nothing of the content: a square of the
method's crop side in the middle. All return boxes in pixels of the image they were given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import storage
from pipeline.crop import select
from pipeline.crop.fcn import FCN, convolutionalize, feature_centres
from pipeline.crop.pyramid import Scale, ScaleMaps, ensemble_maps, pyramid
from pipeline.models.zoo import Classifier, ModelError, brief_error, build_model, load_checkpoint

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
class Located:
    """One image's findings by the FCN ensemble: every class's best cell over the pyramid."""

    width: int
    height: int
    scales: list[Scale]
    maps: list[ScaleMaps]
    findings: select.Findings

    def box(self, cls: int, mode: str) -> select.Box:
        pick = select.region_box if mode == "region" else select.cell_box
        return pick(self.maps, self.findings, cls, self.width, self.height)

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

    def locate(self, images: torch.Tensor) -> list[Located | None]:
        """Normalized images (N, 3, H, W) of one size -> per image its findings, or None when the image
        is too small for a single scale (its short side needs more zoom than max_scale)."""
        height, width = images.shape[-2:]
        scales = self.scales(width, height)
        if not scales:
            return [None] * images.shape[0]
        per_image = ensemble_maps(self.fcns, images, scales)
        return [Located(width, height, scales, maps, select.find_classes(maps, self.early_stop))
                for maps in per_image]  # fmt: skip


class Saliency:
    """Grad-CAM or SIMILARnet of the members, averaged, turned into boxes by the shared selection."""

    def __init__(self, method: str, members: Sequence[Classifier],
                 similarnet_weights: Sequence[torch.Tensor] | None = None) -> None:  # fmt: skip
        if method not in ("gradcam", "similarnet"):
            raise ValueError(f"unknown saliency method {method!r}; allowed: gradcam, similarnet")
        if method == "similarnet" and similarnet_weights is None:
            raise ValueError("similarnet needs the members' filter weights (similarnet_weights)")
        self.method, self.members, self.weights = method, list(members), similarnet_weights

    def heat(self, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
        """(N, H, W) mean over members of their maps for ``classes``, each member at its own input scale
        (the short side resized to its training size), back on the image plane."""
        from pipeline.crop import saliency

        height, width = images.shape[-2:]
        total = np.zeros((images.shape[0], height, width), dtype=np.float32)
        for n, model in enumerate(self.members):
            factor = model.input_size / min(height, width)
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
            x = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                                antialias=factor < 1)  # fmt: skip
            if self.method == "gradcam":
                maps = saliency.gradcam(model, x, classes)
            else:
                assert self.weights is not None
                maps = saliency.similarnet_map(model, self.weights[n], x, classes)
            # Feature cell centres in the resized input, then in this image's pixels.
            fy, fx = size[0] / height, size[1] / width
            ys = feature_centres(model, maps.shape[-2]) / fy + (1 / fy - 1) / 2
            xs = feature_centres(model, maps.shape[-1]) / fx + (1 / fx - 1) / 2
            total += saliency.to_image_plane(maps, height, width, centres=(ys, xs)).float().cpu().numpy()
        return total / len(self.members)


def whole_image_probs(members: Sequence[Classifier], images: torch.Tensor) -> np.ndarray:
    """(N, C) the members' mean class probabilities on the whole image squashed to each one's input."""
    probs = []
    with torch.no_grad():
        for model in members:
            side = (model.input_size, model.input_size)
            x = torch.nn.functional.interpolate(images, size=side, mode="bilinear", antialias=True)
            probs.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.mean(probs, axis=0)
