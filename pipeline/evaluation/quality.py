"""Crop and blacklist quality against ground truth, the cleanlab baseline, verified-subset calibration.

Generated data (``pipeline/synth.py``) writes ``ground_truth.parquet`` at the source root: the true class
and the object's box of every file. :func:`load_ground_truth` joins it to the images manifest and scales
the boxes into the normalized images' pixels; the other functions are pure functions over DataFrames
that score one run's outputs against it:

- :func:`crop_quality`: how much of the object each localizer's crop holds (containment, IoU, area);
- :func:`blacklist_quality`: precision, recall and F1 of the blacklist against the injected label errors,
  the suggested label's accuracy, and the average precision of the ranking score;
- :func:`cleanlab_quality`: the same numbers for cleanlab's ``find_label_issues`` on the ensemble's
  probabilities, the baseline the blacklist is compared with;
- :func:`verified_quality`: precision and recall against a Food-101N ``verified_train.tsv``, for real
  data without generated ground truth.

:func:`quality_metrics` runs what a run's outputs allow; the evaluation stage stores the result under
``evaluation.quality`` in ``metrics.json``. Every number is a plain int or float, or None where it is
undefined (0/0), so the dict serializes to JSON as is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.manifests import read_manifest
from pipeline.sources import detect_kind

if TYPE_CHECKING:
    from pipeline.config import RunConfig, SourceConfig
    from pipeline.stages.base import RunContext

GROUND_TRUTH_FILE = "ground_truth.parquet"
# A crop "holds the object" when at least this share of the object's box lies inside it.
CONTAINED = 0.8
LABEL_NOT_FOUND = "label_not_found"
TOP_SHARE = 0.1  # top10_precision: the precision of this share of the ranking
BOX = ("x0", "y0", "x1", "y1")


# ---------------------------------------------------------------------------------------------------
# Small helpers


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for missing or NaN."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def prf(flagged: Iterable[str], positives: Iterable[str], universe: Iterable[str]) -> dict[str, Any]:
    """Precision, recall and F1 of the ids ``flagged`` against ``positives``, both cut to ``universe``.

    Undefined ratios (nothing flagged, no positives) are None; F1 is 2 TP / (flagged + positives).
    """
    scope = set(universe)
    flag, pos = set(flagged) & scope, set(positives) & scope
    tp = len(flag & pos)
    return {
        "flagged": len(flag),
        "true_positives": tp,
        "precision": _ratio(tp, len(flag)),
        "recall": _ratio(tp, len(pos)),
        "f1": _ratio(2 * tp, len(flag) + len(pos)),
    }


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Average precision of ranking by ``scores`` (higher first) for the boolean ``positive``.

    Tied scores form one threshold (as in scikit-learn's ``average_precision_score``):
    AP = sum over thresholds of (recall step) x (precision at that threshold). None without positives.
    """
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    tp = np.cumsum(p)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last index of each tied run
    tp_at, seen = tp[last], last + 1
    recall_step = np.diff(np.r_[0, tp_at]) / n_pos
    return float(np.sum(recall_step * tp_at / seen))


