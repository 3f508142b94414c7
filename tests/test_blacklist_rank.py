"""The blacklist's ranking, operating point, weak-ensemble gate and annotator export, on synthetic score
tables with known label flips (no Ray, no models): pipeline/crop/rank.py, pipeline/crop/confidence.py,
the crop stage's blacklist helpers and pipeline/annotate/export.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import manifests
from pipeline.annotate import export
from pipeline.cli import main
from pipeline.config import ConfigError, build_config
from pipeline.crop import confidence, rank
from pipeline.evaluation.quality import average_precision, blacklist_quality, top_precision
from pipeline.stages.crop import blacklist_rows, leave_out, left_out, reasons


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evidence(n: int = 1000, k: int = 8, noise: float = 0.1, strength: float = 3.0, fcn: float | None = None,
             seed: int = 0) -> tuple[rank.Evidence, np.ndarray]:  # fmt: skip
    """A run's evidence with uniform label flips (as ``cropclean synth`` makes them): whole-image
    probabilities and two members' best-cell probabilities, each the true class's logit ``strength`` above
    independent unit noise. Returns the evidence and which labels are wrong."""
    rng = np.random.default_rng(seed)
    true = rng.integers(k, size=n)
    flip = rng.random(n) < noise
    given = np.where(flip, (true + rng.integers(1, k, size=n)) % k, true)
    onehot = np.eye(k)[true]
    probs = softmax(strength * onehot + rng.normal(size=(n, k)))
    fcn = strength if fcn is None else fcn
    members = [softmax(fcn * onehot + rng.normal(size=(n, k))) for _ in range(2)]
    votes = sum(m.argmax(axis=1)[:, None] == np.arange(k) for m in members) / 2.0
    return rank.Evidence(given, votes, np.mean(members, axis=0), probs), flip


def without(ev: rank.Evidence, group: str) -> rank.Evidence:
    nan = np.full_like(ev.probs, np.nan)
    if group == "fcn":
        return rank.Evidence(ev.labels, nan, nan, ev.probs, ev.conflicts)
    return rank.Evidence(ev.labels, ev.fcn_votes, ev.fcn_scores, nan, ev.conflicts)


def ap(r: rank.Ranking, wrong: np.ndarray) -> float:
    position = np.empty(len(r.order))
    position[r.order] = np.arange(len(r.order))
    return average_precision(-position, wrong)


# ------------------------------------------------------------------------------------------- ranking


def test_a_strong_ensemble_ranks_every_flip_above_the_clean_images():
    ev, wrong = evidence(strength=3.0)
    r = rank.rank_images(ev)
    assert ap(r, wrong) > 0.99
    assert r.p_wrong[wrong].min() > np.quantile(r.p_wrong[~wrong], 0.99)
    # The weights say what evidence means: a higher label probability or more label votes, less wrong.
    weights = r.models["fcn+oof"]["weights"]
    assert weights["label_prob"] < 0 and weights["label_votes"] < 0


def test_combining_fcn_and_whole_image_evidence_beats_either_alone():
    """Two independent noisy views of the same image (seed 0..2, strength 1: weak members)."""
    for seed in range(3):
        ev, wrong = evidence(strength=1.0, seed=seed)
        both = ap(rank.rank_images(ev), wrong)
        fcn_only = ap(rank.rank_images(without(ev, "oof")), wrong)
        oof_only = ap(rank.rank_images(without(ev, "fcn")), wrong)
        assert both > max(fcn_only, oof_only) + 0.05, (seed, both, fcn_only, oof_only)


def test_the_noise_rate_is_estimated_within_a_fifth_and_sets_the_operating_point():
    for noise in (0.05, 0.1, 0.2):
        ev, wrong = evidence(n=2000, noise=noise, strength=3.0, seed=1)
        r = rank.rank_images(ev)
        assert r.noise_rate == pytest.approx(wrong.mean(), rel=0.2), (noise, r.noise_rate, wrong.mean())
        flagged = rank.operating_point(r.p_wrong[r.order], "noise_rate", r.noise_rate, 0.8)
        assert flagged == round(r.noise_rate * ev.n)
        top = wrong[r.order[:flagged]]
        # An upper bound: a few more than the flips, so precision gives a little before recall does.
        assert top.mean() >= 0.85 and top.sum() / wrong.sum() >= 0.9, (noise, top.mean(), top.sum())


def test_a_weak_ensemble_overestimates_the_noise_rate_never_underestimates_much():
    """The estimate is an upper bound: at chance-like members it grows, it does not vanish."""
    ev, wrong = evidence(strength=0.5, seed=2)
    r = rank.rank_images(ev)
    assert r.noise_rate > wrong.mean()


def test_the_precision_operating_point_meets_its_target_when_the_ensemble_is_strong():
    ev, wrong = evidence(n=2000, strength=2.0, seed=3)
    r = rank.rank_images(ev)
    p = r.p_wrong[r.order]
    for target in (0.7, 0.9):
        n = rank.operating_point(p, "precision", r.noise_rate, target)
        assert n > 0.5 * wrong.sum()
        assert wrong[r.order[:n]].mean() >= target - 0.05, (target, wrong[r.order[:n]].mean())
        assert p[:n].mean() >= target > p[: n + 1].mean()  # the longest head whose mean reaches it


def test_operating_point_arithmetic():
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert rank.operating_point(p, "precision", 0.4, 0.8) == 3  # running means .9, .85, .8, .65, .54
    assert rank.operating_point(p, "precision", 0.4, 0.95) == 0
    assert rank.operating_point(p, "noise_rate", 0.4, 0.8) == 2
    assert rank.operating_point(p, "noise_rate", 1.0, 0.8) == 5
    assert rank.expected_quality(p, 2) == {"expected_precision": 0.85, "expected_recall": round(1.7 / 2.7, 4)}
    with pytest.raises(ValueError, match="allowed: noise_rate, precision"):
        rank.operating_point(p, "votes", 0.4, 0.8)


def test_mixture_proportion_recovers_a_known_share():
    rng = np.random.default_rng(0)
    wrong = rng.normal(4, 1, 20_000)
    given = np.r_[rng.normal(0, 1, 8_000), rng.normal(4, 1, 2_000)]  # 20% from the wrong distribution
    assert rank.mixture_proportion(given, wrong) == pytest.approx(0.2, abs=0.02)
    assert rank.mixture_proportion(rng.normal(0, 1, 5000), wrong) < 0.01  # nothing like the wrong ones
    assert rank.mixture_proportion(np.zeros(0), wrong) == 0.0


def test_a_small_run_whose_few_wrong_labels_miss_the_top_tail_still_gets_a_noise_rate():
    # 120 images, 10 of them wrong: the top tenth of the counterfactual scores often holds no given label
    # by chance (an expected count of one). Such a tail must not bound the noise rate at 0 (which flags
    # nothing): over many draws the estimate stays positive and centred near the true 8.3%.
    estimates = []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        given = np.r_[rng.normal(0, 1, 110), rng.normal(3, 1, 10)]
        estimates.append(rank.mixture_proportion(given, rng.normal(3, 1, 360)))
    assert min(estimates) > 0.01
    assert 0.06 <= np.median(estimates) <= 0.1


def test_a_conflicting_copy_makes_the_label_wrong_unless_the_evidence_says_which():
    ev, _ = evidence(n=400, strength=3.0, seed=4)
    right = int(np.flatnonzero(ev.probs.argmax(axis=1) == ev.labels)[0])  # the evidence backs its label
    other = (ev.labels[right] + 1) % ev.classes
    base = rank.rank_images(ev).p_wrong[right]
    conflicts: list[list[int]] = [[] for _ in range(ev.n)]
    conflicts[right] = [other]
    p = rank.rank_images(rank.Evidence(ev.labels, ev.fcn_votes, ev.fcn_scores, ev.probs, conflicts)).p_wrong
    assert base < 0.05 and p[right] < 0.05  # the copy's label is the wrong one
    # The same copy against an image whose evidence backs the copy's label: this label is the wrong one.
    labels = ev.labels.copy()
    labels[right] = other
    conflicts[right] = [int(ev.labels[right])]
    p = rank.rank_images(rank.Evidence(labels, ev.fcn_votes, ev.fcn_scores, ev.probs, conflicts)).p_wrong
    assert p[right] > 0.95
    # Evidence that backs both labels alike: one of the two is wrong, about a coin flip. P(a right) is
    # proportional to r_a (1 - r_b) = 0.9 x 0.1, as is P(b right); neither right: 0.1 x 0.1.
    adjusted = rank._conflict_adjusted
    assert adjusted(np.array([0.1]), [np.array([0.1])])[0] == pytest.approx(1 - 0.09 / 0.19)
    assert adjusted(np.array([0.1]), [np.array([0.9])])[0] == pytest.approx(1 - 0.81 / 0.91)
    assert adjusted(np.array([0.3, 0.2]), [np.array([]), np.array([0.5])])[0] == 0.3  # no copies: as is


def test_counterfactual_labels_are_other_classes_and_bounded_in_number():
    ev, _ = evidence(n=50, k=30, seed=5)
    cf = rank.counterfactuals(ev)
    assert cf.shape == (50, rank.CF_PER_IMAGE)
    assert not (cf == ev.labels[:, None]).any()
    assert all(len(set(row)) == len(row) for row in cf)
    assert np.array_equal(cf, rank.counterfactuals(ev))  # seeded: the same ranking twice


def test_one_class_or_no_evidence_flags_nothing():
    ev = rank.Evidence(np.zeros(5, int), np.full((5, 1), np.nan), np.full((5, 1), np.nan), np.ones((5, 1)))
    r = rank.rank_images(ev)
    assert r.noise_rate == 0.0 and (r.p_wrong == 0).all()


# ------------------------------------------------------------------------------------- judgment tables


def judgments(ev: rank.Evidence, classes: list[str], with_vectors: bool = True) -> pd.DataFrame:
    """The crop stage's judgments for ``ev`` (votes as counts of 2 members)."""
    rows = []
    for i in range(ev.n):
        label = int(ev.labels[i])
        key = ev.fcn_votes[i] * 2 + ev.fcn_scores[i]
        key[label] = -np.inf
        other = int(np.argmax(key))
        row = {"image_id": f"i{i:04d}", "split": "train", "label": classes[label], "path": f"blobs/{i}.jpg",
               "votes": int(ev.fcn_votes[i, label] * 2), "label_score": ev.fcn_scores[i, label],
               "suggested_label": classes[other], "suggested_votes": int(ev.fcn_votes[i, other] * 2),
               "suggested_score": ev.fcn_scores[i, other], "members": 2, "evidence": "fcn",
               "cross_label": False, "verified": False}  # fmt: skip
        if with_vectors:
            row |= {
                "class_votes": list((ev.fcn_votes[i] * 2).astype(int)),
                "class_scores": list(ev.fcn_scores[i]),
            }
        rows.append(row)
    return pd.DataFrame(rows)


