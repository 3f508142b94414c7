"""Names that come from strangers and become path segments under OUT: class labels, splits, image ids.

A label names a folder (``cropped/<split>/<label>/``) and a file (the report's ``heat/<id>/<label>.png``),
so it must be one path segment that means the same on every filesystem fsspec opens:

- valid UTF-8 (a name read from disk that was not decodes to lone surrogates: refused);
- at least one visible character (not empty, not only spaces or invisible format characters);
- not ``.`` or ``..`` (``...`` and ``a.b`` are ordinary names);
- no ``/`` or ``\\`` (a separator here or on another system);
- no ``::`` (fsspec reads it as a protocol chain and would cut the path there);
- no control characters or line breaks (C0, DEL, C1, U+2028, U+2029): they break logs, CSVs and terminals;
- at most ``MAX_LABEL_BYTES`` bytes of UTF-8 (a file name holds 255; ``.png`` and margin included).

Spaces, accents, emoji and other punctuation are kept as they are (``hot dog``, ``crème_brûlée``). A
label that breaks a rule is refused where it enters, never rewritten: the candidate becomes a
``rejected`` row with reason ``bad_label`` and the original label in its detail (``checked`` in
``pipeline.stages.sources``). The split stage checks again, so a manifest written by an older version or
edited by hand gets the same treatment, and every path builder checks once more (``safe_label``,
``safe_split``, ``safe_id``), raising UnsafeName rather than writing anywhere else.

Splits are ``train``, ``val`` or ``test``. Image ids are made by the code (hex digests); as file names
they must be ASCII letters, digits, ``_`` or ``-``.
"""

from __future__ import annotations

import re
import unicodedata

from pipeline.reasons import Reason

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_LABEL_BYTES = 200
MAX_ID_CHARS = 128
_ID = re.compile(r"[0-9A-Za-z_-]+")
# Characters that end a line or steer a terminal; Cf (format) is allowed: emoji sequences need U+200D.
_CONTROL = frozenset({"Cc", "Zl", "Zp"})
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


class UnsafeName(ValueError):
    """A name that cannot be used as a path segment under OUT; ``reason`` is its Reason code."""

    def __init__(self, message: str, reason: str = Reason.BAD_LABEL) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[UnsafeName], tuple[str, str]]:  # keeps the reason across processes
        return type(self), (str(self), self.reason)


def label_problem(label: object) -> str | None:
    """Why ``label`` cannot name a class folder, or None when it can."""
    if not isinstance(label, str):
        return f"not text ({type(label).__name__})"
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if not label:
        return "empty"
    categories = {unicodedata.category(ch) for ch in label}
    if categories & _CONTROL:
        return "contains control characters"
    if categories <= _INVISIBLE:
        return "no visible character"
    if label in (".", ".."):
        return f"{label!r} names a folder of its own"
    if "/" in label or "\\" in label:
        return "contains a path separator"
    if "::" in label:
        return "contains '::' (a protocol chain to fsspec)"
    if size > MAX_LABEL_BYTES:
        return f"longer than {MAX_LABEL_BYTES} bytes ({size})"
    return None


def split_problem(split: object) -> str | None:
    """Why ``split`` is not a split name, or None when it is one."""
    if not isinstance(split, str) or split not in SPLITS:
        return f"not one of {', '.join(SPLITS)}"
    return None


def id_problem(image_id: object) -> str | None:
    """Why ``image_id`` cannot name a file, or None when it can."""
    if not isinstance(image_id, str) or not _ID.fullmatch(image_id):
        return "not an image id (ASCII letters, digits, _ and - only)"
    if len(image_id) > MAX_ID_CHARS:
        return f"longer than {MAX_ID_CHARS} characters"
    return None


def _checked(value: str, problem: str | None, what: str, reason: Reason) -> str:
    if problem:
        raise UnsafeName(f"{what} {value!r}: {problem}", reason)
    return value


def safe_label(label: str) -> str:
    """``label`` itself, or UnsafeName (reason ``bad_label``) when it cannot be a folder name."""
    return _checked(label, label_problem(label), "label", Reason.BAD_LABEL)


def safe_split(split: str) -> str:
    """``split`` itself, or UnsafeName (reason ``bad_split``) when it is not train, val or test."""
    return _checked(split, split_problem(split), "split", Reason.BAD_SPLIT)


def safe_id(image_id: str) -> str:
    """``image_id`` itself, or UnsafeName (reason ``bad_image_id``) when it cannot be a file name."""
    return _checked(image_id, id_problem(image_id), "image id", Reason.BAD_IMAGE_ID)
