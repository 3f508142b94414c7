"""Label Studio's formats: the labelling config, import tasks with predictions, and its exports (JSON,
JSON-MIN, CSV and TSV), as Label Studio 1.23 writes them; and, for the verdict import, its users.

Import format (one task per image): ``{"data": {"image": URL, ...}, "predictions": [{"model_version",
"score", "result": [...]}]}``; a result of a ``Choices`` control is ``{"from_name": "label", "to_name":
"image", "type": "choices", "value": {"choices": [CLASS]}}``, a ``RectangleLabels`` box gives x, y,
width, height in percent of the image.

Exports (``GET /api/projects/<id>/export?exportType=...``, or the UI's *Export*):

- JSON: one item per task: its ``id``, ``data`` and ``annotations[]`` (``completed_by`` a user id,
  ``result`` in the import's shape, ``was_cancelled``, ``updated_at``).
- JSON-MIN: one row per annotation (newest created first; a task nobody answered is one row without
  the control's key): the task's data, ``id`` (the task), one key per control (``label``: the choice),
  ``annotator`` (a user id), ``annotation_id``, ``created_at``, ``updated_at``. Cancelled annotations are
  left out.
- CSV and TSV: the same rows as JSON-MIN, columns sorted by name, every value a cell. Label Studio names
  its TSV download ``.csv`` too.

Tasks keep the image's label as ``given_label`` (not ``label``): the flat exports would mix a data field
and the control of the same name.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import quoteattr

CHOICES = "label"  # the control annotators answer with: the image's right class, or drop
BOX = "box"  # prelabels: the label-free crop, as a rectangle
IMAGE = "image"
DROP = "__drop__"  # the drop choice's alias: what the export holds when an annotator picks it
DROP_TEXT = "Drop: none of these, or not usable"
# Label Studio's editor replaces each match of this in a Header's value with the task's data
# (libs/editor/src/utils/data.js, parseValue): a full stop or bracket right after a name is read as part
# of it, so "$given_label." shows without its full stop.
LS_VARIABLE = re.compile(r"\$[\w[\].{}]+")
# The columns every flat export (JSON-MIN, CSV, TSV) has beside the task's data.
FLAT_KEYS = ("id", "annotator", "annotation_id", "created_at", "updated_at")
EPOCH = datetime.min.replace(tzinfo=UTC)


def image_url(path: str, prefix: str) -> str:
    """The task's image: ``prefix`` + the path relative to the run folder (see docs/annotators.md)."""
    return f"{prefix}{path}"


def header_variables(header: str) -> list[str]:
    """The data fields a Header's value reads, as Label Studio's editor reads them."""
    return [m.group()[1:] for m in LS_VARIABLE.finditer(header)]


