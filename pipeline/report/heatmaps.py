"""Evidence heatmaps: where the trained ensemble finds a class, as small transparent PNG overlays.

The crop stage keeps boxes, not maps, so the report runs the full-data ensemble's FCNs over a coarser
pyramid (every other scale) once more for the images it shows a heatmap of. A pixel's heat is the
highest mean member probability of the class over every window (any scale) that covers it: what the
crop and the mislabel judgment look at. Overlays are drawn at thumbnail size, a few KB each.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline import progress, storage
from pipeline.crop.localize import FCNEnsemble, load_classifier
from pipeline.layout import RunLayout
from pipeline.models.data import load_rgb, normalize
from pipeline.names import safe_id, safe_label
from pipeline.report.thumbs import THUMB_SIDE

BATCH = 16


@dataclass(frozen=True)
class HeatJob:
    image_id: str
    path: str  # the normalized image, relative to the run's output
    classes: tuple[str, ...]  # classes to draw a heatmap of


def heat_name(image_id: str, cls: str) -> str:
    """An overlay's path relative to the report folder (class names are folder names in the dataset).
    Both come from manifests: one that cannot be a path segment under OUT raises UnsafeName."""
    return f"heat/{safe_id(image_id)}/{safe_label(cls)}.png"


def class_heat(maps: Sequence, cls: int, width: int, height: int, tw: int, th: int) -> np.ndarray:
    """(th, tw) float heat in [0, 1] of class ``cls`` from one image's ScaleMaps, at thumbnail size."""
    heat = np.zeros((th, tw), dtype=np.float32)
    sx, sy = tw / width, th / height
    for scale_maps in maps:
        probs = scale_maps.probs[:, cls].mean(axis=0)  # (h, w): mean over members
        boxes = scale_maps.boxes(width, height)
        for (i, j), p in np.ndenumerate(probs):
            x0, y0, x1, y1 = boxes[i, j]
            ys = slice(int(y0 * sy), max(int(y0 * sy) + 1, int(np.ceil(y1 * sy))))
            xs = slice(int(x0 * sx), max(int(x0 * sx) + 1, int(np.ceil(x1 * sx))))
            np.maximum(heat[ys, xs], p, out=heat[ys, xs])
    return heat


def overlay_png(heat: np.ndarray) -> bytes:
    """Red where the class is found, fading to transparent yellow where it is not."""
    h = np.clip(heat, 0.0, 1.0)
    rgba = np.zeros((*h.shape, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (255 * (1 - h)).astype(np.uint8)
    rgba[..., 3] = (235 * np.sqrt(h)).astype(np.uint8)  # weak evidence still shows, faintly
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _batches(jobs: Sequence[HeatJob], pictures: dict[str, np.ndarray]) -> Iterator[list[HeatJob]]:
    """Jobs grouped by image size (one pyramid per group), in batches."""
    groups: dict[tuple[int, ...], list[HeatJob]] = {}
    for job in jobs:
        groups.setdefault(pictures[job.image_id].shape, []).append(job)
    for group in groups.values():
        for start in range(0, len(group), BATCH):
            yield group[start : start + BATCH]


def make_heatmaps(
    out: str,
    report_dir: str,
    jobs: Sequence[HeatJob],
    class_names: Sequence[str],
    members: Sequence[str],
    step: float,
    max_scale: float,
) -> int:
    """Write the overlays of ``jobs`` that are missing; returns how many images were run."""
    todo = [
        j
        for j in jobs
        if not all(storage.exists(storage.join(report_dir, heat_name(j.image_id, c))) for c in j.classes)
    ]
    if not todo or not members:
        return 0
    index = {c: i for i, c in enumerate(class_names)}
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    # Every other scale of the crop's pyramid: at thumbnail size the overlay looks the same, at half the
    # cost (the FCNs' convolutions are nearly all of it).
    fcn = FCNEnsemble([load_classifier(RunLayout(out).model_dir(m)) for m in members], step**2, max_scale)
    pictures = {j.image_id: np.asarray(load_rgb(storage.join(out, j.path))) for j in todo}
    done = 0
    batches = list(_batches(todo, pictures))
    for batch in progress.bar(batches, len(batches), "report: heatmap batches"):
        x = torch.from_numpy(np.stack([pictures[j.image_id] for j in batch])).permute(0, 3, 1, 2)
        located = fcn.locate(normalize(x.contiguous()))
        for job, found in zip(batch, located, strict=True):
            done += 1
            if found is None:  # too small for one scale: nothing was searched
                continue
            scale = THUMB_SIDE / max(found.width, found.height)
            tw, th = max(1, round(found.width * scale)), max(1, round(found.height * scale))
            for cls in job.classes:
                heat = class_heat(found.maps, index[cls], found.width, found.height, tw, th)
                storage.write_bytes_atomic(
                    storage.join(report_dir, heat_name(job.image_id, cls)), overlay_png(heat)
                )
    return done
