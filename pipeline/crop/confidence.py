"""The weak-ensemble gate: can this run's ensemble judge its labels well enough for its crops and blacklist to
be acted on? ``ok``, ``low_confidence`` (annotators see the list marked) or ``withheld`` (the blacklist is
written for inspection, but the annotator export refuses it unless forced).

Two numbers, both 0 at chance and 1 at perfect, so that one scale reads both (Landis & Koch's for kappa:
below 0.2 slight, 0.2-0.4 fair, 0.4-0.6 moderate, above 0.6 substantial):

- **lift**: a member's val top-1 against chance, (top1 - 1/C) / (1 - 1/C). An image is judged by one
  ensemble (the fold models that never saw it, or the full-data models for val and test); an ensemble's
  lift is its members' mean, and the gate takes the weakest ensemble's: the images it judged are only as
  well judged as that.
- **agreement**: Cohen's kappa between members' predicted classes on images their models never trained on
  (out-of-fold rows of train images, the full-data models' rows of the other splits), mean over member pairs,
  the weakest ensemble's again. It needs no labels, so it is measured on every judged image rather than on
  the few val images; members that agree no more than chance are guessing (or learned only class
  frequencies, which kappa discounts).

Lift below ``min_lift`` withholds the blacklist; lift below ``ok_lift`` or agreement below ``ok_agreement``
makes it low-confidence. Disagreement alone does not withhold: a member from random init beside a
pretrained one agrees little with it (kappa 0.17 and 0.18 in the fold ensembles of a 2026-12-04 demo run)
while the blacklist the two judge together was right 7 times in 10 (precision 0.70, recall 0.91). A run
without cross-fitting judges its train images in-sample (its models memorized part of the noise): low
confidence at best.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

OK, LOW, WITHHELD = "ok", "low_confidence", "withheld"
DECISIONS = (OK, LOW, WITHHELD)
ADVICE = ("train longer (train.finetune_epochs), add a pretrained member (e.g. arch efficientnet_lite0 "
          "with weights DEFAULT), or add images")  # fmt: skip


@dataclass(frozen=True)
class Thresholds:
    min_lift: float = 0.2
    ok_lift: float = 0.6
    ok_agreement: float = 0.6

    @classmethod
    def of(cls, blacklist: Any) -> Thresholds:
        """The thresholds a run's ``blacklist`` config section sets."""
        return cls(blacklist.min_lift, blacklist.ok_lift, blacklist.ok_agreement)


@dataclass
class Gate:
    decision: str
    lift: float | None  # the weakest judging ensemble's mean member lift
    agreement: float | None  # the weakest judging ensemble's mean pairwise kappa
    chance: float
    ensembles: dict[str, dict[str, Any]] = field(default_factory=dict)  # per ensemble: top1, lift, kappa
    reasons: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One line for the log and for people: the decision, the numbers behind it, what to do."""
        facts = "; ".join(self.reasons) or "members well above chance and agreeing"
        if self.decision == WITHHELD:
            return (f"blacklist withheld from annotators: the ensemble is too weak to judge labels "
                    f"({facts}). Crops and blacklist are written for inspection; `cropclean export OUT "
                    f"--force` sends the list anyway. To fix: {ADVICE}")  # fmt: skip
        if self.decision == LOW:
            return (f"blacklist and crops of low confidence ({facts}); annotators see the list marked. "
                    f"To improve: {ADVICE}")  # fmt: skip
        return f"ensemble strong enough to judge labels ({facts})"

    def as_dict(self) -> dict[str, Any]:
        r = _round
        return {"decision": self.decision, "lift": r(self.lift), "agreement": r(self.agreement),
                "chance": r(self.chance), "ensembles": self.ensembles, "reasons": self.reasons,
                "message": self.message()}  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def lift(top1: float, classes: int) -> float:
    """(top1 - chance) / (1 - chance): 0 at chance, 1 when every val image is right."""
    chance = 1.0 / max(classes, 1)
    return (top1 - chance) / (1.0 - chance) if classes > 1 else 0.0


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement of two raters beyond what their class frequencies give by chance (rows: items)."""
    a, b = np.asarray(a), np.asarray(b)
    observed = float((a == b).mean())
    fa, fb = pd.Series(a).value_counts(normalize=True), pd.Series(b).value_counts(normalize=True)
    expected = float((fa * fb.reindex(fa.index, fill_value=0.0)).sum())
    return 1.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)


