"""Annotators' verdicts: read a CSV or a Label Studio export, check every row, keep them as the run's
label-overrides manifest (``OUT/manifests/overrides.parquet``), and apply them on the next run.

Three verdicts: ``keep`` (the label is right), ``relabel`` (it is ``new_label``), ``drop`` (the image
leaves the dataset). The split stage applies drops and relabels to the images manifest; the crop stage
never flags a kept or relabelled image again. Each of the two stages adds a digest of the verdicts it
uses to its completion key, so a new verdict re-runs what it changes, and a run without verdicts keeps
the keys it always had.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd

from pipeline import manifests, storage
from pipeline.annotate import labelstudio
from pipeline.reasons import Reason, Status

VERDICTS = ("keep", "relabel", "drop")
CSV_COLUMNS = ("image_id", "verdict", "new_label")  # the CSV's required columns (new_label: for relabel)
MAX_ERRORS = 20  # rows named in one error message


class VerdictError(ValueError):
    """A verdict file has rows that cannot be applied; the message names each."""


def overrides_uri(out: str) -> str:
    return storage.join(out, "manifests", "overrides.parquet")


@dataclass(frozen=True)
class Imported:
    overrides: pd.DataFrame  # every verdict of the run, after the import
    added: int  # verdicts in the file
    unanswered: int  # rows without a verdict (not reviewed yet), left out


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


def _csv_rows(data: bytes, name: str) -> tuple[list[dict[str, object]], int]:
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in CSV_COLUMNS[:2] if c not in frame.columns]
    if missing:
        raise VerdictError(f"{name}: missing columns {missing}; a verdict CSV has {', '.join(CSV_COLUMNS)} "
                           f"(new_label for relabel only); found {list(frame.columns)}")  # fmt: skip
    rows, unanswered = [], 0
    for n, r in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        verdict = str(r["verdict"]).strip().lower()
        if not verdict:
            unanswered += 1
            continue
        rows.append({"where": f"line {n}", "image_id": str(r["image_id"]).strip(), "verdict": verdict,
                     "new_label": str(r.get("new_label") or "").strip() or None,
                     "annotator": str(r.get("annotator") or "").strip() or None})  # fmt: skip
    return rows, unanswered


def _labelstudio_rows(doc: object, labels: pd.Series) -> tuple[list[dict[str, object]], int]:
    """Label Studio answers -> verdicts: the drop choice drops, the given label keeps, another class
    relabels."""
    try:
        answers = labelstudio.exported_answers(doc)
    except ValueError as exc:
        raise VerdictError(str(exc)) from None
    rows = []
    for a in answers:
        image_id = str(a["data"].get("image_id") or "")
        given = a["data"].get("given_label") or labels.get(image_id)
        choice = a["choice"]
        verdict = "drop" if choice == labelstudio.DROP else "keep" if choice == given else "relabel"
        rows.append({"where": f"task {a['row']}", "image_id": image_id, "verdict": verdict,
                     "new_label": choice if verdict == "relabel" else None,
                     "annotator": a["annotator"]})  # fmt: skip
    total = len(doc) if isinstance(doc, list) else 0
    return rows, total - len(answers)


def read_verdict_file(uri: str, images: pd.DataFrame) -> tuple[list[dict[str, object]], int]:
    """Rows ``{where, image_id, verdict, new_label, annotator}`` of a CSV or Label Studio JSON file, and
    how many rows carry no verdict yet."""
    name = uri.rsplit("/", 1)[-1]
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise VerdictError(f"{uri}: no such file") from None
    if uri.lower().endswith(".json"):
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise VerdictError(f"{name}: not valid JSON: {exc}") from None
        return _labelstudio_rows(doc, images.set_index("image_id")["label"])
    if uri.lower().endswith((".csv", ".tsv")):
        return _csv_rows(data, name)
    raise VerdictError(f"{name}: give a .csv (image_id, verdict, new_label) or Label Studio's .json export")


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
    errors: list[str] = []
    seen: dict[str, tuple[str, str, object]] = {}
    out = []
    for r in rows:
        where, image_id = f"{name} {r['where']}", str(r["image_id"])
        verdict, new = r["verdict"], r["new_label"]
        if image_id not in by_id.index:
            errors.append(f"{where}: unknown image_id {image_id!r} (not in this run's images manifest)")
            continue
        if verdict not in VERDICTS:
            errors.append(f"{where} ({image_id}): verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
            continue
        if verdict == "relabel" and not new:
            errors.append(f"{where} ({image_id}): relabel needs new_label")
            continue
        if new and verdict != "relabel":
            errors.append(f"{where} ({image_id}): new_label {new!r} goes with relabel only, not {verdict}")
            continue
        if new and new not in known:
            errors.append(
                f"{where} ({image_id}): unknown label {new!r}; the run's classes: {', '.join(classes)}"
            )
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
    if errors:
        more = f"\n  ... and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        rows_text = f"{len(errors)} row{'s' if len(errors) > 1 else ''}"
        raise VerdictError(f"{name}: {rows_text} cannot be applied; nothing was imported:\n  "
                           + "\n  ".join(errors[:MAX_ERRORS]) + more)  # fmt: skip
    return out


def run_classes(out: str, images: pd.DataFrame) -> list[str]:
    """The run's classes: those the ensemble was trained on, else the labels of its usable images."""
    uri = storage.join(out, "models", "classes.json")
    if storage.exists(uri):
        return list(json.loads(storage.read_text(uri)))
    return sorted(images.loc[images["status"] == Status.OK, "label"].dropna().unique())


def import_verdicts(uri: str, out: str, replace: bool = False) -> Imported:
    """Check the file's verdicts against the run at ``out`` and merge them into its overrides manifest
    (a later verdict on an image replaces an earlier one; ``replace`` drops the earlier ones). All rows
    are checked before anything is written, and the manifest is written atomically."""
    images_uri = storage.join(out, "manifests", "images.parquet")
    if not storage.exists(images_uri):
        raise VerdictError(f"{out} holds no ingested run (no manifests/images.parquet)")
    images = manifests.read_manifest("images", images_uri)
    if "relabelled_from" not in images:  # written before verdicts existed
        images["relabelled_from"] = None
    name = uri.rsplit("/", 1)[-1]
    rows, unanswered = read_verdict_file(uri, images)
    checked = check_rows(rows, images, run_classes(out, images), name)
    new = pd.DataFrame(checked, columns=["image_id", "verdict", "new_label", "label", "annotator"])
    new = new.drop_duplicates("image_id", keep="last").assign(source=name, imported_at=datetime.now(UTC))
    old = read_overrides(out)
    old = old.iloc[0:0] if replace else old[~old["image_id"].isin(new["image_id"])]
    merged = pd.concat([df for df in (old, new) if len(df)], ignore_index=True) if len(old) else new
    merged = merged.sort_values("image_id").reset_index(drop=True)
    manifests.write_manifest("overrides", merged, overrides_uri(out))
    return Imported(merged, len(new), unanswered)
