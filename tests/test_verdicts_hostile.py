"""Annotator files from strangers, without a cluster: a malformed verdict file is one line naming it and
exit status 2, never a traceback, and the overrides manifest stays as it was; the annotator CSVs never
hold a cell a spreadsheet would run as a formula, and a relabel to a class named like one survives the
round trip through the CSV."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline import manifests
from pipeline.annotate import export, verdicts
from pipeline.annotate.verdicts import read_overrides
from pipeline.cli import main
from tests.test_verdicts import CLASSES, make_run

# Class names a spreadsheet would run as formulas (or that start with the escaping quote itself), and
# one that must never name a folder: as if models/classes.json had been edited by hand.
HOSTILE = ["-x", "=x", "'q", "+1", "@x"]
MORE = pd.DataFrame({
    "image_id": ["-f6", "g7", "h8"], "source_key": ["=cmd|' /C calc'!A0", "@g.jpg", "h.jpg"],
    "label": ["=x", "pho", "-x"], "split": ["train", "train", "val"], "status": "ok",
    "path": ["blobs/f.jpg", "blobs/g.jpg", "blobs/h.jpg"],
})  # fmt: skip
FORMULA = tuple("=+-@\t\r")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", [*CLASSES, *HOSTILE, "../x"], MORE)


@pytest.fixture
def imported(run: Path, tmp_path: Path) -> bytes:
    """The run with one verdict imported already: the overrides manifest's bytes."""
    good = tmp_path / "first.csv"
    good.write_text("image_id,verdict,new_label\na1,drop,\n")
    assert main(["verdicts", "import", str(good), "--out", str(run)]) == 0
    return (run / "manifests" / "overrides.parquet").read_bytes()


def _tasks(*answers: dict, image_id: object = "a1") -> str:
    return json.dumps([{"id": 1, "data": {"image_id": image_id, "given_label": "pho"},
                        "annotations": list(answers)}])  # fmt: skip


def _answer(n: object = 1, value: object = None, result: object = None, **more: object) -> dict:
    value = {"choices": ["ramen"]} if value is None else value
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": value}] \
        if result is None else result  # fmt: skip
    return {"id": n, "completed_by": 7, "updated_at": "2026-01-01", "result": result, **more}