def probability_table(ev: rank.Evidence, judged: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    return pd.DataFrame({"image_id": judged["image_id"], "out_of_fold": True}), ev.probs


def test_score_judgments_ranks_the_crop_stages_table_and_old_tables_fall_back_to_probabilities():
    ev, wrong = evidence(n=600, k=6, strength=2.0, seed=6)
    classes = [f"c{i}" for i in range(6)]
    judged = judgments(ev, classes)
    scored, r = rank.score_judgments(judged.sample(frac=1, random_state=0), classes,
                                     probability_table(ev, judged))  # fmt: skip
    assert list(scored["rank"]) == list(range(1, 601))
    assert scored["p_wrong"].is_monotonic_decreasing
    truth = dict(zip(judged["image_id"], wrong, strict=True))
    positive = scored["image_id"].map(truth).to_numpy(bool)
    assert average_precision(-scored["rank"].to_numpy(float), positive) > 0.9
    assert set(r.models) == {"fcn+oof"}
    i = scored.index[scored["image_id"] == "i0000"][0]
    assert scored.loc[i, "label_prob"] == pytest.approx(ev.probs[0, ev.labels[0]])
    assert scored.loc[i, "margin"] == pytest.approx(
        judged.loc[0, "suggested_score"] - judged.loc[0, "label_score"]
    )
    # Judgments written before class_votes existed: the whole-image probabilities alone.
    old, r_old = rank.score_judgments(judgments(ev, classes, with_vectors=False), classes,
                                      probability_table(ev, judged))  # fmt: skip
    assert set(r_old.models) == {"oof"} and old["p_wrong"].notna().all()


def scored_table(n: int = 10) -> pd.DataFrame:
    p = np.linspace(0.95, 0.05, n)
    return pd.DataFrame({
        "image_id": [f"i{i}" for i in range(n)], "split": "train", "label": "a",
        "path": [f"p{i}" for i in range(n)], "votes": [0, 1, 2, 0, 2, 2, 2, 2, 2, 2],
        "margin": np.linspace(0.5, -0.5, n), "label_score": 0.5, "suggested_label": ["b"] * (n - 1) + [None],
        "suggested_score": 0.4, "suggested_votes": 1, "members": 2,
        "evidence": "fcn", "p_wrong": p, "log_ratio": np.log(p), "label_prob": 0.2, "other_label": "b",
        "other_prob": 0.7, "conflict": [False, False, True] + [False] * (n - 3),
        "verified": [False, True] + [False] * (n - 2), "rank": np.arange(1, n + 1), "reason": None,
    })  # fmt: skip


def test_flagging_skips_verified_images_and_gives_reasons():
    scored = scored_table()
    flagged = rank.flag(scored, "noise_rate", 0.3, 0.8)  # 9 open images: 3 flagged, i1 is verified
    assert scored.loc[flagged, "image_id"].tolist() == ["i0", "i2", "i3"]
    flagged = rank.flag(scored, "precision", 0.3, 0.8)  # p .95, (.85 verified), .75, .65: means .95 .85 .78
    assert scored.loc[flagged, "image_id"].tolist() == ["i0", "i2"]
    flagged = rank.flag(
        scored, "votes", 0.3, 0.8, max_votes=0, min_score=-1.0
    )  # the paper's rule + conflicts
    assert scored.loc[flagged, "image_id"].tolist() == ["i0", "i2", "i3"]
    why = reasons(scored, flagged, max_votes=0)
    assert why[flagged].tolist() == ["label_not_found", "cross_label_duplicate", "label_not_found"]
    assert why[~flagged].isna().all()
    scored["votes"] = [2] * 10
    assert (
        reasons(scored, rank.flag(scored, "noise_rate", 0.3, 0.8), 0)[[0, 3]].tolist()
        == ["likely_mislabeled"] * 2
    )


def test_blacklist_rows_mark_confidence_and_what_lies_beyond_the_noise_rate():
    scored = scored_table()
    flagged = np.zeros(10, bool)
    flagged[[0, 2, 3, 9]] = True
    scored = scored.assign(flagged=flagged, reason=reasons(scored, flagged, 0))
    bl = blacklist_rows(scored, allowed=2, decision="low_confidence")
    table = manifests.conform(manifests.load_schema("blacklist"), bl).to_pandas()
    assert table["image_id"].tolist() == ["i0", "i2", "i3", "i9"]
    assert table["within_noise_rate"].tolist() == [True, True, False, False]
    assert (table["confidence"] == "low_confidence").all()
    assert table["score"].is_monotonic_decreasing and table["score"].iloc[0] == pytest.approx(0.95)
    assert table.loc[3, "suggested_label"] == "b" and table.loc[3, "suggested_score"] == pytest.approx(0.7)
    assert "whole image: a p=0.20, b p=0.70" in table.loc[0, "evidence"]
    assert blacklist_rows(scored.assign(flagged=False), 2, "ok").empty


def test_the_cropped_dataset_leaves_the_blacklist_out(tmp_path):
    from pipeline.config import build_config
    from pipeline.stages.base import RunContext

    (tmp_path / "cropped").mkdir()
    for i in range(3):
        (tmp_path / "cropped" / f"i{i}.jpg").write_bytes(b"x")
    crops = pd.DataFrame({"image_id": ["i0", "i1", "i2", "i0"], "method": "fcn_ensemble",
                          "target": ["label", "label", "label", "predicted"],
                          "path": ["cropped/i0.jpg", "cropped/i1.jpg", "cropped/i2.jpg", None],
                          "reason": None})  # fmt: skip
    ctx = RunContext(cfg=build_config({"out": str(tmp_path), "sources": [{"uri": str(tmp_path)}]}))
    out = leave_out(ctx, crops, {"i1"}, "fcn_ensemble")
    assert out["path"].isna().tolist() == [False, True, False, True]
    assert out.loc[[0, 2], "path"].tolist() == ["cropped/i0.jpg", "cropped/i2.jpg"]
    assert out["reason"].tolist()[1] == "blacklisted" and out["reason"].isna().tolist() == [
        True,
        False,
        True,
        True,
    ]
    assert sorted(p.name for p in (tmp_path / "cropped").iterdir()) == ["i0.jpg", "i2.jpg"]
    # A withheld list is not trusted: the cropped dataset keeps its images.
    listed = pd.DataFrame({"image_id": ["i0", "i2"]})
    assert left_out(listed, "withheld") == set()
    assert left_out(listed, "low_confidence") == left_out(listed, "ok") == {"i0", "i2"}


# ------------------------------------------------------------------------------------------- the gate


def training(top1: dict[str, float], folds: dict[str, float] | None = None) -> dict:
    return {"members": {m: {"val_top1": v} for m, v in top1.items()},
            "folds": {m: {"val_top1": v} for m, v in (folds or {}).items()}}  # fmt: skip


def predictions(agree: float, n: int = 300, k: int = 8, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Two members' out-of-fold predictions (2 folds) and val/test full-data ones; member b copies member a
    on a share ``agree`` of the images and guesses on the rest."""
    rng = np.random.default_rng(seed)
    a = rng.integers(k, size=n)
    b = np.where(rng.random(n) < agree, a, rng.integers(k, size=n))
    ids = [f"i{i}" for i in range(n)]
    split = np.where(np.arange(n) < 0.8 * n, "train", "test")
    fold = np.where(split == "train", np.arange(n) % 2, np.nan)
    rows = pd.DataFrame({"image_id": ids * 2, "member": ["a"] * n + ["b"] * n, "fold": np.r_[fold, fold],
                         "predicted": np.r_[a, b].astype(str)})  # fmt: skip
    return rows, dict(zip(ids, split, strict=True))


def test_kappa_is_one_for_copies_and_near_zero_for_guesses():
    rng = np.random.default_rng(0)
    x = rng.integers(5, size=2000)
    assert confidence.cohen_kappa(x, x) == pytest.approx(1.0)
    assert abs(confidence.cohen_kappa(x, rng.integers(5, size=2000))) < 0.05
    assert confidence.lift(0.125, 8) == pytest.approx(0.0) and confidence.lift(1.0, 8) == pytest.approx(1.0)


def test_chance_level_members_are_withheld_with_the_numbers_and_what_to_do():
    preds, splits = predictions(agree=0.0)
    folds = {"a/fold-0": 0.13, "b/fold-0": 0.12, "a/fold-1": 0.14, "b/fold-1": 0.11}
    gate = confidence.assess(training({"a": 0.15, "b": 0.14}, folds), preds, splits, classes=8, folds=2)
    assert gate.decision == "withheld"
    assert gate.lift is not None and gate.lift < 0.05 and gate.agreement is not None and gate.agreement < 0.1
    text = gate.message()
    assert "blacklist.min_lift 0.2" in text and "against chance 0.12" in text and "--force" in text
    assert "efficientnet_lite0" in text and "train.finetune_epochs" in text and "\n" not in text


def test_strong_agreeing_members_are_ok_and_the_weakest_ensemble_decides():
    preds, splits = predictions(agree=0.9)
    strong = {"a/fold-0": 0.92, "b/fold-0": 0.9, "a/fold-1": 0.93, "b/fold-1": 0.91}
    gate = confidence.assess(training({"a": 0.95, "b": 0.94}, strong), preds, splits, classes=8, folds=2)
    assert gate.decision == "ok", gate.reasons
    assert gate.agreement is not None and gate.agreement > 0.85
    # One fold's models near chance: the images it judged are not judged; withheld.
    weak_fold = strong | {"a/fold-1": 0.15, "b/fold-1": 0.2}
    gate = confidence.assess(training({"a": 0.95, "b": 0.94}, weak_fold), preds, splits, classes=8, folds=2)
    assert gate.decision == "withheld" and "fold-1 models" in gate.message()
    # Middling members, or no cross-fitting: low confidence.
    middling = {m: 0.55 for m in strong}
    gate = confidence.assess(training({"a": 0.6, "b": 0.6}, middling), preds, splits, classes=8, folds=2)
    assert gate.decision == "low_confidence" and "blacklist.ok_lift 0.6" in gate.message()
    gate = confidence.assess(training({"a": 0.95, "b": 0.94}), preds, splits, classes=8, folds=0)
    assert gate.decision == "low_confidence" and "train.folds" in gate.message()
    # Members that disagree (kappa ~ 0.1) while their val top-1 looks fine: low confidence, not withheld.
    noisy, splits = predictions(agree=0.1)
    gate = confidence.assess(training({"a": 0.95, "b": 0.94}, strong), noisy, splits, classes=8, folds=2)
    assert gate.decision == "low_confidence" and "blacklist.ok_agreement 0.6" in gate.message()
    assert gate.agreement is not None and gate.agreement < 0.2


def test_gate_thresholds_are_config_keys_with_clear_errors():
    doc = {"out": "/tmp/x", "sources": [{"uri": "/tmp"}]}
    cfg = build_config(doc, sets=["blacklist.min_lift=0.3", "blacklist.operating_point=precision"])
    assert cfg.blacklist.min_lift == 0.3 and cfg.blacklist.operating_point == "precision"
    with pytest.raises(ConfigError, match=r"blacklist.operating_point: 'precison' is not allowed; expected "
                                          r"'noise_rate', 'precision' or 'votes'"):  # fmt: skip
        build_config(doc, sets=["blacklist.operating_point=precison"])
    with pytest.raises(ConfigError, match=r"blacklist.min_lift \(0.9\) must not exceed blacklist.ok_lift"):
        build_config(doc, sets=["blacklist.min_lift=0.9"])


# ------------------------------------------------------------------------------------------ the export


def export_run(tmp_path: Path, decision: str | None, within: list[bool] | None = None) -> Path:
    out = tmp_path / f"run-{decision}"
    (out / "manifests").mkdir(parents=True)
    (out / "models").mkdir()
    (out / "models" / "classes.json").write_text(json.dumps(["a", "b"]))
    n = len(within) if within else 3
    bl = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "split": "train", "label": "a",
                       "reason": "likely_mislabeled", "score": np.linspace(0.9, 0.5, n),
                       "suggested_label": "b", "suggested_score": 0.7,
                       "path": [f"blobs/{i}.jpg" for i in range(n)], "confidence": decision,
                       "within_noise_rate": within if within else [True] * n})  # fmt: skip
    manifests.write_manifest("blacklist", bl, str(out / "manifests" / "blacklist.parquet"))
    (out / "metrics.json").write_text(json.dumps({"crop": {"blacklist": {"confidence": {
        "message": "blacklist withheld from annotators: lift 0.05 < blacklist.min_lift 0.2"}}}}))  # fmt: skip
    return out


def test_a_withheld_blacklist_is_not_exported_unless_forced(tmp_path, capsys):
    out = export_run(tmp_path, "withheld")
    stale = out / "export" / export.BLACKLIST_TASKS
    stale.parent.mkdir()
    stale.write_text("[]")  # an earlier export must not be sent by mistake
    written = export.write_blacklist_export(str(out), ["a", "b"])
    assert written["refused"] == "withheld" and written["rows"] == 0 and written["withheld"] == 3
    assert "lift 0.05 < blacklist.min_lift 0.2" in written["message"] and "--force" in written["message"]
    assert not stale.exists() and not (out / "export" / export.BLACKLIST_CSV).exists()
    assert main(["export", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cropclean export: blacklist withheld" in err and "--force" in err
    assert main(["export", str(out), "--force"]) == 0
    assert len(json.loads(stale.read_text())) == 3
    assert "sending a withheld blacklist (3 images) because of --force" in capsys.readouterr().err


def test_rows_beyond_the_noise_rate_are_cut_unless_forced(tmp_path):
    out = export_run(tmp_path, "ok", within=[True, True, False, False])
    written = export.write_blacklist_export(str(out), ["a", "b"])
    tasks = json.loads((out / "export" / export.BLACKLIST_TASKS).read_text())
    assert [t["data"]["image_id"] for t in tasks] == ["i0", "i1"] and written["rows"] == 2
    assert written["warnings"] == [
        "sending the first 2 of 4 blacklisted images, as many as the run estimates wrong labels; --force "
        "sends the other 2"
    ]
    written = export.write_blacklist_export(str(out), ["a", "b"], force=True)
    assert written["rows"] == 4 and "2 lie beyond the 2 wrong labels" in written["warnings"][0]


def test_a_low_confidence_blacklist_is_marked_for_annotators(tmp_path):
    out = export_run(tmp_path, "low_confidence")
    written = export.write_blacklist_export(str(out), ["a", "b"])
    assert written["rows"] == 3 and any("low confidence" in w for w in written["warnings"])
    tasks = json.loads((out / "export" / export.BLACKLIST_TASKS).read_text())
    assert all(t["data"]["note"] == export.LOW_CONFIDENCE_NOTE for t in tasks)
    assert all(t["data"]["confidence"] == "low_confidence" for t in tasks)
    # Annotators see it first in the task's header, which the labelling config shows.
    assert all(t["data"]["header"].startswith(export.LOW_CONFIDENCE_NOTE) for t in tasks)
    assert "$header" in (out / "export" / export.CONFIG).read_text()
    csv = pd.read_csv(out / "export" / export.BLACKLIST_CSV)
    assert (csv["confidence"] == "low_confidence").all()
    ok = export_run(tmp_path, "ok")
    export.write_blacklist_export(str(ok), ["a", "b"])
    assert all(
        t["data"]["note"] == "" for t in json.loads((ok / "export" / export.BLACKLIST_TASKS).read_text())
    )


# ------------------------------------------------------------------------------------------ quality


def test_top_ten_percent_precision_and_ranked_quality():
    scores = np.arange(20, 0, -1, dtype=float)  # item 0 ranks first
    positive = np.zeros(20, bool)
    positive[[0, 3]] = True
    assert top_precision(scores, positive) == pytest.approx(0.5)  # top 2 of 20: one right
    assert top_precision(scores, positive, share=0.25) == pytest.approx(0.4)  # top 5: two
    assert top_precision(scores[:3], positive[:3]) == pytest.approx(1.0)  # at least one item
    assert top_precision(np.zeros(0), np.zeros(0, bool)) is None
    truth = pd.DataFrame({"image_id": [f"i{i}" for i in range(20)], "split": "train", "status": "ok",
                          "true_label": "t", "is_mislabeled": positive})  # fmt: skip
    judged = pd.DataFrame({"image_id": truth["image_id"], "rank": np.arange(1, 21), "score": 0.5})
    blacklist = pd.DataFrame(
        {"image_id": ["i0", "i1"], "reason": "likely_mislabeled", "suggested_label": "t"}
    )
    q = blacklist_quality(blacklist, judged, truth)["train"]
    assert q["top10_precision"] == pytest.approx(0.5)
    assert q["average_precision"] == pytest.approx((1 / 1 + 2 / 4) / 2)  # by rank, not the tied scores
    assert q["all_reasons"]["precision"] == pytest.approx(0.5) and q["all_reasons"]["recall"] == 0.5
    assert math.isclose(q["all_reasons"]["suggested_accuracy"], 1.0)
