"""``cropclean clean`` on the demo's data with the cpu-small preset, end to end on local Ray, scored
against the generated ground truth: the ensemble's accuracy, the crops, the blacklist against cleanlab,
and the paper's Table IV with a classifier outside the ensemble. One run (about 7.5 minutes on 2 cores)
serves every test here (``demo_run`` in conftest.py; the report's tests read it too)."""

from __future__ import annotations

import itertools

import pytest

from pipeline import manifests

# The module's first test also runs the shared fixture: the whole demo, about 7.5 minutes on 2 cores.
pytestmark = pytest.mark.timeout(1500)


def test_cpu_small_trainings_run_at_once_and_classify_the_demo_data_well_above_chance(demo_run):
    out, metrics = demo_run.out, demo_run.metrics
    members = metrics["training"]["members"]
    assert set(members) == {"lite0_128", "small_cnn_64"}  # pretrained and from random init
    folds = metrics["training"]["folds"]
    assert set(folds) == {f"{m}/fold-{k}" for m in members for k in (0, 1)}
    # Six trainings: each member's three (full-data model, then its fold models) one after another in
    # one Ray Train run, the two members' runs at once on 2 CPUs.
    spans = {}
    for m in members:
        runs = [members[m], *(folds[f"{m}/fold-{k}"] for k in (0, 1))]
        assert all(a["finished_at"] <= b["started_at"] for a, b in itertools.pairwise(runs)), runs
        spans[m] = (runs[0]["started_at"], runs[-1]["finished_at"])
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, spans

    images = manifests.read_manifest("images", str(out / "manifests" / "images.parquet"))
    preds = manifests.read_manifest("predictions", str(out / "manifests" / "predictions.parquet"))
    preds = preds[preds["fold"].isna()]  # the full-data models (fold models judge train images)
    test = preds.merge(images.loc[images["split"] == "test", ["image_id", "label"]], on="image_id")
    assert len(test) == 2 * int((images["split"] == "test").sum()) > 200
    assert test["topk_labels"].map(len).eq(8).all()  # few classes: the full probability vector
    top1 = test.assign(hit=test["predicted"] == test["label"]).groupby("member")["hit"].mean()
    scores = test.explode(["topk_labels", "topk_probs"]).astype({"topk_probs": float})
    summed = scores.groupby(["image_id", "topk_labels"])["topk_probs"].sum().reset_index()
    best = summed.loc[summed.groupby("image_id")["topk_probs"].idxmax()]
    ensemble = best.merge(test[["image_id", "label"]].drop_duplicates(), on="image_id")
    ensemble_top1 = float((ensemble["topk_labels"] == ensemble["label"]).mean())
    # Measured on 138 test images with two small_cnns (four runs): members 0.42 to 0.58, the ensemble
    # 0.49 to 0.55. With efficientnet_lite0 (2026-12-04, seeds 0 and 1): lite0 0.65, 0.67, small_cnn
    # 0.46, 0.48.
    assert (top1 >= 0.3).all(), top1.to_dict()
    assert top1["lite0_128"] >= 0.5 and top1["lite0_128"] > top1["small_cnn_64"], top1.to_dict()
    assert ensemble_top1 >= 0.35, ensemble_top1
    assert all(m["val_top1"] >= 0.25 for m in members.values()), members


def test_crops_hold_the_object_without_taking_the_whole_image(demo_run):
    """At least 70% of the method's crops hold >= 0.8 of the object's box, and the mean crop covers at
    most half the image (label-driven, over correctly labelled images of every split)."""
    metrics = demo_run.metrics
    crops = metrics["evaluation"]["quality"]["crops"]
    method = crops["fcn_ensemble"]["label"]["cell"]
    assert method["images"] > 400 and method["no_box_share"] == 0
    # Measured with two small_cnns, region crops: 0.84 at 0.27 of the image; 0.85 at 0.29 (2026-12-01).
    # With efficientnet_lite0, cell crops: 0.89 at 0.38, 0.88 at 0.39 (2026-12-04, seeds 0 and 1).
    assert method["share_containment_ge_80"] >= 0.7, method
    assert method["mean_area_fraction"] <= 0.5, method
    # Localization beats zoom alone: the centre crop of the same size holds far less.
    centre = crops["centre"]["label"]["cell"]
    assert method["share_containment_ge_80"] > centre["share_containment_ge_80"] + 0.3, (method, centre)
    # Label-free: the searched class is the true one for most images, above the ensemble's chance, and
    # the crops hold the object as often (measured 0.80 and 0.82 at 0.36 and 0.39 of the image).
    free = crops["fcn_ensemble"]["predicted"]["cell"]
    assert free["searched_is_true"] >= 0.35, free
    assert free["share_containment_ge_80"] >= 0.7 and free["mean_area_fraction"] <= 0.5, free


