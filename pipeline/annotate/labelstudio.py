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


def exported_answers(doc: Any) -> list[dict[str, Any]]:
    """Label Studio's JSON (or JSON-MIN) export -> per answered task ``{"row", "data", "choice",
    "annotator"}``, ``row`` counting tasks from 1. The latest annotation not cancelled is the answer;
    tasks nobody answered are left out. A file that is neither export raises ValueError."""
    if not isinstance(doc, list):
        raise ValueError("expected a JSON list of tasks (Label Studio's JSON or JSON-MIN export)")
    answers = []
    for row, item in enumerate(doc, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"task {row}: expected an object, got {type(item).__name__}")
        if "annotations" in item or "data" in item:  # the full JSON export
            data = item.get("data") or {}
            done = [a for a in item.get("annotations") or [] if not a.get("was_cancelled")]
            if not done:
                continue
            latest = max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                              a.get("id") or 0))  # fmt: skip
            picked = [r for r in latest.get("result") or []
                      if r.get("from_name") == CHOICES and r.get("type") == "choices"]  # fmt: skip
            choice = (picked[0].get("value") or {}).get("choices") if picked else None
            who = latest.get("completed_by")
            annotator = who.get("email") if isinstance(who, dict) else who
        else:  # JSON-MIN: the data's fields and one key per control
            data, choice, annotator = item, item.get(CHOICES), item.get("annotator")
            if choice is None:
                continue
        if isinstance(choice, list):
            if len(choice) != 1:
                raise ValueError(f"task {row}: expected one choice in {CHOICES!r}, got {choice}")
            choice = choice[0]
        if choice is None:
            continue
        answers.append({"row": row, "data": data, "choice": str(choice),
                        "annotator": None if annotator is None else str(annotator)})  # fmt: skip
    return answers
