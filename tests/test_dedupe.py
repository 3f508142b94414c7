"""The dedupe stage on generated photos with hard negatives (another object on the same background): every
pHash candidate is confirmed on the images before it groups them or raises a label conflict."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import manifests, neardup
from pipeline.config import DedupeConfig
from pipeline.evaluation.duplicates import duplicate_pair_scores, found_duplicate_pairs, true_duplicate_pairs
from pipeline.runner import RunReport, run_stages
from pipeline.stages.base import RunContext
from tests.conftest import ingest_config

RADIUS = DedupeConfig().radius
MAX_DIFF = DedupeConfig().verify_max_diff


def read(out: Path, name: str) -> pd.DataFrame:
    """``duplicates`` from the run's manifests; ``images`` as the dedupe stage left them."""
    where = (
        out / "stages" / "dedupe" / "images.parquet"
        if name == "images"
        else out / "manifests" / f"{name}.parquet"
    )
    return manifests.read_manifest(name, str(where))


def ingest(data: Path, out: Path, *sets: str) -> RunReport:
    from pipeline.stages.dedupe import DedupeStage
    from pipeline.stages.normalize import NormalizeStage
    from pipeline.stages.sources import SourcesStage

    # Exact search: every pair within the radius is a candidate, so what is lost is lost to verification.
    cfg = ingest_config(data, out, "dedupe.method=exact", *sets)
    return run_stages(cfg, [SourcesStage(), NormalizeStage(), DedupeStage()])


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("dedupe")
    data, out = root / "data", root / "run"
    synthesize(str(data), classes=6, per_class=30, seed=18, backgrounds="real", hard_negatives=0.3)
    ingest(data, out)
    return data, out, pd.read_parquet(data / "ground_truth.parquet")


def sibling_pairs(truth: pd.DataFrame) -> set[tuple[str, str]]:
    hard = truth[truth["kind"] == "hard_negative"]
    return {tuple(sorted(p)) for p in zip(hard["source_key"], hard["background_of"], strict=True)}


