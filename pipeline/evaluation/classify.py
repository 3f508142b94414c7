"""Table IV of the method paper: which test images a classifier outside the ensemble is scored on, how,
and how the numbers are kept and shown.

The sets are all the ok test images with a split and a known class, each time in full: the originals
("no crop"), and per localizer and target their crops, label-free (the box searched for the ensemble's
own prediction: no test label involved) and label-driven (searched for the given label, as the paper
did). An image whose crop row has no box, or has no crop row at all, is scored on its whole image, and
counted, so that every set has the same images and the numbers compare. Pure pandas and numpy: the
training is in ``pipeline/stages/evaluate.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.summary import read_metrics

SECTION = "evaluation"
BOX_COLUMNS = ("x0", "y0", "x1", "y1")  # crops.parquet's box (the columns the image decoder crops to)
ORIGINAL = "original"
# crops.parquet's target -> the name used in metrics: who chose what the crop looks for.
TARGETS = {"predicted": "label_free", "label": "label_driven"}
# Localizers that are the whole image by definition: scoring them again would only repeat "original".
WHOLE_IMAGE_METHODS = ("none",)
# evaluate.select_by -> how the headline says which weights were scored.
SELECTED = {"loss": " (weights: least val loss)", "top1": " (weights: best val top-1)"}


def set_name(method: str, target: str) -> str:
    """Name of the evaluation set of ``method``'s crops for ``target`` (a crops.parquet target)."""
    return f"{method}/{TARGETS[target]}"


def with_boxes(rows: pd.DataFrame, crops: pd.DataFrame, method: str, target: str) -> tuple[pd.DataFrame, int]:
    """``rows`` (image rows with a ``label_idx``) with the box ``method`` found for ``target``; returns the
    rows in the same order and how many of them have no box (they are read whole)."""
    picked = crops[(crops["method"] == method) & (crops["target"] == target)]
    boxes = picked.drop_duplicates("image_id").set_index("image_id")[list(BOX_COLUMNS)]
    out = rows.drop(columns=[c for c in BOX_COLUMNS if c in rows.columns])
    joined = out.join(boxes, on="image_id")
    for c in BOX_COLUMNS:
        joined[c] = pd.to_numeric(joined[c], errors="coerce").astype("float64")
    fallback = int(joined[list(BOX_COLUMNS)].isna().any(axis=1).sum())
    return joined.reset_index(drop=True), fallback


def crop_methods(crops: pd.DataFrame, method: str) -> list[str]:
    """The configured method first, then every other localizer crops.parquet holds (the baselines)."""
    present = set(crops["method"].unique()) - set(WHOLE_IMAGE_METHODS)
    return [method, *sorted(present - {method})]


def evaluation_sets(
    test: pd.DataFrame, crops: pd.DataFrame, method: str
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Every evaluation set of the test rows: originals and, for each localizer and target that
    crops.parquet holds, the crops; returns the sets and the whole-image fallbacks per crop set."""
    sets: dict[str, pd.DataFrame] = {
        ORIGINAL: test.drop(columns=[c for c in BOX_COLUMNS if c in test.columns])
    }
    fallback: dict[str, int] = {}
    test_crops = crops[crops["image_id"].isin(test["image_id"])]
    for m in crop_methods(test_crops, method):
        for target in TARGETS:
            if m != method and not ((test_crops["method"] == m) & (test_crops["target"] == target)).any():
                continue  # a baseline without this target: nothing to report
            name = set_name(m, target)
            sets[name], fallback[name] = with_boxes(test, test_crops, m, target)
    return sets, fallback


def topk(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the ``k`` most probable classes."""
    if len(labels) == 0:
        return 0.0
    k = min(k, probs.shape[1])
    best = np.argsort(-probs, axis=1)[:, :k]
    return float((best == labels[:, None]).any(axis=1).mean())


def accuracy(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"top1": round(topk(probs, labels, 1), 4), "top5": round(topk(probs, labels, 5), 4)}


def table_metrics(
    scores: dict[str, dict[str, float]], method: str, retrained: dict[str, float] | None
) -> dict[str, Any]:
    """Table IV's keys from per-set scores (``scores[set] = {"top1", "top5"}``)."""
    values: dict[str, Any] = {
        "top1_original": scores[ORIGINAL]["top1"],
        "top5_original": scores[ORIGINAL]["top5"],
    }
    for target in TARGETS.values():
        s = scores[f"{method}/{target}"]
        values[f"top1_cropped_{target}"], values[f"top5_cropped_{target}"] = s["top1"], s["top5"]
    values["top1_cropped_retrained"] = retrained["top1"] if retrained else None
    values["top5_cropped_retrained"] = retrained["top5"] if retrained else None
    baselines: dict[str, dict[str, float]] = {}
    for name, s in scores.items():
        m, _, target = name.partition("/")
        if target and m != method:
            baselines.setdefault(m, {}).update({f"top1_{target}": s["top1"], f"top5_{target}": s["top5"]})
    values["baselines"] = baselines
    return values


def read_evaluation_metrics(out: str) -> dict[str, Any]:
    """The ``evaluation`` section of OUT/metrics.json (empty when there is none yet)."""
    return dict(read_metrics(out).get(SECTION) or {})


def _pct(value: Any) -> str:
    return f"{100 * value:5.1f}%" if isinstance(value, int | float) else "    -"


def format_evaluation(metrics: dict[str, Any]) -> str:
    """A readable Table IV from the ``evaluation`` section (or the whole metrics.json)."""
    m = metrics.get(SECTION, metrics)
    if "top1_original" not in m:
        return "Evaluation: no classification numbers yet (run the evaluate stage)."
    method = m.get("method", "crops")
    fallback = m.get("fallback_whole_image", {})
    rows: list[tuple[str, Any, Any, Any]] = [
        ("original (no crop)", m["top1_original"], m["top5_original"], None)
    ]
    for target, words in (("label_free", "label-free"), ("label_driven", "label-driven")):
        rows.append((f"{method}, {words}", m[f"top1_cropped_{target}"], m[f"top5_cropped_{target}"],
                     fallback.get(f"{method}/{target}")))  # fmt: skip
    if m.get("top1_cropped_retrained") is not None:
        rows.append((f"{method}, label-free; retrained on crops", m["top1_cropped_retrained"],
                     m["top5_cropped_retrained"], fallback.get(f"{method}/label_free")))  # fmt: skip
    for base, s in sorted(m.get("baselines", {}).items()):
        for target, words in (("label_free", "label-free"), ("label_driven", "label-driven")):
            if f"top1_{target}" in s:
                rows.append((f"{base}, {words}", s[f"top1_{target}"], s[f"top5_{target}"],
                             fallback.get(f"{base}/{target}")))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    size = f", {m['input_size']} px" if m.get("input_size") else ""
    picked = SELECTED.get(m.get("select_by"), "")
    lines = [
        f"Table IV: {m.get('outside_arch', '?')} outside the ensemble{size}, trained on the train split"
        f"{picked}, {m.get('test_images', '?')} test images",
        f"{'test images':<{width}}  top-1   top-5  read whole",
    ]
    lines += [
        f"{name:<{width}}  {_pct(t1)}  {_pct(t5)}  {'' if fb is None else fb:>10}"
        for name, t1, t5, fb in rows
    ]
    return "\n".join(lines)
