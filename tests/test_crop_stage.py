"""The crop stage end to end on local Ray: a small generated dataset, ingested and trained with the cpu-small
preset (shortened), then cropped: manifests, files, the blacklist, resume."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from pipeline import manifests
from pipeline.ingest import ingest_stages
from pipeline.runner import run_stages
from pipeline.stages.crop import CropStage
from pipeline.stages.train import TrainStage
from tests.conftest import ingest_config

# Cross-fitting on: train images are judged by the fold model that never saw them (crops come from the
# full-data models); an in-sample model has memorized the flipped labels it should find. Cell mode (the
# paper's window): the crops are the pyramid's squares. The gate never withholds here (min_lift -1): a
# withheld list would keep its images in the cropped dataset (test_blacklist_rank.py), and these short
# trainings land on either side of the default line from run to run.
SETS = ("train.finetune_epochs=4", "train.folds=2", "crop.max_scale=1.5", "crop.mode=cell",
        "crop.baselines=[centre, gradcam, similarnet]", "blacklist.min_lift=-1")  # fmt: skip


@pytest.fixture(scope="module")
def cropped(ray_local, tmp_path_factory):
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("crop")
    data, out = root / "data", root / "run"
    synthesize(str(data), classes=4, per_class=30, clutter=0.25, seed=3)
    cfg = ingest_config(data, out, *SETS)
    report = run_stages(cfg, [*ingest_stages(), TrainStage(), CropStage()])
    return cfg, out, report


def test_every_dataset_image_gets_its_crops_inside_the_image(cropped):
    _cfg, out, _report = cropped
    images = manifests.read_manifest("images", str(out / "manifests" / "images.parquet"))
    crops = manifests.read_manifest("crops", str(out / "manifests" / "crops.parquet"))
    ok = images[(images["status"] == "ok") & images["split"].notna()].set_index("image_id")
    methods = {"fcn_ensemble", "centre", "gradcam", "similarnet"}
    assert set(crops["method"]) == methods and set(crops["target"]) == {"label", "predicted"}
    assert len(crops) == len(ok) * len(methods) * 2
    assert crops.groupby(["method", "target"])["image_id"].nunique().eq(len(ok)).all()
    boxed = crops.dropna(subset=["x0"]).join(ok[["width", "height"]], on="image_id")
    assert (boxed["x0"] >= 0).all() and (boxed["y0"] >= 0).all()
    assert (boxed["x1"] <= boxed["width"]).all() and (boxed["y1"] <= boxed["height"]).all()
    assert ((boxed["x1"] > boxed["x0"]) & (boxed["y1"] > boxed["y0"])).all()
    fcn = boxed[boxed["method"] == "fcn_ensemble"]
    assert (fcn["x1"] - fcn["x0"] == fcn["y1"] - fcn["y0"]).all()  # cell crops are the pyramid's squares
    assert fcn["votes"].between(0, 2).all() and (fcn["members"] == 2).all()
    assert fcn["scale"].between(0, 1.5 + 1e-6).all()
    assert (fcn.loc[fcn["target"] == "label", "searched"] == fcn.loc[fcn["target"] == "label", "label"]).all()


def test_cropped_dataset_leaves_out_the_blacklist_and_says_why(cropped):
    _cfg, out, _report = cropped
    crops = manifests.read_manifest("crops", str(out / "manifests" / "crops.parquet"))
    blacklist = manifests.read_manifest("blacklist", str(out / "manifests" / "blacklist.parquet"))
    main = crops[(crops["method"] == "fcn_ensemble") & (crops["target"] == "label")].set_index("image_id")
    listed = set(blacklist["image_id"])
    assert (main.loc[sorted(listed), "reason"] == "blacklisted").all()
    assert main.loc[sorted(listed), "path"].isna().all()
    exported = main[main["path"].notna()]
    assert len(exported) == len(main) - len(listed)
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out / "cropped") for f in fs}
    assert set(exported["path"]) == files - {"cropped/_KEY"}
    row = exported.iloc[0]
    assert row["path"] == f"cropped/{row['split']}/{row['label']}/{row.name}.jpg"
    from PIL import Image

    with Image.open(out / row["path"]) as im:
        assert im.size == (row["x1"] - row["x0"], row["y1"] - row["y0"])
    # The blacklist: ranked, a known reason each, suggestions that differ from the label.
    assert set(blacklist["reason"]) <= {"label_not_found", "cross_label_duplicate", "likely_mislabeled"}
    assert blacklist["score"].is_monotonic_decreasing and blacklist["score"].between(0, 1).all()
    assert blacklist["rank"].is_monotonic_increasing
    found = blacklist[blacklist["reason"] == "label_not_found"]
    assert (found["votes"] == 0).all() and (found["suggested_label"] != found["label"]).all()
    # The operating point (noise_rate): as many as the run estimates wrong labels, all of them within it.
    ranking = _report.results["crop"].stats["blacklist"]
    assert len(blacklist) == ranking["allowed"]
    assert abs(ranking["allowed"] - ranking["noise_rate"] * ranking["images"]) <= 1
    assert blacklist["within_noise_rate"].all() and blacklist["confidence"].nunique() == 1
    assert ranking["confidence"]["decision"] in {"ok", "low_confidence"}  # min_lift -1: never withheld


def test_label_not_found_flags_mislabelled_images_more_than_correct_ones(cropped):
    _cfg, out, _ = cropped
    images = manifests.read_manifest("images", str(out / "manifests" / "images.parquet"))
    truth = pd.read_parquet(out.parent / "data" / "ground_truth.parquet")
    judged = pd.read_parquet(out / "stages" / "crop" / "judgments.parquet")
    j = judged.merge(images[["image_id", "source_key"]], on="image_id").merge(truth, on="source_key")
    wrong = j["true_label"].notna() & (j["true_label"] != j["given_label"])
    assert wrong.sum() >= 5
    # Mislabelled images have the lower label votes and the higher scores, on average; every judged image
    # has its per-class evidence and a place in the ranking.
    assert j.loc[wrong, "votes"].mean() < j.loc[~wrong, "votes"].mean()
    assert j.loc[wrong, "score"].mean() > j.loc[~wrong, "score"].mean()
    assert j.loc[wrong, "rank"].mean() < j.loc[~wrong, "rank"].mean()
    assert j["class_votes"].map(len).eq(4).all() and sorted(j["rank"]) == list(range(1, len(j) + 1))


def test_rerun_skips_the_stage_and_a_lost_part_is_redone_alone(cropped, tmp_path):
    cfg, out, _ = cropped
    report = run_stages(cfg, [*ingest_stages(), TrainStage(), CropStage()])
    assert "crop" in report.skipped
    before = manifests.read_manifest("crops", str(out / "manifests" / "crops.parquet"))
    # A crash that lost one batch's results: the marker goes, one part file goes.
    stage = out / "stages" / "crop"
    (stage / "_COMPLETE.json").unlink()
    shard_dir = next(p for p in stage.iterdir() if p.name.startswith("shards-"))
    judged = sorted(shard_dir.glob("judged-*.parquet"))
    lost = pd.read_parquet(judged[0])["image_id"]
    judged[0].unlink()
    kept = {p: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    report = run_stages(cfg, [*ingest_stages(), TrainStage(), CropStage()])
    assert report.results["crop"].stats["processed"] == len(lost)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished parts untouched
    after = manifests.read_manifest("crops", str(out / "manifests" / "crops.parquet"))
    key = ["image_id", "method", "target"]
    a, b = before.sort_values(key).reset_index(drop=True), after.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])
    assert np.array_equal(a[["x0", "y0", "x1", "y1"]].to_numpy(), b[["x0", "y0", "x1", "y1"]].to_numpy())
