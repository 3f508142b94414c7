"""The annotator export under ``OUT/export/``: the blacklist as a Label Studio import file (each image
with its given label, and the ensemble's suggestion pre-filled as a prediction with its score), the same
rows as a CSV with empty verdict columns to fill in, and the Label Studio labelling config that goes
with them. Either file, answered, goes back with ``cropclean verdicts import``.

What the crop stage knows about the list decides what is sent (``force`` sends the manifest as it is):
a list the weak-ensemble gate withheld is not sent at all (and files of an earlier export are removed, so
that none is sent by mistake); rows beyond the number of wrong labels the run estimates are cut; a
low-confidence list is marked on every task and in the header annotators see. Images that already have a
verdict (``manifests/overrides.parquet``) are never sent again."""

from __future__ import annotations

import io
import json
import posixpath
import urllib.parse
from typing import Any

import pandas as pd

from pipeline import manifests, storage
from pipeline.annotate import labelstudio
from pipeline.layout import RunLayout

# Label Studio serves local files as /data/local-files/?d=<path under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT>,
# to users of a project with a Local files storage whose folder holds the file. With the document root at
# the run folder (and the storage at OUT/blobs: Label Studio refuses one at the root itself), an image's
# path in the manifests is all the URL needs.
LOCAL_FILES_URL = "/data/local-files/?d="
DEFAULT_IMAGE_PREFIX = LOCAL_FILES_URL
MODEL_VERSION = "cropclean-ensemble"
BLACKLIST_TASKS = "blacklist-labelstudio.json"
BLACKLIST_CSV = "blacklist.csv"
CONFIG = "labelstudio-config.xml"
CSV_COLUMNS = ["image_id", "verdict", "new_label", "label", "suggested_label", "suggested_score", "score",
               "reason", "evidence", "confidence", "split", "path", "image"]  # fmt: skip
WITHHELD, LOW_CONFIDENCE = "withheld", "low_confidence"
LOW_CONFIDENCE_NOTE = "LOW CONFIDENCE: a weak ensemble made this list; check every suggestion. "


def export_dir(out: str) -> str:
    return RunLayout(out).export_dir


def local_files_prefix(out: str, document_root: str) -> str:
    """The image prefix for a Label Studio whose LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is
    ``document_root``, a local folder at or above the run folder ``out``: the local-files URL and the
    run folder's path under the root. ValueError when ``out`` lies outside it."""
    from pipeline.config import absolute_local

    run, root = absolute_local(out.rstrip("/")), absolute_local(document_root.rstrip("/") or "/")
    if "://" in run or "://" in root:
        raise ValueError("--document-root needs a local run folder and a local document root")
    relative = posixpath.relpath(run, root)
    if relative == ".." or relative.startswith("../"):
        raise ValueError(f"the run folder {run} is not inside the document root {root}")
    return LOCAL_FILES_URL + ("" if relative == "." else urllib.parse.quote(relative) + "/")


