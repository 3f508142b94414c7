"""The blacklist's human-confirmed precision, without a cluster: verdicts imported on a run with a
blacklist keep each flag's score and reason, metrics.json's ``review`` section counts the reviewed flags
that annotators relabelled or dropped (overall, per reason, per score band, and the score threshold that
reaches a chosen precision), and the report's summary page shows it. ``make_flagged_run`` is the small
run with real image files that the annotator tests share (the live Label Studio test too)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline import manifests
from pipeline.annotate import review
from pipeline.annotate.verdicts import import_verdicts, read_overrides
from pipeline.cli import main

CLASSES = ["churros", "donuts", "pho"]
# image_id, label, colour: a plain image each, stored as normalize stores it (blobs/aa/<sha256>.jpg).
IMAGES = [("img0", "churros", "red"), ("img1", "donuts", "blue"), ("img2", "pho", "green"),
          ("img3", "churros", "yellow"), ("img4", "donuts", "purple")]  # fmt: skip
# The blacklist, most likely wrong first: image_id, reason, score, suggestion, its score, votes, evidence.
FLAGS = [("img0", "label_not_found", 0.95, "donuts", 0.7, 0, "churros: best 0/2"),
         ("img1", "likely_mislabeled", 0.8, "pho", 0.5, 1, "donuts: best 1/2"),
         ("img2", "label_not_found", 0.6, "churros", 0.4, 0, "pho: best 0/2"),
         ("img3", "cross_label_duplicate", 0.4, None, None, None, "")]  # fmt: skip
SIZE = (64, 48)


def make_flagged_run(out: Path) -> Path:
    """A cropped run as annotators meet it: five images (real JPEG files under blobs/), their images
    manifest, the classes the ensemble knows, and a blacklist of four, one of each reason."""
    rows = []
    for image_id, label, colour in IMAGES:
        buf = io.BytesIO()
        Image.new("RGB", SIZE, colour).save(buf, "JPEG")
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        path = f"blobs/{sha[:2]}/{sha}.jpg"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(buf.getvalue())
        rows.append({"image_id": image_id, "source": "food101", "source_key": f"images/{image_id}.jpg",
                     "label": label, "split": "train", "status": "ok", "sha256": sha, "width": SIZE[0],
                     "height": SIZE[1], "path": path})  # fmt: skip
    images = pd.DataFrame(rows)
    manifests.write_manifest("images", images, str(out / "manifests" / "images.parquet"))
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "models" / "classes.json").write_text(json.dumps(CLASSES))
    flags = pd.DataFrame(FLAGS, columns=["image_id", "reason", "score", "suggested_label", "suggested_score",
                                         "votes", "evidence"])  # fmt: skip
    blacklist = flags.merge(images[["image_id", "label", "split", "path"]], on="image_id")
    manifests.write_manifest("blacklist", blacklist, str(out / "manifests" / "blacklist.parquet"))
    return out


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_flagged_run(tmp_path / "run")


def verdict_csv(path: Path, rows: str) -> str:
    path.write_text("image_id,verdict,new_label\n" + rows)
    return str(path)


def test_reviewed_flags_give_precision_per_reason_and_band_and_a_threshold(run, tmp_path):
    # img0 (0.95) relabelled, img1 (0.8) kept, img2 (0.6) dropped; img4 was not flagged.
    csv = verdict_csv(tmp_path / "v.csv", "img0,relabel,donuts\nimg1,keep,\nimg2,drop,\nimg4,drop,\n")
    done = import_verdicts(csv, str(run), target_precision=0.9)
    o = read_overrides(str(run)).set_index("image_id")
    assert o.loc[["img0", "img1", "img2"], "flag_score"].tolist() == pytest.approx([0.95, 0.8, 0.6])
    assert o.loc["img1", "flag_reason"] == "likely_mislabeled" and pd.isna(o.loc["img4", "flag_score"])
    section = json.loads((run / "metrics.json").read_text())["review"]
    assert section == done.precision
    assert (section["reviewed"], section["confirmed"]) == (3, 2)
    assert section["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert section["unflagged_verdicts"] == 1 and section["verdicts"] == {"keep": 1, "relabel": 1, "drop": 2}
    assert {r: (c["reviewed"], c["confirmed"]) for r, c in section["per_reason"].items()} == {
        "label_not_found": (2, 2), "likely_mislabeled": (1, 0)}  # fmt: skip
    assert [(b["low"], b["reviewed"], b["confirmed"]) for b in section["per_band"]] == [
        (0.9, 1, 1), (0.8, 1, 0), (0.6, 1, 1)]  # fmt: skip
    # At 0.95 one flag, confirmed (1.0); at 0.8, 1 of 2; at 0.6, 2 of 3: only the first reaches 0.9.
    assert section["threshold"] == {"score": 0.95, "reviewed": 1, "confirmed": 1, "precision": 1.0}
    lo, hi = section["interval95"]
    assert 0 <= lo < 2 / 3 < hi <= 1
    assert review.blacklist_precision(read_overrides(str(run)), 0.6)["threshold"]["score"] == 0.6


def test_the_wilson_interval_and_ties_at_a_threshold():
    assert review.wilson(0, 1) == (0.0, pytest.approx(0.7935, abs=1e-4))  # z^2 / (1 + z^2)
    assert review.wilson(0, 0) is None
    lo, hi = review.wilson(90, 100)
    assert 0.82 < lo < 0.83 and 0.94 < hi < 0.95  # 0.8256 to 0.9448 by the textbook formula
    # Flags of one score go together: 0.9 and 0.9 give 1 of 2, never the first alone.
    scores, confirmed = pd.Series([0.9, 0.9, 0.5]), pd.Series([True, False, True])
    assert review.threshold_for(scores, confirmed, 0.9) is None
    assert review.threshold_for(scores, confirmed, 0.5)["reviewed"] == 3


def test_a_flag_is_remembered_after_the_next_run_stops_listing_the_image(run, tmp_path):
    import_verdicts(verdict_csv(tmp_path / "a.csv", "img0,keep,\n"), str(run))
    # The next run no longer flags img0 (checked); a later file confirms img2.
    blacklist = manifests.read_manifest("blacklist", str(run / "manifests" / "blacklist.parquet"))
    manifests.write_manifest("blacklist", blacklist[blacklist["image_id"] != "img0"],
                             str(run / "manifests" / "blacklist.parquet"))  # fmt: skip
    import_verdicts(verdict_csv(tmp_path / "b.csv", "img0,keep,\nimg2,drop,\n"), str(run))
    o = read_overrides(str(run)).set_index("image_id")
    assert o.loc["img0", ["flag_score", "flag_reason"]].tolist() == [pytest.approx(0.95), "label_not_found"]
    section = json.loads((run / "metrics.json").read_text())["review"]
    assert (section["reviewed"], section["confirmed"]) == (2, 1)


def test_overrides_of_schema_1_0_are_read_and_merged(run, tmp_path):
    old = pd.DataFrame({"image_id": ["img1"], "verdict": ["keep"], "label": ["donuts"], "new_label": [None],
                        "annotator": ["7"], "source": ["old.csv"],
                        "imported_at": [pd.Timestamp("2026-01-01", tz="UTC")]})  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(old, preserve_index=False).replace_schema_metadata(
        {"cropclean.schema": "overrides", "cropclean.schema_version": "1.0"})  # fmt: skip
    pq.write_table(table, run / "manifests" / "overrides.parquet")
    assert read_overrides(str(run)).columns.tolist()[:7] == old.columns.tolist()
    import_verdicts(verdict_csv(tmp_path / "v.csv", "img0,relabel,donuts\n"), str(run))
    o = read_overrides(str(run)).set_index("image_id")
    assert o["verdict"].to_dict() == {"img0": "relabel", "img1": "keep"}
    # img1's flag was not recorded by 1.0; the blacklist still lists it, so it is found there.
    assert o["flag_score"].tolist() == pytest.approx([0.95, 0.8])


def test_the_report_shows_the_human_confirmed_precision(run, tmp_path):
    from pipeline.report import _render
    from pipeline.report.data import RunData
    from pipeline.report.pages import PageBuilder
    from tests.conftest import ingest_config

    answers = "img0,relabel,donuts\nimg1,keep,\nimg2,drop,\n"
    import_verdicts(verdict_csv(tmp_path / "v.csv", answers), str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    images = manifests.read_manifest("images", str(run / "manifests" / "images.parquet"))
    empty = pd.DataFrame(columns=["image_id", "label", "split", "width", "height", "x0", "y0", "x1", "y1",
                                  "score", "reason", "path"])  # fmt: skip
    data = RunData(out=str(run), cfg=ingest_config(tmp_path / "src", run), images=images,
                   duplicates=pd.DataFrame(columns=["image_id", "group_id", "kept_id", "cross_label",
                                                    "cross_split"]),
                   crops=empty, searched=empty,
                   blacklist=pd.DataFrame(columns=["image_id", "label", "reason"]),
                   predictions=pd.DataFrame(), metrics=metrics)  # fmt: skip
    page = PageBuilder(data, 10, set(), set()).index("now")
    _render([page], str(tmp_path / "report"))
    html = (tmp_path / "report" / "index.html").read_text()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    assert "Blacklist precision confirmed by annotators" in text
    assert "Of 3 blacklisted images with a verdict, annotators relabelled or dropped 2: a precision" in text
    assert "a precision of 0.67 (95% interval 0.21 to 0.94)" in text
    assert "Flags scoring 0.950 or more reached precision 0.9 (1 of 1, 1.00)" in text
    assert re.search(r"label_not_found 2 2 1\.00", text) and re.search(r"likely_mislabeled 1 0 0\.00", text)
    assert re.search(r"score 0\.9 to 1\.0 1 1 1\.00", text)
    # Without verdicts the section is absent.
    page = PageBuilder(RunData(**{**data.__dict__, "metrics": {}}), 10, set(), set()).index("now")
    assert page.context["review"] is None


def test_the_cli_prints_the_precision_and_the_threshold(run, tmp_path, capsys):
    csv = verdict_csv(tmp_path / "v.csv", "img0,relabel,donuts\nimg1,keep,\nimg2,drop,\n")
    assert main(["verdicts", "import", csv, "--out", str(run), "--precision", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "precision of the blacklist: 0.67 (2 of 3 reviewed flags relabelled or dropped" in out
    assert "flags scoring 0.600 or more reach precision 0.6: 0.67 (2 of 3)" in out
    assert "label_not_found: 1.00 (2 of 2)" in out
