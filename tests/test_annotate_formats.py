"""Label Studio's export formats and the annotator files, without a server: rows shaped as Label Studio
1.23.2 writes them (tests/test_labelstudio_live.py checks the same against a running one). JSON-MIN, CSV
and TSV list one row per annotation, newest created first; the annotation updated last counts. Errors name
the row and Label Studio's task id. The header annotators read renders as written; image URLs fit a
document root above the run; ``cropclean export`` leaves out images that already have a verdict."""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.annotate import export, labelstudio
from pipeline.annotate.verdicts import VerdictError, import_verdicts, read_overrides
from pipeline.cli import main
from tests.test_verdicts_precision import make_flagged_run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    out = make_flagged_run(tmp_path / "run")
    export.write_blacklist_export(str(out), ["churros", "donuts", "pho"])
    return out


def tasks_of(run: Path) -> list[dict]:
    return json.loads((run / "export" / export.BLACKLIST_TASKS).read_text())


def flat_row(
    task: dict, task_id: int, choice: str | None, annotation: int | None, updated: str | None
) -> dict:
    """A JSON-MIN row as Label Studio 1.23.2 writes it: the task's data, its id, the control's answer and
    the annotation's fields (all null, and no answer, for a task nobody answered)."""
    row = {**task["data"], "id": task_id}
    if choice is not None:
        row[labelstudio.CHOICES] = choice
    return {**row, "annotator": 1 if annotation else None, "annotation_id": annotation, "created_at": updated,
            "updated_at": updated, "lead_time": 3.2 if annotation else None}  # fmt: skip


def answered_rows(run: Path) -> list[dict]:
    """img0 kept; img1 relabelled; img2 answered twice, the first annotation updated last (drop) though
    created first; img3 open. Rows in Label Studio's order: by creation, newest first."""
    t = tasks_of(run)
    return [
        flat_row(t[0], 11, "churros", 1, "2026-12-04T23:48:55.553001Z"),
        flat_row(t[1], 12, "pho", 2, "2026-12-04T23:48:55.631257Z"),
        flat_row(t[2], 13, "donuts", 4, "2026-12-04T23:48:55.842654Z"),  # created last
        flat_row(t[2], 13, labelstudio.DROP, 3, "2026-12-04T23:48:56.912450Z"),  # updated last
        flat_row(t[3], 14, None, None, None),
    ]


EXPECTED = {"img0": ("keep", None), "img1": ("relabel", "pho"), "img2": ("drop", None)}


def overrides(run: Path) -> dict[str, tuple]:
    o = read_overrides(str(run))
    return {
        r.image_id: (r.verdict, r.new_label if isinstance(r.new_label, str) else None) for r in o.itertuples()
    }


def flat_table(rows: list[dict], delimiter: str) -> str:
    """Label Studio's CSV or TSV export of ``rows``: columns sorted by name, text quoted, numbers not."""
    columns = sorted({k for r in rows for k in r})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, quoting=csv.QUOTE_NONNUMERIC, delimiter=delimiter)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else str(v) if k == "annotator" else v) for k, v in r.items()})
    return buf.getvalue()


def test_json_min_takes_the_annotation_updated_last_of_each_task(run, tmp_path):
    path = tmp_path / "project-1-at-2026-12-04-23-48-b1188065.json"
    path.write_text(json.dumps(answered_rows(run)))
    done = import_verdicts(str(path), str(run))
    assert (done.added, done.unanswered, done.kind) == (3, 1, "Label Studio's JSON-MIN export")
    assert overrides(run) == EXPECTED
    assert set(read_overrides(str(run))["annotator"]) == {"1"}


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_label_studio_csv_and_tsv_exports_are_read(run, tmp_path, delimiter):
    # Label Studio names its TSV download .csv as well.
    path = tmp_path / "project-1-at-2026-12-04-23-48-b1188065.csv"
    path.write_text(flat_table(answered_rows(run), delimiter))
    done = import_verdicts(str(path), str(run))
    kind = "TSV" if delimiter == "\t" else "CSV"
    assert (done.added, done.unanswered, done.kind) == (3, 1, f"Label Studio's {kind} export")
    assert overrides(run) == EXPECTED


