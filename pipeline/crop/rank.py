"""Mislabel ranking: per-image evidence -> an estimated probability that the given label is wrong, the run's
noise rate, and the operating point that decides how many images go to annotators.

**Evidence.** For an image and a class c the run knows: the FCN's best votes for c over every cell of every
scale (as a share of the members) and its mean member probability there, the same two numbers for the best
class other than c (the suggestion), and the members' mean out-of-fold probability of c and of the best
other class on the whole image (``manifests/predictions.parquet``). Six numbers, ``FEATURES``.

**The score is a probability, estimated on the run itself.** The given labels are a mixture: a share
(1 - e) of right labels and a share e of wrong ones, so the evidence of a given label has the density
f_given = (1 - e) f_right + e f_wrong. A label known to be wrong is easy to make: any *other* class on the
same image (a counterfactual label; it is right only when the given label was wrong and it happens to hit
the true class, a share e / (C - 1) of them). So f_wrong is sampled by the counterfactual labels and
f_given by the given ones, and by Bayes

    P(label wrong | evidence) = e * f_wrong(evidence) / f_given(evidence).

The density ratio f_wrong / f_given is estimated by a logistic regression that tells counterfactual labels
from given ones, both sets weighted to the same total (its log-odds are then the log ratio): one weight per
feature, fitted on the run, none chosen by hand; the fitted weights go to metrics.json. This is
positive-unlabelled learning with the wrong labels as the known class (Elkan & Noto 2008). It assumes that
a real label error looks like a label drawn at random from the other classes, as far as the evidence goes;
errors between look-alike classes look more like right labels, and rank lower than they should.

**The noise rate e** is estimated by mixture proportion estimation (Blanchard et al. 2010, Scott 2015):
for any set S of evidence values, P_given(S) >= e P_wrong(S), so e <= P_given(S) / P_wrong(S); the estimate
is the least such ratio, each taken one standard error high, over the upper tails of the ranking score
that hold at least ``MIN_TAIL`` of the counterfactual labels (the least of many noisy ratios is biased
low, most at small tails). It is an upper bound that is tight when some evidence occurs only with wrong
labels (a strong ensemble: within a fifth of the true rate on generated score tables); a weak ensemble's
estimate comes out high (the demo's two small_cnns: 19% for 7.5%). The cleanlab-style confident joint
was not used: on the demo run it counts 272 of 508 labels as wrong, every model error an issue.

**Duplicates.** Copies of one picture share one true class, so when a copy carries another label b, the
labels cannot both be right. With r_l = 1 - P(label l wrong) for the image's own label and each other
label (b's evidence is that of the same picture), P(true class = l) is proportional to
r_l * prod_{m != l} (1 - r_m) (and "none of them" to prod (1 - r_m)); the label is wrong with
1 - P(true class = own label).

**Operating point.** ``noise_rate``: the top round(e n) images, the estimated number of wrong labels.
``precision``: the longest head of the ranking whose mean estimated probability, its expected precision,
is at least the target. ``votes``: the paper's rule (no member finds the label, ``max_votes``), kept for
comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

FCN_FEATURES = ("label_votes", "label_score", "other_votes", "other_score")
OOF_FEATURES = ("label_prob", "other_prob")
FEATURES = FCN_FEATURES + OOF_FEATURES
MIN_TAIL = 0.1  # share of the counterfactual labels an upper tail must hold to bound the noise rate
RIDGE = 1.0  # L2 penalty on the standardized weights: keeps them finite when the classes separate
FLOOR = 1e-4  # probabilities below this count as this (log features stay finite)
OPERATING_POINTS = ("noise_rate", "precision", "votes")
CF_PER_IMAGE = 8  # counterfactual labels per image: bounds memory at many classes


@dataclass(frozen=True)
class Evidence:
    """What the run knows per image, as arrays over the run's classes (C of them).

    ``fcn_votes``/``fcn_scores``: (n, C) best votes (share of the members) and mean member probability of
    every class at its best cell, NaN rows where the FCN did not judge the image; ``probs``: (n, C) mean
    out-of-fold probabilities, NaN rows where the image has no predictions; ``conflicts``: per image the
    other labels (class indices) its duplicates carry.
    """

    labels: np.ndarray  # (n,) int, the given label
    fcn_votes: np.ndarray
    fcn_scores: np.ndarray
    probs: np.ndarray
    conflicts: Sequence[Sequence[int]] = ()

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> int:
        return self.probs.shape[1]


@dataclass
class _Model:
    """A logistic regression on standardized features; ``log_ratio`` is log f_wrong / f_given."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # intercept first

    def log_ratio(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        return self.coef[0] + z @ self.coef[1:]

    def describe(self) -> dict[str, Any]:
        """Weights per unit of each feature (not standardized), for metrics.json: positive means the
        feature is higher for wrong labels."""
        per_unit = self.coef[1:] / self.scale
        return {f: round(float(w), 4) for f, w in zip(self.features, per_unit, strict=True)}


@dataclass
class Ranking:
    """The result of :func:`rank_images`, per image in the input order."""

    p_wrong: np.ndarray  # estimated probability that the given label is wrong
    log_ratio: np.ndarray  # log f_wrong / f_given of its evidence (0 without evidence)
    order: np.ndarray  # image indices, most likely wrong first
    noise_rate: float
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # feature set -> weights, rows


# ------------------------------------------------------------------------------------------- features


def _best_other(key: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row of ``key`` (n, C), the column of the highest value other than ``target`` (n, m) -> (n, m)."""
    top2 = np.argsort(-key, axis=1, kind="stable")[:, :2]
    first, second = top2[:, :1], top2[:, 1:2] if key.shape[1] > 1 else top2[:, :1]
    return np.where(target == first, second, first)


def pair_features(ev: Evidence, target: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Features of (image, class) pairs: ``target`` (n, m) classes per image -> (n, m, d), the columns of
    the named groups ("fcn", "oof") in ``FEATURES`` order."""
    rows = np.arange(ev.n)[:, None]
    cols: list[np.ndarray] = []
    if "fcn" in groups:
        votes, scores = ev.fcn_votes, ev.fcn_scores
        other = _best_other(np.nan_to_num(votes * 2.0 + scores, nan=-1.0), target)  # as Findings.best_class
        cols += [votes[rows, target], np.log(np.clip(scores[rows, target], FLOOR, 1.0)),
                 votes[rows, other], np.log(np.clip(scores[rows, other], FLOOR, 1.0))]  # fmt: skip
    if "oof" in groups:
        p = ev.probs
        other = _best_other(np.nan_to_num(p, nan=-1.0), target)
        cols += [np.log(np.clip(p[rows, target], FLOOR, 1.0)), np.log(np.clip(p[rows, other], FLOOR, 1.0))]
    return np.stack(cols, axis=-1)


def _names(groups: Sequence[str]) -> tuple[str, ...]:
    return (FCN_FEATURES if "fcn" in groups else ()) + (OOF_FEATURES if "oof" in groups else ())


def counterfactuals(ev: Evidence, per_image: int = CF_PER_IMAGE, seed: int = 0) -> np.ndarray:
    """(n, m): m = min(C - 1, per_image) classes other than the given label per image, drawn at random
    without repeats (all of them when C - 1 <= per_image); a fixed seed, so a run ranks the same twice."""
    k = ev.classes
    offsets = np.broadcast_to(np.arange(1, k), (ev.n, k - 1))
    if k - 1 > per_image:
        draw = np.random.default_rng(seed).random((ev.n, k - 1)).argsort(axis=1)[:, :per_image]
        offsets = np.take_along_axis(offsets, draw, axis=1)
    return (ev.labels[:, None] + offsets) % k


# -------------------------------------------------------------------------------------------- fitting


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float = RIDGE) -> _Model:
    """Weighted logistic regression (Newton's method) on standardized ``x``; the intercept is not
    penalized. Deterministic; converges in a handful of steps on a few features."""
    total = w.sum()
    mean = (w[:, None] * x).sum(axis=0) / total
    scale = np.sqrt((w[:, None] * (x - mean) ** 2).sum(axis=0) / total)
    scale = np.where(scale > 1e-9, scale, 1.0)
    a = np.column_stack([np.ones(len(x)), (x - mean) / scale])
    beta = np.zeros(a.shape[1])
    penalty = np.full(a.shape[1], ridge)
    penalty[0] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta, -35, 35)))
        grad = a.T @ (w * (y - p)) - penalty * beta
        hess = (a * (w * p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return _Model((), mean, scale, beta)


def mixture_proportion(given: np.ndarray, wrong: np.ndarray, min_tail: float = MIN_TAIL) -> float:
    """An upper bound on the share of wrong labels among ``given``: the least P_given(S) / P_wrong(S) over
    upper tails S = {score >= t} that hold at least ``min_tail`` of the ``wrong`` scores, each ratio taken
    one standard error high (a minimum over noisy ratios is biased low, most at the small tails)."""
    if not len(given) or not len(wrong):
        return 0.0
    g = np.sort(given)
    t = np.sort(wrong)[::-1]
    in_wrong = np.arange(1, len(t) + 1)
    in_given = len(g) - np.searchsorted(g, t, side="left")
    ratio = (in_given / len(g)) / (in_wrong / len(t))
    # Delta method on a ratio of two independent binomial shares. A tail without given labels still has an
    # error of about one count: at a small noise rate, the few wrong labels often miss the top tail by
    # chance, and a zero there would bound the noise rate at 0 and flag nothing.
    counted = np.maximum(in_given, 1)
    se = (counted / len(g)) / (in_wrong / len(t)) * np.sqrt(1.0 / counted + 1.0 / in_wrong)
    ok = in_wrong / len(t) >= min_tail
    return float(np.clip((ratio + se)[ok].min(), 0.0, 1.0))


def _patterns(ev: Evidence) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """Feature sets by the evidence images have: ("fcn", "oof") for most, ("oof",) for images the FCN
    could not judge (too small), ("fcn",) for images without predictions. Per set: (the rows a model of
    that set fits on: every image that has its evidence; the rows it scores: those with no richer set)."""
    fcn, oof = ~np.isnan(ev.fcn_scores).any(axis=1), ~np.isnan(ev.probs).any(axis=1)
    sets = {("fcn", "oof"): (fcn & oof, fcn & oof), ("oof",): (oof, oof & ~fcn), ("fcn",): (fcn, fcn & ~oof)}
    return {g: rows for g, rows in sets.items() if rows[1].any()}


def _conflict_adjusted(p: np.ndarray, others: Sequence[np.ndarray]) -> np.ndarray:
    """P(own label wrong) when copies of the picture carry other labels: ``p`` the own labels'
    probabilities of being wrong, ``others`` per image those of the other labels. One true class: at most
    one label is right; P(label l right) is proportional to r_l * prod_{m != l} (1 - r_m), "none right" to
    prod (1 - r_m), with r = 1 - P(wrong) of each label on its own."""
    out = p.copy()
    for i, q in enumerate(others):
        if not len(q):
            continue
        wrong = np.r_[p[i], q]  # own label first
        right = np.array([(1.0 - wrong[j]) * np.prod(np.delete(wrong, j)) for j in range(len(wrong))])
        total = right.sum() + np.prod(wrong)
        out[i] = 1.0 - right[0] / total if total > 0 else p[i]
    return out


def _subset(ev: Evidence, rows: np.ndarray) -> Evidence:
    return Evidence(ev.labels[rows], ev.fcn_votes[rows], ev.fcn_scores[rows], ev.probs[rows])


def _other_labels_wrong(ev: Evidence, patterns: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]],
                        fitted: dict[tuple[str, ...], _Model], e: float) -> list[np.ndarray]:  # fmt: skip
    """Per image, P(wrong) of each other label its copies carry, judged on this image's evidence."""
    pairs = [(i, b) for i, labels in enumerate(ev.conflicts) for b in sorted({int(c) for c in labels}
             - {int(ev.labels[i])})]  # fmt: skip
    idx = np.array([i for i, _ in pairs], dtype=int)
    target = np.array([b for _, b in pairs], dtype=int)
    q = np.full(len(pairs), e)  # no evidence: the prior
    for groups, (_, own) in patterns.items():
        sel = own[idx]
        if sel.any():
            x = pair_features(_subset(ev, idx[sel]), target[sel][:, None], groups)[:, 0]
            q[sel] = np.minimum(1.0, e * np.exp(np.clip(fitted[groups].log_ratio(x), -50, 50)))
    bounds = np.searchsorted(idx, np.arange(ev.n + 1))  # pairs come in image order
    return [q[bounds[i] : bounds[i + 1]] for i in range(ev.n)]