def write_json(uri: str, doc: Any) -> None:
    storage.write_text_atomic(uri, json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n")


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV Injection"); the
# full-width forms count too, as some spreadsheets fold them to ASCII. A leading quote makes such a cell
# text. Cells that already start with a quote get one more, so that reading them back is exact.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
QUOTE = "'"


def spreadsheet_safe(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet shows as text: a string that starts with a formula character
    (or with the quote itself) gets a leading quote. Anything else, numbers included, is left as it is:
    numbers are written by the code, and ``-0.5`` in a score column is a number, not a formula."""
    if isinstance(value, str) and value.startswith((*FORMULA_START, QUOTE)):
        return QUOTE + value
    return value


def spreadsheet_text(cell: str) -> str:
    """What ``spreadsheet_safe`` wrote ``cell`` from: exactly one leading quote comes off when a formula
    character or another quote follows it; any other cell is returned as it is."""
    if cell.startswith(QUOTE) and cell[1:].startswith((*FORMULA_START, QUOTE)):
        return cell[1:]
    return cell


def write_csv(uri: str, frame: pd.DataFrame) -> None:
    """``frame`` as a CSV for annotators: every text cell neutralised (``spreadsheet_safe``)."""
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):  # bool is numeric too: left as it is
            safe[column] = safe[column].map(spreadsheet_safe)
    buf = io.StringIO()
    safe.to_csv(buf, index=False)
    storage.write_text_atomic(uri, buf.getvalue())


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 4)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def gate_message(out: str) -> str:
    """The crop stage's one line on the ensemble's strength (metrics.json), or nothing."""
    uri = RunLayout(out).metrics
    if not storage.exists(uri):
        return ""
    try:
        crop = json.loads(storage.read_text(uri)).get("crop") or {}
    except ValueError:
        return ""
    return str(((crop.get("blacklist") or {}).get("confidence") or {}).get("message") or "")


def review(blacklist: pd.DataFrame, force: bool) -> tuple[pd.DataFrame, str | None, list[str]]:
    """What of the blacklist may go to annotators: (rows, refusal or None, warnings). A 1.1 manifest
    (without ``confidence`` and ``within_noise_rate``) goes as it is."""
    decision = next(iter(blacklist["confidence"].dropna()), None) if "confidence" in blacklist else None
    warnings: list[str] = []
    if decision == WITHHELD and len(blacklist):
        if not force:
            return blacklist.iloc[:0], WITHHELD, warnings
        warnings.append(f"sending a withheld blacklist ({len(blacklist)} images) because of --force")
    within = blacklist.get("within_noise_rate")
    inside = within.fillna(True).astype(bool) if within is not None else pd.Series(True, blacklist.index)
    beyond = int((~inside).sum())
    if beyond:
        allowed = len(blacklist) - beyond
        if force:
            warnings.append(f"sending all {len(blacklist)} images because of --force: {beyond} lie beyond "
                            f"the {allowed} wrong labels the run estimates")  # fmt: skip
        else:
            blacklist = blacklist[inside]
            warnings.append(f"sending the first {allowed} of {allowed + beyond} blacklisted images, as "
                            f"many as the run estimates wrong labels; --force sends the other "
                            f"{beyond}")  # fmt: skip
    if decision == LOW_CONFIDENCE and len(blacklist):
        warnings.append("the blacklist is of low confidence (a weak ensemble): every task is marked")
    return blacklist, None, warnings


def header_text(note: str, given: str, suggested: str | None, evidence: str) -> str:
    """What annotators read above the image. It is one data field, shown as written: Label Studio reads
    a full stop after a variable in the config as part of the variable's name."""
    text = f"{note}Given: {given}. Suggested: {suggested or 'none'}."
    return f"{text} {evidence}" if evidence else text


def blacklist_tasks(blacklist: pd.DataFrame, prefix: str) -> list[dict[str, Any]]:
    """One Label Studio task per blacklisted image, most likely wrong first."""
    tasks = []
    for r in blacklist.to_dict("records"):
        suggested = r.get("suggested_label")
        suggested = None if suggested is None or pd.isna(suggested) else str(suggested)
        note = LOW_CONFIDENCE_NOTE if r.get("confidence") == LOW_CONFIDENCE else ""
        data = {
            "image": labelstudio.image_url(r["path"], prefix), "image_id": r["image_id"],
            "given_label": r["label"], "suggested_label": suggested or "", "reason": r["reason"],
            "score": _num(r["score"]), "suggested_score": _num(r.get("suggested_score")),
            "evidence": r.get("evidence") or "", "split": r.get("split") or "", "path": r["path"],
            "confidence": _text(r.get("confidence")), "note": note,
            "header": header_text(note, str(r["label"]), suggested, _text(r.get("evidence"))),
        }  # fmt: skip
        results = [labelstudio.choice_result(suggested)] if suggested else []
        tasks.append(labelstudio.task(data, MODEL_VERSION, data["suggested_score"], results))
    return tasks


def write_blacklist_export(
    out: str, classes: list[str], prefix: str = DEFAULT_IMAGE_PREFIX, force: bool = False
) -> dict[str, Any]:
    """Write the three files from ``manifests/blacklist.parquet`` (:func:`review` decides which rows),
    leaving out images that already have a verdict. Returns the file URIs, the row count, ``reviewed``
    (images left out for their verdict), ``refused`` (a withheld list: nothing written, earlier task files
    removed, ``message`` says why) and ``warnings``."""
    blacklist = manifests.read_manifest("blacklist", RunLayout(out).manifest("blacklist"))
    judged = reviewed_ids(out)
    reviewed = int(blacklist["image_id"].isin(judged).sum())
    blacklist = blacklist[~blacklist["image_id"].isin(judged)]
    folder = export_dir(out)
    files = {name: storage.join(folder, name) for name in (BLACKLIST_TASKS, BLACKLIST_CSV, CONFIG)}
    rows, refused, warnings = review(blacklist, force)
    if refused:
        for name in (BLACKLIST_TASKS, BLACKLIST_CSV):
            storage.remove(files[name])
        why = gate_message(out) or "blacklist withheld: the ensemble is too weak to judge labels"
        message = f"{why} (cropclean export {out} --force writes the annotator files anyway)"
        return {"rows": 0, "files": {}, "refused": refused, "withheld": len(blacklist), "message": message,
                "warnings": warnings, "reviewed": reviewed}  # fmt: skip
    storage.write_text_atomic(files[CONFIG], labelstudio.labeling_config(classes, "$header"))
    write_json(files[BLACKLIST_TASKS], blacklist_tasks(rows, prefix))
    table = rows.assign(verdict="", new_label="", image=[labelstudio.image_url(p, prefix)
                                                         for p in rows["path"]])  # fmt: skip
    write_csv(files[BLACKLIST_CSV], table.reindex(columns=CSV_COLUMNS))
    return {"rows": len(rows), "files": files, "refused": None, "withheld": 0, "message": "",
            "warnings": warnings, "reviewed": reviewed}  # fmt: skip


def reviewed_ids(out: str) -> set[str]:
    """Images with a verdict of any kind (``manifests/overrides.parquet``): not sent again."""
    uri = RunLayout(out).manifest("overrides")
    if not storage.exists(uri):
        return set()
    return set(manifests.read_manifest("overrides", uri, columns=["image_id"])["image_id"])
