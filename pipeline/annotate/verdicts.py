"""Annotators' verdicts: read a CSV or a Label Studio export, check every row, keep them as the run's
label-overrides manifest (``OUT/manifests/overrides.parquet``), and apply them on the next run.

Three verdicts: ``keep`` (the label is right), ``relabel`` (it is ``new_label``), ``drop`` (the image
leaves the dataset). The split stage applies drops and relabels to the images manifest; the crop stage
never flags a kept or relabelled image again. Each of the two stages adds a digest of the verdicts it
uses to its completion key, so a new verdict re-runs what it changes, and a run without verdicts keeps
the keys it always had.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd

from pipeline import manifests, storage
from pipeline.annotate import export, labelstudio, review
from pipeline.layout import RunLayout
from pipeline.names import label_problem
from pipeline.reasons import Reason, Status
from pipeline.summary import update_metrics

VERDICTS = ("keep", "relabel", "drop")
CSV_COLUMNS = ("image_id", "verdict", "new_label")  # the CSV's required columns (new_label: for relabel)
MAX_ERRORS = 20  # rows named in one error message
MAX_BYTES = 64 * 2**20  # the largest verdict file read; a larger one is refused, never read whole


class VerdictError(ValueError):
    """A verdict file has rows that cannot be applied; the message names each."""


def overrides_uri(out: str) -> str:
    return RunLayout(out).manifest("overrides")


@dataclass(frozen=True)
class Imported:
    overrides: pd.DataFrame  # every verdict of the run, after the import
    added: int  # verdicts in the file
    unanswered: int  # rows without a verdict (not reviewed yet), left out
    kind: str = ""  # what the file was read as (a verdict CSV, Label Studio's JSON-MIN export, ...)
    precision: dict | None = None  # the review section written to metrics.json


def read_overrides(out: str) -> pd.DataFrame:
    """The run's verdicts; empty (with the schema's columns) when there are none."""
    uri = overrides_uri(out)
    if not storage.exists(uri):
        return pd.DataFrame(columns=manifests.load_schema("overrides").names)
    return manifests.read_manifest("overrides", uri)


def digest(overrides: pd.DataFrame, verdicts: tuple[str, ...]) -> str | None:
    """A short hash of the verdicts of these kinds; None when there are none (keys stay as they were)."""
    rows = overrides[overrides["verdict"].isin(verdicts)]
    if rows.empty:
        return None
    text = json.dumps(sorted(rows[["image_id", "verdict", "new_label"]].astype(str).values.tolist()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_overrides(images: pd.DataFrame, overrides: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drops and relabels applied to the images manifest's ok rows; returns the rows and the counts."""
    images = images.copy()
    if "relabelled_from" not in images:
        images["relabelled_from"] = None
    by_id = overrides.set_index("image_id")
    ok = images["status"] == Status.OK
    drop = ok & images["image_id"].isin(by_id.index[by_id["verdict"] == "drop"])
    images.loc[drop, ["status", "reason", "detail", "split"]] = [
        Status.REJECTED.value, Reason.ANNOTATOR_DROP.value, "dropped by an annotator's verdict", None,
    ]  # fmt: skip
    relabels = by_id.loc[by_id["verdict"] == "relabel", "new_label"]
    move = ok & images["image_id"].isin(relabels.index)
    move &= images["image_id"].map(relabels).ne(images["label"])
    images.loc[move, "relabelled_from"] = images.loc[move, "label"]
    images.loc[move, "label"] = images.loc[move, "image_id"].map(relabels)
    return images, {"dropped": int(drop.sum()), "relabelled": int(move.sum())}


def verified_ids(out: str) -> set[str]:
    """Images a person has checked (kept or relabelled): never blacklisted again."""
    o = read_overrides(out)
    return set(o.loc[o["verdict"].isin(["keep", "relabel"]), "image_id"])


# ------------------------------------------------------------------------------------------ reading


def _shown(value: str, limit: int = 60) -> str:
    """A stranger's text inside a one-line message: quoted, escaped, and cut when long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    """A path as it is, or escaped when it holds characters that would break the message's line."""
    return text if text.isprintable() else _shown(text, 200)