def rank_images(ev: Evidence, min_tail: float = MIN_TAIL) -> Ranking:
    """Estimate every image's probability that its label is wrong and the noise rate (module docstring)."""
    n, k = ev.n, ev.classes
    log_ratio = np.zeros(n)  # images without evidence keep the prior: ratio 1
    models: dict[str, dict[str, Any]] = {}
    fitted: dict[tuple[str, ...], _Model] = {}
    given_scores: list[np.ndarray] = []
    wrong_scores: list[np.ndarray] = []
    patterns = _patterns(ev) if k >= 2 else {}
    cf = counterfactuals(ev) if patterns else np.zeros((n, 0), dtype=int)
    for groups, (fit_rows, own_rows) in patterns.items():
        obs = pair_features(ev, ev.labels[:, None], groups)[:, 0]  # (n, d)
        alt = pair_features(ev, cf, groups)  # (n, m, d)
        d, m = obs.shape[1], cf.shape[1]
        x = np.vstack([obs[fit_rows], alt[fit_rows].reshape(-1, d)])
        y = np.r_[np.zeros(fit_rows.sum()), np.ones(fit_rows.sum() * m)]
        w = np.r_[np.ones(fit_rows.sum()), np.full(fit_rows.sum() * m, 1.0 / m)]  # both sides weigh the same
        model = fit_logistic(x, y, w)
        model.features = _names(groups)
        fitted[groups] = model
        log_ratio[own_rows] = model.log_ratio(obs[own_rows])
        given_scores.append(log_ratio[own_rows])
        wrong_scores.append(model.log_ratio(alt[own_rows].reshape(-1, d)))
        models["+".join(groups)] = {"images": int(own_rows.sum()), "weights": model.describe()}
    e = mixture_proportion(np.concatenate([np.zeros(0), *given_scores]),
                           np.concatenate([np.zeros(0), *wrong_scores]), min_tail)  # fmt: skip
    p = np.minimum(1.0, e * np.exp(np.clip(log_ratio, -50, 50)))
    if any(len(c) for c in ev.conflicts):
        p = _conflict_adjusted(p, _other_labels_wrong(ev, patterns, fitted, e))
    order = np.lexsort((-log_ratio, -p))  # ties (probabilities capped at 1) by the evidence ratio
    return Ranking(p_wrong=p, log_ratio=log_ratio, order=order, noise_rate=e, models=models)