def test_blacklist_finds_label_errors_at_least_as_well_as_cleanlab(demo_run):
    """Same out-of-fold predictions for both: the fold models that never saw each train image."""
    metrics = demo_run.metrics
    q = metrics["evaluation"]["quality"]
    ours, cleanlab = q["blacklist"]["train"]["all_reasons"], q["cleanlab"]
    train = q["blacklist"]["train"]
    assert cleanlab["predictions"] == "out_of_fold" and cleanlab["images"] == train["images"]
    assert train["mislabeled"] >= 25
    # Measured with two small_cnns and the paper's votes rule: ours F1 0.34, 0.38, 0.27, 0.30 against
    # cleanlab's 0.21, 0.23, 0.21, 0.23. With efficientnet_lite0, ranked by the estimated probability of
    # a wrong label at the noise-rate operating point (2026-12-04, seeds 0 and 1): P 0.70, 0.67, R 0.91,
    # 0.73, F1 0.79, 0.70, top-10% 0.82, 0.65; cleanlab F1 0.39, 0.38, top-10% 0.35, 0.56. A later
    # seed-0 run: P 0.49 R 0.85 F1 0.62, cleanlab F1 0.33 (training does not repeat exactly).
    assert ours["f1"] >= cleanlab["f1"] + 0.05, (ours, cleanlab)
    assert ours["precision"] >= 0.4 and ours["recall"] >= 0.5, ours
    assert train["top10_precision"] >= cleanlab["top10_precision"] - 0.05, (train, cleanlab)


def test_crops_raise_the_outside_classifier_and_the_cleaned_dataset_raises_it_more(demo_run):
    """Table IV: an architecture outside the ensemble gains >= 3 points top-1 on label-free crops of the
    test images, and more when trained on the cleaned dataset."""
    out, metrics = demo_run.out, demo_run.metrics
    ev = metrics["evaluation"]
    from pipeline.config import load_config_file

    members = load_config_file(str(out / "run.yaml"))["train"]["members"]
    assert ev["outside_arch"] not in {m["arch"] for m in members}, members
    gain = ev["top1_cropped_label_free"] - ev["top1_original"]
    # Measured with resnet18 at 48 px: 0.145 -> 0.275 (label-free), 0.572 retrained, but also +0.029 and
    # +0.007 (near chance on the originals). small_resnet selected by val top-1: +0.029 to +0.160 in five
    # runs (the +0.029 kept epoch 0); by val loss: 0.341 -> 0.514, 0.261 -> 0.333, 0.319 -> 0.406,
    # retrained 0.616, 0.529, 0.565.
    # With efficientnet_lite0 and cell crops (2026-12-04, seeds 0 and 1): 0.268 -> 0.391 and 0.123 ->
    # 0.312 label-free, retrained 0.681 and 0.674.
    assert gain >= 0.03, ev
    assert ev["top1_cropped_retrained"] > ev["top1_cropped_label_free"], ev
    assert ev["top1_cropped_retrained"] - ev["top1_original"] >= 0.08, ev
    assert (out / "cropped" / "train").is_dir() and (out / "manifests" / "blacklist.parquet").exists()


def test_clean_prints_the_headline_numbers(demo_run):
    metrics, printed = demo_run.metrics, demo_run.stdout
    ev = metrics["evaluation"]
    assert "Table IV: small_resnet outside the ensemble" in printed
    assert f"{100 * ev['top1_original']:5.1f}%" in printed
    assert "blacklist vs ground truth" in printed and "cleanlab find_label_issues (out_of_fold)" in printed
    assert f"{'fcn_ensemble cell':<23} label-driven" in printed  # cpu-small crops cells


def test_run_on_a_config_with_every_section_is_clean(demo_run, capsys):
    """``cropclean run CONFIG`` on the demo run's resolved config (every section) is the same pipeline as
    ``cropclean clean``: the same stages with the same keys, so every one of them is found complete and
    nothing is written again."""
    from pipeline.cli import main
    from pipeline.config import load_config_file
    from pipeline.pipelines import PIPELINES, pipeline_for

    out = demo_run.out
    assert pipeline_for(load_config_file(str(out / "run.yaml"))) == "clean"
    files = {p: p.stat().st_mtime_ns for p in [*(out / "manifests").iterdir(), out / "metrics.json",
                                                *(out / "stages").glob("*/_COMPLETE.json")]}  # fmt: skip
    capsys.readouterr()
    assert main(["run", str(out / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert len(list((out / "stages").glob("*/_COMPLETE.json"))) == len(PIPELINES["clean"])
    assert "Table IV" in printed and f"report: {out / 'report' / 'index.html'}" in printed