def _file_name(uri: str) -> str:
    return _printable(uri.rsplit("/", 1)[-1])


def _read_capped(uri: str, name: str) -> bytes:
    """The file's bytes, reading no more than ``MAX_BYTES`` (plus one, to tell a larger file)."""
    try:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise VerdictError(f"{_printable(uri)}: no such file") from None
    except IsADirectoryError:
        raise VerdictError(f"{_printable(uri)}: a folder, not a verdict file") from None
    except (OSError, ValueError, ImportError) as exc:  # unreadable, a NUL in the path, an unknown scheme
        raise VerdictError(f"{_printable(uri)}: cannot be read: {_first_line(exc)}") from None
    if len(data) > MAX_BYTES:
        raise VerdictError(f"{name}: larger than {MAX_BYTES:,} bytes, the most a verdict file may hold; "
                           "split it")  # fmt: skip
    return data


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _decoded(data: bytes, name: str) -> str:
    """The file's text: UTF-8 (a byte-order mark is dropped, as spreadsheets write one), or UTF-16 when
    it starts with UTF-16's byte-order mark (a spreadsheet's "Unicode text")."""
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise VerdictError(f"{name}: not {'UTF-16' if utf16 else 'UTF-8'} text (at byte {exc.start}, line "
                           f"{line}); save it as UTF-8") from None  # fmt: skip