# ------------------------------------------------------------------------------------ operating point


def operating_point(p_sorted: np.ndarray, mode: str, noise_rate: float, target_precision: float) -> int:
    """How many of the ranked images (``p_sorted``: probabilities, most likely wrong first) to flag.

    ``noise_rate``: round(noise_rate * n), the estimated number of wrong labels; ``precision``: the most
    images whose mean probability (the expected precision) is at least ``target_precision``. ``votes`` is
    not a cut of the ranking (the caller applies the rule)."""
    n = len(p_sorted)
    if mode == "noise_rate":
        return int(min(n, round(noise_rate * n)))
    if mode == "precision":
        running = np.cumsum(p_sorted) / np.arange(1, n + 1)
        return int((running >= target_precision - 1e-12).sum())  # running is non-increasing
    raise ValueError(f"operating point {mode!r} is not a cut of the ranking; allowed: noise_rate, precision")


def expected_quality(p_sorted: np.ndarray, flagged: int) -> dict[str, float | None]:
    """The ranking's own estimate of precision and recall when its top ``flagged`` images are flagged."""
    total = float(p_sorted.sum())
    head = float(p_sorted[:flagged].sum())
    return {
        "expected_precision": round(head / flagged, 4) if flagged else None,
        "expected_recall": round(head / total, 4) if total > 0 else None,
    }


