"""End-to-end ingest on a real local Ray instance over generated data with ground truth."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import manifests
from pipeline.evaluation.duplicates import duplicate_pair_scores
from pipeline.faults import FaultPlan
from pipeline.ingest import run_ingest
from tests.conftest import ingest_config

REPO = Path(__file__).resolve().parent.parent


def read(out: Path, name: str) -> pd.DataFrame:
    return manifests.read_manifest(name, str(out / "manifests" / f"{name}.parquet"))


@pytest.fixture(scope="module")
def ingested(ray_local, small_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest") / "run"
    run_ingest(ingest_config(small_dataset, out))
    return out


def test_every_input_has_exactly_one_row_with_the_right_reason(ingested, small_truth):
    images = read(ingested, "images")
    assert images["image_id"].is_unique and images["source_key"].is_unique
    assert sorted(images["source_key"]) == sorted(small_truth["source_key"])
    merged = small_truth.merge(images, on="source_key")
    bad = merged[merged["expected_status"] != "ok"]
    assert set(bad["kind"]) == {"too_small", "truncated", "zero_byte", "html", "svg", "decompression_bomb"}
    assert (bad["status"] == bad["expected_status"]).all(), bad[["kind", "status", "reason"]]
    assert (bad["reason"] == bad["expected_reason"]).all(), bad[["kind", "reason", "expected_reason"]]
    good = merged[(merged["expected_status"] == "ok") & merged["duplicate_of"].isna()]
    # A good image is lost only to dedupe (as the kept copy's partner), never to a bad neighbour.
    lost = good[good["status"] != "ok"]
    assert lost["reason"].str.startswith("duplicate").all(), lost[["kind", "reason"]]
    for kind in ("cmyk", "palette", "grayscale", "rgba", "png16", "exif_rotated", "animated_gif"):
        assert (merged.loc[merged["kind"] == kind, "status"] == "ok").all(), kind


def test_normalized_images_exist_and_match_sizes(ingested, small_truth):
    from PIL import Image

    images = read(ingested, "images")
    ok = images[images["path"].notna()]
    assert len(ok) > 0
    for row in ok.head(20).itertuples():
        with Image.open(ingested / row.path) as im:
            assert im.size == (row.width, row.height) and im.mode == "RGB"
            assert min(im.size) == min(128, min(row.orig_width, row.orig_height))
    rotated = small_truth[small_truth["kind"] == "exif_rotated"].merge(images, on="source_key")
    assert (rotated["orig_width"] == rotated["width_x"]).all()  # upright size, as ground truth records


def test_duplicates_found_and_flagged(ingested, small_truth):
    images, dups = read(ingested, "images"), read(ingested, "duplicates")
    scores = duplicate_pair_scores(images, dups, small_truth)
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.9, scores
    assert dups.groupby("group_id")["kept_id"].nunique().eq(1).all()
    kept = images.set_index("image_id").loc[dups["kept_id"].unique()]
    assert (kept["status"] == "ok").all()
    # A copy under another label is a label conflict; a train copy of a test image leaves train.
    keyed = dups.merge(images[["image_id", "source_key", "split", "status", "reason"]], on="image_id")
    truth = small_truth.set_index("source_key")
    for key in truth.index[truth["cross_label"]]:
        row = keyed[keyed["source_key"] == key]
        if len(row):
            assert row["cross_label"].all()
    leaks = keyed[keyed["cross_split"] & keyed["reason"].eq("duplicate_of_test")]
    assert len(leaks) >= 1
    assert (images.set_index("image_id").loc[leaks["kept_id"], "split"] == "test").all()


def test_split_respects_source_and_is_stratified(ingested, small_truth):
    images = read(ingested, "images")
    ok = images[images["status"] == "ok"].merge(
        small_truth[["source_key", "split"]], on="source_key", suffixes=("", "_source")
    )
    assert (ok.loc[ok["split_source"] == "test", "split"] == "test").all()
    assert set(ok.loc[ok["split_source"] == "train", "split"]) == {"train", "val"}
    assert (ok.groupby("label")["split"].apply(lambda s: (s == "val").sum()) >= 1).all()
    assert images.loc[images["status"] != "ok", "split"].isna().all()


def test_rerun_gives_identical_manifests_and_skips_everything(ingested, small_dataset, ray_local):
    before = {n: read(ingested, n) for n in ("images", "duplicates")}
    report, _ = run_ingest(ingest_config(small_dataset, ingested))
    assert report.ran == [] and report.skipped == ["sources", "normalize", "dedupe", "split"]
    for name, df in before.items():
        pd.testing.assert_frame_equal(read(ingested, name), df)
    metrics = json.loads((ingested / "metrics.json").read_text())
    assert metrics["ingest"]["images"] == len(before["images"])


def test_ids_are_stable_across_runs(ingested, small_dataset, tmp_path, ray_local):
    other = tmp_path / "run2"
    run_ingest(ingest_config(small_dataset, other))
    for name in ("images", "duplicates"):
        pd.testing.assert_frame_equal(read(other, name), read(ingested, name))


def test_config_change_reruns_that_stage_and_later_ones_only(ingested, small_dataset, tmp_path, ray_local):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(ingested, out)
    report, _ = run_ingest(ingest_config(small_dataset, out, "dedupe.radius=4"))
    assert report.skipped == ["sources", "normalize"] and report.ran == ["dedupe", "split"]
    report, _ = run_ingest(ingest_config(small_dataset, out, "dedupe.radius=4", "split.salt=other"))
    assert report.ran == ["split"]


def test_resume_after_a_failing_dedupe_shard(ray_local, small_dataset, tmp_path):
    reference = tmp_path / "reference"
    run_ingest(ingest_config(small_dataset, reference))

    out = tmp_path / "interrupted"
    cfg = ingest_config(small_dataset, out, "dedupe.partitions=4")
    with pytest.raises(Exception, match="injected failure in dedupe shard 2"):
        run_ingest(cfg, faults=FaultPlan(frozenset({("dedupe", 2)})))
    assert (out / "stages" / "normalize" / "_COMPLETE.json").exists()
    assert not (out / "stages" / "dedupe" / "_COMPLETE.json").exists()
    assert not (out / "manifests" / "images.parquet").exists()
    shard_dir = next((out / "stages" / "dedupe").glob("shards-*"))
    finished = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("pairs-*.parquet")}
    assert "pairs-000002.parquet" not in finished

    report, _ = run_ingest(cfg, faults=FaultPlan())
    assert report.skipped == ["sources", "normalize"]
    assert report.results["dedupe"].stats["partitions_reused"] == len(finished)
    for name, mtime in finished.items():  # finished partitions were not redone
        assert (shard_dir / name).stat().st_mtime_ns == mtime
    assert (shard_dir / "pairs-000002.parquet").exists()
    for name in ("images", "duplicates"):
        pd.testing.assert_frame_equal(read(out, name), read(reference, name))


def test_resume_after_a_failing_normalize_shard(ray_local, small_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = ingest_config(small_dataset, out, "normalize.shard_size=16")
    inputs = len(pd.read_parquet(small_dataset / "ground_truth.parquet"))  # one candidate per file
    # The last shard fails. Shards start in order, at most one per CPU: by the time the last one starts
    # (and fails at once), all but the few still in flight have finished, however slow the machine.
    # (An early shard failing at once could stop the stage before any other finished.)
    last = math.ceil(inputs / 16) - 1
    assert last >= 3
    with pytest.raises(Exception, match=f"injected failure in normalize shard {last}"):
        run_ingest(cfg, faults=FaultPlan(frozenset({("normalize", last)})))
    ledger = next((out / "stages" / "normalize").glob("ledger-*"))
    finished = {p.name: p.stat().st_mtime_ns for p in ledger.glob("part-*.parquet")}
    done_rows = sum(len(pd.read_parquet(ledger / name)) for name in finished)
    assert not any(name.endswith(f"-{last:06d}.parquet") for name in finished)
    assert 0 < done_rows < inputs

    report, _ = run_ingest(cfg, faults=FaultPlan())
    stats = report.results["normalize"].stats
    assert stats["reused"] == done_rows and stats["processed"] == stats["images"] - done_rows
    assert all((ledger / n).stat().st_mtime_ns == m for n, m in finished.items())
    images = read(out, "images")
    assert len(images) == stats["images"] and images["image_id"].is_unique
    assert (images["attempts"] == 1).all()  # nothing was processed twice


def test_url_list_mixes_paths_and_guarded_urls(ray_local, small_dataset, tmp_path):
    truth = pd.read_parquet(small_dataset / "ground_truth.parquet")
    ok_keys = truth.loc[truth["kind"] == "clean", ["source_key", "given_label"]].head(6)
    lines = []
    for key, label in ok_keys.itertuples(index=False):  # paths relative to the list's folder
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_dataset / key, tmp_path / key)
        lines.append(f"{key},{label}")
    outside = f"{small_dataset / ok_keys.iloc[0, 0]}"  # an absolute path: never read
    lines += ["http://127.0.0.1:9/pho.jpg,pho", "images/missing.jpg,pho", f"{outside},pho"]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run_ingest(ingest_config(tmp_path / "urls.txt", out, "balance.min_per_class=0"))
    images = read(out, "images").set_index("source_key")
    # Fetched through the network guard: loopback is refused unless allowed.
    assert images.loc["http://127.0.0.1:9/pho.jpg", "reason"] == "blocked_private_address"
    assert images.loc["images/missing.jpg", ["status", "reason"]].tolist() == ["failed", "missing_file"]
    assert images.loc[outside, ["status", "reason"]].tolist() == ["rejected", "unsupported_url"]
    assert (images["status"] == "ok").sum() == 6
    assert set(images.loc[images["status"] == "ok", "split"]) <= {"train", "val", "test"}


def run_job(*args: str, job: str = "jobs.ingest") -> subprocess.CompletedProcess:
    """``python -m jobs.<job> ARGS`` as Ray would run it: a fresh process that starts its own Ray. The
    limit only stops a hang: each job starts a Ray of its own, slow on 2 busy cores."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", job, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.timeout(2400)  # five jobs, each starting its own Ray
