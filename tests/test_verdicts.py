"""Verdict files without a cluster: CSV and Label Studio exports read, every bad row named (and nothing
written), verdicts merged into the overrides manifest and applied to an images manifest; the Label
Studio labelling config; unlabelled image folders as a source."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from pipeline import manifests
from pipeline.annotate import labelstudio
from pipeline.annotate.verdicts import VerdictError, apply_overrides, import_verdicts, read_overrides
from pipeline.cli import main

CLASSES = ["pho", "ramen", "sushi"]


def make_run(out: Path, classes: list[str] = CLASSES, more: pd.DataFrame | None = None) -> Path:
    """A run folder without training: an images manifest (four ok images, one rejected, and ``more``)
    and the classes the ensemble would have been trained on."""
    images = pd.DataFrame({
        "image_id": ["a1", "b2", "c3", "d4", "e5"], "source": "food101",
        "source_key": [f"images/{k}.jpg" for k in "abcde"], "label": ["pho", "ramen", "sushi", "pho", "pho"],
        "split": ["train", "train", "val", "test", None], "status": ["ok"] * 4 + ["rejected"],
        "reason": [None] * 4 + ["duplicate_near"], "path": [f"blobs/{k}.jpg" for k in "abcde"],
    })  # fmt: skip
    if more is not None:
        images = pd.concat([images, more.assign(source="food101")], ignore_index=True)
    manifests.write_manifest("images", images, str(out / "manifests" / "images.parquet"))
    (out / "models").mkdir(parents=True)
    (out / "models" / "classes.json").write_text(json.dumps(classes))
    return out


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_csv_verdicts_become_overrides_and_a_relabel_to_the_own_label_is_a_keep(run, tmp_path):
    csv = write_csv(tmp_path / "v.csv", "image_id,verdict,new_label,note\na1,keep,,x\nb2,relabel,sushi,\n"
                    "c3,DROP,,\nd4,relabel,pho,\ne5,,,not reviewed yet\n")  # fmt: skip
    done = import_verdicts(csv, str(run))
    assert (done.added, done.unanswered) == (4, 1)
    o = read_overrides(str(run)).set_index("image_id")
    assert o["verdict"].to_dict() == {"a1": "keep", "b2": "relabel", "c3": "drop", "d4": "keep"}
    assert o.loc["b2", "new_label"] == "sushi" and pd.isna(o.loc["a1", "new_label"])
    assert o.loc["b2", "label"] == "ramen" and (o["source"] == "v.csv").all()
    # A later file replaces an earlier verdict on the same image and keeps the others.
    import_verdicts(write_csv(tmp_path / "w.csv", "image_id,verdict,new_label\nc3,keep,\n"), str(run))
    o = read_overrides(str(run)).set_index("image_id")
    assert o["verdict"].to_dict() == {"a1": "keep", "b2": "relabel", "c3": "keep", "d4": "keep"}
    assert o.loc["c3", "source"] == "w.csv"


def test_every_bad_row_is_named_and_nothing_is_written(run, tmp_path):
    csv = write_csv(tmp_path / "bad.csv", "image_id,verdict,new_label\nzz9,keep,\na1,maybe,\nb2,relabel,\n"
                    "c3,relabel,pizza\nd4,drop,ramen\na1,keep,\na1,drop,\n")  # fmt: skip
    with pytest.raises(VerdictError) as err:
        import_verdicts(csv, str(run))
    text = str(err.value)
    assert "nothing was imported" in text
    assert "line 2: unknown image_id 'zz9'" in text
    assert "line 3 (a1): verdict 'maybe' is not one of keep, relabel, drop" in text
    assert "line 4 (b2): relabel needs new_label" in text
    assert "line 5 (c3): unknown label 'pizza'; the run's classes: pho, ramen, sushi" in text
    assert "line 6 (d4): new_label 'ramen' goes with relabel only" in text
    assert "line 8 (a1): contradicts bad.csv line 7" in text
    assert not (run / "manifests" / "overrides.parquet").exists()
    with pytest.raises(VerdictError, match="missing columns \\['verdict'\\]"):
        import_verdicts(write_csv(tmp_path / "cols.csv", "image_id,label\na1,pho\n"), str(run))


def test_cli_reports_a_bad_file_with_exit_status_2(run, tmp_path, capsys):
    csv = write_csv(tmp_path / "bad.csv", "image_id,verdict,new_label\na1,dorp,\n")
    assert main(["verdicts", "import", csv, "--out", str(run)]) == 2
    assert "line 2 (a1): verdict 'dorp'" in capsys.readouterr().err
    good = write_csv(tmp_path / "good.csv", "image_id,verdict,new_label\na1,drop,\n")
    assert main(["verdicts", "import", good, "--out", str(run)]) == 0
    assert "0 keep, 0 relabel, 1 drop" in capsys.readouterr().out


def _answer(choice: str, when: str, cancelled: bool = False) -> dict:
    return {"id": len(when), "completed_by": 7, "was_cancelled": cancelled, "updated_at": when,
            "result": [labelstudio.choice_result(choice)]}  # fmt: skip


def test_label_studio_export_gives_keep_relabel_and_drop(run, tmp_path):
    task = lambda i, label, *answers: {"id": i, "data": {"image_id": i, "given_label": label},  # noqa: E731
                                       "annotations": list(answers), "predictions": []}  # fmt: skip
    export = [
        task("a1", "pho", _answer("pho", "2026-01-02")),
        # The latest answer counts; a cancelled one does not.
        task("b2", "ramen", _answer("ramen", "2026-01-01"), _answer("sushi", "2026-01-03"),
             _answer("pho", "2026-01-04", cancelled=True)),
        task("c3", "sushi", _answer(labelstudio.DROP, "2026-01-02")),
        task("d4", "pho"),  # nobody answered yet
    ]  # fmt: skip
    path = tmp_path / "project-1-at-2026.json"
    path.write_text(json.dumps(export))
    done = import_verdicts(str(path), str(run))
    assert (done.added, done.unanswered) == (3, 1)
    o = read_overrides(str(run)).set_index("image_id")
    assert o["verdict"].to_dict() == {"a1": "keep", "b2": "relabel", "c3": "drop"}
    assert o.loc["b2", "new_label"] == "sushi" and o.loc["a1", "annotator"] == "7"
    # JSON-MIN: the data's fields and the control's answer side by side.
    path.write_text(
        json.dumps([{"image_id": "d4", "given_label": "pho", "label": "ramen", "annotator": "x"}])
    )
    import_verdicts(str(path), str(run))
    assert read_overrides(str(run)).set_index("image_id").loc["d4", "new_label"] == "ramen"
    path.write_text(json.dumps({"tasks": []}))
    with pytest.raises(VerdictError, match="JSON list of tasks"):
        import_verdicts(str(path), str(run))


def test_overrides_drop_and_relabel_ok_images_only(run, tmp_path):
    import_verdicts(write_csv(tmp_path / "v.csv", "image_id,verdict,new_label\na1,drop,\nb2,relabel,sushi\n"
                              "c3,keep,\ne5,relabel,ramen\n"), str(run))  # fmt: skip
    images = manifests.read_manifest("images", str(run / "manifests" / "images.parquet"))
    applied, counts = apply_overrides(images, read_overrides(str(run)))
    assert counts == {"dropped": 1, "relabelled": 1}
    a = applied.set_index("image_id")
    assert a.loc["a1", ["status", "reason"]].tolist() == ["rejected", "annotator_drop"]
    assert pd.isna(a.loc["a1", "split"])
    assert a.loc["b2", ["label", "relabelled_from", "status"]].tolist() == ["sushi", "ramen", "ok"]
    assert a.loc["c3", "label"] == "sushi" and pd.isna(a.loc["c3", "relabelled_from"])
    assert a.loc["e5", ["label", "status"]].tolist() == ["pho", "rejected"]  # not in the dataset: untouched


def test_labeling_config_is_xml_with_one_choice_per_class_and_a_drop_alias():
    view = ET.fromstring(labelstudio.labeling_config(["pho", 'r"amen'], "Given: $given_label", boxes=True))
    choices = view.find("Choices")
    assert choices.get("name") == "label" and choices.get("toName") == "image"
    values = [c.get("value") for c in choices.findall("Choice")]
    assert values[:2] == ["pho", 'r"amen'] and choices.findall("Choice")[-1].get("alias") == labelstudio.DROP
    assert view.find("Image").get("value") == "$image"
    assert [lab.get("value") for lab in view.find("RectangleLabels").findall("Label")] == ["pho", 'r"amen']
    with pytest.raises(ValueError, match="rename the class"):
        labelstudio.labeling_config([labelstudio.DROP], "")


def test_a_folder_without_class_folders_gives_unlabelled_candidates(tmp_path):
    from pipeline.config import SourceConfig
    from pipeline.sources import iter_candidates

    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = list(iter_candidates(SourceConfig(uri=str(tmp_path), kind="imagefolder")))
    assert [(c.source_key, c.label, c.split) for c in found] == [("a.png", None, None), ("b.jpg", None, None)]


def test_predict_needs_a_trained_run_and_a_folder_of_its_own(run, tmp_path, capsys):
    source = tmp_path / "new"
    source.mkdir()
    assert main(["predict", str(source), "--models", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "holds no trained run" in capsys.readouterr().err
    (run / "run.yaml").write_text(f"out: {run}\nsources: [{{uri: {source}}}]\n")
    assert main(["predict", str(source), "--models", str(run), "--out", f"{run}/"]) == 2
    assert "a folder of its own" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: usage and exit status 2
        main(["predict", str(source), "--models", str(run), "--out", "x", "--threshold", "1.5"])
    assert "must lie in [0, 1], got 1.5" in capsys.readouterr().err