# ------------------------------------------------------------------------------- the crop stage's tables


Probabilities = tuple[pd.DataFrame, np.ndarray]  # quality.mean_probabilities: (image_id frame, matrix)


def _matrix(values: pd.Series, width: int) -> np.ndarray:
    """A column of per-class lists -> (n, width) floats, NaN rows where a list is missing or too short."""
    out = np.full((len(values), width), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, list | tuple | np.ndarray) and len(v) == width:
            out[i] = np.asarray(v, dtype=float)
    return out


def evidence_from(judged: pd.DataFrame, classes: Sequence[str], probabilities: Probabilities | None = None,
                  conflicts: Mapping[str, Sequence[str]] | None = None) -> Evidence:  # fmt: skip
    """The crop stage's judgments as :class:`Evidence`, in the rows' order.

    ``judged``: image_id, label, and (from the crop actors) ``class_votes``/``class_scores`` (per class,
    the best votes and mean probability) and ``members``; older judgments without them give no FCN
    evidence. ``probabilities``: ``quality.mean_probabilities``' (index frame, matrix) over ``classes``.
    ``conflicts``: image id -> labels its duplicates carry."""
    k, n = len(classes), len(judged)
    labels = pd.Index(list(classes)).get_indexer(judged["label"])
    if (labels < 0).any():
        raise ValueError(f"labels not among the run's classes: {sorted(set(judged['label'][labels < 0]))}")
    votes = scores = np.full((n, k), np.nan)
    if "class_votes" in judged.columns and "class_scores" in judged.columns:
        members = judged["members"].astype(float).to_numpy()[:, None]
        votes = _matrix(judged["class_votes"], k) / np.where(members > 0, members, np.nan)
        scores = _matrix(judged["class_scores"], k)
    probs = np.full((n, k), np.nan)
    if probabilities is not None:
        index, matrix = probabilities
        where = pd.Index(index["image_id"]).get_indexer(judged["image_id"])
        probs[where >= 0] = matrix[where[where >= 0]]
    position = {c: i for i, c in enumerate(classes)}
    others = [[position[c] for c in (conflicts or {}).get(image, ()) if c in position]
              for image in judged["image_id"]]  # fmt: skip
    return Evidence(labels, votes, scores, probs, others)