def test_ingest_and_train_job_entrypoints(small_dataset, tmp_path):
    out = tmp_path / "job"
    proc = run_job(str(small_dataset), "--out", str(out), "--preset", "cpu-small", "--set", "ray.num_cpus=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ingest summary" in proc.stdout and "duplicate_exact" in proc.stdout
    assert (out / "run.yaml").exists() and (out / "manifests" / "images.parquet").exists()
    bad = run_job(str(small_dataset), "--out", str(out), "--set", "dedupe.radious=3")
    assert bad.returncode == 2 and "dedupe.radious" in bad.stderr

    tiny = ["--set", "train.members=[{arch: small_cnn, input_size: 16}]", "--set", "train.finetune_epochs=1"]
    # 1 CPU: a worker of a whole CPU leaves none for the data tasks feeding it; the job says so at once.
    no_room = run_job(str(out), *tiny, "--set", "train.cpus_per_worker=1", job="jobs.train")
    assert no_room.returncode == 2 and "Lower train.cpus_per_worker" in no_room.stderr, no_room.stderr[-2000:]
    assert "Traceback" not in no_room.stderr
    assert not (out / "models" / "small_cnn" / "best.pt").exists()
    # A half-CPU worker (the preset's; a --set stays in run.yaml) leaves half a CPU: the data tasks ask for
    # half each and the training runs.
    trained = run_job(str(out), *tiny, "--set", "train.cpus_per_worker=0.5", job="jobs.train")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "small_cnn" in trained.stdout and "val top-1" in trained.stdout
    assert (out / "models" / "small_cnn" / "best.pt").exists()
    assert (out / "manifests" / "predictions.parquet").exists()
    nothing = run_job(str(tmp_path / "nothing"), job="jobs.train")
    assert nothing.returncode == 2 and "run cropclean ingest first" in nothing.stderr


def test_duplicate_pair_quality_at_the_default_radius(ray_local, tmp_path_factory):
    """On generated data with ground truth: pair precision and recall both >= 0.95 at r = 10."""
    from pipeline.synth import synthesize

    data = tmp_path_factory.mktemp("medium") / "data"
    synthesize(str(data), classes=12, per_class=60, noise=0.1, seed=11)
    out = data.parent / "run"
    run_ingest(ingest_config(data, out))
    truth = pd.read_parquet(data / "ground_truth.parquet")
    scores = duplicate_pair_scores(read(out, "images"), read(out, "duplicates"), truth)
    assert scores["true_pairs"] >= 40
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.95, scores


def test_balance_caps_train_and_drops_small_classes(ingested, small_dataset, tmp_path, ray_local):
    import shutil

    out = tmp_path / "balanced"
    shutil.copytree(ingested, out)
    report, _ = run_ingest(ingest_config(small_dataset, out, "balance.max_per_class=5"))
    assert report.ran == ["split"]  # only the stage that depends on balance
    images = read(out, "images")
    train = images[(images["status"] == "ok") & (images["split"] == "train")]
    assert train.groupby("label").size().max() == 5
    capped = images[images["reason"] == "class_cap"]
    assert len(capped) > 0 and capped["split"].isna().all()
    assert (images.loc[images["split"] == "test"].groupby("label").size() > 5).any()  # test is not capped

    run_ingest(ingest_config(small_dataset, out, "balance.min_per_class=10000"))
    images = read(out, "images")
    assert (images["status"] != "ok").all() and (images["reason"] == "class_too_small").sum() > 0


def test_split_drawn_by_fraction_when_the_source_gives_none(ray_local, small_dataset, tmp_path):
    import shutil

    folder = tmp_path / "folder"  # ImageFolder without split folders: the same images, no meta
    shutil.copytree(small_dataset / "images", folder)
    out = tmp_path / "run"
    run_ingest(ingest_config(folder, out, "split.train=0.6", "split.val=0.2", "split.test=0.2"))
    ok = read(out, "images").query("status == 'ok'")
    shares = ok["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.6) < 0.06 and abs(shares["val"] - 0.2) < 0.06
    per_class = ok.groupby("label")["split"].value_counts().unstack(fill_value=0)
    assert (per_class > 0).all().all()  # stratified: every class in every split
    again = tmp_path / "again"
    run_ingest(ingest_config(folder, again, "split.train=0.6", "split.val=0.2", "split.test=0.2"))
    pd.testing.assert_series_equal(read(again, "images")["split"], read(out, "images")["split"])