HEADER = "image_id,verdict,new_label\n"
# file name -> contents (bytes or text); None: a folder of that name; absent: no file at all.
MALFORMED: dict[str, bytes | str | None] = {
    "empty.csv": b"",
    "blank-lines.csv": b"\n\r\n\n",
    "header-only.csv": HEADER,
    "unclosed-quote.csv": HEADER + 'a1,keep,"pho\nb2,drop,\n',
    "latin-1.csv": HEADER.encode() + b"a1,relabel,caf\xe9\n",
    "a-png.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "extra-cells.csv": HEADER + "a1,keep,,surprise\n",
    "verdict-twice.csv": "image_id,verdict,verdict\na1,keep,drop\n",
    "semicolons.csv": "image_id;verdict;new_label\na1;keep;\n",
    "huge-field.csv": HEADER + "a1,keep," + "x" * 200_000 + "\n",
    "sheet.xlsx": b"PK\x03\x04",
    "folder.csv": None,
    "empty.json": b"",
    "not.json": "{not json",
    "deep.json": "[" * 200_000 + "]" * 200_000,
    "deep-objects.json": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "big-number.json": '[{"data": {"image_id": 1' + "0" * 5000 + "}}]",
    "an-object.json": json.dumps({"tasks": []}),
    "no-tasks.json": "[]",
    "a-string-task.json": json.dumps(["a1"]),
    "annotations-text.json": json.dumps([{"data": {"image_id": "a1"}, "annotations": "x"}]),
    "data-list.json": json.dumps([{"data": ["a1"], "annotations": [_answer()]}]),
    "annotation-text.json": _tasks("x"),  # type: ignore[arg-type]
    "result-text.json": _tasks(_answer(result="x")),
    "result-number.json": _tasks(_answer(result=[1])),
    "value-text.json": _tasks(_answer(value="ramen")),
    "choices-object.json": _tasks(_answer(value={"choices": {"a": 1}})),
    "choices-number.json": _tasks(_answer(value={"choices": [1]})),
    "choices-nested.json": _tasks(_answer(value={"choices": [[[["ramen"]]]]})),
    "two-choices.json": _tasks(_answer(value={"choices": ["pho", "ramen"]})),
    "mixed-annotation-ids.json": _tasks(_answer(1), _answer("z")),
    "updated-at-number.json": _tasks(_answer(1), _answer(2, updated_at=5)),
    "annotator-list.json": _tasks(_answer(completed_by=[7])),
    "image-id-number.json": "[" + _tasks(_answer())[1:-1] + "," + _tasks(_answer(), image_id=7)[1:-1] + "]",
    "json-min-object.json": json.dumps([{"image_id": "a1", "label": {"choices": ["ramen"]}}]),
    "json-min-task-object.json": json.dumps([{"id": {"a": 1}, "image_id": "a1", "label": "pho"}]),
    "json-min-when.json": json.dumps(
        [{"id": 1, "image_id": "a1", "label": "pho", "annotation_id": 1, "updated_at": "noon"}]
    ),
    "json-min-annotation-id.json": json.dumps(
        [{"id": 1, "image_id": "a1", "label": "pho", "annotation_id": 1.5}]
    ),
    # Label Studio's CSV export, with cells a person broke.
    "ls-annotation-id.csv": "annotation_id,annotator,id,image_id,label,updated_at\nx,1,1,a1,pho,2026-01-01\n",
    "ls-when.tsv": "annotation_id\tid\timage_id\tlabel\tupdated_at\n1\t1\ta1\tpho\t31/12/2026\n",
    "ls-unknown-image.csv": "annotation_id,id,image_id,label\n1,1,zz,pho\n",
    # Rows that read well but cannot be applied: one row, one line.
    "relabel-out-of-out.csv": HEADER + "a1,relabel,../x\n",
    "relabel-unknown.csv": HEADER + "a1,relabel,pizza\n",
}


@pytest.mark.parametrize("name", [*MALFORMED, "missing.csv"])
def test_a_malformed_verdict_file_is_one_line_and_exit_status_2(name, run, imported, tmp_path, capsys):
    path = tmp_path / name
    content = MALFORMED.get(name, "absent")
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif name != "missing.csv":
        path.write_text(content, encoding="utf-8")
    assert main(["verdicts", "import", str(path), "--out", str(run)]) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1, printed.err
    assert name in lines[0] and lines[0].startswith("cropclean verdicts import: ")
    assert "Traceback" not in printed.err + printed.out
    assert (run / "manifests" / "overrides.parquet").read_bytes() == imported