def ensemble_top1(training: Mapping[str, Any], folds: int) -> dict[str, dict[str, float]]:
    """Val top-1 per judging ensemble and member, from metrics.json's ``training`` section:
    ``{"full": {member: top1}, "fold-0": {...}, ...}`` (fold ensembles when the run cross-fits)."""
    out: dict[str, dict[str, float]] = {}
    for member, numbers in (training.get("members") or {}).items():
        if numbers.get("val_top1") is not None:
            out.setdefault("full", {})[member] = float(numbers["val_top1"])
    if folds:
        for name, numbers in (training.get("folds") or {}).items():
            member, _, fold = name.rpartition("/")
            if numbers.get("val_top1") is not None and fold.startswith("fold-"):
                out.setdefault(fold, {})[member] = float(numbers["val_top1"])
    return out


def ensemble_agreement(predictions: pd.DataFrame, splits: Mapping[str, str | None]) -> dict[str, float]:
    """Mean pairwise kappa of members' predicted classes per judging ensemble ("full", "fold-k"), on the
    images its models never trained on: fold rows (out of fold by construction), and full-data rows of
    images outside the train split. Ensembles with one member or fewer than 10 such images are left out."""
    p = predictions[["image_id", "member", "fold", "predicted"]].copy()
    split = p["image_id"].map(splits)
    held_out = p["fold"].notna() | (split.notna() & (split != "train"))
    p = p[held_out]
    p["ensemble"] = np.where(p["fold"].isna(), "full", "fold-" + p["fold"].fillna(-1).astype(int).astype(str))
    out: dict[str, float] = {}
    for name, rows in p.groupby("ensemble", sort=True):
        wide = rows.pivot_table(index="image_id", columns="member", values="predicted", aggfunc="first")
        kappas = []
        for x, y in itertools.combinations(wide.columns, 2):
            both = wide[[x, y]].dropna()
            if len(both) >= 10:
                kappas.append(cohen_kappa(both[x].to_numpy(), both[y].to_numpy()))
        if kappas:
            out[str(name)] = float(np.mean(kappas))
    return out


def assess(training: Mapping[str, Any] | None, predictions: pd.DataFrame | None,
           splits: Mapping[str, str | None], classes: int, folds: int,
           thresholds: Thresholds = Thresholds()) -> Gate:  # fmt: skip
    """The gate's decision from the training numbers and the predictions manifest (module docstring)."""
    t = thresholds
    top1 = ensemble_top1(training or {}, folds)
    kappa = ensemble_agreement(predictions, splits) if predictions is not None else {}
    ensembles: dict[str, dict[str, Any]] = {}
    for name in sorted(set(top1) | set(kappa)):
        members = top1.get(name, {})
        lifts = [lift(v, classes) for v in members.values()]
        ensembles[name] = {"val_top1": {m: _round(v) for m, v in members.items()},
                           "lift": _round(np.mean(lifts)) if lifts else None,
                           "agreement": _round(kappa.get(name))}  # fmt: skip
    lifts = {n: e["lift"] for n, e in ensembles.items() if e["lift"] is not None}
    agree = {n: e["agreement"] for n, e in ensembles.items() if e["agreement"] is not None}
    weakest_lift = min(lifts.items(), key=lambda kv: kv[1]) if lifts else None
    weakest_agree = min(agree.items(), key=lambda kv: kv[1]) if agree else None
    chance = 1.0 / max(classes, 1)
    withheld, low, reasons = False, False, []
    if weakest_lift is not None:
        name, value = weakest_lift
        shown = ", ".join(f"{v:.2f}" for v in top1[name].values())
        where = "full-data models" if name == "full" else f"{name} models"
        text = f"{where}' val top-1 {shown} against chance {chance:.2f}: lift {value:.2f}"
        if value < t.min_lift:
            withheld = True
            reasons.append(f"{text} < blacklist.min_lift {t.min_lift}")
        elif value < t.ok_lift:
            low = True
            reasons.append(f"{text} < blacklist.ok_lift {t.ok_lift}")
        else:
            reasons.append(text)
    if weakest_agree is not None:
        name, value = weakest_agree
        where = "full-data models" if name == "full" else f"{name} models"
        text = f"{where} agree kappa {value:.2f} on images they never trained on"
        if value < t.ok_agreement:
            low = True
            reasons.append(f"{text} < blacklist.ok_agreement {t.ok_agreement}")
        else:
            reasons.append(text)
    if weakest_lift is None and weakest_agree is None:
        low = True
        reasons.append("no val top-1 in metrics.json and no two members to compare: strength unknown")
    if not folds:
        low = True
        reasons.append("no cross-fitting (train.folds): train images judged by models trained on them")
    decision = WITHHELD if withheld else LOW if low else OK
    return Gate(decision, weakest_lift[1] if weakest_lift else None,
                weakest_agree[1] if weakest_agree else None, chance, ensembles, reasons)  # fmt: skip
