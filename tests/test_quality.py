"""Quality against ground truth: crop geometry, blacklist and cleanlab scores, verified-subset parsing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from pipeline.evaluation.quality import (
    average_precision,
    blacklist_quality,
    box_metrics,
    cleanlab_quality,
    crop_quality,
    join_ground_truth,
    load_ground_truth,
    mean_probabilities,
    parse_verified,
    prf,
    quality_metrics,
    verified_quality,
)


def truth_frame(rows: list[tuple]) -> pd.DataFrame:
    """Truth rows: (image_id, label, split, true_label, box or None), 100 x 80 images, status ok."""
    out = []
    for image_id, label, split, true_label, box in rows:
        x0, y0, x1, y1 = box if box is not None else (np.nan,) * 4
        out.append(
            {
                "image_id": image_id,
                "source": "food101",
                "source_key": f"images/{label}/{image_id}.jpg",
                "label": label,
                "split": split,
                "status": "ok",
                "width": 100,
                "height": 80,
                "given_label": label,
                "true_label": true_label,
                "kind": "clean" if true_label == label else "label_flip",
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "is_mislabeled": true_label is not None and true_label != label,
            }
        )
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------
# Geometry and crops


def test_box_metrics_on_hand_made_boxes():
    crops = [(0, 0, 10, 10), (0, 0, 50, 40), (60, 60, 70, 70), (20, 20, 30, 30)]
    objects = [(5, 5, 15, 15), (10, 10, 20, 20), (0, 0, 10, 10), (20, 20, 20, 30)]
    m = box_metrics(np.array(crops), np.array(objects), np.array([[20, 20], [100, 80], [100, 80], [100, 80]]))
    # Quarter overlap: 25 px of a 100 px object; union 175; crop is a quarter of a 20 x 20 image.
    assert m.loc[0, "containment"] == pytest.approx(0.25)
    assert m.loc[0, "iou"] == pytest.approx(25 / 175)
    assert m.loc[0, "area_fraction"] == pytest.approx(0.25)
    # Object fully inside a larger crop.
    assert m.loc[1, "containment"] == pytest.approx(1.0)
    assert m.loc[1, "iou"] == pytest.approx(100 / 2000)
    assert m.loc[1, "area_fraction"] == pytest.approx(2000 / 8000)
    # Disjoint.
    assert m.loc[2, "containment"] == 0 and m.loc[2, "iou"] == 0
    # A degenerate object box has no containment.
    assert np.isnan(m.loc[3, "containment"])


def test_crop_quality_per_method_target_and_mode():
    truth = truth_frame(
        [
            ("a", "pho", "train", "pho", (10, 10, 30, 30)),
            ("b", "pho", "train", "ramen", (50, 40, 70, 60)),  # mislabeled
            ("c", "ramen", "test", "ramen", (0, 0, 20, 20)),
            ("d", "ramen", "test", None, None),  # no object: not scored
        ]
    )
    rows = [
        # label-driven fcn cells: a fully inside, b (mislabeled, not scored), c half inside, d ignored
        ("a", "pho", "label", "pho", "fcn_ensemble", "cell", (0, 0, 40, 40)),
        ("b", "pho", "label", "pho", "fcn_ensemble", "cell", (0, 0, 10, 10)),
        ("c", "ramen", "label", "ramen", "fcn_ensemble", "cell", (10, 0, 30, 20)),
        ("d", "ramen", "label", "ramen", "fcn_ensemble", "cell", (0, 0, 10, 10)),
        # predicted: b found where the object is, a without a box, c searched for the wrong class
        ("a", "pho", "predicted", "pho", "fcn_ensemble", "cell", None),
        ("b", "pho", "predicted", "ramen", "fcn_ensemble", "cell", (50, 40, 70, 60)),
        ("c", "ramen", "predicted", "pho", "fcn_ensemble", "cell", (60, 60, 80, 80)),
        # a centre baseline, region mode
        ("a", "pho", "label", "pho", "centre", "region", (25, 20, 75, 60)),
        ("c", "ramen", "label", "ramen", "centre", "region", (25, 20, 75, 60)),
    ]
    crops = pd.DataFrame(
        [
            {
                "image_id": i,
                "split": "train",
                "label": lab,
                "target": tgt,
                "searched": s,
                "method": meth,
                "mode": mode,
                **dict(zip(("x0", "y0", "x1", "y1"), box or (None,) * 4, strict=True)),
            }
            for i, lab, tgt, s, meth, mode, box in rows
        ]
    )
    q = crop_quality(crops, truth)
    json.dumps(q, allow_nan=False)
    assert set(q) == {"fcn_ensemble", "centre"}
    cell = q["fcn_ensemble"]["label"]["cell"]
    assert cell["images"] == 2 and cell["with_box"] == 2 and cell["no_box_share"] == 0
    assert cell["mean_containment"] == pytest.approx((1.0 + 0.5) / 2)
    assert cell["share_containment_ge_80"] == pytest.approx(0.5)
    assert cell["mean_iou"] == pytest.approx((400 / 1600 + 200 / 600) / 2)
    assert cell["mean_area_fraction"] == pytest.approx((1600 / 8000 + 400 / 8000) / 2)
    assert "searched_is_true" not in cell

    pred = q["fcn_ensemble"]["predicted"]["cell"]
    assert pred["images"] == 3 and pred["with_box"] == 2
    assert pred["no_box_share"] == pytest.approx(1 / 3)
    assert pred["mean_containment"] == pytest.approx(0.5)  # b: 1.0, c: 0.0
    assert pred["mean_iou"] == pytest.approx(0.5)
    assert pred["searched_is_true"] == pytest.approx(2 / 3)  # a and b searched the true class

    centre = q["centre"]["label"]["region"]
    assert centre["images"] == 2
    # a: 5 x 10 of its 20 x 20 object inside the centre box; c: none.
    assert centre["mean_containment"] == pytest.approx((50 / 400 + 0.0) / 2)
    assert centre["share_containment_ge_80"] == 0
    assert centre["mean_area_fraction"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------
# Blacklist


def test_prf_cuts_to_the_universe_and_handles_empty_sets():
    assert prf(["a", "b", "z"], ["a", "c"], ["a", "b", "c", "d"]) == {
        "flagged": 2,
        "true_positives": 1,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
    }
    empty = prf([], ["a"], ["a", "b"])
    assert empty["precision"] is None and empty["recall"] == 0 and empty["f1"] == 0
    assert prf([], [], ["a"])["f1"] is None


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 30).astype(float)  # many ties
        positive = rng.random(30) < 0.3
        if positive.any():
            assert average_precision(scores, positive) == pytest.approx(
                average_precision_score(positive, scores)
            )
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([True, False, True])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    assert average_precision(np.array([1.0]), np.array([False])) is None


def test_blacklist_quality_with_a_hand_made_blacklist():
    truth = truth_frame(
        [
            ("t1", "pho", "train", "ramen", (0, 0, 10, 10)),  # mislabeled, flagged, right suggestion
            ("t2", "pho", "train", "sushi", (0, 0, 10, 10)),  # mislabeled, flagged, wrong suggestion
            ("t3", "ramen", "train", "pho", (0, 0, 10, 10)),  # mislabeled, missed
            ("t4", "ramen", "train", "ramen", (0, 0, 10, 10)),  # clean, flagged (cross-label copy)
            ("t5", "sushi", "train", "sushi", (0, 0, 10, 10)),
            ("t6", "sushi", "train", "sushi", (0, 0, 10, 10)),
            ("v1", "sushi", "test", "sushi", (0, 0, 10, 10)),  # clean, flagged
            ("v2", "pho", "test", "pho", (0, 0, 10, 10)),
            ("n1", "pho", "train", None, None),  # unknown truth: never scored
        ]
    )
    blacklist = pd.DataFrame(
        {
            "image_id": ["t1", "t2", "t4", "v1", "n1"],
            "split": ["train", "train", "train", "test", "train"],
            "label": ["pho", "pho", "ramen", "sushi", "pho"],
            "reason": ["label_not_found"] * 2 + ["cross_label_duplicate"] + ["label_not_found"] * 2,
            "score": [0.9, 0.8, 1.0, 0.7, 0.6],
            "suggested_label": ["ramen", "pho", None, "pho", "ramen"],
        }
    )
    q = blacklist_quality(blacklist, None, truth, split="train")
    train = q["train"]
    assert train["images"] == 6 and train["mislabeled"] == 3
    nf = train["label_not_found"]
    assert (nf["flagged"], nf["true_positives"]) == (2, 2)
    assert nf["precision"] == 1.0 and nf["recall"] == pytest.approx(2 / 3) and nf["f1"] == pytest.approx(0.8)
    assert nf["suggested_correct"] == 1 and nf["suggested_accuracy"] == 0.5
    everything = train["all_reasons"]
    assert (everything["flagged"], everything["true_positives"]) == (3, 2)
    assert everything["precision"] == pytest.approx(2 / 3) and everything["f1"] == pytest.approx(2 / 3)
    assert train["average_precision"] is None  # no judgments

    allq = q["all"]
    assert allq["images"] == 8 and allq["mislabeled"] == 3
    assert allq["label_not_found"]["flagged"] == 3
    assert allq["label_not_found"]["precision"] == pytest.approx(2 / 3)

    # With judgments: scored images only, ranked by score. t3 (missed) ranks last among positives.
    judged = pd.DataFrame(
        {
            "image_id": ["t1", "t2", "t3", "t4", "t5", "t6", "v1", "v2"],
            "score": [0.9, 0.8, 0.1, 0.95, -0.5, 0.2, 0.7, -0.9],
        }
    )
    qj = blacklist_quality(blacklist, judged, truth, split="train")
    # train ranking: t4 (neg), t1, t2, t6 (neg), t3  ->  AP = (1/2 + 2/3 + 3/5) / 3
    assert qj["train"]["average_precision"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    # The universe (judged plus blacklisted images) is the same as without judgments here.
    assert qj["train"]["images"] == 6


# ---------------------------------------------------------------------------------------------------
# cleanlab


def synthetic_predictions(seed: int = 0):
    """60 train images of 3 classes, 4 of them mislabeled; two members; out-of-fold rows that see the
    errors, in-sample rows that have memorized the given labels."""
    rng = np.random.default_rng(seed)
    classes = ["pho", "ramen", "sushi"]
    true = np.repeat(np.arange(3), 20)
    given = true.copy()
    flipped = [3, 17, 29, 50]
    for i in flipped:
        given[i] = (true[i] + 1 + i % 2) % 3
    ids = [f"img{i:02d}" for i in range(60)]
    truth = truth_frame(
        [(ids[i], classes[given[i]], "train", classes[true[i]], (0, 0, 10, 10)) for i in range(60)]
    )
    rows = []
    for member in ("m1", "m2"):
        for i in range(60):
            for fold, cls in ((i % 3, true[i]), (None, given[i])):  # out-of-fold: true; in-sample: given
                p = rng.dirichlet([1, 1, 1]) * 0.15
                p[cls] += 0.85
                order = np.argsort(-p)
                rows.append(
                    {
                        "image_id": ids[i],
                        "member": member,
                        "fold": fold,
                        "predicted": classes[order[0]],
                        "confidence": float(p[order[0]]),
                        "topk_labels": [classes[j] for j in order],
                        "topk_probs": [float(p[j]) for j in order],
                    }
                )
    preds = pd.DataFrame(rows)
    images = truth[["image_id", "source_key", "label", "split", "status"]]
    return preds, images, truth, [ids[i] for i in flipped]


def test_cleanlab_finds_obvious_label_errors_with_out_of_fold_predictions():
    preds, images, truth, flipped = synthetic_predictions()
    q = cleanlab_quality(preds, images, truth, split="train")
    assert q["predictions"] == "out_of_fold" and q["out_of_fold_images"] == 60 and q["in_sample_images"] == 0
    assert q["images"] == 60 and q["mislabeled"] == len(flipped) == 4 and q["classes"] == 3
    assert (q["flagged"], q["true_positives"]) == (4, 4)
    assert q["precision"] == 1.0 and q["recall"] == 1.0 and q["f1"] == 1.0
    assert q["cleanlab_version"] == "2.9.0"
    json.dumps(q, allow_nan=False)
    # Without out-of-fold rows the memorized in-sample predictions hide every error.
    q_in = cleanlab_quality(preds[preds["fold"].isna()], images, truth, split="train")
    assert q_in["predictions"] == "in_sample" and q_in["true_positives"] == 0 and q_in["recall"] == 0
    # Another split has no images.
    assert cleanlab_quality(preds, images, truth, split="test")["images"] == 0


def test_mean_probabilities_prefers_out_of_fold_and_spreads_missing_mass():
    preds = pd.DataFrame(
        {
            "image_id": ["a", "a", "a", "b", "b"],
            "member": ["m1", "m2", "m1", "m1", "m2"],
            "fold": [0, 1, None, None, None],
            "predicted": ["x", "y", "x", "z", "x"],
            "confidence": [0.6, 0.5, 0.99, 0.7, 0.4],
            "topk_labels": [["x", "y", "z", "w"], ["y", "x", "w", "z"], ["x"], ["z", "x"], None],
            "topk_probs": [[0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.99], [0.7, 0.2], None],
        }
    )
    index, m = mean_probabilities(preds, ["w", "x", "y", "z"])
    assert index["image_id"].tolist() == ["a", "b"] and index["out_of_fold"].tolist() == [True, False]
    np.testing.assert_allclose(m[0], [0.1, 0.45, 0.35, 0.1])  # the in-sample row of a is ignored
    # b: m1 names z, x (0.1 left over w, y); m2 has only predicted x 0.4 (0.2 each over w, y, z)
    np.testing.assert_allclose(m[1], [0.125, 0.3, 0.125, 0.45])
    np.testing.assert_allclose(m.sum(axis=1), 1.0)


# ---------------------------------------------------------------------------------------------------
# Verified subset


TSV = (
    "class_name/key\tverification_label\n"
    "pho/aa11.jpg\t1\npho/bb22.jpg\t0\nramen/cc33.jpg\t0\n\nsushi/zz.jpg\t1\n"
)


def test_parse_verified_and_malformed_lines(tmp_path):
    assert parse_verified(TSV) == {
        "pho/aa11.jpg": True,
        "pho/bb22.jpg": False,
        "ramen/cc33.jpg": False,
        "sushi/zz.jpg": True,
    }
    with pytest.raises(ValueError, match=r"v\.tsv, line 3: .*2 tab-separated fields"):
        parse_verified("h\npho/a.jpg\t1\npho/b.jpg 1\n", "v.tsv")
    with pytest.raises(ValueError, match=r"line 2: verification label must be 0 or 1, got 'yes'"):
        parse_verified("h\npho/a.jpg\tyes\n", "v.tsv")
    with pytest.raises(ValueError, match=r"line 2: key must look like 'class/key.jpg'"):
        parse_verified("h\na.jpg\t1\n", "v.tsv")
    with pytest.raises(ValueError, match="empty file"):
        parse_verified("", "v.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("h\npho/a.jpg\t1\t2\n")
    with pytest.raises(ValueError, match=rf"{bad}, line 2"):
        verified_quality(pd.DataFrame(columns=["image_id", "reason"]), pd.DataFrame(), str(bad))


def test_verified_quality_matches_source_keys(tmp_path):
    tsv = tmp_path / "verified_train.tsv"
    tsv.write_text(TSV)
    images = pd.DataFrame(
        {
            "image_id": ["i1", "i2", "i3", "i4", "i5"],
            "source_key": [
                "images/pho/aa11.jpg",
                "images/pho/bb22.jpg",
                "images/ramen/cc33.jpg",
                "images/ramen/dd44.jpg",  # not verified
                "images/sushi/zz.jpg",
            ],
            "split": ["train", "train", "train", "train", None],  # i5 left the dataset
            "status": ["ok", "ok", "ok", "ok", "ok"],
        }
    )
    blacklist = pd.DataFrame(
        {"image_id": ["i1", "i2", "i4"], "reason": ["label_not_found", "label_not_found", "label_not_found"]}
    )
    q = verified_quality(blacklist, images, str(tsv))
    assert (q["verified"], q["matched"], q["verified_wrong"]) == (4, 3, 2)
    nf = q["label_not_found"]
    assert (nf["flagged"], nf["true_positives"]) == (2, 1)  # i4 is not verified: not scored
    assert nf["precision"] == 0.5 and nf["recall"] == 0.5 and nf["f1"] == 0.5


# ---------------------------------------------------------------------------------------------------
# Ground truth join


def test_join_ground_truth_scales_boxes_per_axis():
    images = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "r"],
            "source": ["food101", "food101", "other", "food101"],
            "source_key": ["images/pho/1.jpg", "images/pho/2.jpg", "images/pho/1.jpg", "images/pho/3.jpg"],
            "label": ["pho", "pho", "pho", "pho"],
            "split": ["train", "test", "train", None],
            "status": ["ok", "ok", "ok", "rejected"],
            "width": [128.0, 171.0, 64.0, np.nan],
            "height": [170.0, 128.0, 64.0, np.nan],
            "orig_width": [256.0, 342.0, 64.0, np.nan],
            "orig_height": [340.0, 256.0, 64.0, np.nan],
        }
    )
    gt = pd.DataFrame(
        {
            "source_key": ["images/pho/1.jpg", "images/pho/2.jpg", "images/pho/3.jpg", "images/pho/9.jpg"],
            "given_label": ["pho", "pho", "pho", "pho"],
            "true_label": ["pho", "ramen", None, "pho"],
            "x0": [10, 0, None, 1],
            "y0": [20, 100, None, 1],
            "x1": [110, 342, None, 2],
            "y1": [340, 256, None, 2],
            "width": [256, 342, 30, 10],
            "height": [340, 256, 30, 10],
            "kind": ["clean", "label_flip", "zero_byte", "clean"],
        }
    )
    t = join_ground_truth(images, {"food101": gt}).set_index("image_id")
    assert sorted(t.index) == ["a", "b", "r"]  # c belongs to another source
    assert t.loc["a", ["x0", "y0", "x1", "y1"]].tolist() == pytest.approx([5, 10, 55, 170])
    assert t.loc["b", ["x0", "y0", "x1", "y1"]].tolist() == pytest.approx([0, 50, 171, 128])
    assert t["is_mislabeled"].tolist() == [False, True, False]
    assert t.loc["r", ["x0", "x1"]].isna().all()
    assert join_ground_truth(images, {}) is None


def test_ground_truth_end_to_end_on_a_small_ingest(ray_local, tmp_path):
    from pipeline.config import BlacklistConfig
    from pipeline.ingest import ingest_stages
    from pipeline.manifests import read_manifest, write_manifest
    from pipeline.runner import run_stages
    from pipeline.stages.base import RunContext
    from pipeline.synth import synthesize
    from tests.conftest import ingest_config

    data, out = tmp_path / "data", tmp_path / "out"
    synthesize(str(data), classes=4, per_class=16, noise=0.15, seed=5)
    cfg = ingest_config(data, out)
    run_stages(cfg, ingest_stages())
    images = read_manifest("images", str(out / "manifests" / "images.parquet"))
    gt = pd.read_parquet(data / "ground_truth.parquet")

    truth = load_ground_truth(cfg)
    assert truth is not None and len(truth) == len(gt) == len(images)
    # A known image: the EXIF-rotated ones are the hardest (the box is in upright pixels).
    for key in gt.loc[gt["kind"] == "exif_rotated", "source_key"]:
        g = gt.set_index("source_key").loc[key]
        im = images.set_index("source_key").loc[key]
        t = truth.set_index("source_key").loc[key]
        assert (im["orig_width"], im["orig_height"]) == (g["width"], g["height"])
        sx, sy = im["width"] / g["width"], im["height"] / g["height"]
        assert min(im["width"], im["height"]) == 128  # cpu-small resizes the short side to 128
        assert [t["x0"], t["y0"], t["x1"], t["y1"]] == pytest.approx(
            [g["x0"] * sx, g["y0"] * sy, g["x1"] * sx, g["y1"] * sy]
        )
    ok = truth[(truth["status"] == "ok") & truth["true_label"].notna()]
    assert (ok["x0"] >= 0).all() and (ok["x1"] <= ok["width"] + 1e-9).all()
    assert (ok["y1"] <= ok["height"] + 1e-9).all()
    flips = set(gt.loc[gt["kind"] == "label_flip", "source_key"])
    mislabeled = set(truth.loc[truth["is_mislabeled"], "source_key"])
    assert flips and flips <= mislabeled
    assert mislabeled - flips == set(gt.loc[gt["cross_label"] & gt["true_label"].notna(), "source_key"])

    # A run with a blacklist of exactly the flipped train images and a verified file.
    train = truth[(truth["split"] == "train") & (truth["status"] == "ok")]
    flagged = train[train["kind"] == "label_flip"]
    write_manifest(
        "blacklist",
        pd.DataFrame(
            {
                "image_id": flagged["image_id"],
                "split": "train",
                "label": flagged["label"],
                "reason": "label_not_found",
                "score": 1.0,
                "suggested_label": flagged["true_label"],
            }
        ),
        str(out / "manifests" / "blacklist.parquet"),
    )
    tsv = tmp_path / "verified.tsv"
    keys = ["/".join(k.split("/")[-2:]) for k in train["source_key"]]
    verdicts = [0 if kind == "label_flip" else 1 for kind in train["kind"]]
    tsv.write_text("h\n" + "".join(f"{k}\t{v}\n" for k, v in zip(keys, verdicts, strict=True)))
    ctx = RunContext(cfg=cfg.model_copy(update={"blacklist": BlacklistConfig(verified=str(tsv))}))
    q = quality_metrics(ctx)
    assert set(q) == {"blacklist", "verified"}  # no crops, no predictions yet
    json.dumps(q, allow_nan=False)  # metrics.json material: plain numbers, None where undefined
    nf = q["blacklist"]["train"]["label_not_found"]
    positives = int(train["is_mislabeled"].sum())
    assert nf["flagged"] == nf["true_positives"] == len(flagged) > 0
    assert nf["precision"] == 1.0 and nf["recall"] == pytest.approx(len(flagged) / positives)
    assert nf["suggested_accuracy"] == 1.0
    v = q["verified"]
    assert v["matched"] == len(train) and v["verified_wrong"] == len(flagged)
    assert v["label_not_found"]["precision"] == 1.0 and v["label_not_found"]["recall"] == 1.0
