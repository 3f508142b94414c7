"""The crop stage's worker, batched against the per-image path it replaced, on a finished run.

Both paths run in this process on the run's own images and trained models (the full-data members and
the fold models), with the run's crop settings, batch by batch as the stage hands them to an actor
(rows sorted by image size, ``crop.batch_size`` per batch):

- **per image** (``tests/crop_reference.py``, the worker of 7bbd85d): images grouped by size and fold;
  per group each ensemble's pyramid, then per image numpy selection and boxes, and Grad-CAM and
  SIMILARnet one image, one class and one member at a time.
- **batched** (``CropWorker.rows``): images grouped by size; each ensemble once over the images it
  judges or crops, selection, judgments, boxes and saliency as tensor ops over the group.

Each batch is decoded and located by both paths, in alternating order (so that a change of load hits
both alike); times include the decoding, not the part files or the cropped JPEGs (the same work in both).
The outputs are compared row by row: boxes (and display boxes) must be equal, votes and classes equal,
probabilities and scores within ``--atol``.

    python bench/crop.py RUN [--images N] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifests, storage
from pipeline.actor_pool import batch_blocks
from pipeline.config import build_config, load_config_file
from pipeline.crop.worker import CropWorker, _to_tensor
from pipeline.resume import KeyedFolder
from pipeline.stages.base import RunContext
from pipeline.stages.crop import CropStage, stage_rows
from tests.crop_reference import Reference, ReferenceFCN, reference_rows

BOXES = ["x0", "y0", "x1", "y1", "display_x0", "display_y0", "display_x1", "display_y1"]
EXACT_CROPS = ["searched", "votes", "members", "reason"]
CLOSE_CROPS = ["score", "scale"]
EXACT_JUDGED = ["votes", "suggested_label", "suggested_votes", "members", "class_votes", "evidence", "reason"]
CLOSE_JUDGED = ["label_score", "suggested_score", "class_scores"]


def reference_of(worker: CropWorker) -> Reference:
    """The per-image path with the worker's own models and settings."""
    s = worker.s
    similarnet = worker.saliency["similarnet"].weights if "similarnet" in worker.saliency else None
    return Reference(
        fcns={k: [ReferenceFCN(m) for m in ms] for k, ms in worker.models.items()}, models=worker.models,
        classes=s.classes,
        crop_models=s.crop_models, method=s.method, mode=s.mode, baselines=s.baselines, step=s.step,
        max_scale=s.max_scale, early_stop=s.early_stop, display_aspect=s.display_aspect,
        display_min_area=s.display_min_area, similarnet=list(similarnet) if similarnet else None,
    )  # fmt: skip


def compare(old: pd.DataFrame, new: pd.DataFrame, key: list[str], exact: list[str], close: list[str],
            atol: float) -> dict[str, Any]:  # fmt: skip
    """Rows matched on ``key``: how many differ in each exact column, the largest difference of each
    float column."""
    a = old.sort_values(key).reset_index(drop=True)
    b = new.sort_values(key).reset_index(drop=True)
    if len(a) != len(b) or not a[key].equals(b[key]):
        return {"rows": [len(a), len(b)], "same_keys": False}
    out: dict[str, Any] = {"rows": len(a), "same_keys": True, "differ": {}, "max_abs": {}, "examples": {}}
    for col in exact:
        if col in a or col in b:
            x, y = a.get(col), b.get(col)
            if x is None or y is None:
                out["differ"][col] = len(a)
                continue
            same = [_same(u, v) for u, v in zip(x, y, strict=True)]
            out["differ"][col] = int(len(same) - sum(same))
            bad = [i for i, ok in enumerate(same) if not ok][:3]
            if bad:
                out["examples"][col] = [[*a.loc[i, key], _plain(x[i]), _plain(y[i])] for i in bad]
    for col in close:
        if col in a and col in b:
            x = [np.asarray(v, dtype=float) for v in a[col]]
            y = [np.asarray(v, dtype=float) for v in b[col]]
            diffs = [float(np.nan_to_num(np.abs(u - v)).max(initial=0.0)) for u, v in zip(x, y, strict=True)]
            nan_mismatch = sum(bool((np.isnan(u) != np.isnan(v)).any()) for u, v in zip(x, y, strict=True))
            out["max_abs"][col] = max(diffs, default=0.0)
            out["differ"][col] = int(sum(d > atol for d in diffs) + nan_mismatch)
            worst = [int(i) for i in np.argsort(diffs)[::-1][:3] if diffs[i] > atol]
            if worst:
                out["examples"][col] = [
                    [*a.loc[i, key], _plain(a.loc[i, col]), _plain(b.loc[i, col])] for i in worst
                ]
    return out