def score_judgments(
    judged: pd.DataFrame,
    classes: Sequence[str],
    probabilities: Probabilities | None = None,
    conflicts: Mapping[str, Sequence[str]] | None = None,
) -> tuple[pd.DataFrame, Ranking]:
    """``judged`` with the ranking's columns, most likely wrong first (ties by image id): ``p_wrong`` (also
    as ``score``, the blacklist's name for it), ``log_ratio``, ``rank`` (1 first), ``label_prob`` /
    ``other_label`` / ``other_prob`` (the members' mean out-of-fold probabilities), ``conflict`` (a copy
    carries another label) and ``margin`` (the paper's score: suggested minus label probability at their
    best cells)."""
    judged = judged.sort_values("image_id").reset_index(drop=True)
    ev = evidence_from(judged, classes, probabilities, conflicts)
    r = rank_images(ev)
    rows = np.arange(ev.n)
    p = np.nan_to_num(ev.probs, nan=-1.0)
    other = _best_other(p, ev.labels[:, None])[:, 0]
    has_p = ~np.isnan(ev.probs).any(axis=1)
    out = judged.assign(
        p_wrong=r.p_wrong, score=r.p_wrong, log_ratio=r.log_ratio,
        label_prob=np.where(has_p, ev.probs[rows, ev.labels], np.nan),
        other_label=np.where(has_p, np.asarray(classes, dtype=object)[other], None),
        other_prob=np.where(has_p, ev.probs[rows, other], np.nan),
        conflict=[len(set(c) - {int(ev.labels[i])}) > 0 for i, c in enumerate(ev.conflicts)],
        margin=judged["suggested_score"] - judged["label_score"] if "suggested_score" in judged else np.nan,
    )  # fmt: skip
    out = out.iloc[r.order].reset_index(drop=True)
    return out.assign(rank=np.arange(1, len(out) + 1)), r


def flag(scored: pd.DataFrame, mode: str, noise_rate: float, target_precision: float,
         max_votes: int = 0, min_score: float = -1.0) -> np.ndarray:  # fmt: skip
    """Which rows of :func:`score_judgments`' table go to annotators. Rows with ``verified`` true (a person
    checked them) never do, and do not count in n. ``votes``: the paper's rule (the label's best votes at
    most ``max_votes``, margin at least ``min_score``) or a conflicting copy; else :func:`operating_point`."""
    open_rows = ~scored["verified"].fillna(False).astype(bool).to_numpy() if "verified" in scored else None
    open_rows = np.ones(len(scored), bool) if open_rows is None else open_rows
    if mode == "votes":
        votes = scored["votes"].to_numpy(float)
        rule = (votes <= max_votes) & (scored["margin"].to_numpy(float) >= min_score)
        return open_rows & (rule | scored["conflict"].to_numpy(bool))
    p = scored["p_wrong"].to_numpy(float)[open_rows]
    n = operating_point(p, mode, noise_rate, target_precision)
    out = np.zeros(len(scored), dtype=bool)
    out[np.flatnonzero(open_rows)[:n]] = True
    return out