def _delimiter(text: str) -> str:
    """Tabs when the header row has one, else commas, whatever the file's name says: Label Studio names
    its TSV download ``.csv``, and a spreadsheet's "Unicode text" is tab-separated."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "\t" if "\t" in first else ","


def _records(text: str, name: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(first line, cells) of every row with a non-blank cell, the header first."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[tuple[int, list[str]]] = []
    line = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append((line, cells))
            line = reader.line_num + 1
    except csv.Error as exc:  # an unclosed quote, a field over csv's size limit, ...
        raise VerdictError(f"{name}: not a readable {kind} at line {line}: {exc}") from None
    if not records:
        raise VerdictError(f"{name}: empty; a verdict {kind} starts with a header row "
                           f"({', '.join(CSV_COLUMNS)})")  # fmt: skip
    return records


def _csv_rows(text: str, name: str) -> tuple[list[dict[str, object]], int, str]:
    """Verdict rows of a CSV or TSV with a header row: a verdict CSV (``image_id``, ``verdict``,
    ``new_label``), or Label Studio's CSV or TSV export (its rows go as the JSON-MIN export's do).
    ``image_id`` and ``new_label`` cells of a verdict CSV lose the quote that the export puts before a
    formula character (``export.spreadsheet_text``), so a class named ``-x`` survives the round trip
    through a spreadsheet."""
    delimiter = _delimiter(text)
    kind = "TSV" if delimiter == "\t" else "CSV"
    records = _records(text, name, delimiter)
    header = [c.strip() for c in records[0][1]]
    flat = "verdict" not in header and labelstudio.is_flat_export(header)
    missing = [c for c in CSV_COLUMNS[:2] if c not in header]
    if missing and not flat:
        hint = f" (the header was read with {'tabs' if kind == 'TSV' else 'commas'})"
        hint = hint if len(header) == 1 and any(c in header[0] for c in ",;\t") else ""
        raise VerdictError(f"{name}: missing columns {missing}{hint}; a verdict {kind} has "
                           f"{', '.join(CSV_COLUMNS)} (new_label for relabel only), Label Studio's {kind} "
                           f"export has {labelstudio.CHOICES}, image_id and annotation_id; found "
                           f"{_shown(str(header[:12]), 200)}")  # fmt: skip
    named = (*labelstudio.FLAT_KEYS, labelstudio.CHOICES, "image_id", "given_label") if flat else ()
    for column in (*CSV_COLUMNS, "annotator", *named):
        if header.count(column) > 1:
            raise VerdictError(f"{name}: the header names column {column!r} twice")
    if len(records) == 1:
        raise VerdictError(f"{name}: a header and no rows")
    for n, cells in records[1:]:
        if any(c.strip() for c in cells[len(header) :]):
            raise VerdictError(f"{name}: line {n} has {len(cells)} cells, the header names {len(header)}")
    if flat:
        rows = [(f"line {n}", {h: cells[i].strip() if i < len(cells) else "" for i, h in enumerate(header)})
                for n, cells in records[1:]]  # fmt: skip
        try:
            answers = labelstudio.flat_answers(rows, f"Label Studio's {kind} export")
        except ValueError as exc:
            raise VerdictError(f"{name}: {exc}") from None
        return _answer_rows(answers, name), answers.unanswered, answers.kind
    at = {c: header.index(c) for c in (*CSV_COLUMNS, "annotator") if c in header}
    rows, unanswered = [], 0
    for n, cells in records[1:]:
        cell = {c: cells[i].strip() if i < len(cells) else "" for c, i in at.items()}
        verdict = cell["verdict"].lower()
        if not verdict:
            unanswered += 1
            continue
        rows.append({"where": f"line {n}", "image_id": export.spreadsheet_text(cell["image_id"]),
                     "verdict": verdict, "new_label": export.spreadsheet_text(cell.get("new_label", ""))
                     or None, "annotator": cell.get("annotator") or None})  # fmt: skip
    return rows, unanswered, f"verdict {kind}"


def _answer_rows(answers: labelstudio.Answers, name: str) -> list[dict[str, object]]:
    """Label Studio answers -> verdict rows: the drop choice drops, the given label keeps, another class
    relabels (``check_rows`` turns a relabel to the image's own label into a keep)."""
    rows = []
    for a in answers.answers:
        image_id = a.data.get("image_id")
        if image_id is not None and not isinstance(image_id, str):
            raise VerdictError(f"{name}: {a.where}: 'image_id' is {labelstudio.json_kind(image_id)}, "
                               "expected text")  # fmt: skip
        given = a.data.get("given_label")
        choice = a.choice
        verdict = "drop" if choice == labelstudio.DROP else "keep" if choice == given else "relabel"
        rows.append({"where": a.where, "image_id": image_id or "", "verdict": verdict,
                     "new_label": choice if verdict == "relabel" else None,
                     "annotator": a.annotator})  # fmt: skip
    return rows


@dataclass(frozen=True)
class VerdictFile:
    rows: list[dict[str, object]]  # {where, image_id, verdict, new_label, annotator}
    unanswered: int  # rows (tasks) without a verdict yet
    kind: str  # what the file was read as, e.g. "Label Studio's JSON-MIN export"


def read_verdict_file(uri: str) -> VerdictFile:
    """The verdict rows of a CSV, a TSV, or a Label Studio export (JSON, JSON-MIN, CSV, TSV), and how
    many rows carry no verdict yet. A file that cannot be read as one raises VerdictError with one line
    naming the file and the problem; a file over ``MAX_BYTES`` is not read beyond it."""
    name = _file_name(uri)
    suffix = uri.lower().rsplit(".", 1)[-1] if "." in uri.rsplit("/", 1)[-1] else ""
    if suffix not in ("json", "csv", "tsv"):
        raise VerdictError(f"{name}: give a .csv or .tsv (image_id, verdict, new_label) or a Label Studio "
                           "export (.json, JSON-MIN, CSV or TSV)")  # fmt: skip
    text = _decoded(_read_capped(uri, name), name)
    if suffix != "json":
        return VerdictFile(*_csv_rows(text, name))
    if not text.strip():
        raise VerdictError(f"{name}: empty; expected Label Studio's JSON export (a list of tasks)")
    try:
        doc = json.loads(text)
    except RecursionError:  # json's parser recurses once per nesting level
        raise VerdictError(f"{name}: not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise VerdictError(f"{name}: not valid JSON: {_first_line(exc)}") from None
    if isinstance(doc, list) and not doc:
        raise VerdictError(f"{name}: no tasks (an empty list)")
    try:
        answers = labelstudio.exported_answers(doc)
    except ValueError as exc:
        raise VerdictError(f"{name}: {exc}") from None
    kind = f"Label Studio's {answers.kind} export"
    return VerdictFile(_answer_rows(answers, name), answers.unanswered, kind)


def check_rows(rows: list[dict[str, object]], images: pd.DataFrame, classes: list[str],
               name: str) -> list[dict[str, object]]:  # fmt: skip
    """Every row's problems, all at once (VerdictError naming them); the rows as overrides otherwise.

    A verdict is about the label the annotator saw (images.parquet's ``label``); an override is about the
    source's label, which the split stage starts from. So the image's right label decides: the source's
    label makes a keep, another class a relabel (a keep of an image relabelled earlier stays a relabel).
    """
    by_id = images.set_index("image_id")
    shown, given = by_id["label"], by_id["relabelled_from"].fillna(by_id["label"])
    known = set(classes)
    listed = ", ".join(_printable(c) for c in classes[:MAX_ERRORS])
    listed += f", ... ({len(classes)} in all)" if len(classes) > MAX_ERRORS else ""
    errors: list[str] = []
    seen: dict[str, tuple[str, str, object]] = {}
    out = []
    for r in rows:
        where, image_id = f"{name} {r['where']}", str(r["image_id"])
        verdict, new = r["verdict"], r["new_label"]
        if image_id not in by_id.index:
            errors.append(f"{where}: unknown image_id {_shown(image_id)} (not in this run's images manifest)")
            continue
        if verdict not in VERDICTS:
            errors.append(
                f"{where} ({image_id}): verdict {_shown(verdict)} is not one of {', '.join(VERDICTS)}"
            )
            continue
        if verdict == "relabel" and not new:
            errors.append(f"{where} ({image_id}): relabel needs new_label")
            continue
        if new and verdict != "relabel":
            errors.append(
                f"{where} ({image_id}): new_label {_shown(new)} goes with relabel only, not {verdict}"
            )
            continue
        problem = label_problem(new) if new else None
        if problem:
            errors.append(f"{where} ({image_id}): new_label {_shown(new)} cannot name a class: {problem}")
            continue
        if new and new not in known:
            errors.append(f"{where} ({image_id}): unknown label {_shown(new)}; the run's classes: {listed}")
            continue
        if verdict != "drop":
            right = new if verdict == "relabel" else shown[image_id]
            verdict, new = ("keep", None) if right == given[image_id] else ("relabel", right)
        if image_id in seen and seen[image_id][1:] != (verdict, new):
            errors.append(f"{where} ({image_id}): contradicts {seen[image_id][0]} ({seen[image_id][1]})")
            continue
        seen[image_id] = (where, str(verdict), new)
        out.append({"image_id": image_id, "verdict": verdict, "new_label": new, "label": shown[image_id],
                    "annotator": r.get("annotator")})  # fmt: skip
    if len(errors) == 1:  # one line
        raise VerdictError(f"{name}: 1 row cannot be applied, nothing was imported: {errors[0]}")
    if errors:
        more = f"\n  ... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise VerdictError(f"{name}: {len(errors)} rows cannot be applied; nothing was imported:\n  "
                           + "\n  ".join(errors[:MAX_ERRORS]) + more)  # fmt: skip
    return out


def run_classes(out: str, images: pd.DataFrame) -> list[str]:
    """The run's classes: those the ensemble was trained on, else the labels of its usable images."""
    uri = RunLayout(out).classes
    if storage.exists(uri):
        try:
            classes = json.loads(storage.read_text(uri))
        except (OSError, ValueError, RecursionError) as exc:
            raise VerdictError(f"{uri}: cannot be read: {_first_line(exc)}") from None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise VerdictError(f"{uri}: expected a JSON list of class names")
        return classes
    return sorted(images.loc[images["status"] == Status.OK, "label"].dropna().unique())


def _run_manifest(name: str, uri: str) -> pd.DataFrame:
    try:
        return manifests.read_manifest(name, uri)
    except (OSError, ValueError) as exc:  # ManifestError, a damaged Parquet file (ArrowInvalid)
        raise VerdictError(f"{uri}: cannot be read: {_first_line(exc)}") from None


def _flags(out: str, old: pd.DataFrame) -> pd.DataFrame:
    """Per image, the score and reason it was flagged with: the blacklist's rows now, else what an earlier
    import kept (the next run no longer lists an image that has a verdict)."""
    columns = ["image_id", "flag_score", "flag_reason"]
    uri = RunLayout(out).manifest("blacklist")
    found = [old.dropna(subset=["flag_score"])[columns]]
    if storage.exists(uri):
        blacklist = _run_manifest("blacklist", uri)
        found.append(blacklist.rename(columns={"score": "flag_score", "reason": "flag_reason"})[columns])
    found = [f for f in found if len(f)]
    if not found:
        return pd.DataFrame(columns=columns).set_index("image_id")
    both = pd.concat(found, ignore_index=True)
    return both.drop_duplicates("image_id", keep="last").set_index("image_id")  # the blacklist's row wins


def import_verdicts(uri: str, out: str, replace: bool = False, users: dict[str, str] | None = None,
                    target_precision: float = review.DEFAULT_TARGET) -> Imported:  # fmt: skip
    """Check the file's verdicts against the run at ``out`` and merge them into its overrides manifest
    (a later verdict on an image replaces an earlier one; ``replace`` drops the earlier ones). All rows
    are checked before anything is written, and the manifest is written atomically. ``users`` (Label
    Studio's user id -> email) names annotators by email. The blacklist's human-confirmed precision
    goes to metrics.json (``review``), for ``target_precision``'s threshold."""
    images_uri = RunLayout(out).manifest("images")
    try:
        ingested = storage.exists(images_uri)
    except (OSError, ValueError) as exc:  # a NUL byte in the path, an unknown scheme
        raise VerdictError(f"{_printable(out)}: cannot be read: {_first_line(exc)}") from None
    if not ingested:
        raise VerdictError(f"{_printable(out)} holds no ingested run (no manifests/images.parquet)")
    images = _run_manifest("images", images_uri)
    if "relabelled_from" not in images:  # written before verdicts existed
        images["relabelled_from"] = None
    read = read_verdict_file(uri)
    checked = check_rows(read.rows, images, run_classes(out, images), _file_name(uri))
    names = manifests.load_schema("overrides").names
    new = pd.DataFrame(checked, columns=["image_id", "verdict", "new_label", "label", "annotator"])
    if users:
        new["annotator"] = new["annotator"].map(lambda a: users.get(a, a) if isinstance(a, str) else a)
    source = uri.rsplit("/", 1)[-1]
    new = new.drop_duplicates("image_id", keep="last").assign(source=source, imported_at=datetime.now(UTC))
    old = _run_manifest("overrides", overrides_uri(out)) if storage.exists(overrides_uri(out)) else None
    # A 1.0 manifest has no flag columns: they come back empty.
    old = (old if old is not None else pd.DataFrame(columns=names)).reindex(columns=names)
    flags = _flags(out, old)
    old = old.iloc[0:0] if replace else old[~old["image_id"].isin(new["image_id"])]
    merged = pd.concat([df for df in (old, new) if len(df)], ignore_index=True) if len(old) else new
    merged = merged.reindex(columns=names).sort_values("image_id").reset_index(drop=True)
    # Every row without a flag takes it from the blacklist (new rows; rows of a 1.0 manifest).
    known = merged["flag_score"].notna()
    score = merged["image_id"].map(flags["flag_score"]).astype(float).round(6)
    merged["flag_score"] = merged["flag_score"].astype(float).where(known, score)
    merged["flag_reason"] = (
        merged["flag_reason"].astype(object).where(known, merged["image_id"].map(flags["flag_reason"]))
    )
    manifests.write_manifest("overrides", merged, overrides_uri(out))
    precision = review.blacklist_precision(merged, target_precision)
    update_metrics(out, review.SECTION, precision)
    return Imported(merged, len(new), read.unanswered, read.kind, precision)