def phash_distance(images: pd.DataFrame, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    h = images.set_index("source_key")["phash"]
    return {
        (a, b): int(neardup.popcount(neardup.hex_to_u64([h[a]]) ^ neardup.hex_to_u64([h[b]]))[0])
        for a, b in pairs
        if isinstance(h.get(a), str) and isinstance(h.get(b), str)
    }


def test_hard_negative_pairs_are_not_grouped(run):
    _, out, truth = run
    images = read(out, "images")
    siblings = sibling_pairs(truth)
    close = {p for p, d in phash_distance(images, siblings).items() if d <= RADIUS}
    assert len(close) >= 5, "pHash alone would have grouped these: the data must hold some"
    found = found_duplicate_pairs(images, read(out, "duplicates"))
    assert not siblings & found
    scores = duplicate_pair_scores(images, read(out, "duplicates"), truth)
    assert scores["precision"] == 1.0, scores


def test_every_copy_within_the_radius_is_grouped(run):
    _, out, truth = run
    images = read(out, "images")
    found = found_duplicate_pairs(images, read(out, "duplicates"))
    within = {p for p, d in phash_distance(images, true_duplicate_pairs(truth)).items() if d <= RADIUS}
    variant = truth.set_index("source_key")["variant"]
    kinds = {variant[k] for p in within for k in p if isinstance(variant[k], str)}
    assert kinds == {"resized", "recompressed", "cropped", "brightness"}  # each kind of copy is there
    assert within <= found, sorted(within - found)
    assert duplicate_pair_scores(images, read(out, "duplicates"), truth)["recall"] >= 0.9


def test_the_manifest_says_why_each_image_was_grouped(run):
    _, out, _ = run
    dups = read(out, "duplicates")
    assert manifests.load_schema("duplicates").version == "1.1"
    kept = dups["image_id"] == dups["kept_id"]
    assert dups.loc[kept, "verified_by"].isna().all() and dups.loc[kept, "verify_score"].isna().all()
    members = dups[~kept]
    assert set(members["verified_by"]) <= {"bytes", "pixels", "thumbnail", "chain"}
    exact = members[members["kind"] == "exact"]
    assert len(exact) and exact["verified_by"].isin(["bytes", "pixels"]).all()
    assert (exact["verify_score"] == 0).all() and (exact["distance"] == 0).all()
    near = members[members["verified_by"] == "thumbnail"]
    assert len(near) >= 4 and (near["kind"] == "near").all()
    assert near["verify_score"].between(0, MAX_DIFF).all() and (near["distance"] <= RADIUS).all()


def test_a_cross_label_pair_on_a_shared_background_does_not_reach_the_blacklist(run, tmp_path):
    """Conflicts flow from duplicates.parquet through the crop stage's ``duplicate_labels`` into the
    ranking (``rank.flag`` sends every conflicting copy to annotators): judged with their labels found,
    only true copies under two labels may be flagged, never two dishes on one table."""
    from pipeline.crop import rank
    from pipeline.stages.crop import duplicate_labels

    data, out, truth = run
    siblings = sibling_pairs(truth)
    given = truth.set_index("source_key")["given_label"]
    cross = {p for p in siblings if given[p[0]] != given[p[1]]}
    copies = set(truth.loc[truth["cross_label"], "source_key"])
    assert copies, "the data must hold true copies under another label"

    def flagged(run_dir: Path) -> set[str]:
        images = read(run_dir, "images")
        cfg = ingest_config(data, run_dir)
        conflicts = duplicate_labels(RunContext(cfg=cfg), images)
        judged = images[images["label"].notna()][["image_id", "label"]].assign(
            split="train", votes=2, label_score=0.9, suggested_score=0.1, members=2, verified=False
        )
        classes = sorted(judged["label"].unique())
        scored, _ = rank.score_judgments(judged, classes, None, conflicts)
        hit = scored.loc[rank.flag(scored, "votes", 0.1, 0.8, max_votes=0, min_score=-1.0), "image_id"]
        return set(images.set_index("image_id").loc[hit, "source_key"])

    blacklisted = flagged(out)
    assert not blacklisted & {k for p in cross for k in p}
    assert blacklisted & copies
    # The same images grouped by pHash alone put pairs on a shared background on the list.
    alone = tmp_path / "phash-only"
    shutil.copytree(out, alone)
    ingest(data, alone, "dedupe.verify=false")
    assert flagged(alone) & {k for p in cross for k in p}


def test_a_blob_that_no_longer_reads_is_a_row_with_a_reason(run, tmp_path):
    data, out, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    dups = read(out, "duplicates")
    images = read(out, "images").set_index("image_id")
    near = dups.loc[dups["kind"] == "near", "image_id"].tolist()
    garbled, missing, escaping = near[:3]
    (bad / images.loc[garbled, "path"]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg any more")
    (bad / images.loc[missing, "path"]).unlink()
    normalized = bad / "stages" / "normalize" / "images.parquet"
    rows = manifests.read_manifest("images", str(normalized))
    rows.loc[rows["image_id"] == escaping, "path"] = "../../../etc/passwd"  # a hand-edited manifest
    manifests.write_manifest("images", rows, str(normalized))
    shutil.rmtree(bad / "stages" / "dedupe")

    report = ingest(data, bad)
    assert report.ran == ["dedupe"] and report.results["dedupe"].stats["unreadable"] == 3
    after = read(bad, "images").set_index("image_id")
    assert (after.loc[garbled, "status"], after.loc[garbled, "reason"]) == ("rejected", "decode_error")
    for image in (missing, escaping):
        assert (after.loc[image, "status"], after.loc[image, "reason"]) == ("failed", "read_error")
    assert after.loc[[garbled, missing, escaping], "detail"].str.startswith("dedupe: ").all()
    assert not {garbled, missing, escaping} & set(read(bad, "duplicates")["image_id"])
    # Every other image is where it was.
    others = images.index.difference([garbled, missing, escaping])
    assert (after.loc[others, "status"] == images.loc[others, "status"]).all()


def test_the_report_shows_the_verification_beside_each_copy(run, tmp_path):
    from pipeline.report import _render
    from pipeline.report.data import RunData
    from pipeline.report.pages import PageBuilder

    data, out, _ = run
    images, dups = read(out, "images"), read(out, "duplicates")
    empty = pd.DataFrame(columns=["image_id", "label", "split", "width", "height", "path"])
    report = RunData(out=str(out), cfg=ingest_config(data, out), images=images, duplicates=dups,
                     crops=empty, searched=empty, blacklist=empty.assign(reason=None, score=None),
                     predictions=pd.DataFrame(), metrics={})  # fmt: skip
    pages = PageBuilder(report, 400, heats=set(), thumbs=set()).duplicates()
    _render(pages, str(tmp_path))
    text = re.sub(r"<[^>]+>", "", "".join((tmp_path / p.name).read_text() for p in pages))
    near = dups[dups["verified_by"] == "thumbnail"]
    for score in near["verify_score"]:
        assert f"v={score:.2f} (thumbnail)" in text
    assert (
        text.count("(bytes)") + text.count("(pixels)")
        == (dups["kind"].eq("exact") & dups["verified_by"].notna()).sum()
    )


def test_ray_tasks_score_as_the_driver_does(run, monkeypatch):
    """Beyond LOCAL_BLOBS_MAX blobs the pairs are scored in Ray tasks, each reading the blobs it needs."""
    from pipeline.stages import dedupe

    _, out, _ = run
    ok = manifests.read_manifest("images", str(out / "stages" / "normalize" / "images.parquet"))
    ok = ok[ok["status"] == "ok"].reset_index(drop=True)
    uniq, inverse = np.unique(neardup.hex_to_u64(ok["phash"].tolist()), return_inverse=True)
    pairs = neardup.exact_pairs(uniq, RADIUS)
    here = dedupe.verify_candidates(ok, inverse, pairs, str(out), MAX_DIFF)
    monkeypatch.setattr(dedupe, "LOCAL_BLOBS_MAX", 0)
    monkeypatch.setattr(dedupe, "SCORE_CHUNK", 8)
    tasks = dedupe.verify_candidates(ok, inverse, pairs, str(out), MAX_DIFF)
    assert tasks.stats == here.stats and sorted(tasks.confirmed) == sorted(here.confirmed)
    assert tasks.verifier.known.keys() == here.verifier.known.keys()
    assert np.allclose(
        list(tasks.verifier.known.values()), [here.verifier.known[k] for k in tasks.verifier.known]
    )
