"""The blacklist's ranking against ground truth: the paper's votes rule, the estimated probability of a wrong
label at its operating points, and cleanlab, side by side on the same out-of-fold probabilities.

On a finished run (``cropclean clean``, ``make demo``) with generated ground truth, re-ranks the crop
stage's judgments (``stages/crop/judgments.parquet``) with ``pipeline/crop/rank.py`` as the stage does
(no model runs, seconds) and prints per scope (the train split, where the label flips are, and every judged
image): images flagged, precision, recall, F1, the precision of the top 10% of each ranking, and its average
precision. Then the run's estimated noise rate against the true one and the weak-ensemble gate's decision.
No timing.

    python bench/blacklist.py [RUN] [--truth DATA/ground_truth.parquet] [--target-precision 0.8]

Judgments written before the crop stage kept every class's votes and probabilities (``class_votes``) give
the ranking no FCN evidence: it then ranks by the out-of-fold probabilities (and duplicates) alone; the
table says which features it had.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifests
from pipeline.config import build_config, load_config_file
from pipeline.crop import confidence, rank
from pipeline.evaluation import quality
from pipeline.layout import RunLayout
from pipeline.stages.base import RunContext
from pipeline.stages.crop import duplicate_labels
from pipeline.summary import read_metrics


def load(run: str, truth_file: str | None) -> dict:
    layout = RunLayout(run)
    doc = load_config_file(layout.run_config)
    doc["out"] = run
    cfg = build_config(doc)
    images = manifests.read_manifest("images", layout.manifest("images"))
    if truth_file:
        source = images["source"].dropna().iloc[0]
        truth = quality.join_ground_truth(images, {source: pd.read_parquet(truth_file)})
    else:
        truth = quality.load_ground_truth(cfg, images)
    if truth is None:
        raise SystemExit(f"{run}: no ground truth (give --truth DATA/ground_truth.parquet)")
    judged = manifests.read_manifest("judgments", layout.judgments)
    predictions = manifests.read_manifest("predictions", layout.manifest("predictions"))
    classes = manifests.read_classes(layout.classes)
    return {"cfg": cfg, "images": images, "truth": truth, "judged": judged, "predictions": predictions,
            "classes": classes}  # fmt: skip


def row(name: str, flagged: np.ndarray, ranking: np.ndarray, positive: np.ndarray) -> dict:
    """One line of the table: ``flagged`` (bool per image), ``ranking`` (higher: more likely wrong)."""
    tp = int((flagged & positive).sum())
    n, pos = int(flagged.sum()), int(positive.sum())
    return {
        "method": name, "flagged": n, "precision": tp / n if n else None, "recall": tp / pos if pos else None,
        "f1": 2 * tp / (n + pos) if n + pos else None, **quality.ranking_quality(ranking, positive),
    }  # fmt: skip


def cleanlab_scores(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's find_label_issues (its defaults) and its label quality score (self-confidence)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = np.asarray(find_label_issues(labels, probs, n_jobs=1), dtype=bool)
        score = np.asarray(get_label_quality_scores(labels, probs), dtype=float)
    return flagged, score


def table(rows: list[dict]) -> str:
    def f(x: float | None) -> str:
        return "    -" if x is None else f"{x:.3f}"

    lines = [
        f"  {'method':<44} {'flagged':>7}  {'prec':>5}  {'recall':>6}  {'F1':>5}  {'top10%':>6}  {'AP':>5}"
    ]
    for r in rows:
        lines.append(f"  {r['method']:<44} {r['flagged']:>7}  {f(r['precision'])}  {f(r['recall']):>6}  "
                     f"{f(r['f1'])}  {f(r['top10_precision']):>6}  {f(r['average_precision'])}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="demo-out/run", help="a finished run folder")
    ap.add_argument("--truth", help="ground_truth.parquet (default: the run's sources')")
    ap.add_argument("--target-precision", type=float, default=0.8, help="for the precision operating point")
    args = ap.parse_args(argv)
    d = load(args.run, args.truth)
    cfg, classes, b = d["cfg"], d["classes"], d["cfg"].blacklist
    probabilities = quality.mean_probabilities(d["predictions"], classes)
    conflicts = duplicate_labels(RunContext(cfg=cfg), d["images"]) if b.cross_label_duplicates else {}
    scored, ranking = rank.score_judgments(d["judged"].drop(columns=["verified"], errors="ignore"), classes,
                                           probabilities, conflicts)  # fmt: skip
    truth = d["truth"].set_index("image_id")
    scored = scored[scored["image_id"].isin(truth.index[truth["true_label"].notna()])].reset_index(drop=True)
    positive = scored["image_id"].map(truth["is_mislabeled"]).fillna(False).to_numpy(bool)
    noise, target = ranking.noise_rate, args.target_precision
    new = {
        "noise_rate": rank.flag(scored, "noise_rate", noise, target),
        "precision": rank.flag(scored, "precision", noise, target),
    }
    old_flag = rank.flag(scored, "votes", noise, target, b.max_votes, b.min_score)  # as the stage applies it
    labels = pd.Index(classes).get_indexer(scored["label"])
    index, matrix = probabilities
    where = pd.Index(index["image_id"]).get_indexer(scored["image_id"])
    has_p = where >= 0

    features = ", ".join(ranking.models) or "none"
    print(f"run {args.run}: {len(scored)} judged images with ground truth, {int(positive.sum())} "
          f"mislabelled; ranking features: {features}")  # fmt: skip
    for scope, mask in (("train split", (scored["split"] == "train").to_numpy()),
                        ("every judged image", np.ones(len(scored), bool))):  # fmt: skip
        m, pos = mask, positive[mask]
        # cleanlab on this scope's images alone (its thresholds depend on the set), as the evaluation does.
        cl_flag, cl_score = np.zeros(len(scored), bool), np.full(len(scored), np.inf)
        fit = m & has_p
        cl_flag[fit], cl_score[fit] = cleanlab_scores(labels[fit], matrix[where[fit]])
        neg_rank = -scored["rank"].to_numpy(float)
        rows = [
            row("votes rule (paper; margin ranks)", old_flag[m], scored["margin"].to_numpy(float)[m], pos),
            row("P(wrong) at noise_rate", new["noise_rate"][m], neg_rank[m], pos),
            row(f"P(wrong) at precision {target}", new["precision"][m], neg_rank[m], pos),
            row("cleanlab find_label_issues (self-confidence)", cl_flag[m], -cl_score[m], pos),
        ]
        print(f"\n{scope}: {int(m.sum())} images, {int(pos.sum())} mislabelled "
              f"({100 * pos.mean():.1f}%)\n{table(rows)}")  # fmt: skip
    print(f"\nestimated noise rate {100 * noise:.1f}% of {len(scored)} (true {100 * positive.mean():.1f}%)")
    for name, model in ranking.models.items():
        print(f"  weights ({name}, per unit): {model['weights']}")
    thresholds = confidence.Thresholds.of(b)
    splits = dict(zip(d["images"]["image_id"], d["images"]["split"], strict=True))
    gate = confidence.assess(read_metrics(args.run).get("training"), d["predictions"], splits, len(classes),
                             cfg.train.folds, thresholds)  # fmt: skip
    print(f"gate: {gate.decision}: {gate.message()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