def _plain(v: Any) -> Any:
    """A JSON-able value."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v.item() if isinstance(v, np.generic) else v


def _same(u: Any, v: Any) -> bool:
    if isinstance(u, list | np.ndarray) or isinstance(v, list | np.ndarray):
        return list(np.asarray(u).tolist()) == list(np.asarray(v).tolist())
    if pd.isna(u) and pd.isna(v):
        return True
    return u == v


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="a finished run (trained models; its crop stage need not have run)")
    parser.add_argument("--images", type=int, default=0, help="the first N images in stage order (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a crop actor's CPUs)")
    parser.add_argument("--atol", type=float, default=1e-4, help="tolerance on probabilities and scores")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    doc = load_config_file(storage.join(args.run, "run.yaml"))
    cfg = build_config(doc | {"out": args.run})
    ctx = RunContext(cfg=cfg)
    classes = manifests.read_classes(ctx.layout.classes)
    images = manifests.read_manifest("images", ctx.manifest("images"))
    rows = stage_rows(ctx, images, classes, set())
    rows = rows.assign(_size=rows["width"] * 100_000 + rows["height"]).sort_values("_size", kind="stable")
    rows = rows.drop(columns="_size")
    if args.images:
        rows = rows.head(args.images)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as parts:
        settings = CropStage()._settings(ctx, classes, rows, KeyedFolder(parts, "bench"))
        settings.export, settings.threads = False, args.threads
        start = time.perf_counter()
        worker = CropWorker(settings)
        init_s = time.perf_counter() - start
    ref = reference_of(worker)
    seconds = {"per_image": 0.0, "batched": 0.0}
    out: dict[str, list[Any]] = {"old_crops": [], "old_judged": [], "new_crops": [], "new_judged": []}

    def per_image(batch: pd.DataFrame) -> None:
        pictures = worker.decode(batch)
        crops, judged = reference_rows(ref, batch, pictures, lambda p: _to_tensor(p, worker.device))
        out["old_crops"] += crops
        out["old_judged"] += judged

    def batched(batch: pd.DataFrame) -> None:
        crops, judged = worker.rows(batch, worker.decode(batch))
        out["new_crops"] += [r for image_rows in crops for r in image_rows]
        out["new_judged"] += judged

    blocks = batch_blocks(rows, cfg.crop.batch_size)
    for b, block in enumerate(blocks):
        paths = [("per_image", per_image), ("batched", batched)]
        for name, fn in paths if b % 2 == 0 else paths[::-1]:
            t = time.perf_counter()
            fn(block)
            seconds[name] += time.perf_counter() - t
        print(f"batch {b + 1}/{len(blocks)}: per-image {seconds['per_image']:.1f} s, "
              f"batched {seconds['batched']:.1f} s so far", file=sys.stderr, flush=True)  # fmt: skip

    frames = {k: pd.DataFrame(v) for k, v in out.items()}
    crops = compare(frames["old_crops"], frames["new_crops"], ["image_id", "method", "target"],
                    BOXES + EXACT_CROPS, CLOSE_CROPS, args.atol)  # fmt: skip
    judged = compare(frames["old_judged"], frames["new_judged"], ["image_id"], EXACT_JUDGED, CLOSE_JUDGED,
                     args.atol)  # fmt: skip
    n = len(rows)
    result = {
        "run": args.run, "images": n, "batch_size": cfg.crop.batch_size, "threads": args.threads,
        "members": [m.label for m in cfg.train.members], "folds": cfg.train.folds, "mode": cfg.crop.mode,
        "baselines": settings.baselines, "init_s": round(init_s, 2),
        "per_image_s": round(seconds["per_image"], 2), "batched_s": round(seconds["batched"], 2),
        "per_image_img_s": round(n / seconds["per_image"], 2),
        "batched_img_s": round(n / seconds["batched"], 2),
        "speedup": round(seconds["per_image"] / seconds["batched"], 2),
        "crops": crops, "judged": judged,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_after": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    print(f"{n} images, batch {cfg.crop.batch_size}, {args.threads} thread(s), {cfg.crop.mode} mode, "
          f"baselines {', '.join(settings.baselines) or 'none'}")  # fmt: skip
    old_s, new_s = seconds["per_image"], seconds["batched"]
    print(f"per image: {old_s:.1f} s ({result['per_image_img_s']} images/s); batched: {new_s:.1f} s "
          f"({result['batched_img_s']} images/s): {result['speedup']}x")  # fmt: skip
    for name, c in (("crops", crops), ("judged", judged)):
        print(f"{name}: {c['rows']} rows, same keys {c['same_keys']}; rows that differ: {c.get('differ')}; "
              f"largest float difference: {c.get('max_abs')}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    same = all(c["same_keys"] and not any(c["differ"].values()) for c in (crops, judged))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