def labeling_config(classes: Sequence[str], header: str, boxes: bool = False) -> str:
    """The project's labelling config: the image, a header with the task's facts, one choice per class
    and a drop choice; with ``boxes``, a rectangle control for the crop as well. A header whose variables
    Label Studio would read with a following full stop or bracket is refused: it would not render as
    written."""
    if DROP in classes:
        raise ValueError(f"a class is named {DROP!r}, the drop choice's alias; rename the class")
    glued = [v for v in header_variables(header) if not v.isidentifier()]
    if glued:
        raise ValueError(f"header {header!r}: Label Studio reads ${glued[0]} as one name; put a space or "
                         "other punctuation after the variable")  # fmt: skip
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


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, int) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(item: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``item[key]`` when it has JSON type ``kind``; None when absent or null; ValueError otherwise."""
    value = item.get(key)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{where}: {key!r} is {json_kind(value)}, expected {json_kind(kind())}")
    return value


def _task_id(value: Any, where: str) -> int | str | None:
    """Label Studio's task id: a number in JSON, a cell of digits in CSV; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{where}: the task id is {json_kind(value)}, expected a number")
    return value


def _where(place: str, task_id: int | str | None) -> str:
    """Where a row is: its place in the file and, when the file says, Label Studio's task id."""
    return place if task_id is None else f"{place} (Label Studio task {_short(task_id)})"


def _when(value: Any, where: str) -> datetime:
    """An annotation's ``updated_at`` (or ``created_at``) as a time; the earliest time when absent."""
    if value is None or value == "":
        return EPOCH
    if not isinstance(value, str):
        raise ValueError(f"{where}: an annotation's updated_at is {json_kind(value)}, expected text")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{where}: updated_at {_short(value)} is not a date and time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # Label Studio writes UTC


def _annotation_number(value: Any, where: str) -> int:
    """An annotation's id, which breaks ties between equal times; 0 when absent."""
    if value is None or value == "":
        return 0
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: an annotation's id is {json_kind(value)}, expected a whole number")
    return value


def _order(annotation: dict[str, Any], where: str, number_key: str = "id") -> tuple[datetime, int]:
    """The key that finds the latest annotation: when it was updated (or created), then its id."""
    when = annotation.get("updated_at") or annotation.get("created_at")
    return _when(when, where), _annotation_number(annotation.get(number_key), where)


def _annotator(who: Any, where: str) -> str | None:
    """Who answered: Label Studio's completed_by or annotator (a user id, or a user object with an
    email)."""
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    if who is None or who == "":
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
        return choice or None
    raise ValueError(f"{where}: the choice in {CHOICES!r} is {json_kind(choice)}, expected text")


@dataclass(frozen=True)
class Answer:
    """One task's answer: the latest annotation not cancelled."""

    where: str  # e.g. "row 3 (Label Studio task 17)": the place in the file, then Label Studio's id
    data: dict[str, Any]  # the task's data as exported (image_id, given_label, ...)
    choice: str  # a class, or DROP
    annotator: str | None  # a user id or an email, as the export gives it


@dataclass(frozen=True)
class Answers:
    answers: list[Answer]
    unanswered: int  # tasks in the file without an answer
    kind: str  # JSON, JSON-MIN, CSV or TSV


def _full_task(item: dict[str, Any], place: str) -> Answer | None:
    """A task of the JSON export: its latest annotation not cancelled, or None."""
    where = _where(place, _task_id(item.get("id"), place))
    data = _field(item, "data", dict, where) or {}
    done = []
    for a in _field(item, "annotations", list, where) or []:
        if not isinstance(a, dict):
            raise ValueError(f"{where}: an annotation is {json_kind(a)}, expected an object")
        if not a.get("was_cancelled"):
            done.append(a)
    if not done:
        return None
    latest = max(done, key=lambda a: _order(a, where))
    picked = []
    for r in _field(latest, "result", list, where) or []:
        if not isinstance(r, dict):
            raise ValueError(f"{where}: a result is {json_kind(r)}, expected an object")
        if r.get("from_name") == CHOICES and r.get("type") == "choices":
            picked.append(r)
    value = _field(picked[0], "value", dict, where) if picked else None
    choice = _one_choice(value.get("choices") if value else None, where)
    if choice is None:
        return None
    return Answer(where, data, choice, _annotator(latest.get("completed_by"), where))


def flat_answers(records: Iterable[tuple[str, dict[str, Any]]], kind: str) -> Answers:
    """Answers of a flat export (JSON-MIN, CSV, TSV): ``records`` are (place in the file, row). Rows of
    one task (Label Studio's ``id``) are its annotations; the one updated last counts (then the highest
    ``annotation_id``); a task whose rows carry no choice is unanswered. Rows without a task id are
    tasks of their own."""
    tasks: dict[tuple[str, Any], list[tuple[str, dict[str, Any]]]] = {}
    for place, record in records:
        task_id = _task_id(record.get("id"), place)
        key = ("task", task_id) if task_id is not None else ("row", place)
        tasks.setdefault(key, []).append((_where(place, task_id), record))
    answers, unanswered = [], 0
    for rows in tasks.values():
        answered = []
        for where, record in rows:
            choice = _one_choice(record.get(CHOICES), where)
            if choice is not None:
                answered.append((where, record, choice))
        if not answered:
            unanswered += 1
            continue
        where, record, choice = max(answered, key=lambda a: _order(a[1], a[0], "annotation_id"))
        answers.append(Answer(where, record, choice, _annotator(record.get("annotator"), where)))
    return Answers(answers, unanswered, kind)


def is_flat_export(columns: Iterable[str]) -> bool:
    """Whether a CSV's or TSV's header is Label Studio's export (rather than a verdict CSV)."""
    names = set(columns)
    return {CHOICES, "image_id", "annotation_id"} <= names


def exported_answers(doc: Any) -> Answers:
    """Label Studio's JSON or JSON-MIN export -> the answered tasks, and how many are unanswered. A file
    that is neither export, or a row whose fields have the wrong JSON types, raises ValueError (one line,
    naming the row and Label Studio's task id)."""
    if not isinstance(doc, list):
        raise ValueError("expected a JSON list of tasks (Label Studio's JSON or JSON-MIN export)")
    for row, item in enumerate(doc, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"row {row}: expected an object, got {json_kind(item)}")
    if any("annotations" in item or "data" in item for item in doc):  # the full JSON export
        answers, unanswered = [], 0
        for row, item in enumerate(doc, start=1):
            answer = _full_task(item, f"row {row}")
            if answer is None:
                unanswered += 1
            else:
                answers.append(answer)
        return Answers(answers, unanswered, "JSON")
    return flat_answers(((f"row {row}", item) for row, item in enumerate(doc, start=1)), "JSON-MIN")


# ------------------------------------------------------------------------------------- the server

MAX_RESPONSE = 16 * 2**20  # the most read of one API answer


class LabelStudioError(ValueError):
    """Label Studio's API could not be used: unreachable, the token refused, an answer not understood."""


def _request(url: str, headers: dict[str, str], body: dict[str, Any] | None, timeout: float) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": "application/json", **headers}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code in (401, 403):
            hint = (": the token was refused (a legacy token works only where the organization allows them, "
                    "e.g. label-studio start --enable-legacy-api-token; else give a personal access token "
                    "from Account & Settings)")  # fmt: skip
        raise LabelStudioError(f"{url}: HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise LabelStudioError(f"{url}: cannot reach Label Studio: {reason}") from None
    if len(raw) > MAX_RESPONSE:
        raise LabelStudioError(f"{url}: the answer is larger than {MAX_RESPONSE:,} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise LabelStudioError(f"{url}: the answer is not JSON; is this Label Studio's address?") from None


def auth_header(url: str, token: str, timeout: float = 30) -> dict[str, str]:
    """The Authorization header for Label Studio's API. A personal access token (Label Studio 1.2x's
    default: a JWT refresh token) is exchanged for an access token; any other token is a legacy token."""
    if token.count(".") == 2:
        doc = _request(f"{url.rstrip('/')}/api/token/refresh/", {}, {"refresh": token}, timeout)
        access = doc.get("access") if isinstance(doc, dict) else None
        if not isinstance(access, str):
            raise LabelStudioError(f"{url}: the personal access token was not exchanged for an access token")
        return {"Authorization": f"Bearer {access}"}
    return {"Authorization": f"Token {token}"}


def user_emails(url: str, token: str, timeout: float = 30) -> dict[str, str]:
    """Label Studio's users: id (as text, as exports name annotators) -> email."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise LabelStudioError(f"{url}: give Label Studio's http:// or https:// address")
    doc = _request(f"{url.rstrip('/')}/api/users/", auth_header(url, token, timeout), None, timeout)
    users = doc.get("results") if isinstance(doc, dict) else doc  # a page, in case a version pages it
    if not isinstance(users, list):
        raise LabelStudioError(f"{url}/api/users/: expected a list of users, got {json_kind(users)}")
    found = {}
    for u in users:
        if isinstance(u, dict) and isinstance(u.get("id"), int) and isinstance(u.get("email"), str):
            found[str(u["id"])] = u["email"]
    return found