def test_the_json_export_and_its_errors_name_the_row_and_the_task_id(run, tmp_path, capsys):
    t = tasks_of(run)
    items = [
        {"id": 21 + n, "data": task["data"], "annotations": [], "predictions": []} for n, task in enumerate(t)
    ]
    items[0]["annotations"] = [{"id": 5, "completed_by": 1, "was_cancelled": False,
                                "updated_at": "2026-12-04T10:00:00Z",
                                "result": [labelstudio.choice_result("churros")]}]  # fmt: skip
    items[1]["annotations"] = [{"id": 6, "completed_by": 1, "was_cancelled": False, "updated_at": "yesterday",
                                "result": [labelstudio.choice_result("pho")]}]  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(json.dumps(items))
    assert main(["verdicts", "import", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cropclean verdicts import: export.json: row 2 (Label Studio task 22): updated_at "
                   "'yesterday' is not a date and time")  # fmt: skip
    items[1]["annotations"][0]["updated_at"] = "2026-12-04T10:00:00Z"
    items[1]["annotations"][0]["result"] = [labelstudio.choice_result("pizza")]
    path.write_text(json.dumps(items))
    with pytest.raises(VerdictError, match=r"row 2 \(Label Studio task 22\) \(img1\): unknown label 'pizza'"):
        import_verdicts(str(path), str(run))
    rows = answered_rows(run)
    rows[3]["label"] = ["pho", "donuts"]
    path.write_text(json.dumps(rows))
    with pytest.raises(VerdictError, match=r"row 4 \(Label Studio task 13\): expected one choice"):
        import_verdicts(str(path), str(run))
    table = tmp_path / "export.csv"
    table.write_text(flat_table(answered_rows(run), ",").replace('"2026-12-04T23:48:56.912450Z"', '"soon"'))
    with pytest.raises(VerdictError, match=r"line 5 \(Label Studio task 13\): updated_at 'soon'"):
        import_verdicts(str(table), str(run))
    assert not (run / "manifests" / "overrides.parquet").exists()


def test_the_header_renders_as_written():
    """Label Studio's editor fills a Header's ``$name`` from the task's data with the regular expression
    of libs/editor/src/utils/data.js, which reads a full stop after a name as part of it."""

    def get(data: dict, path: str) -> object:  # a path of names between full stops; empty ones skipped
        for part in (p for p in re.split(r"[.\[\]{}]", path) if p):
            data = data.get(part) if isinstance(data, dict) else None
        return data

    def rendered(value: str, data: dict) -> str:
        if labelstudio.LS_VARIABLE.fullmatch(value):
            return str(get(data, value[1:]) or "")
        return labelstudio.LS_VARIABLE.sub(lambda m: str(get(data, m.group()[1:])), value)

    data = {
        "note": "",
        "given_label": "churros",
        "suggested_label": "donuts",
        "evidence": "churros: best 0/2",
    }
    # What the issue saw with the old header: the full stops after the names vanish.
    assert rendered("$note Given: $given_label. Suggested: $suggested_label. $evidence", data) == (
        " Given: churros Suggested: donuts churros: best 0/2")  # fmt: skip
    with pytest.raises(ValueError, match=r"reads \$given_label\. as one name"):
        labelstudio.labeling_config(["a"], "Given: $given_label. Suggested")
    task = export.blacklist_tasks(_blacklist_row(), export.DEFAULT_IMAGE_PREFIX)[0]
    config = ET.fromstring(labelstudio.labeling_config(["churros", "donuts"], "$header"))
    shown = rendered(config.find("Header").get("value"), task["data"])
    assert shown == "Given: churros. Suggested: donuts. churros: best 0/2"
    low = export.blacklist_tasks(_blacklist_row(confidence=export.LOW_CONFIDENCE), "")[0]["data"]
    assert rendered("$header", low) == export.LOW_CONFIDENCE_NOTE + shown
    # The prelabels' header has no name followed by a full stop: it renders as written.
    header = "Predicted: $predicted_label (confidence $confidence, unsure: $unsure)"
    labelstudio.labeling_config(["a"], header, boxes=True)
    assert rendered(header, {"predicted_label": "pho", "confidence": 0.93, "unsure": False}) == (
        "Predicted: pho (confidence 0.93, unsure: False)")  # fmt: skip


def _blacklist_row(**more: object):
    import pandas as pd

    return pd.DataFrame([{"image_id": "img0", "label": "churros", "reason": "label_not_found", "score": 0.95,
                          "suggested_label": "donuts", "suggested_score": 0.7,
                          "evidence": "churros: best 0/2", "split": "train", "path": "blobs/ab/x.jpg",
                          **more}])  # fmt: skip


def test_image_urls_for_a_document_root_above_the_run(tmp_path, run, capsys):
    root = tmp_path
    assert export.local_files_prefix(str(run), str(run)) == "/data/local-files/?d="
    assert export.local_files_prefix(str(run), str(root)) == "/data/local-files/?d=run/"
    spaced = tmp_path / "runs of may" / "r1"
    assert export.local_files_prefix(str(spaced), str(root)) == "/data/local-files/?d=runs%20of%20may/r1/"
    with pytest.raises(ValueError, match="not inside the document root"):
        export.local_files_prefix(str(root), str(run))
    assert main(["export", str(run), "--document-root", str(root)]) == 0
    task = tasks_of(run)[0]
    assert task["data"]["image"] == f"/data/local-files/?d=run/{task['data']['path']}"
    assert main(["export", str(run), "--document-root", str(run / "blobs")]) == 2
    assert "not inside the document root" in capsys.readouterr().err


def test_export_leaves_out_images_that_already_have_a_verdict(run, tmp_path, capsys):
    assert len(tasks_of(run)) == 4
    verdicts = tmp_path / "v.csv"
    verdicts.write_text("image_id,verdict,new_label\nimg0,relabel,donuts\nimg2,drop,\nimg4,keep,\n")
    import_verdicts(str(verdicts), str(run))
    assert main(["export", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "2 blacklisted images for annotators:" in printed
    assert "2 blacklisted images left out: they already have a verdict" in printed
    assert [t["data"]["image_id"] for t in tasks_of(run)] == ["img1", "img3"]
    rows = list(csv.DictReader(io.StringIO((run / "export" / export.BLACKLIST_CSV).read_text())))
    assert [r["image_id"] for r in rows] == ["img1", "img3"]


def test_annotators_by_email_needs_a_reachable_label_studio(run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "min.json"
    path.write_text(json.dumps(answered_rows(run)))
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert (
        main(["verdicts", "import", str(path), "--out", str(run), "--labelstudio-url", "http://127.0.0.1:9"])
        == 2
    )
    assert "needs a token" in capsys.readouterr().err
    args = ["--labelstudio-url", "http://127.0.0.1:9", "--labelstudio-token", "x" * 40]
    assert main(["verdicts", "import", str(path), "--out", str(run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "http://127.0.0.1:9/api/users/: cannot reach Label Studio" in err[0]
    assert main(["verdicts", "import", str(path), "--out", str(run), "--labelstudio-url", "file:///etc",
                 "--labelstudio-token", "x"]) == 2  # fmt: skip
    assert "give Label Studio's http:// or https:// address" in capsys.readouterr().err
    assert not (run / "manifests" / "overrides.parquet").exists()