def top_precision(scores: np.ndarray, positive: np.ndarray, share: float = TOP_SHARE) -> float | None:
    """Precision of the ``share`` of items ranked highest by ``scores`` (at least one; ties keep the input
    order, so pass a strict ranking, e.g. minus the rank). None without items."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    if not len(scores):
        return None
    top = max(1, math.ceil(share * len(scores)))
    order = np.argsort(-scores, kind="stable")[:top]
    return float(positive[order].mean())


def ranking_quality(scores: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """A ranking's ``average_precision`` and ``top10_precision`` (the top 10% of the items)."""
    return {"average_precision": average_precision(scores, positive), "top10_precision":
            top_precision(scores, positive)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 1. Ground truth


def join_ground_truth(images: pd.DataFrame, truths: Mapping[str, pd.DataFrame]) -> pd.DataFrame | None:
    """Join each source's ground truth (``truths``: source name -> its ground_truth table) to ``images``.

    Rows are matched by source name and ``source_key`` (a path relative to the source root on both
    sides). Boxes go from the displayed source pixels to the normalized image's pixels, per axis
    (``width / orig_width``, ``height / orig_height``; the ground truth's own size when orig_* is
    missing). Columns: image_id, source, source_key, label, split, status, width, height (normalized),
    given_label, true_label, kind, x0, y0, x1, y1 (floats, x1/y1 exclusive, NaN without a box or a
    normalized image) and ``is_mislabeled`` (true_label known and not the given label). None when no
    source has ground truth.
    """
    parts = []
    for source, gt in truths.items():
        cols = ["source_key", "given_label", "true_label", "kind", *BOX, "width", "height"]
        g = gt[cols].rename(columns={"width": "gt_width", "height": "gt_height"})
        g = g.rename(columns={c: f"gt_{c}" for c in BOX})
        parts.append(g.assign(source=source))
    if not parts:
        return None
    gt_all = pd.concat(parts, ignore_index=True)
    keep = ["image_id", "source", "source_key", "label", "split", "status", "width", "height"]
    keep += ["orig_width", "orig_height"]
    df = images[keep].merge(gt_all, on=["source", "source_key"], how="inner")
    src_w = df["orig_width"].astype(float).fillna(df["gt_width"].astype(float))
    src_h = df["orig_height"].astype(float).fillna(df["gt_height"].astype(float))
    sx = df["width"].astype(float) / src_w
    sy = df["height"].astype(float) / src_h
    for c, scale in zip(BOX, (sx, sy, sx, sy), strict=True):
        df[c] = df[f"gt_{c}"].astype(float) * scale
    df["is_mislabeled"] = df["true_label"].notna() & (df["true_label"] != df["given_label"])
    cols = [*keep[:8], "given_label", "true_label", "kind", *BOX, "is_mislabeled"]
    return df[cols].reset_index(drop=True)


def source_name(src: SourceConfig) -> str:
    """The name a source's images carry in images.source: its name, else its kind, detected when auto.

    (``SourceConfig.label`` says "auto" for an auto-detected source; ingest records the detected kind.)
    """
    if src.name or src.kind != "auto" or not src.uri:
        return src.label
    return detect_kind(src.uri)


def load_ground_truth(cfg: RunConfig, images: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Ground truth of every configured source whose root holds ``ground_truth.parquet``, joined to images.

    ``images`` defaults to the run's images manifest. See :func:`join_ground_truth` for the columns.
    None when no source has ground truth (or the run has no images manifest yet).
    """
    truths: dict[str, pd.DataFrame] = {}
    for src in cfg.sources:
        if not src.uri:
            continue
        uri = storage.join(src.uri, GROUND_TRUTH_FILE)
        if storage.exists(uri):
            fs, path = storage.get_fs(uri)
            truths[source_name(src)] = pq.read_table(path, filesystem=fs).to_pandas()
    if not truths:
        return None
    if images is None:
        uri = RunLayout(cfg.out).manifest("images")
        if not storage.exists(uri):
            return None
        images = read_manifest("images", uri)
    return join_ground_truth(images, truths)


# ---------------------------------------------------------------------------------------------------
# 2. Crops


def box_metrics(crops: np.ndarray, objects: np.ndarray, image_wh: np.ndarray) -> pd.DataFrame:
    """Per row: containment (share of the object box inside the crop), IoU, crop area / image area.

    ``crops`` and ``objects`` are (n, 4) arrays x0, y0, x1, y1 (x1, y1 exclusive); ``image_wh`` is
    (n, 2). A degenerate object box gives NaN containment.
    """
    c = np.asarray(crops, dtype=float).reshape(-1, 4)
    o = np.asarray(objects, dtype=float).reshape(-1, 4)
    wh = np.asarray(image_wh, dtype=float).reshape(-1, 2)
    iw = np.clip(np.minimum(c[:, 2], o[:, 2]) - np.maximum(c[:, 0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(c[:, 3], o[:, 3]) - np.maximum(c[:, 1], o[:, 1]), 0, None)
    inter = iw * ih
    crop_area = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    obj_area = np.clip(o[:, 2] - o[:, 0], 0, None) * np.clip(o[:, 3] - o[:, 1], 0, None)
    union = crop_area + obj_area - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        containment = np.where(obj_area > 0, inter / obj_area, np.nan)
        iou = np.where(union > 0, inter / union, np.nan)
        area = np.where(wh.prod(axis=1) > 0, crop_area / wh.prod(axis=1), np.nan)
    return pd.DataFrame({"containment": containment, "iou": iou, "area_fraction": area})


def _crop_group_stats(rows: pd.DataFrame, predicted: bool) -> dict[str, Any]:
    has_box = rows[list(BOX)].notna().all(axis=1)
    boxed = rows[has_box]
    m = box_metrics(
        boxed[list(BOX)].to_numpy(float),
        boxed[[f"gt_{c}" for c in BOX]].to_numpy(float),
        boxed[["width", "height"]].to_numpy(float),
    )
    cont = m["containment"].dropna()
    out: dict[str, Any] = {
        "images": len(rows),
        "with_box": int(has_box.sum()),
        "no_box_share": _ratio(int((~has_box).sum()), len(rows)),
        "mean_containment": _num(cont.mean()) if len(cont) else None,
        "share_containment_ge_80": _num((cont >= CONTAINED).mean()) if len(cont) else None,
        "mean_iou": _num(m["iou"].mean()) if len(m) else None,
        "mean_area_fraction": _num(m["area_fraction"].mean()) if len(m) else None,
    }
    if predicted:
        searched = rows[rows["searched"].notna()]
        out["searched_is_true"] = _ratio(
            int((searched["searched"] == searched["true_label"]).sum()), len(searched)
        )
    return out


def crop_quality(crops: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Crop quality per method, target and mode: ``{method: {target: {mode: stats}}}``.

    Only images whose true class is known count. Target "label" is scored over correctly labelled images
    (a crop searched for a wrong label has no right answer); target "predicted" over all of them, with
    ``searched_is_true``, the share whose searched class is the true one. Stats: images (rows scored),
    with_box, no_box_share, mean_containment, share_containment_ge_80 (containment >= 0.8), mean_iou,
    mean_area_fraction (crop area / normalized image area); box means are over rows with a box.
    """
    t = truth[truth["true_label"].notna()]
    t = t[["image_id", "true_label", "width", "height", *BOX]].rename(columns={c: f"gt_{c}" for c in BOX})
    cols = ["image_id", "label", "target", "method", "mode", *BOX]
    cols += ["searched"] if "searched" in crops.columns else []
    df = crops[cols].merge(t, on="image_id", how="inner")
    if "searched" not in df.columns:
        df["searched"] = np.where(df["target"] == "label", df["label"], None)
    out: dict[str, Any] = {}
    for (method, target, mode), rows in df.groupby(["method", "target", "mode"], sort=True):
        predicted = target != "label"
        if not predicted:
            rows = rows[rows["label"] == rows["true_label"]]
        out.setdefault(str(method), {}).setdefault(str(target), {})[str(mode)] = _crop_group_stats(
            rows, predicted
        )
    return out


# ---------------------------------------------------------------------------------------------------
# 3. Blacklist


def _universe(truth: pd.DataFrame, judged: pd.DataFrame | None, extra: Iterable[str] = ()) -> pd.DataFrame:
    """Truth rows (true class known) of the judged images, or of every ok image with a split, plus extra."""
    known = truth[truth["true_label"].notna()]
    if judged is not None:
        ids = set(judged["image_id"])
    else:
        ids = set(known.loc[(known["status"] == "ok") & known["split"].notna(), "image_id"])
    ids |= set(extra)
    return known[known["image_id"].isin(ids)]


def blacklist_quality(
    blacklist: pd.DataFrame, judged: pd.DataFrame | None, truth: pd.DataFrame, split: str = "train"
) -> dict[str, Any]:
    """Precision, recall, F1 of the blacklist against ``is_mislabeled``, for ``split`` and for all splits.

    Scored over the judged images (``judged``: the crop stage's judgments, one row per judged image;
    None: every ok image with a split) plus any blacklisted image, whose true class is known; the split
    is the images manifest's. Layout: ``{split: scope, "all": scope}`` where a scope is
    ``{"images", "mislabeled", "label_not_found": counts, "all_reasons": counts, "average_precision"}``
    and counts are :func:`prf` plus ``suggested_correct`` / ``suggested_accuracy`` (suggested_label ==
    true_label over the true positives; a missing suggestion counts as wrong). ``average_precision``
    and ``top10_precision`` (precision of the first 10%) rank the judged images by their ``rank``
    (judgments before 1.2 of the blacklist schema: by ``score``); None without judgments.
    """
    universe = _universe(truth, judged, blacklist["image_id"])
    true_label = universe.set_index("image_id")["true_label"]
    out: dict[str, Any] = {}
    for scope_name, scope in ((split, universe[universe["split"] == split]), ("all", universe)):
        ids = set(scope["image_id"])
        positives = set(scope.loc[scope["is_mislabeled"], "image_id"])
        res: dict[str, Any] = {"images": len(ids), "mislabeled": len(positives)}
        for key, rows in (
            (LABEL_NOT_FOUND, blacklist[blacklist["reason"] == LABEL_NOT_FOUND]),
            ("all_reasons", blacklist),
        ):
            # One row per image; a label_not_found row (which carries the suggestion) first.
            rows = rows.assign(_nf=rows["reason"] != LABEL_NOT_FOUND).sort_values("_nf", kind="stable")
            rows = rows.drop_duplicates("image_id")
            counts = prf(rows["image_id"], positives, ids)
            tps = rows[rows["image_id"].isin(positives & ids)]
            correct = int((tps["suggested_label"] == tps["image_id"].map(true_label)).sum())
            counts["suggested_correct"] = correct
            counts["suggested_accuracy"] = _ratio(correct, len(tps))
            res[key] = counts
        ranking: dict[str, Any] = {"average_precision": None, "top10_precision": None}
        if judged is not None and ("rank" in judged.columns or "score" in judged.columns):
            key = "rank" if "rank" in judged.columns else "score"
            scored = judged[judged["image_id"].isin(ids)].drop_duplicates("image_id")
            scored = scored[scored[key].notna()]
            values = scored[key].to_numpy(float)
            ranking = ranking_quality(-values if key == "rank" else values,
                                      scored["image_id"].isin(positives).to_numpy())  # fmt: skip
        res.update(ranking)
        out[scope_name] = res
    return out


# ---------------------------------------------------------------------------------------------------
# 4. cleanlab


def mean_probabilities(predictions: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Per image, the members' mean class-probability vector over ``classes``.

    Out-of-fold rows (fold non-null) are used for an image that has any, else the full-data model's.
    A row's vector comes from topk_labels/topk_probs (predicted/confidence when those are null); mass
    the row leaves unassigned (only the top 5 are stored above 20 classes) is spread evenly over the
    classes it does not name. Returns (index frame with image_id and ``out_of_fold``, matrix) in the
    same order, rows summing to 1.
    """
    p = predictions.copy()
    p["_oof"] = p["fold"].notna()
    p = p[p["_oof"] == p.groupby("image_id")["_oof"].transform("any")].reset_index(drop=True)
    labels = [
        list(lab) if isinstance(lab, list | np.ndarray) else [pred]
        for lab, pred in zip(p["topk_labels"], p["predicted"], strict=True)
    ]
    probs = [
        list(pr) if isinstance(pr, list | np.ndarray) else [conf]
        for pr, conf in zip(p["topk_probs"], p["confidence"], strict=True)
    ]
    k = len(classes)
    lengths = np.array([len(x) for x in labels], dtype=int)
    rows = np.repeat(np.arange(len(p)), lengths)
    flat_labels = [lab for x in labels for lab in x]
    flat_probs = np.array([float(v) for x in probs for v in x], dtype=float)
    cols = pd.Index(classes).get_indexer(flat_labels)
    known = cols >= 0
    mat = np.zeros((len(p), k), dtype=float)
    mat[rows[known], cols[known]] = flat_probs[known]
    named = np.zeros((len(p), k), dtype=bool)
    named[rows[known], cols[known]] = True
    left = np.clip(1.0 - mat.sum(axis=1), 0, None)
    n_free = (~named).sum(axis=1)
    fill = np.divide(left, n_free, out=np.zeros_like(left), where=n_free > 0)
    mat = np.where(named, mat, fill[:, None])
    frame = pd.DataFrame(mat, columns=range(k))
    frame["image_id"], frame["_oof"] = p["image_id"], p["_oof"]
    mean = frame.groupby("image_id", sort=True).mean()
    m = mean[list(range(k))].to_numpy(float)
    m = m / np.clip(m.sum(axis=1, keepdims=True), 1e-12, None)
    index = pd.DataFrame({"image_id": mean.index.to_numpy(), "out_of_fold": mean["_oof"].to_numpy() > 0})
    return index, m


def cleanlab_quality(
    predictions: pd.DataFrame, images: pd.DataFrame, truth: pd.DataFrame, split: str = "train"
) -> dict[str, Any]:
    """cleanlab's ``find_label_issues`` (default filter_by) as a mislabel detector, scored like the blacklist.

    Run on the ok images of ``split`` in ``images`` that have predictions and a known true class, with
    the given labels and the members' mean probabilities (:func:`mean_probabilities`). Layout:
    ``{"split", "predictions": "out_of_fold" | "in_sample" | "mixed", "out_of_fold_images",
    "in_sample_images", "images", "mislabeled", "flagged", "true_positives", "precision", "recall",
    "f1", "average_precision", "top10_precision", "classes", "cleanlab_version"}``; the ranking numbers
    order the images by cleanlab's label quality score (self-confidence, lowest first).
    """
    import cleanlab
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    known = truth[truth["true_label"].notna()].set_index("image_id")
    imgs = images[(images["status"] == "ok") & (images["split"] == split) & images["label"].notna()]
    imgs = imgs[imgs["image_id"].isin(known.index) & imgs["image_id"].isin(set(predictions["image_id"]))]
    preds = predictions[predictions["image_id"].isin(set(imgs["image_id"]))]
    pred_classes = {str(c) for x in preds["topk_labels"].dropna() for c in x} | set(preds["predicted"])
    classes = sorted(set(imgs["label"]) | pred_classes)
    index, probs = mean_probabilities(preds, classes)
    label_of = imgs.set_index("image_id")["label"]
    labels = pd.Index(classes).get_indexer(index["image_id"].map(label_of))
    ids = index["image_id"].to_numpy()
    n_oof = int(index["out_of_fold"].sum())
    kind = "out_of_fold" if n_oof == len(index) else "in_sample" if n_oof == 0 else "mixed"
    flagged: np.ndarray = np.zeros(len(ids), dtype=bool)
    quality = np.zeros(len(ids))
    if len(ids) and len(set(labels)) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # classes absent from labels, tiny classes: expected here
            flagged = np.asarray(find_label_issues(labels, probs, n_jobs=1), dtype=bool)
            quality = np.asarray(get_label_quality_scores(labels, probs), dtype=float)  # low: likely wrong
    positives = known.index[known["is_mislabeled"].to_numpy(bool)]
    return {
        "split": split,
        "predictions": kind,
        "out_of_fold_images": n_oof,
        "in_sample_images": len(index) - n_oof,
        "images": len(ids),
        "mislabeled": int(np.isin(ids, positives).sum()),
        **prf(ids[flagged], positives, ids),
        **ranking_quality(-quality, np.isin(ids, positives)),
        "classes": len(classes),
        "cleanlab_version": cleanlab.__version__,
    }


# ---------------------------------------------------------------------------------------------------
# 5. Verified subset (Food-101N)


def parse_verified(text: str, uri: str = "verified file") -> dict[str, bool]:
    """``class/key.jpg`` -> label verified correct, from a Food-101N verification file.

    The first line is a header; then ``class/key.jpg<TAB>1`` (verified correct) or ``<TAB>0`` (verified
    wrong); blank lines are skipped. A malformed line raises ValueError naming ``uri`` and the line.
    """
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{uri}: empty file; expected a header line, then lines 'class/key.jpg<TAB>1|0'")
    out: dict[str, bool] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 2:
            raise ValueError(
                f"{uri}, line {n}: expected 'class/key.jpg<TAB>1|0' (2 tab-separated fields), got {line!r}"
            )
        key, flag = fields[0].strip(), fields[1].strip()
        if flag not in ("0", "1"):
            raise ValueError(f"{uri}, line {n}: verification label must be 0 or 1, got {flag!r}")
        if key.count("/") != 1 or not all(key.split("/")):
            raise ValueError(f"{uri}, line {n}: key must look like 'class/key.jpg', got {key!r}")
        out[key] = flag == "1"
    return out


def verified_quality(blacklist: pd.DataFrame, images: pd.DataFrame, tsv_uri: str) -> dict[str, Any]:
    """Blacklist precision, recall, F1 against a Food-101N verification file.

    Verified keys ``class/key.jpg`` match the ok images (with a split) whose source_key ends with them
    (Food-101 keys are ``images/<class>/<id>.jpg``); positives are the matched images verified wrong.
    Layout: ``{"verified", "matched", "verified_wrong", "label_not_found": prf, "all_reasons": prf}``.
    """
    verdicts = parse_verified(storage.read_text(tsv_uri), tsv_uri)
    imgs = images[(images["status"] == "ok") & images["split"].notna()]
    tail = imgs["source_key"].str.split("/").str[-2:].str.join("/")
    correct = tail.map(verdicts)
    matched = imgs[correct.notna()]
    wrong = matched.loc[~correct[correct.notna()].astype(bool), "image_id"]
    out: dict[str, Any] = {
        "verified": len(verdicts),
        "matched": len(matched),
        "verified_wrong": len(wrong),
    }
    nf = blacklist.loc[blacklist["reason"] == LABEL_NOT_FOUND, "image_id"]
    out[LABEL_NOT_FOUND] = prf(nf, wrong, matched["image_id"])
    out["all_reasons"] = prf(blacklist["image_id"], wrong, matched["image_id"])
    return out


# ---------------------------------------------------------------------------------------------------
# 6. One run


def _read(name: str, uri: str) -> pd.DataFrame | None:
    return read_manifest(name, uri) if storage.exists(uri) else None


def quality_metrics(ctx: RunContext) -> dict[str, Any]:
    """All quality numbers a run's outputs allow: ``{"crops", "blacklist", "cleanlab", "verified"}``.

    Ground-truth parts need a source with ground_truth.parquet and the manifest they score; cleanlab
    also needs ``evaluate.cleanlab``; verified needs ``blacklist.verified`` and the blacklist. Parts
    whose inputs are absent are left out. Cleanlab is scored over the judged images when the crop
    stage's judgments exist, like the blacklist.
    """
    cfg = ctx.cfg
    out: dict[str, Any] = {}
    images = _read("images", ctx.manifest("images"))
    if images is None:
        return out
    blacklist = _read("blacklist", ctx.manifest("blacklist"))
    truth = load_ground_truth(cfg, images)
    if truth is not None:
        judged = _read("judgments", ctx.layout.judgments)
        crops = _read("crops", ctx.manifest("crops"))
        if crops is not None:
            out["crops"] = crop_quality(crops, truth)
        if blacklist is not None:
            out["blacklist"] = blacklist_quality(blacklist, judged, truth)
        predictions = _read("predictions", ctx.manifest("predictions"))
        if predictions is not None and cfg.evaluate.cleanlab:
            scope = images if judged is None else images[images["image_id"].isin(set(judged["image_id"]))]
            out["cleanlab"] = cleanlab_quality(predictions, scope, truth)
    if cfg.blacklist.verified and blacklist is not None:
        out["verified"] = verified_quality(blacklist, images, cfg.blacklist.verified)
    return out


# ---------------------------------------------------------------------------------------------------
# 6. Summary for people


def _f(x: Any, pct: bool = False) -> str:
    if x is None:
        return "   -"
    return f"{100 * x:5.1f}%" if pct else f"{x:.3f}"


def format_quality(quality: Mapping[str, Any]) -> str:
    """The headline quality numbers from :func:`quality_metrics`' result, as lines of text: each
    localizer's crops (share holding >= 0.8 of the object, mean area), the blacklist against cleanlab
    on the train split. Empty when there is no ground truth."""
    lines: list[str] = []
    crops = quality.get("crops") or {}
    if crops:
        lines.append("crops vs ground truth     target       holds >=0.8  mean area   IoU")
        for method, targets in sorted(crops.items()):
            for target, words in (("label", "label-driven"), ("predicted", "label-free")):
                for mode, s in sorted(targets.get(target, {}).items()):
                    held, area = _f(s["share_containment_ge_80"], True), _f(s["mean_area_fraction"])
                    name = f"{method} {mode}"
                    lines.append(f"  {name:<23} {words:<12} {held:>11}  {area:>9}  {_f(s['mean_iou'])}")
    bl = (quality.get("blacklist") or {}).get("train")
    if bl:
        lines.append(f"blacklist vs ground truth (train: {bl['mislabeled']} mislabelled of {bl['images']})"
                     f"   flagged  precision  recall     F1  top-10%     AP")  # fmt: skip
        rows = [("label not found", bl[LABEL_NOT_FOUND], {}), ("all reasons", bl["all_reasons"], bl)]
        if quality.get("cleanlab"):
            cl = quality["cleanlab"]
            rows.append((f"cleanlab find_label_issues ({cl.get('predictions', '?')})", cl, cl))
        for name, s, ranked in rows:
            lines.append(f"  {name:<46} {s['flagged']:>7}  {_f(s['precision']):>9}  {_f(s['recall']):>6}"
                         f"  {_f(s['f1'])}  {_f(ranked.get('top10_precision')):>7}"
                         f"  {_f(ranked.get('average_precision')):>5}")  # fmt: skip
        right = _f(bl["all_reasons"]["suggested_accuracy"], True).strip()
        lines.append(f"  suggested label right for {right} of found errors; top-10% and AP rank every judged "
                     f"image (blacklist: estimated P(wrong label); cleanlab: self-confidence)")  # fmt: skip
    return "\n".join(lines)
