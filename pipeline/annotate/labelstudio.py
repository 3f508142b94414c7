"""Label Studio's formats: the labelling config, import tasks with predictions, and its JSON export.

Import format (one task per image): ``{"data": {"image": URL, ...}, "predictions": [{"model_version",
"score", "result": [...]}]}``; a result of a ``Choices`` control is ``{"from_name": "label", "to_name":
"image", "type": "choices", "value": {"choices": [CLASS]}}``, a ``RectangleLabels`` box gives x, y,
width, height in percent of the image. The JSON export echoes each task's ``data`` and adds
``annotations[].result`` in the same shape; JSON-MIN flattens a task to its data plus one key per control.

Tasks keep the image's label as ``given_label`` (not ``label``): JSON-MIN would mix a data field and the
control of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from xml.sax.saxutils import quoteattr

CHOICES = "label"  # the control annotators answer with: the image's right class, or drop
BOX = "box"  # prelabels: the label-free crop, as a rectangle
IMAGE = "image"
DROP = "__drop__"  # the drop choice's alias: what the export holds when an annotator picks it
DROP_TEXT = "Drop: none of these, or not usable"


def image_url(path: str, prefix: str) -> str:
    """The task's image: ``prefix`` + the path relative to the run folder (see docs/annotators.md)."""
    return f"{prefix}{path}"


def labeling_config(classes: Sequence[str], header: str, boxes: bool = False) -> str:
    """The project's labelling config: the image, a header with the task's facts, one choice per class
    and a drop choice; with ``boxes``, a rectangle control for the crop as well."""
    if DROP in classes:
        raise ValueError(f"a class is named {DROP!r}, the drop choice's alias; rename the class")
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    rect = ""
    if boxes:
        labels = "\n".join(f"    <Label value={quoteattr(c)}/>" for c in classes)
        rect = f'\n  <RectangleLabels name="{BOX}" toName="{IMAGE}">\n{labels}\n  </RectangleLabels>'
    return (
        "<View>\n"
        f"  <Header value={quoteattr(header)}/>\n"
        f'  <Image name="{IMAGE}" value="${IMAGE}" zoomControl="true"/>{rect}\n'
        f'  <Choices name="{CHOICES}" toName="{IMAGE}" choice="single-radio" showInline="true"'
        ' required="true">\n'
        f"{choices}\n"
        f"    <Choice value={quoteattr(DROP_TEXT)} alias={quoteattr(DROP)}/>\n"
        "  </Choices>\n"
        "</View>\n"
    )


def choice_result(label: str) -> dict[str, Any]:
    return {"from_name": CHOICES, "to_name": IMAGE, "type": "choices", "value": {"choices": [label]}}


def box_result(label: str, box: Sequence[int], width: int, height: int) -> dict[str, Any]:
    """A rectangle in Label Studio's units: percent of the image's width and height."""
    x0, y0, x1, y1 = box
    return {
        "from_name": BOX, "to_name": IMAGE, "type": "rectanglelabels",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                  "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]},
    }  # fmt: skip


def task(data: dict[str, Any], model_version: str, score: float | None,
         results: Iterable[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """One import task with one prediction (pre-filled answer) made of ``results``."""
    prediction: dict[str, Any] = {"model_version": model_version, "result": list(results)}
    if score is not None:
        prediction["score"] = float(score)
    return {"data": data, "predictions": [prediction]}


def json_kind(value: Any) -> str:
    """A value's JSON type, for messages: the value itself may be huge or nested too deep to print."""
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _field(item: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``item[key]`` when it has JSON type ``kind``; None when absent or null; ValueError otherwise."""
    value = item.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{where}: {key!r} is {json_kind(value)}, expected {json_kind(kind())}")
    return value


def _order(annotation: dict[str, Any], where: str) -> tuple[str, int]:
    """The key that finds the latest annotation: when it was updated (or created), then its id."""
    when = annotation.get("updated_at") or annotation.get("created_at") or ""
    if not isinstance(when, str):
        raise ValueError(f"{where}: an annotation's updated_at is {json_kind(when)}, expected text")
    number = annotation.get("id") or 0
    if not isinstance(number, int) or isinstance(number, bool):
        raise ValueError(f"{where}: an annotation's id is {json_kind(number)}, expected a whole number")
    return when, number


def _annotator(who: Any, where: str) -> str | None:
    """Who answered: Label Studio's completed_by (a user id, or a user object with an email)."""
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    if who is None:
        return None
    if isinstance(who, bool) or not isinstance(who, str | int | float):
        raise ValueError(f"{where}: the annotator is {json_kind(who)}, expected text or a user id")
    return str(who)


def _one_choice(choice: Any, where: str) -> str | None:
    """A ``Choices`` answer: one class, as text or as a list of one."""
    if isinstance(choice, list):
        if len(choice) != 1:
            raise ValueError(f"{where}: expected one choice in {CHOICES!r}, got {len(choice)}")
        choice = choice[0]
    if choice is None or isinstance(choice, str):
        return choice
    raise ValueError(f"{where}: the choice in {CHOICES!r} is {json_kind(choice)}, expected text")


def exported_answers(doc: Any) -> list[dict[str, Any]]:
    """Label Studio's JSON (or JSON-MIN) export -> per answered task ``{"row", "data", "choice",
    "annotator"}``, ``row`` counting tasks from 1. The latest annotation not cancelled is the answer;
    tasks nobody answered are left out. A file that is neither export, or a task whose fields have the
    wrong JSON types, raises ValueError (one line, naming the task)."""
    if not isinstance(doc, list):
        raise ValueError("expected a JSON list of tasks (Label Studio's JSON or JSON-MIN export)")
    answers = []
    for row, item in enumerate(doc, start=1):
        where = f"task {row}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {json_kind(item)}")
        if "annotations" in item or "data" in item:  # the full JSON export
            data = _field(item, "data", dict, where) or {}
            done = []
            for a in _field(item, "annotations", list, where) or []:
                if not isinstance(a, dict):
                    raise ValueError(f"{where}: an annotation is {json_kind(a)}, expected an object")
                if not a.get("was_cancelled"):
                    done.append(a)
            if not done:
                continue
            latest = max(done, key=lambda a: _order(a, where))
            picked = []
            for r in _field(latest, "result", list, where) or []:
                if not isinstance(r, dict):
                    raise ValueError(f"{where}: a result is {json_kind(r)}, expected an object")
                if r.get("from_name") == CHOICES and r.get("type") == "choices":
                    picked.append(r)
            value = _field(picked[0], "value", dict, where) if picked else None
            choice = value.get("choices") if value else None
            annotator = _annotator(latest.get("completed_by"), where)
        else:  # JSON-MIN: the data's fields and one key per control
            data, choice = item, item.get(CHOICES)
            if choice is None:
                continue
            annotator = _annotator(item.get("annotator"), where)
        choice = _one_choice(choice, where)
        if choice is None:
            continue
        answers.append({"row": row, "data": data, "choice": choice, "annotator": annotator})
    return answers