def test_a_verdict_file_is_never_read_beyond_the_size_cap(run, imported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(verdicts, "MAX_BYTES", 1000)
    big = tmp_path / "big.csv"
    big.write_text(HEADER + "a1,keep,\n" * 200)
    assert main(["verdicts", "import", str(big), "--out", str(run)]) == 2
    assert "big.csv: larger than 1,000 bytes" in capsys.readouterr().err
    if os.path.exists("/dev/zero"):  # endless: reading it whole would never end
        (tmp_path / "zero.csv").symlink_to("/dev/zero")
        assert main(["verdicts", "import", str(tmp_path / "zero.csv"), "--out", str(run)]) == 2
        assert "zero.csv: larger than" in capsys.readouterr().err
    assert (run / "manifests" / "overrides.parquet").read_bytes() == imported


def test_tsv_byte_order_marks_and_utf16_are_read(run, tmp_path):
    tsv = tmp_path / "v.tsv"
    tsv.write_text("image_id\tverdict\tnew_label\tnote\na1\tkeep\t\tfine, really\nb2\trelabel\tsushi\t\n")
    assert verdicts.import_verdicts(str(tsv), str(run)).added == 2
    # Spreadsheets write CSV UTF-8 with a byte-order mark, and "Unicode text" as UTF-16 with tabs.
    bom = tmp_path / "bom.csv"
    bom.write_bytes(codecs.BOM_UTF8 + b"image_id,verdict,new_label\nc3,drop,\n")
    utf16 = tmp_path / "unicode.tsv"
    utf16.write_bytes("image_id\tverdict\tnew_label\nd4\trelabel\tramen\n".encode("utf-16"))
    doc = tmp_path / "bom.json"
    doc.write_bytes(codecs.BOM_UTF8 + _tasks(_answer(), image_id="g7").encode())
    for path in (bom, utf16, doc):
        assert verdicts.import_verdicts(str(path), str(run)).added == 1
    o = read_overrides(str(run)).set_index("image_id")
    assert o["verdict"].to_dict() == {"a1": "keep", "b2": "relabel", "c3": "drop", "d4": "relabel",
                                      "g7": "relabel"}  # fmt: skip
    assert o.loc[["b2", "d4", "g7"], "new_label"].tolist() == ["sushi", "ramen", "ramen"]
    # The header row decides the delimiter, not the name: Label Studio names its TSV download .csv.
    tabs = tmp_path / "project-1-at-2026-12-01.csv"
    tabs.write_text("image_id\tverdict\tnew_label\na1\tdrop\t\n")
    commas = tmp_path / "commas.tsv"
    commas.write_text("image_id,verdict,new_label\nb2,drop,\n")
    assert verdicts.import_verdicts(str(tabs), str(run)).kind == "verdict TSV"
    assert verdicts.import_verdicts(str(commas), str(run)).kind == "verdict CSV"
    o = read_overrides(str(run)).set_index("image_id")
    assert o.loc[["a1", "b2"], "verdict"].tolist() == ["drop", "drop"]


@pytest.mark.parametrize("text", ["=x", "-x", "+1", "@x", "\tx", "\rx", "\uff1dx", "'q", "''=x", "'",
                                  "pho", "", "x=1", " =x"])  # fmt: skip
def test_neutralising_a_cell_is_undone_exactly(text):
    safe = export.spreadsheet_safe(text)
    assert not safe.startswith(FORMULA)
    assert export.spreadsheet_text(safe) == text
    assert export.spreadsheet_safe(-0.5) == -0.5 and export.spreadsheet_safe(None) is None


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


def _no_formula(rows: list[dict[str, str]], numeric: set[str]) -> None:
    for row in rows:
        for column, cell in row.items():
            if column not in numeric:
                assert not cell.startswith(FORMULA), (column, cell)


def _blacklist(run: Path) -> None:
    blacklist = pd.DataFrame({
        "image_id": ["-f6", "g7", "h8"], "split": ["train", "train", "val"], "label": ["=x", "pho", "-x"],
        "reason": ["label_not_found", "+cmd", "@x"], "score": [0.9, -0.5, 0.1],
        "suggested_label": ["-x", "'q", None], "suggested_score": [0.8, 0.7, None],
        "evidence": ["=HYPERLINK(\"http://x\")", "\t=1+1", None],
        "path": ["blobs/f.jpg", "-blobs/g.jpg", "blobs/h.jpg"],
    })  # fmt: skip
    manifests.write_manifest("blacklist", blacklist, str(run / "manifests" / "blacklist.parquet"))


def test_the_blacklist_csv_holds_no_formula_and_numbers_stay_numbers(run):
    _blacklist(run)
    done = export.write_blacklist_export(str(run), [*CLASSES, *HOSTILE])
    rows = {r["image_id"]: r for r in _csv(Path(done["files"][export.BLACKLIST_CSV]))}
    assert set(rows) == {"'-f6", "g7", "h8"}
    _no_formula(list(rows.values()), numeric={"score", "suggested_score"})
    f6, g7 = rows["'-f6"], rows["g7"]
    assert (f6["label"], f6["suggested_label"], f6["evidence"]) == ("'=x", "'-x", '\'=HYPERLINK("http://x")')
    assert (g7["reason"], g7["suggested_label"], g7["evidence"], g7["path"]) == \
        ("'+cmd", "''q", "'\t=1+1", "'-blobs/g.jpg")  # fmt: skip
    assert g7["score"] == "-0.5" and float(f6["suggested_score"]) == pytest.approx(0.8)
    # The Label Studio file is JSON, not a spreadsheet: its values stay as they are.
    tasks = json.loads(Path(done["files"][export.BLACKLIST_TASKS]).read_text())
    assert tasks[0]["data"]["given_label"] == "=x" and tasks[0]["data"]["image_id"] == "-f6"


def test_the_prelabel_csv_holds_no_formula(run):
    from pipeline.stages.predict import PRELABEL_CSV, PredictStage

    rows = pd.DataFrame({
        "image_id": ["-f6", "g7"], "source_key": ["=cmd|' /C calc'!A0", "@g.jpg"],
        "predicted_label": ["=x", "pho"], "confidence": [0.97, 0.5], "second_label": ["-x", "+1"],
        "second_confidence": [0.02, 0.4], "members": 1, "unsure": [False, True], "threshold": 0.9,
        "width": 96, "height": 96, "x0": [0, None], "y0": [0, None], "x1": [48, None], "y1": [48, None],
        "reason": [None, "too_small_for_scales"], "path": ["blobs/f.jpg", "blobs/g.jpg"],
    })  # fmt: skip
    uri = str(run / "manifests" / "prelabels.parquet")
    manifests.write_manifest("prelabels", rows, uri)
    PredictStage(models=str(run)).write_export(str(run), manifests.read_manifest("prelabels", uri), CLASSES)
    written = _csv(run / "export" / PRELABEL_CSV)
    _no_formula(written, numeric={"confidence", "second_confidence", "threshold", "members"})
    assert [(r["image_id"], r["source_key"], r["predicted_label"], r["second_label"]) for r in written] == [
        ("'-f6", "'=cmd|' /C calc'!A0", "'=x", "'-x"), ("g7", "'@g.jpg", "pho", "'+1")]  # fmt: skip
    assert written[1]["unsure"] == "True" and float(written[0]["confidence"]) == pytest.approx(0.97)


def test_a_relabel_to_a_formula_like_class_survives_the_csv_round_trip(run, tmp_path, capsys):
    _blacklist(run)
    done = export.write_blacklist_export(str(run), [*CLASSES, *HOSTILE])
    exported = Path(done["files"][export.BLACKLIST_CSV])
    rows = _csv(exported)
    # As in a spreadsheet: the annotator copies the suggested label's cell into new_label, or types it
    # with the quote a spreadsheet shows, and saves the sheet as CSV with every other cell as it was.
    for r in rows:
        if r["image_id"] == "'-f6":
            r["verdict"], r["new_label"] = "relabel", r["suggested_label"]  # '-x
        if r["image_id"] == "g7":
            r["verdict"], r["new_label"] = "relabel", r["suggested_label"]  # ''q
        if r["image_id"] == "h8":
            r["verdict"], r["new_label"] = "relabel", "'=x"
    edited = tmp_path / "blacklist.csv"
    with edited.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["verdicts", "import", str(edited), "--out", str(run)]) == 0, capsys.readouterr().err
    o = read_overrides(str(run)).set_index("image_id")
    assert o["new_label"].to_dict() == {"-f6": "-x", "g7": "'q", "h8": "=x"}
    assert set(o["verdict"]) == {"relabel"}
    assert o.loc["-f6", "label"] == "=x"
